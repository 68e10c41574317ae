"""Small bidirectional transformer pieces used by the patch encoders and the DiT heads.

State-dict names follow the released checkpoint: RMSNorm weight is `scale`, attention is
`qkv`/`proj` without biases, the SwiGLU MLP is `fc1`/`fc2`/`proj`, RoPE keeps its table in the
persistent buffer `w`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RoPE(nn.Module):
    """Rotary embedding that rotates adjacent channel pairs (2i, 2i+1) of every head."""

    def __init__(self, head_dim: int, max_len: int = 1024, base: int = 10000):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2) / head_dim))  # (hd/2,)
        angles = torch.outer(torch.arange(max_len), inv_freq).float()  # (max_len, hd/2)
        self.register_buffer("w", torch.stack([angles.cos(), angles.sin()], dim=-1))  # (max_len, hd/2, 2)

    def forward(self, x_blnh: Tensor) -> Tensor:
        """x (B, L, n_head, head_dim) -> same shape, positions 0..L-1."""
        b, length, n, h = x_blnh.shape
        pairs = x_blnh.reshape(b, length, n, h // 2, 2)
        cos_sin = self.w[:length][None, :, None]  # (1, L, 1, hd/2, 2)
        return self.rotate(pairs, cos_sin).reshape(b, length, n, h)

    @staticmethod
    def rotate(pairs: Tensor, cos_sin: Tensor) -> Tensor:
        cos, sin = cos_sin[..., 0], cos_sin[..., 1]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack([cos * x0 - sin * x1, cos * x1 + sin * x0], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + self.eps) * self.scale


class SelfAttention(nn.Module):
    """Multi-head attention without a causal mask (every position sees every other)."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: Tensor, rope: Optional[RoPE], attn_mask: Optional[Tensor]) -> Tensor:
        b, length, d = x.shape
        q, k, v = (t.reshape(b, length, self.n_head, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))
        if rope is not None:
            q, k = rope(q), rope(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_head, L, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


class MLP(nn.Module):
    """SwiGLU: proj(silu(fc1 x) * fc2 x), hidden width int(8/3 * n_embd)."""

    def __init__(self, n_embd: int, n_head: int = 0):
        super().__init__()
        n_hidden = int(8 * n_embd / 3)
        self.fc1 = nn.Linear(n_embd, n_hidden, bias=False)
        self.fc2 = nn.Linear(n_embd, n_hidden, bias=False)
        self.proj = nn.Linear(n_hidden, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.silu(self.fc1(x)) * self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.norm1 = RMSNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.norm2 = RMSNorm(n_embd)
        self.mlp = MLP(n_embd, n_head)

    def forward(self, x: Tensor, rope: Optional[RoPE], attn_mask: Optional[Tensor]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, attn_mask)
        return x + self.mlp(self.norm2(x))


@dataclass
class DecoderConfig:
    seq_len: int = 50  # unused by the modules; kept for signature compatibility
    feat_dim: int = 100
    n_layer: int = 4
    n_head: int = 4
    hidden_size: int = 256


class PatchEncoder(nn.Module):
    """Compresses each patch of P frames into one vector: a learned CLS token is prepended,
    a small bidirectional transformer runs over the P+1 tokens, the CLS row is returned.

    x (B, T, P, input_dim) -> (B, T, hidden_size)
    """

    def __init__(self, input_dim: int, hidden_size: int, n_layer: int = 4, n_head: int = 8):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_dim, hidden_size, bias=True)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 1, hidden_size) * 0.02)
        self.rope = RoPE(hidden_size // n_head)
        self.blocks = nn.ModuleList([Block(hidden_size, n_head) for _ in range(n_layer)])
        self.norm = RMSNorm(hidden_size)

    def forward(self, x_btpd: Tensor) -> Tensor:
        b, t, p, _ = x_btpd.shape
        x = self.input_proj(x_btpd)
        cls = self.cls_token.expand(b, t, 1, -1)
        x = torch.cat([cls, x], dim=2).reshape(b * t, p + 1, self.hidden_size)
        for block in self.blocks:
            x = block(x, self.rope, None)
        return self.norm(x)[:, 0].reshape(b, t, self.hidden_size)


class ContinuousDecoder(nn.Module):
    """input_proj -> bidirectional blocks with RoPE over positions 0..L-1 -> RMSNorm."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.hidden_size = cfg.hidden_size
        self.input_proj = nn.Linear(cfg.feat_dim, cfg.hidden_size)
        self.blocks = nn.ModuleList([Block(cfg.hidden_size, cfg.n_head) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.hidden_size)
        self.rope = RoPE(cfg.hidden_size // cfg.n_head)

    def forward(self, x_bld: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, L, feat_dim); attention_mask (B, L) bool, True = valid -> (B, L, hidden)."""
        b, length, _ = x_bld.shape
        h = self.input_proj(x_bld)
        additive_mask = None
        if attention_mask is not None:
            additive_mask = ((~attention_mask).to(torch.float32) * -1e9).view(b, 1, 1, length)
        for block in self.blocks:
            h = block(h, self.rope, additive_mask)
        return self.norm(h)
