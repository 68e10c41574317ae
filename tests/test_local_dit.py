"""Parity of the DiT velocity estimator with the reference fixture."""
import pytest
import torch
from conftest import load_fixture, max_rel_err

from llama4nar import DecoderConfig
from local_dit import VoxCPMLocDiT


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_local_dit_parity(case):
    tensors, meta = load_fixture("llm", "local_dit")
    ctor = meta["constructor"]
    module = VoxCPMLocDiT(DecoderConfig(**ctor["config"]["DecoderConfig"]), in_channels=ctor["in_channels"],
                          global_cond_channels=ctor["global_cond_channels"]).eval()
    module.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("weights.")}, strict=True)
    inp = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
    with torch.no_grad():
        y = module(inp["x"], inp["mu"], inp["t"], inp["cond"], inp["global_cond"], inp["dt"])
    expected = tensors[f"{case}.outputs.y"]
    err = max_rel_err(y, expected)
    print(f"local_dit {case} max_rel_err={err:.3e}")
    assert y.shape == expected.shape
    assert err < 1e-5
