"""Conditional flow matching head: Euler sampler with sway sampling + CFG-zero-star, and the
training loss. Time runs from t=1 (noise) to t=0 (data); the estimator predicts v = noise - data.

The reference's CfmConfig also has sigma_min, solver, inference_cfg_rate, reg_loss_type and
ratio_r_neq_t_range, and UnifiedCFM a mean-flow mode (mean_mode, a jvp loss); the released model uses
none of them (Euler only, mean_mode False), so they are not here.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from local_dit import VoxCPMLocDiT


ZERO_INIT_FRACTION = 0.04  # CFG-zero-star: the first max(1, int(0.04 * (steps + 1))) steps have zero velocity


@dataclass
class CfmConfig:
    t_scheduler: str = "log-norm"
    training_cfg_rate: float = 0.1
    training_cond_drop_rate: float = 0.05
    noise_cond_prob_range: Tuple[float, float] = (0.0, 0.0)
    noise_cond_scale: float = 0.0


class UnifiedCFM(nn.Module):
    def __init__(self, in_channels: int, cfm_params: CfmConfig, estimator: VoxCPMLocDiT):
        super().__init__()
        self.t_scheduler = cfm_params.t_scheduler
        self.training_cfg_rate = cfm_params.training_cfg_rate
        self.training_cond_drop_rate = cfm_params.training_cond_drop_rate
        self.noise_cond_prob_range = tuple(cfm_params.noise_cond_prob_range)
        self.noise_cond_scale = cfm_params.noise_cond_scale
        self.in_channels = in_channels
        self.estimator = estimator

    # ---------------------------------------------------------------- sampling
    @torch.inference_mode()
    def forward(self, mu, n_timesteps: int, patch_size: int, cond, global_cond, temperature: float = 1.0,
                cfg_value: float = 1.0, sway_sampling_coef: float = 1.0, use_cfg_zero_star: bool = True,
                noise: Optional[torch.Tensor] = None):
        """mu (B, H), cond (B, C, T'), global_cond (B, G) -> one patch (B, C, patch_size).
        The only RNG draw is the initial noise randn(B, C, patch_size); `noise` replays a given draw."""
        b = mu.shape[0]
        if noise is None:
            noise = torch.randn((b, self.in_channels, patch_size), device=mu.device, dtype=mu.dtype)
        z = noise.to(device=mu.device, dtype=mu.dtype) * temperature
        t_span = torch.linspace(1, 0, n_timesteps + 1, device=mu.device, dtype=mu.dtype)
        t_span = t_span + sway_sampling_coef * (torch.cos(torch.pi / 2 * t_span) - 1 + t_span)
        return self.solve_euler(z, t_span, mu, cond, global_cond, cfg_value, use_cfg_zero_star)

    @staticmethod
    def optimized_scale(positive_flat, negative_flat):
        """CFG-zero-star projection coefficient <v_c, v_u> / |v_u|^2 per sample."""
        dot = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)
        return dot / (torch.sum(negative_flat ** 2, dim=1, keepdim=True) + 1e-8)

    def solve_euler(self, x, t_span, mu, cond, global_cond, cfg_value: float = 1.0, use_cfg_zero_star: bool = True):
        t, dt = t_span[0], t_span[0] - t_span[1]
        n_steps = len(t_span) - 1
        zero_init_steps = max(1, int(len(t_span) * ZERO_INIT_FRACTION))
        b = x.size(0)
        # one batched estimator call per step: conditional rows first, unconditional (mu = 0) rows second;
        # the condition rows and the delta-time embedding (mean-flow models only; 0 here) are the same at
        # every step, so they are projected once
        mu_both = torch.cat([mu, torch.zeros_like(mu)])
        context = self.estimator.context(torch.cat([cond, cond]), torch.cat([global_cond, global_cond]),
                                         torch.zeros(2 * b, device=x.device, dtype=t.dtype))
        for step in range(1, n_steps + 1):
            if use_cfg_zero_star and step <= zero_init_steps:
                velocity = torch.zeros_like(x)
            else:
                v_both = self.estimator.velocity(torch.cat([x, x]), mu_both, t.reshape(1).expand(2 * b), context)
                v_cond, v_uncond = v_both[:b], v_both[b:]
                if use_cfg_zero_star:
                    scale = self.optimized_scale(v_cond.reshape(b, -1), v_uncond.reshape(b, -1))
                    scale = scale.view(b, *([1] * (x.dim() - 1)))
                else:
                    scale = 1.0
                velocity = v_uncond * scale + cfg_value * (v_cond - v_uncond * scale)
            x = x - dt * velocity
            t = t - dt
            if step < n_steps:
                dt = t - t_span[step + 1]
        return x

    # ---------------------------------------------------------------- training
    def sample_r_t(self, x, mu: float = -0.4, sigma: float = 1.0, ratio_r_neq_t: float = 0.0):
        batch = x.shape[0]
        if self.t_scheduler == "log-norm":
            r = torch.sigmoid(torch.randn(batch, device=x.device, dtype=x.dtype) * sigma + mu)
            t = torch.sigmoid(torch.randn(batch, device=x.device, dtype=x.dtype) * sigma + mu)
        elif self.t_scheduler == "uniform":
            r = torch.rand(batch, device=x.device, dtype=x.dtype)
            t = torch.rand(batch, device=x.device, dtype=x.dtype)
        else:
            raise ValueError(f"unsupported t_scheduler: {self.t_scheduler}")
        differ = torch.rand(batch, device=x.device, dtype=x.dtype) < ratio_r_neq_t
        r, t = torch.where(differ, torch.stack([torch.min(r, t), torch.max(r, t)]), torch.stack([t, t]))
        return r.squeeze(), t.squeeze()

    @staticmethod
    def adaptive_loss_weighting(losses, mask=None, p: float = 0.0, epsilon: float = 1e-3):
        weights = 1.0 / ((losses + epsilon).pow(p))
        if mask is not None:
            weights = weights * mask
        return weights.detach()

    def compute_loss(self, x1, mu, cond: Optional[torch.Tensor] = None, global_cond: Optional[torch.Tensor] = None,
                     tgt_mask: Optional[torch.Tensor] = None, progress: float = 0.0):
        """x1 (b, C, T) targets, mu (b, H), cond (b, C, T'), global_cond (b, G), tgt_mask (b, 1, T).

        RNG draws, in order: cfg-drop rand(b), cond-drop rand(b), noisy-cond rand(b), randn(cond),
        s_r randn(b), s_t randn(b), r!=t rand(b), z randn(x1)."""
        b = x1.shape[0]
        if self.training_cfg_rate > 0:
            mu = mu * (torch.rand(b, device=x1.device) > self.training_cfg_rate).view(-1, 1)
        if self.training_cond_drop_rate > 0:
            cond = cond * (torch.rand(b, device=x1.device) > self.training_cond_drop_rate).view(-1, 1, 1)
        if cond is None:
            cond = torch.zeros_like(x1)
        lo, hi = self.noise_cond_prob_range
        noisy = torch.rand(b, device=x1.device) > (1.0 - (lo + progress * (hi - lo)))
        cond = cond + noisy.view(-1, 1, 1) * torch.randn_like(cond) * self.noise_cond_scale

        r, t = self.sample_r_t(x1)  # r == t: ratio_r_neq_t is 0 without mean flow, the draws still happen
        r, t = r.detach().clone(), t.detach().clone()
        z = torch.randn_like(x1)
        y = (1 - t.view(-1, 1, 1)) * x1 + t.view(-1, 1, 1) * z
        u_target = z - x1
        u_pred = self.estimator(y, mu, t, cond, global_cond, t - r)

        losses = F.mse_loss(u_pred, u_target.detach(), reduction="none").mean(dim=1)  # (b, T)
        if tgt_mask is not None:
            weights = self.adaptive_loss_weighting(losses, tgt_mask.squeeze(1))
            return (weights * losses).sum() / torch.sum(tgt_mask)
        return losses.mean()
