"""LIA-X generator (encoder + decoder) with the released lia-x.pt state-dict layout."""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from torch import nn

from .decoder import Decoder
from .encoder import Encoder


@dataclass
class LiaXDims:
    style_dim: int = 512  # multiplied by scale: the latent is 1024-d in the release
    motion_dim: int = 40
    scale: int = 2
    size: int = 512  # image size (power of two); the release works on 512x512
    channels: Optional[Tuple[int, int, int, int]] = None  # widths deep -> shallow, see below
    n_blocks: int = 4  # FlowResBlocks and ResBlocks per decoder level
    norm_groups: int = 32  # GroupNorm groups in the FlowResBlocks

    def widths(self) -> dict:
        """Channel width per resolution: the top three resolutions (size, size/2, size/4) use
        channels[3], [2], [1]; everything from size/8 down to 4x4 uses channels[0].
        Default (512*scale, 256*scale, 128*scale, 64*scale) reproduces the release."""
        ch = self.channels or tuple(c * self.scale for c in (512, 256, 128, 64))
        n = int(math.log2(self.size))
        if 2 ** n != self.size or self.size < 16:
            raise ValueError(f"LIA-X size must be a power of two >= 16, got {self.size}")
        return {2 ** i: ch[min(3, max(0, 3 - (n - i)))] for i in range(2, n + 1)}


class Generator(nn.Module):
    """Generator(style_dim=512, motion_dim=40, scale=2) is the released configuration (and the
    default here; upstream defaults to scale=1 but only scale=2 was released).

    Extra keyword arguments build smaller variants for tests and demos, e.g.
    Generator(style_dim=64, scale=1, size=128, channels=(32, 32, 16, 16), n_blocks=1, norm_groups=8).
    """

    def __init__(self, style_dim=512, motion_dim=40, scale=2, *, size=512, channels=None,
                 n_blocks=4, norm_groups=32):
        super().__init__()
        self.dims = LiaXDims(style_dim, motion_dim, scale, size,
                             tuple(channels) if channels else None, n_blocks, norm_groups)
        widths = self.dims.widths()
        latent = style_dim * scale
        if latent < motion_dim:
            raise ValueError(f"style_dim*scale ({latent}) must be >= motion_dim ({motion_dim})")
        self.size = size
        self.enc = Encoder(latent, motion_dim, widths, size)
        self.dec = Decoder(latent, motion_dim, widths, size, n_blocks, norm_groups)

    def get_alpha(self, x):
        """Motion code of an image batch: enc_r2t(enc_2r(x)) (B, motion_dim)."""
        return self.enc.enc_motion(x)

    def forward(self, img_source, alpha=None):
        """Reconstruct img_source moved by the motion codes `alpha` (list, see Decoder.navigation)."""
        z_s2r, _, feats = self.enc(img_source)
        return self.dec(z_s2r, alpha, feats)
