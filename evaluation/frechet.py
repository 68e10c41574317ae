"""Fréchet distance between two Gaussians fitted to feature sets (FID on Inception pool3, FVD on I3D logits).

Reproduces three reference code paths, which share the formula
    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrtm(sigma1 sigma2)
but differ in the statistics and in the handling of a bad matrix square root:

- "pytorch_fid": mseitzer/pytorch-fid b9c18118d082cbd263c1b8963fc4221dc1cbb659, src/pytorch_fid/fid_score.py
  (calculate_activation_statistics, calculate_frechet_distance): np.cov statistics (ddof=1); a non-finite
  sqrtm is retried with eps added to both diagonals; a complex sqrtm with a diagonal imaginary part above
  1e-3 raises, otherwise its real part is kept.
- "common_metrics": JunyaoHu/common_metrics_on_video_quality 5f751734ce9cef4cd2dddb235726b75dff62a387,
  fvd/styleganv/fvd.py (frechet_distance): np.cov statistics (ddof=1), no retry and no check (NaN passes
  through); the real part of the final scalar.
- "stylegan_v": universome/stylegan-v 3fecd69c602e1cda204357201461c0fb0a634909, src/metrics/
  frechet_video_distance.py + metric_utils.py (FeatureStats): the biased (ddof=0) covariance formed from raw
  moments accumulated batch by batch, then the common_metrics formula.

Set 1 is the generated ("fake") set, set 2 the real one, as in every reference.
scipy.linalg.sqrtm is called without the `disp` argument the references pass (deprecated in SciPy 1.16,
removed in 1.18); the matrix returned is the same. SciPy >= 1.16 returns a finite root for exactly singular
products where SciPy <= 1.15 returned NaN, so only the older SciPy takes pytorch-fid's eps path there.
"""
import warnings

import numpy as np
import scipy.linalg
import torch

VARIANTS = ("pytorch_fid", "common_metrics", "stylegan_v")
IMAG_DIAG_ATOL = 1e-3  # pytorch-fid's tolerance on the imaginary part of diag(sqrtm)


def _as_rows(features) -> np.ndarray:
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    return features


def feature_stats(features, ddof: int = 1, batch_size: int | None = None):
    """(mu (D,), sigma (D, D)) float64 of features (N, D).

    ddof=1: np.mean and np.cov (centred), as pytorch-fid and common_metrics compute them.
    ddof=0: StyleGAN-V's FeatureStats: each batch of `batch_size` rows (its detector batch,
    NUM_FRAMES_IN_BATCH[resolution] // num_frames; all rows at once when None) is cast to float32 and then
    float64 and added to the raw sums sum(x) and x^T x; mu = sum / N, sigma = x^T x / N - mu mu^T.
    """
    feats = _as_rows(features)
    if ddof == 1:
        feats = feats.astype(np.float64)
        return np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    if ddof != 0:
        raise ValueError(f"ddof must be 0 (StyleGAN-V) or 1 (pytorch-fid, common_metrics), got {ddof}")
    n, dim = feats.shape
    step = n if batch_size is None else batch_size
    raw_mean, raw_cov = np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64)
    for start in range(0, n, max(step, 1)):
        x64 = feats[start:start + step].astype(np.float32).astype(np.float64)
        raw_mean += x64.sum(axis=0)
        raw_cov += x64.T @ x64
    mu = raw_mean / n
    return mu, raw_cov / n - np.outer(mu, mu)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, variant: str = "pytorch_fid") -> float:
    """Fréchet distance between N(mu1, sigma1) (generated) and N(mu2, sigma2) (real), as `variant` computes it
    ("pytorch_fid", or "common_metrics" / "stylegan_v", whose formula is the same). eps is pytorch-fid's
    diagonal offset for a singular product; the other variants have no such retry."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")

    if variant != "pytorch_fid":
        mean_term = np.square(mu1 - mu2).sum()
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        return float(np.real(mean_term + np.trace(sigma1 + sigma2 - covmean * 2)))

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_DIAG_ATOL):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
