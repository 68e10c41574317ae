"""Parity of the patch encoder with the reference fixture, plus RoPE/RMSNorm facts."""
import math

import torch
from conftest import load_fixture, max_rel_err

from llama4nar import PatchEncoder, RMSNorm, RoPE


def _sub(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_patch_encoder_parity():
    tensors, meta = load_fixture("llm", "patch_encoder")
    module = PatchEncoder(**meta["constructor"]).eval()
    module.load_state_dict(_sub(tensors, "weights."), strict=True)
    with torch.no_grad():
        y = module(tensors["inputs.x"])
    err = max_rel_err(y, tensors["outputs.y"])
    print(f"patch_encoder max_rel_err={err:.3e}")
    assert y.shape == tensors["outputs.y"].shape
    assert err < 1e-5


def test_rope_table_matches_fixture_and_rotates_adjacent_pairs():
    tensors, _ = load_fixture("llm", "patch_encoder")
    rope = RoPE(16)
    assert torch.equal(rope.w, tensors["weights.rope.w"])
    x = torch.zeros(1, 3, 1, 16)
    x[..., 0] = 1.0  # pair (0, 1), frequency 1
    y = rope(x)
    for pos in range(3):
        assert math.isclose(float(y[0, pos, 0, 0]), math.cos(pos), abs_tol=1e-6)
        assert math.isclose(float(y[0, pos, 0, 1]), math.sin(pos), abs_tol=1e-6)
    assert y[..., 2:].abs().max() == 0


def test_rmsnorm_weight_name_and_value():
    norm = RMSNorm(4)
    assert list(norm.state_dict()) == ["scale"]
    x = torch.tensor([[3.0, -3.0, 3.0, -3.0]])
    assert torch.allclose(norm(x), x / 3.0, atol=1e-6)
