"""LIA-X encoder: image -> identity code z_s2r + multi-scale feature maps; code -> motion."""
import math

from torch import nn

from .ops import ConvLayer, EqualConv2d, EqualLinear, _inplace_ok

SQRT2 = math.sqrt(2)


class ResBlock(nn.Module):
    """3x3 conv, then blur + strided 3x3 conv; skip = blur + strided 1x1 conv; halves the size."""

    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, out_channel, 3)
        self.conv2 = ConvLayer(out_channel, out_channel, 3, downsample=True)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False)

    def forward(self, x):
        h = self.conv2(self.conv1(x))
        if not _inplace_ok(h):
            return (h + self.skip(x)) / SQRT2
        skip, scale = self.skip.forward_unscaled(x)
        return h.add_(skip, alpha=scale).div_(SQRT2)


class Encoder2R(nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> (z (B, latent_dim), feature maps deepest first).

    `channels[r]` is the width at resolution r; the feature maps are the outputs of block1
    (resolution S) and of every down block except the last (down to 8x8).
    """

    def __init__(self, latent_dim, channels: dict, size: int = 512):
        super().__init__()
        n_down = int(math.log2(size)) - 2  # S -> 4
        self.block1 = ConvLayer(3, channels[size], 1)
        for i in range(n_down - 1):  # block2 .. block{n_down}: S -> 8
            res = size >> i
            self.add_module(f"block{i + 2}", nn.Sequential(ResBlock(channels[res], channels[res // 2])))
        self.block_512 = ResBlock(channels[8], channels[4])
        self.block8 = EqualConv2d(channels[4], latent_dim, 4, padding=0, bias=False)
        self.n_down = n_down

    def forward(self, x):
        feats = [self.block1(x)]
        for i in range(self.n_down - 1):
            feats.append(getattr(self, f"block{i + 2}")(feats[-1]))
        h = self.block8(self.block_512(feats[-1]))
        return h.squeeze(-1).squeeze(-1), feats[::-1]


class Encoder(nn.Module):
    def __init__(self, dim, dim_motion, channels: dict, size: int = 512):
        super().__init__()
        self.enc_2r = Encoder2R(dim, channels, size)
        self.enc_r2t = nn.Sequential(EqualLinear(dim, dim_motion))

    def enc_motion(self, x):
        """Per-image motion code alpha = enc_r2t(enc_2r(x)) (B, motion_dim)."""
        z, _ = self.enc_2r(x)
        return self.enc_r2t(z)

    def forward(self, input_source, input_target=None, alpha_start=None):
        z_s2r, feats = self.enc_2r(input_source)
        if input_target is None:
            return z_s2r, None, feats
        alpha_r2t = self.enc_r2t(self.enc_2r(input_target)[0])
        if alpha_start is None:
            return z_s2r, [alpha_r2t], feats
        return z_s2r, [alpha_r2t, self.enc_r2t(z_s2r), alpha_start], feats
