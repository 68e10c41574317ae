"""Fréchet Video Distance with the I3D TorchScript detector (i3d_torchscript.pt).

Two reference pipelines, chosen with `variant`:
- "common_metrics" (default): JunyaoHu/common_metrics_on_video_quality 5f751734ce9cef4cd2dddb235726b75dff62a387,
  calculate_fvd.py + fvd/styleganv/fvd.py (calculate_fvd(..., method='styleganv')): [0, 1] float videos are
  resized outside the detector (shorter side to 224, aspect kept, bilinear), centre-cropped to 224x224,
  mapped to [-1, 1] and passed with rescale=False, resize=False; Fréchet distance on ddof=1 statistics.
- "stylegan_v": universome/stylegan-v 3fecd69c602e1cda204357201461c0fb0a634909, src/metrics/
  frechet_video_distance.py + metric_utils.py: uint8 videos at their own resolution, passed with
  rescale=True, resize=True (the TorchScript rescales and resizes); ddof=0 statistics (FeatureStats).

The detector: `forward(x (B, 3, T, H, W), rescale, resize, return_features)` -> (B, 400) float32, the
Kinetics-400 logits averaged over time. Loading it (`load_i3d`) is torch.jit.load, which runs code stored in
the archive: load only a file the user named (or their own hub cache); nothing is downloaded here.

Videos are (B, T, C, H, W) throughout, C = 3 or 1 (grey is repeated to RGB).
"""
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.frechet import feature_stats, frechet_distance

I3D_FILE = "i3d_torchscript.pt"
I3D_SIZE = 224
I3D_DIM = 400
MIN_FRAMES = 10  # common_metrics asserts T >= 10 and scores prefixes [:10] .. [:T]
VARIANTS = ("common_metrics", "stylegan_v")
DETECTOR_KWARGS = {
    "common_metrics": {"rescale": False, "resize": False, "return_features": True},
    "stylegan_v": {"rescale": True, "resize": True, "return_features": True},
}
COMMON_METRICS_CHUNK = 10  # videos per detector call
# StyleGAN-V's detector batch: NUM_FRAMES_IN_BATCH[resolution] // num_frames (it also groups FeatureStats sums)
STYLEGAN_V_FRAMES_IN_BATCH = {128: 128, 256: 128, 512: 64, 1024: 32}


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown FVD variant {variant!r}; expected one of {VARIANTS}")


def stylegan_v_batch_size(num_frames: int, resolution: int = 256) -> int:
    return STYLEGAN_V_FRAMES_IN_BATCH[resolution] // num_frames


def resize_target_hw(height: int, width: int) -> tuple:
    """common_metrics' resize target: the shorter side to 224, the other ceil(side * 224 / shorter) with the
    scale a float64 (so e.g. 50x50 -> 225x224 and 48x54 -> 224x253: the product lands just above an integer)."""
    scale = I3D_SIZE / min(height, width)
    if height < width:
        return I3D_SIZE, math.ceil(width * scale)
    return math.ceil(height * scale), I3D_SIZE


