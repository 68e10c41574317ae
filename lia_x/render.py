"""Rendering 40-d LIA-X motion to frames, and extracting motion from frames.

render_frames mirrors upstream infer.render_motion_to_video: the reference image is
resized to the generator size with area interpolation, scaled to [-1, 1] and encoded once
(identity code z_s2r + feature maps); frame t = dec(z_s2r + direction(motion_t)), clamped and
mapped to uint8 by truncation. Frames are decoded in batches that share the feature maps.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch

from .networks.generator import Generator
from .networks.ops import channels_last_weights_

# CPU batch caps. One frame already keeps the cores busy in every large convolution; batching
# only amortises the small low-resolution layers, while the elementwise passes fall out of
# cache (measured, 2 cores: float32 22.5 -> 20.9 s/frame at batch 4; bf16 4.75 -> 5.5 at 2).
MAX_CPU_BATCH = {torch.float32: 4}
MAX_CPU_BATCH_OTHER = 1
NEVER = 1 << 30  # channels_last_from value meaning "default layout everywhere"


# ----------------------------------------------------------------------------- image prep

def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) resampling matrix of OpenCV INTER_AREA along one axis.

    Downscaling: each output pixel averages the input pixels its footprint covers, weighted
    by the covered fraction. Upscaling: OpenCV's area-upscale taps, fx = (d+1) - (s+1)*out/in
    clipped into [0, 1) between input pixels s and s+1 (edge replicated)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if n_out <= n_in:
        for d in range(n_out):
            lo, hi = d * scale, (d + 1) * scale
            for s in range(int(math.floor(lo)), min(n_in, int(math.ceil(hi)))):
                m[d, s] = (min(hi, s + 1) - max(lo, s)) / scale
        return m
    inv = n_out / n_in
    for d in range(n_out):
        s = int(math.floor(d * scale))
        fx = (d + 1) - (s + 1) * inv
        fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        m[d, min(s, n_in - 1)] += 1 - fx
        m[d, min(s + 1, n_in - 1)] += fx
    return m


def resize_area(rgb_u8, size: int) -> np.ndarray:
    """cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA) without OpenCV.

    Identity when the image already has that size. Integer downscale factors reduce to
    block averaging (also what F.interpolate(mode="area") computes); other factors use
    fractional-overlap weights. Results are rounded to nearest (ties to even, as cvRound);
    for an exact 2x downscale OpenCV's fast path rounds ties up, which is mirrored. Float
    accumulation order differs from OpenCV, so a value landing exactly near .5 may differ
    by one level; upscaling uses OpenCV's INTER_AREA taps in float, not its fixed point."""
    img = np.asarray(rgb_u8)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if h == 2 * size and w == 2 * size:
        s = img.reshape(size, 2, size, 2, 3).astype(np.int32).sum((1, 3))
        return ((s + 2) >> 2).astype(np.uint8)
    if h % size == 0 and w % size == 0:  # integer factors: block mean
        fh, fw = h // size, w // size
        mean = img.reshape(size, fh, size, fw, 3).mean((1, 3))
        return np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    wh, ww = _area_weights(h, size), _area_weights(w, size)
    out = np.einsum("ph,hwc,qw->pqc", wh, img.astype(np.float64), ww, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def prepare_image(rgb_u8, size: int = 512) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32 in [-1, 1] (x / 127.5 - 1)."""
    img = resize_area(rgb_u8, size)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 127.5 - 1.0


def _prepare_batch(frames_u8, size: int) -> torch.Tensor:
    return torch.cat([prepare_image(f, size) for f in frames_u8])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output -> (B, H, W, 3) uint8: clamp, (x+1)/2*255 in float32, truncate."""
    x = images.detach().float().clamp(-1, 1)
    x = ((x + 1) / 2 * 255).permute(0, 2, 3, 1)
    return x.to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- batching

def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def frame_bytes(generator: Generator, dtype=torch.float32, encoder=False) -> int:
    """Rough peak working memory per frame (dominated by the top-resolution activations)."""
    size = generator.size
    widths = generator.dims.widths()
    item = torch.finfo(dtype).bits // 8
    if encoder:  # block2's first conv doubles the width at full resolution
        return 8 * widths[size // 2] * size * size * 4
    return 12 * widths[size] * size * size * max(item, 2) + 4 * widths[size] * size * size * 4


def choose_batch_size(generator: Generator, device=None, dtype=torch.float32, encoder=False) -> int:
    """Frames per batch from free memory (half of it), capped (CPU: MAX_CPU_BATCH)."""
    device = torch.device(device or next(generator.parameters()).device)
    n = _available_bytes(device) // 2 // frame_bytes(generator, dtype, encoder)
    cap = 32 if device.type == "cuda" else MAX_CPU_BATCH.get(dtype, MAX_CPU_BATCH_OTHER)
    return int(max(1, min(cap, n)))


# ----------------------------------------------------------------------------- rendering

def default_channels_last_from(dtype: torch.dtype) -> int:
    """float32/64: never channels-last (parity); 16-bit: always (oneDNN AMX bf16 kernels)."""
    return NEVER if dtype in (torch.float32, torch.float64) else 4


def prepare_generator(generator: Generator, channels_last_from: Optional[int] = None) -> Generator:
    """In-place layout choice (idempotent): decoder levels at resolution >= channels_last_from
    run channels-last, lower ones in the default layout. None keeps the current choice
    (float32 default on first use).

    On CPU oneDNN's channels-last float32 convolutions are ~20-30% faster but sum less
    accurately (ops.channels_last_weights_), and the decoder amplifies early errors: on the
    lia_x_eq fixture the frame error grows from 1.5e-6 (default layout) to ~9e-6 (levels
    >= 128 channels-last) and ~1.5e-5 (all). Switching moves the weights once."""
    if channels_last_from is None:
        if hasattr(generator, "_lia_layout"):
            return generator
        channels_last_from = NEVER
    res = channels_last_from
    if getattr(generator, "_lia_layout", None) != res:
        generator.dec.set_channels_last(res)
        generator._lia_layout = res
    return generator


@dataclass
class Identity:
    """Encoder outputs for one reference image: what every rendered frame reuses."""
    z_s2r: torch.Tensor  # (1, style_dim) float32
    feats: List[torch.Tensor]  # deepest first, batch 1, float32, layout of their decoder level


@torch.no_grad()
def encode_identity(generator: Generator, ref_image_u8) -> Identity:
    """Encode the reference image once (float32, default layout: the identity code feeds
    every frame and the decoder amplifies its error, see prepare_generator)."""
    prepare_generator(generator)
    p = next(generator.parameters())
    x = prepare_image(ref_image_u8, generator.size).to(p.device)
    channels_last_weights_(generator.enc, False)  # the weight layout selects the kernels
    z, feats = generator.enc.enc_2r(x)
    cl_from = generator._lia_layout
    feats = [f.float().contiguous(memory_format=torch.channels_last if f.shape[-1] >= cl_from
                                  else torch.contiguous_format) for f in feats]
    return Identity(z.float(), feats)


def _check_motion(generator: Generator, motion_raw) -> torch.Tensor:
    motion = torch.as_tensor(np.asarray(motion_raw, dtype=np.float32))
    dim = generator.dims.motion_dim
    if motion.ndim != 2 or motion.shape[1] != dim:
        raise ValueError(f"motion must be (T, {dim}), got {tuple(motion.shape)}")
    if not torch.isfinite(motion).all():
        raise ValueError("motion contains non-finite values")
    return motion


@torch.no_grad()
def render_frames(generator: Generator, ref_image_u8, motion_raw, batch_size: Optional[int] = None,
                  dtype: torch.dtype = torch.float32,
                  progress: Optional[Callable[[int], None]] = None,
                  channels_last_from: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yield (b, S, S, 3) uint8 RGB batches (S = generator.size, 512 for the release), one
    row per motion row; motion_raw is raw (denormalised) LIA-X motion (T, 40).

    dtype: compute dtype of the decoder convolutions (float32 or bfloat16); the encoder,
    flow fields, warping and the RGB sum stay float32. progress(n) gets frames done.
    channels_last_from: see prepare_generator (default by dtype: float32 never, bf16 always)."""
    motion = _check_motion(generator, motion_raw)
    prepare_generator(generator, channels_last_from or default_channels_last_from(dtype))
    identity = encode_identity(generator, ref_image_u8)
    device = identity.z_s2r.device
    directions = generator.dec.direction(motion.to(device))  # (T, style_dim)
    bs = batch_size or choose_batch_size(generator, device, dtype)
    done = 0
    for start in range(0, directions.shape[0], bs):
        z = identity.z_s2r + directions[start:start + bs]
        images = generator.dec(z, None, identity.feats, dtype=dtype)
        frames = to_uint8(images)
        done += frames.shape[0]
        if progress is not None:
            progress(done)
        yield frames


@torch.no_grad()
def decode_latents(generator: Generator, identity: Identity, z: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float decoder output (B, 3, S, S) for latents z (B, style_dim) of one identity."""
    return generator.dec(z, None, identity.feats, dtype=dtype)


@torch.no_grad()
def extract_motion(generator: Generator, frames_u8, batch_size: Optional[int] = None,
                   dtype: torch.dtype = torch.float32,
                   progress: Optional[Callable[[int], None]] = None,
                   channels_last: Optional[bool] = None) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB frames -> (T, motion_dim) float32 raw motion,
    enc_r2t(enc_2r(frame)) per frame (frames area-resized to the generator size).

    dtype: encoder compute dtype. channels_last (default: only for 16-bit dtypes): measured
    per 512x512 frame on 2 cores: float32 3.5 s default layout / 3.0 s channels-last
    (z error ~5e-7 / ~4e-6 relative), bfloat16 3.0 s / 1.7 s."""
    if channels_last is None:
        channels_last = dtype not in (torch.float32, torch.float64)
    prepare_generator(generator)
    p = next(generator.parameters())
    n = len(frames_u8)
    if n == 0:
        raise ValueError("no frames to extract motion from")
    bs = batch_size or choose_batch_size(generator, p.device, dtype, encoder=True)
    channels_last_weights_(generator.enc, channels_last)  # the weight layout selects the kernels
    out = []
    for start in range(0, n, bs):
        x = _prepare_batch(frames_u8[start:start + bs], generator.size).to(p.device, dtype)
        z, _ = generator.enc.enc_2r(x)
        out.append(generator.enc.enc_r2t(z.float()).float().cpu())
        if progress is not None:
            progress(start + x.shape[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------- timing

def time_render(generator: Generator, n_frames: int = 2, batch_size: int = 1,
                dtype: torch.dtype = torch.float32, seed: int = 0, warmup: bool = True,
                channels_last_from: Optional[int] = None) -> dict:
    """Seconds per decoded frame after one warm-up batch (the encoder pass, counted separately
    as encoder_s, is a first call) for a random face and random motion."""
    prepare_generator(generator, channels_last_from or default_channels_last_from(dtype))
    g = torch.Generator().manual_seed(seed)
    size = generator.size
    ref = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    motion = 0.1 * torch.randn(n_frames, generator.dims.motion_dim, generator=g)
    t0 = time.perf_counter()
    identity = encode_identity(generator, ref)
    t_enc = time.perf_counter() - t0
    directions = generator.dec.direction(motion.to(identity.z_s2r.device))
    if warmup:  # first calls build weight caches and oneDNN primitives for these shapes
        decode_latents(generator, identity, identity.z_s2r + directions[:batch_size], dtype)
    t0 = time.perf_counter()
    for start in range(0, n_frames, batch_size):
        decode_latents(generator, identity, identity.z_s2r + directions[start:start + batch_size], dtype)
    t_dec = time.perf_counter() - t0
    return {"encoder_s": t_enc, "per_frame_s": t_dec / n_frames, "n_frames": n_frames,
            "batch_size": batch_size, "dtype": str(dtype), "threads": torch.get_num_threads(),
            "channels_last_from": generator._lia_layout,
            "size": size, "pid": os.getpid()}


class FrameRenderer:
    """render_frames as motion arrives: the reference image is encoded once, then render(motion rows)
    returns their frames (streaming)."""

    @torch.no_grad()
    def __init__(self, generator: Generator, ref_image_u8, dtype: torch.dtype = torch.float32,
                 batch_size: Optional[int] = None):
        prepare_generator(generator, default_channels_last_from(dtype))
        self.generator, self.dtype = generator, dtype
        self.identity = encode_identity(generator, ref_image_u8)
        self.batch_size = batch_size or choose_batch_size(generator, self.identity.z_s2r.device, dtype)

    @torch.no_grad()
    def render(self, motion_raw) -> np.ndarray:
        """(n, 40) raw motion -> (n, S, S, 3) uint8 frames."""
        motion = _check_motion(self.generator, motion_raw)
        size = self.generator.size
        if motion.shape[0] == 0:
            return np.zeros((0, size, size, 3), np.uint8)
        directions = self.generator.dec.direction(motion.to(self.identity.z_s2r.device))
        out = []
        for start in range(0, directions.shape[0], self.batch_size):
            z = self.identity.z_s2r + directions[start:start + self.batch_size]
            out.append(to_uint8(self.generator.dec(z, None, self.identity.feats, dtype=self.dtype)))
        return np.concatenate(out)
