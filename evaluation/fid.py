"""The FID Inception-v3 (pool3 features for the Fréchet Inception Distance).

Reproduces mseitzer/pytorch-fid b9c18118d082cbd263c1b8963fc4221dc1cbb659, src/pytorch_fid/inception.py:
`InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True, use_fid_inception=True)`, i.e.
torchvision's Inception3 with the TensorFlow FID graph's pooling, loaded from pt_inception-2015-12-05-
6726825d.pth. The module keeps that file's key names (`Conv2d_1a_3x3.conv.weight` ... `Mixed_7c.*`,
`fc.*`) so the released state dict loads strictly.

Differences from torchvision's inception_v3 (the FID variant):
- the pool branch of Mixed_5b-5d, Mixed_6b-6e and Mixed_7b is a 3x3 average pool that divides by the number
  of in-image pixels (count_include_pad=False, TensorFlow semantics);
- the pool branch of Mixed_7c is a 3x3 max pool;
- fc has 1008 outputs (TF's classes; unused for FID), no AuxLogits, no transform_input: the input
  is resized to 299x299 (bilinear, align_corners=False, no antialias) and mapped from [0, 1] to [-1, 1].
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.safe_load import key_report, safe_torch_load

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_TF_CLASSES = 1008
BN_EPS = 1e-3
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3_tf(x):
    """3x3 stride-1 average whose border windows divide by the in-image pixel count only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35x35 block: [1x1 64 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg pool -> 1x1 pool_features]."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3_tf(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: [3x3/2 384 | 1x1 64 -> 3x3 96 -> 3x3/2 96 | max pool 3x3/2]."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions of width c (`channels_7x7`)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(avg_pool_3x3_tf(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: [1x1 192 -> 3x3/2 320 | 1x1 192 -> 1x7 -> 7x1 -> 3x3/2 192 | max pool 3x3/2]."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b7),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8x8 block: [1x1 320 | 1x1 384 -> (1x3, 3x1) | 1x1 448 -> 3x3 384 -> (1x3, 3x1) | pool -> 1x1 192].
    pool: "avg" (TF average, Mixed_7b) or "max" (Mixed_7c)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = {"avg": avg_pool_3x3_tf, "max": max_pool_3x3}[pool]
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(self.pool(x)),
        ], dim=1)


class FIDInception(nn.Module):
    """images (B, 3, H, W) RGB in [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL3_DIM, NUM_TF_CLASSES)  # only in the checkpoint; FID stops at pool3

    @staticmethod
    def preprocess(images_b3hw):
        """[0, 1] images of any size -> the 299x299 [-1, 1] tensor the first convolution sees."""
        x = F.interpolate(images_b3hw, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images_b3hw):
        x = self.preprocess(images_b3hw)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # pool3: the 8x8 average


def load_fid_inception(path, device="cpu") -> FIDInception:
    """FIDInception in eval mode with the weights of pt_inception-2015-12-05-6726825d.pth (a plain state dict,
    read with torch.load(weights_only=True) and loaded strictly). BatchNorm `num_batches_tracked` counters the
    file may lack are filled with 0 (they do not affect eval). Raises FileNotFoundError, or a one-line
    ValueError naming the file when it is not that state dict."""
    path = os.fspath(path)
    state = safe_torch_load(path, "FID Inception checkpoint")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not an FID Inception state dict (expected a flat dict of tensors, "
                         f"got {type(state).__name__})")
    with torch.device("meta"):  # no random init of 24M parameters that the file replaces
        model = FIDInception()
    expected = model.state_dict()
    state = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros((), dtype=torch.long))
    report = key_report({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in state.items()})
    if not report.ok():
        raise ValueError(f"{path}: {report.message('FID Inception')}")
    not_float = [k for k, v in state.items() if not k.endswith("num_batches_tracked") and not v.is_floating_point()]
    if not_float:
        raise ValueError(f"{path}: {len(not_float)} tensors are not floating point (e.g. {not_float[:3]})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def pool3_features(model: FIDInception, images_b3hw, batch_size: int = 50) -> np.ndarray:
    """(N, 2048) float64 pool3 features of [0, 1] float images (uint8 images are divided by 255 first),
    as pytorch-fid's get_activations collects them."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(images_b3hw), batch_size):
        batch = images_b3hw[start:start + batch_size]
        if batch.dtype == torch.uint8:
            batch = batch.to(torch.float32) / 255
        rows.append(model(batch.to(device)).cpu().numpy().astype(np.float64))
    return np.concatenate(rows, axis=0) if rows else np.empty((0, POOL3_DIM))
