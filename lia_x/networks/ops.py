"""LIA-X building blocks: equalised-learning-rate layers, modulated convolutions and
the FIR up/down-sampling filter (upfirdn2d), all in plain PyTorch.

Conventions shared by every module here:
- The dtype of the incoming activation decides the compute dtype; weights are cast to it
  on the fly (a no-op when they already match), so a float32 model can render in bfloat16
  and a model whose conv weights are stored in bfloat16 still works with float32 input.
- Style vectors (the 1024-d latent and the per-layer modulations) stay in their own dtype
  (float32 in practice); only the small per-channel factors derived from them are cast.
- Inference fast paths fold constant scales into the bias/activation pass and run
  activation ops in place on fresh temporaries; they are used only when autograd is off,
  so training-style use keeps the plain reference formulation.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT2 = math.sqrt(2)
BLUR_TAPS = (1, 3, 3, 1)


def make_kernel(taps) -> torch.Tensor:
    """2-D FIR kernel from 1-D taps (outer product), normalised to sum 1."""
    k = torch.tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def _shift_window(x: torch.Tensor, start_h: int, len_h: int, start_w: int, len_w: int):
    """x[..., start_h:start_h+len_h, start_w:start_w+len_w] with zeros outside x."""
    h, w = x.shape[-2:]
    pad = [-start_w, start_w + len_w - w, -start_h, start_h + len_h - h]
    return F.pad(x, pad) if any(pad) else x


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)):
    """Upsample by zero insertion, pad, filter with `kernel` (true convolution), downsample.

    Same semantics as StyleGAN2's upfirdn2d (pad = (x0, x1) or (x0, x1, y0, y1), negative
    pads crop). Implemented per channel as a depthwise conv2d (up == 1) or a depthwise
    strided conv_transpose2d (up > 1, the polyphase form of zero insertion + filtering).
    """
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # oneDNN has no 16-bit depthwise (transposed) conv: PyTorch's fallback is ~10x slower
        # than two casts around the float32 kernel
        return upfirdn2d(x.float(), kernel, up, down, pad).to(x.dtype)
    px0, px1, py0, py1 = pad
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    k = kernel.to(device=x.device, dtype=x.dtype)
    if up == 1:
        weight = k.flip(0, 1)[None, None].expand(c, 1, kh, kw)
        if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
            return F.conv2d(x, weight, stride=down, padding=(py0, px0), groups=c)
        x = F.pad(x, [px0, px1, py0, py1])
        return F.conv2d(x, weight, stride=down, groups=c)
    # conv_transpose2d(x, k, stride=up) is the full convolution of the zero-inserted input;
    # the upfirdn output starts (k - 1 - pad0) samples into it.
    weight = k[None, None].expand(c, 1, kh, kw)
    out_h = h * up + py0 + py1 - kh + 1
    out_w = w * up + px0 + px1 - kw + 1
    start_h, start_w = kh - 1 - py0, kw - 1 - px0
    extra_h = out_h - ((h - 1) * up + kh - 2 * start_h)
    extra_w = out_w - ((w - 1) * up + kw - 2 * start_w)
    if min(start_h, start_w) >= 0 and 0 <= extra_h < up and 0 <= extra_w < up:
        out = F.conv_transpose2d(x, weight, stride=up, padding=(start_h, start_w),
                                 output_padding=(extra_h, extra_w), groups=c)
    else:
        out = F.conv_transpose2d(x, weight, stride=up, groups=c)
        out = _shift_window(out, start_h, out_h, start_w, out_w)
    return out[:, :, ::down, ::down] if down > 1 else out


def _layout(x: torch.Tensor):
    """torch.channels_last if x is stored so (and is not trivially both), else contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl and not x.is_contiguous() else torch.contiguous_format


