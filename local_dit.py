"""DiT velocity estimator of the CFM heads (VoxCPM-style local DiT).

The decoder sees one sequence per sample:
[mu + time embedding, global condition, context frames (cond), noisy frames (x)]
and the velocity is read from the last T positions.
"""
import math

import torch
import torch.nn as nn

from llama4nar import ContinuousDecoder, DecoderConfig


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        assert dim % 2 == 0, "SinusoidalPosEmb requires an even dim"
        self.dim = dim

    def forward(self, x: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        if x.ndim < 1:
            x = x.unsqueeze(0)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, dtype=x.dtype, device=x.device) * -(math.log(10000) / (half - 1)))
        args = scale * x.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, bias=True)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, bias=True)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class VoxCPMLocDiT(nn.Module):
    def __init__(self, config: DecoderConfig, in_channels: int = 512, global_cond_channels: int = 40):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.config = config
        hidden = config.hidden_size
        self.in_proj = nn.Linear(in_channels, hidden, bias=True)
        self.cond_proj = nn.Linear(in_channels, hidden, bias=True)
        self.global_cond_proj = nn.Linear(global_cond_channels, hidden, bias=True)
        self.out_proj = nn.Linear(hidden, self.out_channels, bias=True)
        self.time_embeddings = SinusoidalPosEmb(hidden)
        self.time_mlp = TimestepEmbedding(hidden, hidden)
        self.delta_time_mlp = TimestepEmbedding(hidden, hidden)
        self.decoder = ContinuousDecoder(config)

    def forward(self, x, mu, t, cond, global_cond, dt):
        """x (N, C, T) noisy frames, mu (N, H) backbone state, t (N,), cond (N, C, T') context frames,
        global_cond (N, G), dt (N,) -> velocity (N, C, T)."""
        context = self.context(cond, global_cond, dt)
        return self.velocity(x, mu, t, context)

    def context(self, cond, global_cond, dt):
        """What does not change over a sampler's Euler steps: the projected condition rows and the
        delta-time embedding. (cond (N, C, T'), global_cond (N, G), dt (N,)) -> tuple for velocity()."""
        cond_ntd = self.cond_proj(cond.transpose(1, 2))
        global_n1d = self.global_cond_proj(global_cond.unsqueeze(1))
        dt_emb = self.delta_time_mlp(self.time_embeddings(dt).to(cond_ntd.dtype))
        return global_n1d, cond_ntd, dt_emb

    def velocity(self, x, mu, t, context):
        global_n1d, cond_ntd, dt_emb = context
        x_ntd = self.in_proj(x.transpose(1, 2))
        temb = self.time_mlp(self.time_embeddings(t).to(x_ntd.dtype)) + dt_emb
        seq = torch.cat([(mu + temb).unsqueeze(1), global_n1d, cond_ntd, x_ntd], dim=1)
        hidden = self.decoder(seq)[:, cond_ntd.size(1) + 2:]
        return self.out_proj(hidden).transpose(1, 2).contiguous()
