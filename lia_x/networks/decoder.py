"""LIA-X decoder: latent (z + motion direction) -> image, warping the encoder features."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import (ConstantInput, ConvLayer, Direction, StyledConv, ToFlow, ToRGB, _inplace_ok,
                  channels_last_weights_)

SQRT2 = math.sqrt(2)


class FlowResBlock(nn.Module):
    """h = conv1(x); return h + gamma * conv2(GroupNorm(h))."""

    def __init__(self, in_channel, out_channel, style_dim, norm_groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, out_channel)
        self.conv1 = StyledConv(in_channel, out_channel, 3, style_dim, False)
        self.conv2 = StyledConv(out_channel, out_channel, 3, style_dim, False)
        self.gamma = nn.Parameter(1e-5 * torch.ones([1, out_channel, 1, 1]))

    def forward(self, x, style):
        skip = self.conv1(x, style)
        n = self.norm
        h = F.group_norm(skip, n.num_groups, n.weight.to(skip.dtype), n.bias.to(skip.dtype), n.eps)
        h = self.conv2(h, style)
        gamma = self.gamma.to(h.dtype)
        if _inplace_ok(h):
            return h.mul_(gamma).add_(skip)
        return gamma * h + skip


class ResBlock(nn.Module):
    """(conv2(conv1(x)) + x) / sqrt(2) with same-width 3x3 ConvLayers."""

    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, out_channel, 3, upsample=False)
        self.conv2 = ConvLayer(out_channel, out_channel, 3, upsample=False)
        if in_channel != out_channel:
            self.skip = ConvLayer(in_channel, out_channel, 1, upsample=False, activate=False, bias=False)
        else:
            self.skip = nn.Identity()

    def forward(self, x):
        h = self.conv2(self.conv1(x))
        if _inplace_ok(h):
            return h.add_(self.skip(x)).div_(SQRT2)
        return (h + self.skip(x)) / SQRT2


def level_names(k: int):
    """State-dict prefixes of decoder level k (k = 0 is the 8x8 level, named '_512' upstream)."""
    if k == 0:
        return dict(up="conv_512_1", flow_blocks="conv_512_2", feat_up=None,
                    rgb_blocks="conv_512_2_rgb", rgb="rgb_512", flow="flow_512")
    p = f"conv{k + 1}"
    return dict(up=f"{p}_1", flow_blocks=f"{p}_2", feat_up=f"{p}_2_up",
                rgb_blocks=f"{p}_2_rgb", rgb=f"rgb{k + 1}", flow=f"flow{k + 1}")


class Decoder(nn.Module):
    """Constant 4x4 input -> styled convs up to `size`; at every level from 8x8 a flow field
    warps that level's encoder feature map, and the warped features feed an RGB skip branch."""

    def __init__(self, style_dim, motion_dim, channels: dict, size=512, n_blocks=4, norm_groups=32):
        super().__init__()
        self.n_levels = int(math.log2(size)) - 2
        self.direction = Direction(style_dim, motion_dim)
        self.input = ConstantInput(channels[4], size=4)
        self.conv1 = StyledConv(channels[4], channels[4], 3, style_dim, False)
        for k in range(self.n_levels):
            names, res = level_names(k), 8 << k
            c_in, c = channels[res // 2], channels[res]
            self.add_module(names["up"], StyledConv(c_in, c, 3, style_dim, True))
            self.add_module(names["flow_blocks"], nn.ModuleList(
                [FlowResBlock(c, c, style_dim, norm_groups) for _ in range(n_blocks)]))
            if names["feat_up"]:
                self.add_module(names["feat_up"], ConvLayer(c_in, c, 3, upsample=True))
            self.add_module(names["rgb_blocks"], nn.ModuleList([ResBlock(c, c) for _ in range(n_blocks)]))
            self.add_module(names["rgb"], ToRGB(c))
            self.add_module(names["flow"], ToFlow(c, style_dim))

    def level_modules(self, k: int):
        return [getattr(self, n) for n in level_names(k).values() if n]

    def set_channels_last(self, min_res: int):
        """Run the levels at resolution >= min_res channels-last (weights stored so), the rest
        in the default layout (see ops.channels_last_weights_ for the speed/precision trade)."""
        channels_last_weights_(self.conv1, min_res <= 4)
        for k in range(self.n_levels):
            for m in self.level_modules(k):
                channels_last_weights_(m, (8 << k) >= min_res)
        self.channels_last_min_res = min_res

    def navigation(self, z_s2r, alpha):
        if alpha is None:
            return z_s2r
        if len(alpha) > 1:  # target, source, start
            return z_s2r + (self.direction(alpha[0]) - self.direction(alpha[2])) + self.direction(alpha[1])
        return z_s2r + self.direction(alpha[0])

    def forward(self, z_s2r, alpha, feats, dtype=None):
        """z_s2r (B, style_dim); alpha None or a list of motion codes (see navigation);
        feats deepest first, each with batch B or 1 (shared by all B latents).

        The convolutions run in `dtype` (default feats[0].dtype) and in channels_last when
        the feature maps are; flow fields, warping and the RGB sum stay in feats' dtype."""
        z = self.navigation(z_s2r, alpha)
        h = self.input(z).to(dtype or feats[0].dtype)
        h = self.conv1(h, z)
        h_warp = flow = rgb = None
        for k in range(self.n_levels):
            m = {key: getattr(self, name) if name else None for key, name in level_names(k).items()}
            h = m["up"](h, z)
            for block in m["flow_blocks"]:
                h = block(h, z)
            last = k == self.n_levels - 1
            warp, h, flow = m["flow"](h, z, feats[k], flow, need_h=not last)
            if m["feat_up"] is not None:
                up = m["feat_up"](h_warp)
                warp = warp.add_(up) if _inplace_ok(warp) else warp + up
            for block in m["rgb_blocks"]:
                warp = block(warp)
            rgb = m["rgb"](warp, rgb)
            h_warp = warp
        return rgb