def preprocess(videos_btchw, variant: str = "common_metrics") -> torch.Tensor:
    """The tensor the I3D detector receives, (B, 3, T, h, w), contiguous.

    common_metrics: videos are float in [0, 1] (uint8 is divided by 255 first); returns float32 in [-1, 1],
      224x224: every frame resized (bilinear, align_corners=False, no antialias) to resize_target_hw, then
      centre-cropped.
    stylegan_v: uint8 videos (real data) are passed through; float videos are taken as generator output
      in [-1, 1] and quantised as StyleGAN-V does, (x * 127.5 + 128).clamp(0, 255) truncated to uint8.
      Resolution unchanged (the detector resizes).
    """
    _check_variant(variant)
    if videos_btchw.ndim != 5 or videos_btchw.shape[2] not in (1, 3):
        raise ValueError(f"videos must be (B, T, C, H, W) with C = 1 or 3, got {tuple(videos_btchw.shape)}")
    x_bcthw = videos_btchw.permute(0, 2, 1, 3, 4)
    if x_bcthw.shape[1] == 1:
        x_bcthw = x_bcthw.repeat(1, 3, 1, 1, 1)

    if variant == "stylegan_v":
        if x_bcthw.dtype != torch.uint8:
            x_bcthw = (x_bcthw.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        return x_bcthw.contiguous()

    if x_bcthw.dtype == torch.uint8:
        x_bcthw = x_bcthw.to(torch.float32) / 255
    b, c, t, h, w = x_bcthw.shape
    new_h, new_w = resize_target_hw(h, w)
    # every frame on its own: the reference resizes (C, T, H, W) as an image batch with T "channels"
    frames = F.interpolate(x_bcthw.reshape(b * c, t, h, w), size=(new_h, new_w), mode="bilinear",
                           align_corners=False)
    top, left = (new_h - I3D_SIZE) // 2, (new_w - I3D_SIZE) // 2
    frames = frames[:, :, top:top + I3D_SIZE, left:left + I3D_SIZE]
    return ((frames - 0.5) * 2).reshape(b, c, t, I3D_SIZE, I3D_SIZE).contiguous()


def load_i3d(path, device="cpu") -> torch.jit.ScriptModule:
    """The I3D TorchScript (i3d_torchscript.pt) from an explicit local path, in eval mode.

    torch.jit.load executes the TorchScript code stored in the file: only pass a file you trust
    (the one published with StyleGAN-V / common_metrics). Raises FileNotFoundError, or a one-line
    ValueError naming the file when it is not a TorchScript archive."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # recent torch deprecates TorchScript; the released detector is one
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
            detector = torch.jit.load(path, map_location=device)
    except Exception as err:  # corrupt / non-TorchScript files fail with several exception types
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a loadable I3D TorchScript archive ({type(err).__name__}: {first})") from None
    return detector.eval()


def _device_of(detector):
    param = next(iter(detector.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def i3d_features(detector, videos_btchw, batch_size: int | None = None, variant: str = "common_metrics"):
    """(N, 400) float64 detector outputs of videos (B, T, C, H, W), `batch_size` videos per call
    (default: common_metrics' 10, StyleGAN-V's NUM_FRAMES_IN_BATCH[256] // T), with the variant's kwargs."""
    _check_variant(variant)
    if batch_size is None:
        batch_size = COMMON_METRICS_CHUNK if variant == "common_metrics" else \
            max(1, stylegan_v_batch_size(videos_btchw.shape[1]))
    device = _device_of(detector)
    rows = []
    for start in range(0, len(videos_btchw), batch_size):
        x = preprocess(videos_btchw[start:start + batch_size], variant).to(device)
        rows.append(detector(x, **DETECTOR_KWARGS[variant]).cpu().numpy())
    return np.concatenate(rows).astype(np.float64) if rows else np.empty((0, I3D_DIM))


def fvd_from_features(fake_features, real_features, variant: str = "common_metrics",
                      batch_size: int | None = None) -> float:
    """FVD of detector features (N1, 400) generated vs (N2, 400) real.

    common_metrics: ddof=1 statistics; with a single generated video only the mean term is returned.
    stylegan_v: ddof=0 statistics accumulated in detector batches of `batch_size` (FeatureStats)."""
    _check_variant(variant)
    if variant == "stylegan_v":
        mu1, sigma1 = feature_stats(fake_features, ddof=0, batch_size=batch_size)
        mu2, sigma2 = feature_stats(real_features, ddof=0, batch_size=batch_size)
        return frechet_distance(mu1, sigma1, mu2, sigma2, variant="stylegan_v")
    fake = np.asarray(fake_features, dtype=np.float64)
    real = np.asarray(real_features, dtype=np.float64)
    if len(fake) <= 1:  # np.cov of one row is undefined; the reference keeps the mean term
        return float(np.square(fake.mean(axis=0) - real.mean(axis=0)).sum())
    mu1, sigma1 = feature_stats(fake)
    mu2, sigma2 = feature_stats(real)
    return frechet_distance(mu1, sigma1, mu2, sigma2, variant="common_metrics")


def fvd(real_videos, fake_videos, detector, variant: str = "common_metrics", batch_size: int | None = None,
        only_final: bool = True):
    """FVD between real and generated videos (B, T, C, H, W) (common_metrics: float [0, 1]; stylegan_v: uint8,
    or float [-1, 1] generator output).

    common_metrics needs both sets of the same shape and T >= 10; only_final=False returns its list of FVDs
    of the prefixes [:10], [:11], ..., [:T] (each one re-run through the detector)."""
    _check_variant(variant)
    if variant == "stylegan_v":
        if batch_size is None:
            batch_size = max(1, stylegan_v_batch_size(fake_videos.shape[1]))
        fake = i3d_features(detector, fake_videos, batch_size, variant)
        real = i3d_features(detector, real_videos, batch_size, variant)
        return fvd_from_features(fake, real, variant, batch_size=batch_size)

    if tuple(real_videos.shape) != tuple(fake_videos.shape):
        raise ValueError(f"common_metrics FVD needs equal shapes, got real {tuple(real_videos.shape)} "
                         f"and generated {tuple(fake_videos.shape)}")
    num_frames = fake_videos.shape[1]
    if only_final:
        if num_frames < MIN_FRAMES:
            raise ValueError(f"common_metrics FVD needs at least {MIN_FRAMES} frames, got {num_frames}")
        prefixes = [num_frames]
    else:
        prefixes = range(MIN_FRAMES, num_frames + 1)
    values = [fvd_from_features(i3d_features(detector, fake_videos[:, :k], batch_size, variant),
                                i3d_features(detector, real_videos[:, :k], batch_size, variant))
              for k in prefixes]
    return values[0] if only_final else values
