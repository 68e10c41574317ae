"""ECAPA-TDNN speaker encoder over WavLM hidden states (UniSpeech `ECAPA_TDNN_SMALL`, wavlm_large).

State-dict names equal those of `wavlm_large_finetune.pth["model"]`: `feature_weight`,
`feature_extract.model.*` (WavLM, fairseq/s3prl names), `layer1`..`layer4`, `conv`,
`pooling`, `bn`, `linear`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .wavlm import WavLMArgs, WavLMUpstream, tiny_wavlm_args, wavlm_large_args


@dataclass(frozen=True)
class EcapaDims:
    feat_dim: int = 1024  # WavLM hidden size
    channels: int = 512
    emb_dim: int = 256
    res2_scale: int = 8
    se_bottleneck_dim: int = 128
    attention_channels: int = 128
    cat_channels_out: int = 1536


class ConvReluBn(nn.Module):
    """Conv1d -> ReLU -> BatchNorm1d (BatchNorm after the ReLU, as released)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, padding=0, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x_bct):
        return self.bn(F.relu(self.conv(x_bct)))


class Res2ConvReluBn(nn.Module):
    """Res2Net block: channels split into `scale` groups; group i (i < scale-1) is convolved
    after adding the previous group's output; the last group passes through unchanged."""

    def __init__(self, channels, kernel_size, padding, dilation, scale):
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels {channels} not divisible by scale {scale}")
        self.width = channels // scale
        n = scale - 1
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, padding=padding, dilation=dilation) for _ in range(n)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(n))

    def forward(self, x_bct):
        groups = torch.split(x_bct, self.width, dim=1)
        outputs, running = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            running = groups[i] if i == 0 else running + groups[i]
            running = bn(F.relu(conv(running)))
            outputs.append(running)
        outputs.append(groups[len(self.convs)])
        return torch.cat(outputs, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels, bottleneck):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x_bct):
        scale_bc = torch.sigmoid(self.linear2(F.relu(self.linear1(x_bct.mean(dim=2)))))
        return x_bct * scale_bc.unsqueeze(2)


class SERes2Block(nn.Module):
    """1x1 ConvReluBn -> dilated Res2 -> 1x1 ConvReluBn -> squeeze-excite, plus the input."""

    def __init__(self, channels, kernel_size, dilation, scale, se_bottleneck_dim):
        super().__init__()
        self.Conv1dReluBn1 = ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = Res2ConvReluBn(channels, kernel_size, dilation, dilation, scale)
        self.Conv1dReluBn2 = ConvReluBn(channels, channels)
        self.SE_Connect = SqueezeExcite(channels, se_bottleneck_dim)

    def forward(self, x_bct):
        y = self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x_bct)))
        return self.SE_Connect(y) + x_bct


class AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and standard deviation over time -> (B, 2C)."""

    def __init__(self, in_dim, attention_channels):
        super().__init__()
        self.linear1 = nn.Conv1d(in_dim, attention_channels, kernel_size=1)
        self.linear2 = nn.Conv1d(attention_channels, in_dim, kernel_size=1)

    def forward(self, x_bct):
        alpha_bct = torch.softmax(self.linear2(torch.tanh(self.linear1(x_bct))), dim=2)
        mean_bc = torch.sum(alpha_bct * x_bct, dim=2)
        var_bc = torch.sum(alpha_bct * x_bct ** 2, dim=2) - mean_bc ** 2
        std_bc = torch.sqrt(var_bc.clamp(min=1e-9))
        return torch.cat([mean_bc, std_bc], dim=1)


class ECAPA_TDNN(nn.Module):
    """Speaker embedding (B, emb_dim) of 16 kHz waveforms (B, T).

    feat = InstanceNorm(softmax(feature_weight)-mix of the WavLM hidden states + 1e-6),
    then the ECAPA-TDNN layers, attentive statistics pooling, BatchNorm and a linear layer.
    """

    def __init__(self, dims: EcapaDims, wavlm_args: WavLMArgs, update_extract: bool = False):
        super().__init__()
        if dims.feat_dim != wavlm_args.encoder_embed_dim:
            raise ValueError(f"feat_dim {dims.feat_dim} != WavLM width {wavlm_args.encoder_embed_dim}")
        self.dims = dims
        self.update_extract = update_extract
        self.feature_extract = WavLMUpstream(wavlm_args)
        self.feature_weight = nn.Parameter(torch.zeros(self.feature_extract.num_hidden_states))
        if not update_extract:
            self.feature_extract.requires_grad_(False)
        self.instance_norm = nn.InstanceNorm1d(dims.feat_dim)  # no affine, no running stats

        c = dims.channels
        res2 = dict(kernel_size=3, scale=dims.res2_scale, se_bottleneck_dim=dims.se_bottleneck_dim)
        self.layer1 = ConvReluBn(dims.feat_dim, c, kernel_size=5, padding=2)
        self.layer2 = SERes2Block(c, dilation=2, **res2)
        self.layer3 = SERes2Block(c, dilation=3, **res2)
        self.layer4 = SERes2Block(c, dilation=4, **res2)
        self.conv = nn.Conv1d(3 * c, dims.cat_channels_out, kernel_size=1)
        self.pooling = AttentiveStatsPool(dims.cat_channels_out, dims.attention_channels)
        self.bn = nn.BatchNorm1d(2 * dims.cat_channels_out)
        self.linear = nn.Linear(2 * dims.cat_channels_out, dims.emb_dim)

    def get_feat(self, wav_bt: torch.Tensor) -> torch.Tensor:
        """(B, T) waveforms -> (B, D, T') normalized mix of the WavLM hidden states."""
        with torch.set_grad_enabled(self.update_extract and torch.is_grad_enabled()):
            hidden_lbtd = torch.stack(self.feature_extract(wav_bt), dim=0)
        layer_weights = F.softmax(self.feature_weight, dim=-1).view(-1, 1, 1, 1)
        mixed_btd = (layer_weights * hidden_lbtd).sum(dim=0)
        return self.instance_norm(mixed_btd.transpose(1, 2) + 1e-6)

    def forward(self, wav_bt: torch.Tensor) -> torch.Tensor:
        feat_bdt = self.get_feat(wav_bt)
        out1 = self.layer1(feat_bdt)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pooling(out)))


def ECAPA_TDNN_SMALL(feat_dim=1024, emb_dim=256, feat_type="wavlm_large", wavlm_args=None,
                     update_extract=False) -> ECAPA_TDNN:
    """The released speaker encoder layout (channels 512); `wavlm_args` overrides WavLM-Large."""
    if feat_type != "wavlm_large":
        raise ValueError(f"feat_type {feat_type!r} not supported; only 'wavlm_large'")
    return ECAPA_TDNN(EcapaDims(feat_dim=feat_dim, emb_dim=emb_dim), wavlm_args or wavlm_large_args(),
                      update_extract=update_extract)


def tiny_speaker_encoder(seed: int = 0) -> ECAPA_TDNN:
    """Randomly initialised small encoder (WavLM 2 layers, 64-d, conv 32 channels; full-width
    ECAPA head on 64-d features) in eval mode, for tests and the offline demo."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ECAPA_TDNN_SMALL(feat_dim=64, wavlm_args=tiny_wavlm_args())
    return model.eval()
