"""CPU linear layers through oneDNN with their weights packed once.

At the diffusion heads' shape (~20 rows x 1024 x 1024-2730 per Euler step) `F.linear` on CPU goes to
MKL's GEMM, which re-packs the weight at every call: at 20 rows it reaches 80-100 GFLOP/s on an Intel
Xeon (Ice Lake, 2 cores) against 115-135 for oneDNN with the weight packed beforehand (the kernels torch
itself uses for frozen CPU inference graphs), and an earlier measurement on an AMD EPYC (Zen 4) found
45 against ~135. At one row (the backbone's step, a memory-bound GEMV) packing gains nothing. Packing
changes only the summation order (~1e-6 relative).

`install(module, rows_hint)` turns every nn.Linear of `module` into a PackedLinear (same parameters and
state dict), whose forward packs the weight on its first call without grad and keeps the packed copy
beside it (not in the state dict, not moved by `.to()`, dropped by deepcopy and pickle). It repacks when
the weight changes (load_state_dict, `.to(dtype)`) and calls F.linear whenever the packed kernel is not
the same computation: grad needed, not on CPU, a dtype mismatch outside autocast, or an autocast to
another dtype. `uninstall(module)` turns them back into nn.Linear and frees the packed copies. The cost:
one more copy of each packed weight in memory.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("auto", "on", "off")
# 'auto' packs only weights of at least this many elements (512 x 1024): a packed call costs ~40 us more than
# F.linear's ~10 us (measured on the Xeon), which small layers (the tiny demo model's, the heads' input and
# output projections) never win back; at 20 rows packing pays from ~256 x 256, at 5 rows from ~1024 x 1024.
AUTO_MIN_WEIGHT_NUMEL = 512 * 1024
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@lru_cache(maxsize=None)
def available() -> bool:
    """oneDNN is in this torch build and its packed linear runs here (and gives F.linear's numbers)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # fixed values, not torch.randn: the probe must not move the global RNG the loop's noise comes from
        w = torch.linspace(-1, 1, 8 * 16).reshape(8, 16).sin()
        x = torch.linspace(-2, 2, 3 * 16).reshape(3, 16).cos()
        y = packed_linear(x, pack(w, 3))
        return bool(torch.allclose(y, F.linear(x, w), rtol=1e-4, atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def resolve(mode: str, device: torch.device) -> bool:
    """'auto' -> on for CPU when oneDNN is available; 'on' where it cannot run is an error."""
    if mode not in MODES:
        raise ValueError(f"packed linear mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return False
    usable = torch.device(device).type == "cpu" and available()
    if mode == "on" and not usable:
        why = "oneDNN is not available in this torch build" if not available() else f"the model is on {device}"
        raise ValueError(f"packed linear layers need a CPU with oneDNN ({why})")
    return usable


def pack(weight_oi: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """An opaque oneDNN copy of a linear weight (out, in), blocked for calls of about `rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_oi, rows_hint)


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ W^T + b with W given as pack(W): F.linear's numbers up to the summation order."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose no-grad CPU forward uses a packed copy of its
    weight. install() turns nn.Linear layers into this class in place; uninstall() turns them back."""
    rows_hint: int = 1
    _packed = None  # (weight key, packed weight), made on first use; never saved, copied or pickled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not _same_computation(x, w, self.bias):
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._packed is None or self._packed[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and out of inference mode
                self._packed = (key, pack(w.detach(), self.rows_hint))
        return packed_linear(x.to(w.dtype), self._packed[1], self.bias)

    def __getstate__(self):  # deepcopy and pickle: the packed copy is an opaque oneDNN tensor; the copy repacks
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def install(module: nn.Module, rows_hint: int, min_weight_numel: int = 0) -> int:
    """Packed forwards on every nn.Linear of `module` whose weight has at least `min_weight_numel` elements
    (smaller ones are left as, or turned back into, nn.Linear); rows_hint: the rows a typical call has
    (oneDNN picks the weight's blocking for it). Idempotent. Returns how many layers have it."""
    n = 0
    for layer in module.modules():
        if type(layer) not in (nn.Linear, PackedLinear):
            continue
        if layer.weight.numel() < min_weight_numel:
            _unpack(layer)
            continue
        if type(layer) is nn.Linear or layer.rows_hint != rows_hint:
            layer.__class__ = PackedLinear
            layer.rows_hint, layer._packed = rows_hint, None
        n += 1
    return n


def uninstall(module: nn.Module) -> None:
    for layer in module.modules():
        _unpack(layer)


def _unpack(layer: nn.Module) -> None:
    if type(layer) is PackedLinear:
        layer.__class__ = nn.Linear
        for attr in ("rows_hint", "_packed"):
            layer.__dict__.pop(attr, None)


def packed_bytes(module: nn.Module) -> int:
    """Memory held by the packed copies now (they are made on first use)."""
    return sum(layer._packed[1].dtype.itemsize * layer._packed[1].numel() for layer in module.modules()
               if type(layer) is PackedLinear and layer._packed is not None)


def _same_computation(x: torch.Tensor, w: torch.Tensor, bias) -> bool:
    if x.device.type != "cpu" or w.device.type != "cpu" or w.dtype not in PACKABLE_DTYPES or x.dim() < 2:
        return False
    if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        return False
    if bias is not None and bias.dtype != w.dtype:
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast computes linear in its dtype: only w's dtype is the same
        return torch.get_autocast_dtype("cpu") == w.dtype
    return x.dtype == w.dtype
