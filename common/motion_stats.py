"""Normalisation statistics of the 40-d LIA-X motion latents (the model reads and writes normalised motion).

Values of the released lia_x/motion_mean.npy and motion_std.npy (float32, 9 significant digits, which
round-trips float32 exactly); the std is clipped at 1e-6 as the reference infer.py does.
"""
import torch

from common.constants import MOTION_DIM  # noqa: F401  (re-exported: the statistics are MOTION_DIM values each)

MOTION_MEAN = (
    0.00636434881, 0.0174848288, 0.0163969472, -0.0135359485, -0.0241865516,
    0.000276537379, 0.0010602104, 0.0169865601, -0.0109868469, 0.00738304015,
    -0.0248002, 0.0179993976, -0.000802936556, -0.0232445262, 0.00633576093,
    -0.128342748, 0.0611694865, -0.00699341437, 0.732209623, -0.0304829534,
    0.0120833544, -0.0088436557, 0.00155583082, -0.0811735988, -0.000116097603,
    0.0168400258, -0.00317181926, -0.0809529647, -0.0448323451, -0.118288256,
    0.000412531634, -0.00617628498, -0.00651681051, 0.273776054, 0.0128538711,
    -0.0502625145, -0.0031032823, 0.120464787, -0.0468954556, -0.199780911,
)

MOTION_STD = (
    0.0845437869, 0.0612202361, 0.0753789544, 0.120993495, 0.0652391687,
    0.0199999996, 0.0588212423, 0.0424233116, 0.0540542044, 0.0490279719,
    0.0722758844, 0.0527252369, 0.0278021377, 0.0535792224, 0.0244491808,
    0.415293634, 0.182715282, 0.0379853994, 0.790606201, 0.051438842,
    0.0563602895, 0.0858712196, 0.0199999996, 0.118270561, 0.0847435445,
    0.0649832934, 0.0328106284, 0.119603932, 0.286964893, 0.185333312,
    0.047593683, 0.0971657187, 0.0199999996, 0.674350142, 0.0199999996,
    0.164688706, 0.0498284549, 0.726542413, 0.108559966, 0.4020769,
)


def _stats(like: torch.Tensor):
    mean = torch.tensor(MOTION_MEAN, dtype=torch.float32, device=like.device)
    std = torch.tensor(MOTION_STD, dtype=torch.float32, device=like.device).clamp_min(1e-6)
    return mean, std


def normalize_motion(motion_raw_td: torch.Tensor) -> torch.Tensor:
    """(T, 40) raw LIA-X motion -> normalised, float32."""
    mean, std = _stats(motion_raw_td)
    return (motion_raw_td.float() - mean) / std


def denormalize_motion(motion_norm_td: torch.Tensor) -> torch.Tensor:
    """(T, 40) normalised motion -> raw LIA-X motion, float32."""
    mean, std = _stats(motion_norm_td)
    return motion_norm_td.float() * std + mean
