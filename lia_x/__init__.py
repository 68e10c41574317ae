"""LIA-X face renderer (pure PyTorch): motion latents <-> 512x512 frames of one identity.

    from lia_x import load_generator
    from lia_x.render import render_frames, extract_motion
"""
from pathlib import Path

import torch

from common.safe_load import key_report, safe_torch_load

from .networks.generator import Generator
from .networks.ops import EqualConv2d, ModulatedConv2d

RELEASE_CONFIG = dict(style_dim=512, motion_dim=40, scale=2)
TINY_CONFIG = dict(style_dim=64, motion_dim=40, scale=1, size=128, channels=(32, 32, 16, 16),
                   n_blocks=1, norm_groups=8)

__all__ = ["Generator", "load_generator", "tiny_generator", "cast_conv_weights",
           "RELEASE_CONFIG", "TINY_CONFIG"]


def cast_conv_weights(generator: Generator, dtype: torch.dtype) -> Generator:
    """Store the convolution weights (>99% of the parameters) in `dtype`, in place; style,
    motion, normalisation and bias parameters stay float32."""
    for m in generator.modules():
        if isinstance(m, (EqualConv2d, ModulatedConv2d)):
            m.weight.data = m.weight.data.to(dtype)
    return generator


def load_generator(ckpt_path, device="cpu", dtype=torch.float32, **config) -> Generator:
    """Strictly load lia-x.pt (a plain state dict saved with torch.save) into
    Generator(style_dim=512, motion_dim=40, scale=2) (override with **config).

    Built on the meta device and loaded with assign=True from a memory-mapped file, so the
    3.6 GB of weights are not held twice. dtype: storage dtype of the convolution weights
    (torch.bfloat16 halves memory and suits bf16 rendering); other parameters stay float32.
    Raises FileNotFoundError, or ValueError naming the file when it is not a LIA-X state dict."""
    path = Path(ckpt_path)
    state = safe_torch_load(path, "LIA-X checkpoint")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a LIA-X state dict (expected a flat dict of tensors, "
                         f"got {type(state).__name__})")
    cfg = {**RELEASE_CONFIG, **config}
    with torch.device("meta"):
        generator = Generator(**cfg)
    expected = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    report = key_report(expected, {k: tuple(v.shape) for k, v in state.items()})
    if not report.ok():
        raise ValueError(f"{path}: {report.message('LIA-X generator')}")
    not_float = [k for k in expected if not state[k].is_floating_point()]
    if not_float:
        raise ValueError(f"{path}: {len(not_float)} tensors are not floating point (e.g. {not_float[:3]})")
    state = {k: v if v.dtype == torch.float32 else v.float() for k, v in state.items()}
    generator.load_state_dict(state, strict=True, assign=True)
    generator.requires_grad_(False).eval()
    cast_conv_weights(generator, dtype)
    return generator.to(device)


def tiny_generator(seed: int = 0, **overrides) -> Generator:
    """A small randomly initialised Generator (TINY_CONFIG: 128x128 frames, narrow layers)
    for tests and offline demos; the global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(**{**TINY_CONFIG, **overrides})
    return generator.requires_grad_(False).eval()