def conv_transpose2d_stride2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.conv_transpose2d(x, weight.transpose(0, 1), stride=2) for a 3x3 `weight` given in
    conv2d layout (out, in, 3, 3): (B, out, 2H+1, 2W+1).

    On CPU it is computed as four phase convolutions (even/odd output rows x columns) and
    interleaved, because oneDNN's transposed convolution runs at a fraction of the speed
    of its convolution; same multiply count, only the summation order differs."""
    if x.device.type != "cpu" or weight.shape[-2:] != (3, 3):
        return F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
    b, _, h, w = x.shape
    k = weight.flip(2, 3)  # even outputs use taps (2, 0), odd outputs tap 1
    fmt = torch.contiguous_format
    if torch.channels_last in (_layout(x), _layout(weight)):
        fmt = torch.channels_last
    y = torch.empty((b, weight.shape[0], 2 * h + 1, 2 * w + 1), dtype=x.dtype, device=x.device,
                    memory_format=fmt)
    y[:, :, 0::2, 0::2] = F.conv2d(x, k[:, :, 0::2, 0::2], padding=(1, 1))
    y[:, :, 0::2, 1::2] = F.conv2d(x, k[:, :, 0::2, 1:2], padding=(1, 0))
    y[:, :, 1::2, 0::2] = F.conv2d(x, k[:, :, 1:2, 0::2], padding=(0, 1))
    y[:, :, 1::2, 1::2] = F.conv2d(x, k[:, :, 1:2, 1:2])
    return y


def upsample_conv_weight(weight: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """Fold "2x FIR upsample (Upsample), then 3x3 conv with padding 1" into one 3x3 conv at
    the input resolution with 4*out channels, to be followed by pixel_shuffle(2).

    For output phase a (row parity) the taps are h_a[r] = sum_t W[t] * fir[2 - 2r + a + t]
    (zero outside the FIR), i.e. H_ab = Q_a W Q_b^T. Same multiply count as the conv at
    the output resolution, and no pass over the 4x larger upsampled activation."""
    n = fir.shape[0]
    q = torch.zeros(2, 3, 3, dtype=weight.dtype, device=weight.device)
    for a in range(2):
        for r in range(3):
            for t in range(3):
                i = 2 - 2 * r + a + t
                if 0 <= i < n:
                    q[a, r, t] = fir[i]
    w = torch.einsum("art,oitu,bsu->oabirs", q, weight, q)  # (out, 2, 2, in, 3, 3)
    return w.reshape(weight.shape[0] * 4, weight.shape[1], 3, 3)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (for 16-bit activations)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _inplace_ok(x: torch.Tensor) -> bool:
    """Inference fast paths (in-place activations, folded scales) only run without autograd."""
    return not torch.is_grad_enabled()


def fused_leaky_relu(x, bias=None, negative_slope=0.2, scale=SQRT2):
    """leaky_relu(x + bias, 0.2) * sqrt(2), bias broadcast over dim 1 (StyleGAN2 bias_act)."""
    if bias is not None:
        x = x + bias.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope=0.2) * scale


def bias_act_(y: torch.Tensor, bias, gain: float = SQRT2, out_scale=None):
    """leaky_relu(y * out_scale + bias, 0.2) * gain for a freshly computed y.

    out_scale (a number or a (B, C) tensor, > 0) is a factor the caller did not apply
    to y yet; it is folded in as leaky(y + bias/s) * (s * gain), which needs no extra pass
    over y. Runs in place when autograd is off.
    """
    shape = (y.shape[0] if torch.is_tensor(out_scale) else 1, y.shape[1]) + (1,) * (y.ndim - 2)
    if out_scale is None:
        b, g = bias, gain
    elif torch.is_tensor(out_scale):
        b = None if bias is None else bias.to(out_scale.dtype) / out_scale
        g = out_scale * gain
    else:
        b = None if bias is None else bias / out_scale
        g = out_scale * gain
    if not _inplace_ok(y):
        out = y if b is None else y + b.to(y.dtype).reshape(shape)
        out = F.leaky_relu(out, 0.2)
        return out * (g.to(y.dtype).reshape(shape) if torch.is_tensor(g) else g)
    if b is not None:
        y.add_(b.to(y.dtype).reshape(shape))
    F.leaky_relu_(y, 0.2)
    return y.mul_(g.to(y.dtype).reshape(shape) if torch.is_tensor(g) else g)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel, bias=True, negative_slope=0.2, scale=SQRT2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x):
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class ScaledLeakyReLU(nn.Module):
    def __init__(self, negative_slope=0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return F.leaky_relu(x, negative_slope=self.negative_slope)


class Blur(nn.Module):
    """FIR low-pass (the [1,3,3,1] binomial) with explicit padding; gain factor**2 after upsampling."""

    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        self.taps = tuple(kernel)
        self.gain = upsample_factor ** 2
        self.register_buffer("kernel", make_kernel(kernel) * self.gain)
        self.pad = pad

    def reset_buffers(self):
        self.kernel.copy_(make_kernel(self.taps) * self.gain)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling (zero insertion + [1,3,3,1] filter)."""

    def __init__(self, kernel, factor=2):
        super().__init__()
        self.taps = tuple(kernel)
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def reset_buffers(self):
        self.kernel.copy_(make_kernel(self.taps) * self.factor ** 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualConv2d(nn.Module):
    """conv2d with the weight scaled by 1/sqrt(fan_in) at run time."""

    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def conv_unscaled(self, x):
        """conv2d with the raw weight: the caller applies self.scale (and the bias)."""
        return F.conv2d(x, self.weight.to(x.dtype), stride=self.stride, padding=self.padding)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype) * self.scale, bias=bias,
                        stride=self.stride, padding=self.padding)

    def extra_repr(self):
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """Linear layer with the weight scaled by lr_mul/sqrt(in_dim) at run time."""

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), bias_init / lr_mul)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x):
        weight = self.weight.to(x.dtype) * self.scale
        bias = None if self.bias is None else self.bias.to(x.dtype) * self.lr_mul
        if self.activation:
            return fused_leaky_relu(F.linear(x, weight), bias)
        return F.linear(x, weight, bias=bias)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU | ScaledLeakyReLU] (the state-dict layout)."""

    def __init__(self, in_channel, out_channel, kernel_size, downsample=False, upsample=False,
                 blur_kernel=BLUR_TAPS, bias=True, activate=True):
        layers = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        elif upsample:
            layers.append(Upsample(blur_kernel))
            stride, padding = 1, kernel_size // 2
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride=stride,
                                  padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel) if bias else ScaledLeakyReLU(0.2))
        super().__init__(*layers)
        self.resample = downsample or upsample
        self.upsample = upsample
        self.conv_index = 1 if self.resample else 0
        self._fused_cache = None

    def _fused_upsample_weight(self, dtype):
        conv, up = self[1], self[0]
        w = conv.weight
        key = (w.data_ptr(), w._version, w.device, dtype)
        if self._fused_cache is None or self._fused_cache[0] != key:
            wide = w if w.dtype == torch.float64 else w.float()
            taps = torch.tensor(up.taps, dtype=wide.dtype, device=w.device)
            fir = taps / taps.sum() * up.factor
            self._fused_cache = (key, upsample_conv_weight(wide, fir).to(dtype))
        return self._fused_cache[1]

    def _use_fused_upsample(self, x) -> bool:
        # worth it when the upsampled activation is large next to the weight
        conv = self[1]
        k = conv.weight.shape[-1]
        return (k == 3 and self[0].factor == 2 and len(self[0].taps) == 4 and min(x.shape[-2:]) >= 2
                and 10 * conv.weight.shape[0] * 9 <= 4 * x.shape[-2] * x.shape[-1])

    def _conv_unscaled(self, x):
        if self.upsample and self._use_fused_upsample(x):
            w = self._fused_upsample_weight(x.dtype)
            y = F.pixel_shuffle(F.conv2d(x, w, padding=1), 2)
            # The folded form sees the upsampled map extend one pixel past the border where
            # the reference zero-pads it: redo the outermost rows/columns on thin strips.
            up, conv = self[0], self[1]
            y[:, :, :1] = conv.conv_unscaled(up(x[:, :, :2]))[:, :, :1]
            y[:, :, -1:] = conv.conv_unscaled(up(x[:, :, -2:]))[:, :, -1:]
            y[:, :, :, :1] = conv.conv_unscaled(up(x[:, :, :, :2]))[:, :, :, :1]
            y[:, :, :, -1:] = conv.conv_unscaled(up(x[:, :, :, -2:]))[:, :, :, -1:]
            return y
        for i in range(self.conv_index):
            x = self[i](x)
        return self[self.conv_index].conv_unscaled(x)

    def forward_unscaled(self, x):
        """For a layer without bias/activation: (conv with the raw weight, its scale)."""
        return self._conv_unscaled(x), self[self.conv_index].scale

    def forward(self, x):
        conv = self[self.conv_index]
        act = self[self.conv_index + 1] if len(self) > self.conv_index + 1 else None
        if not (isinstance(act, FusedLeakyReLU) and conv.bias is None and _inplace_ok(x)):
            return super().forward(x)
        # leaky(s*conv(x, W) + b) * g == leaky(conv(x, W) + b/s) * (s*g): no pass over W
        y = self._conv_unscaled(x)
        return bias_act_(y, act.bias, act.scale, out_scale=conv.scale)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (per-sample input-channel scales, optional demodulation).

    Two equivalent formulations, picked per call by cost:
    - weight folding (the reference): w_b = scale * W * s_b [* d_b], one conv per sample;
      cheap when the weight is small next to the activation (high-resolution layers);
    - input modulation: conv(x * scale * s_b, W) * d_b with one batched conv and shared
      weights; d_b = rsqrt(scale^2 * (s_b^2 @ sum_k W^2) + eps) from a cached (out, in) table.
    """

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True,
                 upsample=False, downsample=False, blur_kernel=BLUR_TAPS):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample
        if upsample:
            p = (len(blur_kernel) - 2) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate
        self._sq_cache = None

    def extra_repr(self):
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
                f"upsample={self.upsample}, downsample={self.downsample}")

    def _weight_sq(self, dtype=torch.float32):
        """sum over kernel taps of W^2, (out, in), cached until the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype, dtype)
        if self._sq_cache is None or self._sq_cache[0] != key:
            with torch.no_grad():
                sq = w[0].to(dtype).pow(2).sum([2, 3])
            self._sq_cache = (key, sq)
        return self._sq_cache[1]

    def _conv(self, x, weight):
        if self.upsample:
            return self.blur(conv_transpose2d_stride2(x, weight))
        if self.downsample:
            return F.conv2d(self.blur(x), weight, stride=2)
        return F.conv2d(x, weight, padding=self.padding)

    def use_weight_folding(self, x) -> bool:
        if torch.is_grad_enabled():
            return True
        h, w = x.shape[-2:]
        return self.out_channel * self.kernel_size ** 2 <= h * w

    def forward_unscaled(self, x, style):
        """(y, d): the modulated conv is y * d[:, :, None, None]; d is None when y is final."""
        batch = x.shape[0]
        style = self.modulation(style)  # (B, in)
        if self.use_weight_folding(x):
            weight = self.scale * self.weight * style.view(batch, 1, self.in_channel, 1, 1)
            if self.demodulate:
                demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
                weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
            weight = weight.to(x.dtype)
            outs = [self._conv(x[b:b + 1], weight[b]) for b in range(batch)]
            return (outs[0] if batch == 1 else torch.cat(outs)), None
        s = style * self.scale
        x = x * s.to(x.dtype).view(batch, self.in_channel, 1, 1)
        y = self._conv(x, self.weight[0].to(x.dtype))
        if not self.demodulate:
            return y, None
        s = _wide(s)
        demod = torch.rsqrt(s.pow(2) @ self._weight_sq(s.dtype).T + 1e-8)
        return y, demod

    def forward(self, x, style):
        y, demod = self.forward_unscaled(x, style)
        if demod is None:
            return y
        return y * demod.to(y.dtype).view(*demod.shape, 1, 1)


class ConstantInput(nn.Module):
    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, style):
        return self.input.repeat(style.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False,
                 demodulate=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample, demodulate=demodulate)
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style):
        if not _inplace_ok(x):
            return self.activate(self.conv(x, style))
        y, demod = self.conv.forward_unscaled(x, style)
        return bias_act_(y, self.activate.bias, self.activate.scale, out_scale=demod)


class ToRGB(nn.Module):
    def __init__(self, in_channel, upsample=True, blur_kernel=BLUR_TAPS):
        super().__init__()
        self.upsample = upsample
        if upsample:
            self.up = Upsample(blur_kernel)
        self.conv = ConvLayer(in_channel, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, skip=None):
        # the 3-channel RGB sum is kept in float32 even when x is bfloat16 / float16
        out = _wide(self.conv(x))
        out = out + self.bias.to(out.dtype)
        if skip is not None:
            out = out + self.up(skip.to(out.dtype))
        return out


def _identity_grid(size: int, like: torch.Tensor) -> torch.Tensor:
    """(size, size, 2) sampling grid over [-1, 1] (x along width, y along height)."""
    xs = torch.linspace(-1, 1, size, device=like.device)
    return torch.stack(torch.meshgrid(xs, xs, indexing="xy"), 2).to(like.dtype)


def grid_sample_shared(feat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear grid_sample (zeros padding, align_corners=True) of a batch-1 or batch-B map.

    A batch-1 map shared by B grids is sampled once with the B grids stacked along
    height, so the identity features are never copied per frame.
    """
    batch, h, w, _ = grid.shape
    if feat.shape[0] == batch:
        return F.grid_sample(feat, grid, align_corners=True)
    out = F.grid_sample(feat, grid.reshape(1, batch * h, w, 2), align_corners=True)
    c = feat.shape[1]
    if out.is_contiguous():
        return out.view(c, batch, h, w).transpose(0, 1)
    return out.permute(0, 2, 3, 1).reshape(batch, h, w, c).permute(0, 3, 1, 2)


