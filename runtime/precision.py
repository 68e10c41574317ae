"""Which floating-point precision `auto` means on this machine: bfloat16 where the hardware runs it natively.

    native_bf16(device)          -> (bool, reason)
    resolve_dtype(name, device)  -> (torch.dtype, reason)      name: 'auto' | 'float32' | 'bfloat16'

CUDA: bfloat16 (the reference runs its backbone under bf16 autocast; the renderer too where the GPU has native
bf16, compute capability 8.0+). CPU: bfloat16 only when the CPU has native bf16 instructions (x86 AVX512-BF16
or AMX-BF16, from torch's cpuinfo and /proc/cpuinfo; aarch64 BF16) *and* a probe finds a bf16 GEMM at the
loop's shape (16 x 1024 x 3072, on one core, through the loop's packed oneDNN kernel) faster than float32
(~0.2 s, once per process). Elsewhere float32: without native instructions bf16 is emulated and 2-3x
slower. TALKER_BF16_PROBE=0 skips the probe and trusts the CPU flags.
"""
import os
import platform
import time
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

PROBE_ENV = "TALKER_BF16_PROBE"
PROBE_SHAPE = (16, 1024, 3072)  # rows x in x out: one head's GEMM in a patch (the CFG pair x ~8 positions)
MIN_SPEEDUP = 1.1  # bf16 must beat float32 by this much (no native bf16: 0.3-0.5x; native: 1.7-2.2x)
NAMES = ("auto", "float32", "bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set:
    """The first CPU's feature flags (x86 'flags', aarch64 'Features'); empty where there is no such file."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _torch_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)  # torch's cpuinfo (x86), present in torch >= 2.3
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001 - a hint only
        return False


def cpu_bf16_features() -> list:
    """Native bf16 instruction sets of this CPU, e.g. ['AVX512-BF16'] or ['AVX512-BF16', 'AMX-BF16'];
    [] where there are none (bf16 is then emulated in float32 arithmetic)."""
    flags = _proc_cpuinfo_flags()
    found = []
    if "avx512_bf16" in flags or _torch_flag("_is_avx512_bf16_supported"):
        found.append("AVX512-BF16")
    if "amx_bf16" in flags or _torch_flag("_is_amx_tile_supported"):
        found.append("AMX-BF16")
    if platform.machine().lower() in ("aarch64", "arm64") and ({"bf16", "svebf16"} & flags):
        found.append("ARM BF16")
    return found


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()  # the SIMD level torch's kernels use: AVX2, AVX512 ...
    except Exception:  # noqa: BLE001
        return "unknown"


def _best_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _kernel(x, w):
    """y = x w^T as the loop runs its heads' linear layers on CPU: oneDNN on a packed weight (F.linear where
    this torch has no oneDNN)."""
    from common import packed_linear

    if not packed_linear.available():
        return lambda: F.linear(x, w)
    packed = packed_linear.pack(w, x.shape[0])
    return lambda: packed_linear.packed_linear(x, packed)


@lru_cache(maxsize=None)
def _probe() -> Tuple[float, float]:
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)  # its own generator: the global RNG (the loop's noise) does not move
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the ratio is the core's; threads on a shared machine only add noise
    try:
        with torch.inference_mode():
            runs = {dtype: _kernel(x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
            for fn in runs.values():
                fn()  # first calls: oneDNN picks and JIT-compiles its kernels
            best = {dtype: float("inf") for dtype in runs}
            for _ in range(4):  # alternated: a busy machine slows both alike
                for dtype, fn in runs.items():
                    best[dtype] = min(best[dtype], _best_ms(fn, 2))
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32], best[torch.bfloat16]


def probe_bf16_speedup() -> Tuple[float, float, float]:
    """(float32 ms, bfloat16 ms, speedup) of one GEMM at PROBE_SHAPE on one core through the loop's CPU kernel,
    best of 8 alternated calls each; measured once per process (~0.2 s, most of it packing the weights)."""
    t32, t16 = _probe()
    return t32, t16, t32 / t16


def _probe_enabled() -> bool:
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def native_bf16(device) -> Tuple[bool, str]:
    """(whether bf16 runs natively and faster than float32 on `device`, why), the reason as the summary
    line shows it, e.g. 'CPU has AVX512-BF16, bf16 GEMM 2.1x float32'."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return True, f"CUDA sm_{major}{minor} has native bf16"
        return False, f"CUDA sm_{major}{minor} has no native bf16 (8.0+)"
    if device.type != "cpu":
        return False, f"{device.type}: float32"
    features = cpu_bf16_features()
    if not features:
        return False, f"CPU ({_cpu_capability()}) has no native bf16 (AVX512-BF16, AMX or ARM BF16)"
    has = f"CPU has {'/'.join(features)}"
    if not _probe_enabled():
        return True, f"{has}; probe off ({PROBE_ENV}=0)"
    _, _, speedup = probe_bf16_speedup()
    if speedup < MIN_SPEEDUP:
        return False, f"{has} but a bf16 GEMM ran only {speedup:.2f}x float32"
    return True, f"{has}, bf16 GEMM {speedup:.1f}x float32"


def resolve_dtype(name, device, part: str = "loop") -> Tuple[torch.dtype, str]:
    """'auto' | 'float32' | 'bfloat16' (or a torch.dtype, or None = 'auto') -> (dtype, reason).

    part: 'loop' (the SpeechLLM's backbone and heads) or 'render' (the LIA-X decoder's convolutions). auto:
    bfloat16 where native_bf16(device); on CUDA the loop is bf16 in any case (the reference's autocast)."""
    if isinstance(name, torch.dtype):
        return name, "requested"
    name = "auto" if name is None else str(name).removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name], "requested"
    if name != "auto":
        raise ValueError(f"expected one of {', '.join(NAMES)}, got {name!r}")
    device = torch.device(device)
    if device.type == "cuda" and part == "loop":
        return torch.bfloat16, "auto: CUDA, bf16 autocast as the reference"
    native, why = native_bf16(device)
    return (torch.bfloat16 if native else torch.float32), f"auto: {why}"


def describe(dtype: torch.dtype, reason: Optional[str]) -> str:
    """'bfloat16 (auto: CPU has AVX512-BF16, bf16 GEMM 2.1x float32)'."""
    name = str(dtype).removeprefix("torch.")
    return f"{name} ({reason})" if reason else name


def summary_note(loop: Tuple[torch.dtype, str], render: Optional[Tuple[torch.dtype, str]] = None) -> str:
    """The precision part of the summary line: one phrase when loop and renderer agree, else both."""
    if render is None:
        return f"loop {describe(*loop)}"
    if loop == render:
        return f"loop and render {describe(*loop)}"
    return f"loop {describe(*loop)}, render {describe(*render)}"