class ToFlow(nn.Module):
    """Predicts a flow field (2 ch, tanh) and a mask (1 ch, sigmoid) and warps encoder features."""

    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=BLUR_TAPS):
        super().__init__()
        self.upsample = upsample
        if upsample:
            self.up = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, h, style, feat, skip=None, need_h=True):
        """(warped features, h blended with them, raw 3-channel output (float32)).

        The flow, mask and sampling run in float32 (feat's dtype) whatever h's dtype: a
        bfloat16 grid would misplace samples by up to half a pixel at 512x512."""
        out = self.conv(h, style).to(feat.dtype) + self.bias.to(feat.dtype)
        if skip is not None:
            out = out + (self.up(skip) if self.upsample else skip).to(feat.dtype)
        flow = torch.tanh(out[:, 0:2]).permute(0, 2, 3, 1) + _identity_grid(out.shape[2], out)
        mask = torch.sigmoid(out[:, 2:3])
        feat_warp = grid_sample_shared(feat, flow)
        feat_warp = feat_warp.contiguous(memory_format=_layout(h))
        if _inplace_ok(feat_warp):
            feat_warp.mul_(mask)
        else:
            feat_warp = feat_warp * mask
        feat_warp = feat_warp.to(h.dtype)
        h = feat_warp + (1 - mask).to(h.dtype) * h if need_h else None
        return feat_warp, h, out


class Direction(nn.Module):
    """Motion code (B, motion_dim) -> latent offset along an orthonormalised basis (QR of W)."""

    def __init__(self, style_dim, motion_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, motion_dim))

    def basis(self) -> torch.Tensor:
        q, _ = torch.linalg.qr(self.weight.float() + 1e-8)  # (style_dim, motion_dim)
        return q

    def forward(self, motion):
        q = self.basis().to(motion.dtype)
        # sum_j motion_j * q_j, reduced exactly as diag_embed(motion) @ Q^T summed over j
        return (motion[:, :, None] * q.T[None]).sum(1)


def channels_last_weights_(module: nn.Module, enable: bool = True) -> nn.Module:
    """Store every conv weight channels-last (or back to OIHW), in place; values and
    state-dict unchanged.

    PyTorch runs a CPU/CUDA convolution channels-last as soon as its weight is, converting
    the input if needed, so the weight layout selects the kernel. On CPU the oneDNN
    channels-last kernels are ~10-30% faster but sum in a less accurate order (measured:
    ~4e-6 vs ~4e-7 max relative error for a 1024-channel 3x3 conv)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, EqualConv2d) and m.weight.ndim == 4:
                w = m.weight
                if w.is_contiguous(memory_format=torch.channels_last) != enable:
                    w.data = w.data.contiguous(
                        memory_format=torch.channels_last if enable else torch.contiguous_format)
            elif isinstance(m, ModulatedConv2d):
                w = m.weight  # (1, out, in, k, k): make w[0] channels-last
                if w[0].is_contiguous(memory_format=torch.channels_last) != enable:
                    w.data = (w.data.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
                              if enable else w.data.contiguous())
    return module


def reset_fir_buffers(module: nn.Module) -> None:
    """Recompute the constant FIR kernels (e.g. after `to_empty` on a meta-built model)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (Blur, Upsample)):
                m.reset_buffers()
