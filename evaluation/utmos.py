"""UTMOS22 strong: predicted MOS of a speech clip (the paper's UTMOS column).

Reproduces tarepan/SpeechMOS v1.2.0 (commit ed25eacbfa42b99156c36ebec67a733b5dbb9b79),
speechmos/utmos22/strong/model.py with the wav2vec 2.0 base encoder of speechmos/utmos22/fairseq_alt.py,
including the torchaudio.functional.resample call that brings any input rate to 16 kHz.

    wave (B, T) at sr -> resample to 16 kHz (float32 Hann-sinc kernel)
      -> wav2vec2: 7 conv layers (hop 320) -> LayerNorm -> Linear 512->768
         -> + GELU(pos_conv) -> LayerNorm -> 12 post-LN transformer layers       = ssl (B, F, 768)
      -> cat(ssl, domain_emb, judge_emb) (B, F, 1024) -> BLSTM -> Linear-ReLU-Linear = frame scores (B, F, 1)
      -> score = 2 * mean over frames + 3

State-dict names and shapes are those of the released utmos22_strong_step7459_v1.pt (a bare state_dict),
so `load_utmos(path)` loads it with strict=True.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from media import audio

SAMPLE_RATE = 16000

# wav2vec 2.0 base
CONV_DIM = 512
CONV_LAYERS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # (kernel, stride): window 400, hop 320
EMBED_DIM = 768
N_LAYERS = 12
N_HEADS = 12
FFN_DIM = 3072
POS_CONV_KERNEL = 128
POS_CONV_GROUPS = 16

# UTMOS head
EMB_DIM = 128  # domain_emb / judge_emb
LSTM_HIDDEN = 512
PROJ_HIDDEN = 2048


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------

def resample_float32(wave: torch.Tensor, sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """torchaudio.functional.resample(wave, sr, new_sr) on the last axis, bit for bit: the kernel built in
    the waveform's dtype (audio.resample's functional path). Equal rates return the input itself."""
    return audio.resample(wave, sr, new_sr, functional=True)


_sinc_kernel_float32 = audio.sinc_kernel_in_dtype  # the kernel alone (tests compare it with the stored one)


# ---------------------------------------------------------------------------------------------
# wav2vec 2.0 (fairseq names)
# ---------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """Seven bias-free Conv1d + GELU; layer 0 adds a per-channel GroupNorm over the whole clip."""

    def __init__(self):
        super().__init__()
        layers, in_dim = [], 1
        for i, (kernel, stride) in enumerate(CONV_LAYERS):
            conv = nn.Conv1d(in_dim, CONV_DIM, kernel, stride=stride, bias=False)
            if i == 0:  # released index layout: 0 conv, 1 dropout (p=0), 2 GroupNorm, 3 GELU
                layers.append(nn.Sequential(conv, nn.Identity(), nn.GroupNorm(CONV_DIM, CONV_DIM), nn.GELU()))
            else:
                layers.append(nn.Sequential(conv, nn.GELU()))
            in_dim = CONV_DIM
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wave16k_bt: torch.Tensor) -> torch.Tensor:
        x = wave16k_bt[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x  # (B, 512, F)


class WeightNormConv1d(nn.Module):
    """Conv1d with legacy weight_norm(dim=2) parameters: weight = weight_v * weight_g / ||weight_v||,
    the norm taken per kernel tap over the output and input channels."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.empty(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4 / (kernel * channels)))
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.weight_g.copy_(self.tap_norm())

    def tap_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)  # (1, 1, kernel)

    def forward(self, x_bct: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.tap_norm())
        return F.conv1d(x_bct, weight, self.bias, padding=self.weight_v.shape[-1] // 2, groups=self.groups)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.k_proj = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.v_proj = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.out_proj = nn.Linear(EMBED_DIM, EMBED_DIM)

    def forward(self, x_bfd: torch.Tensor) -> torch.Tensor:
        b, f, _ = x_bfd.shape
        q, k, v = (proj(x_bfd).view(b, f, N_HEADS, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out_bhfd = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(64)
        return self.out_proj(out_bhfd.transpose(1, 2).reshape(b, f, EMBED_DIM))


class TransformerLayer(nn.Module):
    """Post-LN block: x = LN(x + MHA(x)); x = LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self):
        super().__init__()
        self.self_attn = SelfAttention()
        self.self_attn_layer_norm = nn.LayerNorm(EMBED_DIM)
        self.fc1 = nn.Linear(EMBED_DIM, FFN_DIM)
        self.fc2 = nn.Linear(FFN_DIM, EMBED_DIM)
        self.final_layer_norm = nn.LayerNorm(EMBED_DIM)

    def forward(self, x_bfd: torch.Tensor) -> torch.Tensor:
        x_bfd = self.self_attn_layer_norm(x_bfd + self.self_attn(x_bfd))
        return self.final_layer_norm(x_bfd + self.fc2(F.gelu(self.fc1(x_bfd))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_conv = nn.Sequential(WeightNormConv1d(EMBED_DIM, POS_CONV_KERNEL, POS_CONV_GROUPS))
        self.layer_norm = nn.LayerNorm(EMBED_DIM)
        self.layers = nn.ModuleList(TransformerLayer() for _ in range(N_LAYERS))

    def forward(self, x_bfd: torch.Tensor) -> torch.Tensor:
        # the even kernel with padding 64 yields F + 1 steps; the last one is dropped (fairseq SamePad)
        pos_bdf = F.gelu(self.pos_conv(x_bfd.transpose(1, 2))[..., :-1])
        x_bfd = self.layer_norm(x_bfd + pos_bdf.transpose(1, 2))
        # fairseq pads odd F with a masked zero frame here; masked keys change nothing, so no padding
        for layer in self.layers:
            x_bfd = layer(x_bfd)
        return x_bfd


class Wav2Vec2(nn.Module):
    def __init__(self):
        super().__init__()
        self.mask_emb = nn.Parameter(torch.empty(EMBED_DIM).uniform_())  # training remnant, unused
        self.feature_extractor = FeatureExtractor()
        self.layer_norm = nn.LayerNorm(CONV_DIM)
        self.post_extract_proj = nn.Linear(CONV_DIM, EMBED_DIM)
        self.encoder = Encoder()

    def forward(self, wave16k_bt: torch.Tensor) -> torch.Tensor:
        """(B, T) 16 kHz -> output of the last transformer layer (B, F, 768)."""
        features_bfc = self.feature_extractor(wave16k_bt).transpose(1, 2)
        return self.encoder(self.post_extract_proj(self.layer_norm(features_bfc)))


# ---------------------------------------------------------------------------------------------
# UTMOS22 strong
# ---------------------------------------------------------------------------------------------

class UTMOS22Strong(nn.Module):
    def __init__(self):
        super().__init__()
        self.wav2vec2 = Wav2Vec2()
        # the single learned data-domain and judge-id rows, shared by every frame
        self.domain_emb = nn.Parameter(torch.empty(1, EMB_DIM).normal_(), requires_grad=False)
        self.judge_emb = nn.Parameter(torch.empty(1, EMB_DIM).normal_(), requires_grad=False)
        self.blstm = nn.LSTM(EMBED_DIM + 2 * EMB_DIM, LSTM_HIDDEN, batch_first=True, bidirectional=True)
        self.projection = nn.Sequential(nn.Linear(2 * LSTM_HIDDEN, PROJ_HIDDEN), nn.ReLU(),
                                        nn.Linear(PROJ_HIDDEN, 1))

    def features(self, wave16k_bt: torch.Tensor) -> torch.Tensor:
        """16 kHz waveforms (B, T) -> wav2vec2 features `ssl` (B, F, 768)."""
        return self.wav2vec2(wave16k_bt)

    def frame_scores(self, ssl_bfd: torch.Tensor) -> torch.Tensor:
        """ssl (B, F, 768) -> per-frame scores (B, F, 1) before pooling."""
        b, f, _ = ssl_bfd.shape
        x_bfe = torch.cat([ssl_bfd, self.domain_emb.expand(b, f, -1), self.judge_emb.expand(b, f, -1)], dim=2)
        blstm_bfh, _ = self.blstm(x_bfe)  # [forward | backward] hidden states
        return self.projection(blstm_bfh)

    def forward(self, wave_bt: torch.Tensor, sr: int) -> torch.Tensor:
        """Waveforms (B, T) at rate sr -> predicted MOS (B,), 2 * mean frame score + 3 (unclipped)."""
        if wave_bt.dim() != 2:
            raise ValueError(f"expected a (B, T) waveform batch, got shape {tuple(wave_bt.shape)}")
        wave16k_bt = resample_float32(wave_bt, sr, SAMPLE_RATE)
        scores_bf1 = self.frame_scores(self.features(wave16k_bt))
        return scores_bf1.mean(dim=1).squeeze(1) * 2 + 3


def load_utmos(path) -> UTMOS22Strong:
    """UTMOS22Strong in eval mode with the weights of `path` (utmos22_strong_step7459_v1.pt, a bare
    state_dict; .safetensors also accepted), loaded without unpickling code and strictly checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UTMOS checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"UTMOS checkpoint {path} could not be read: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"UTMOS checkpoint {path} is not a bare state_dict of tensors")

    with torch.device("meta"):  # names and shapes only; the loaded tensors become the parameters
        model = UTMOS22Strong()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"UTMOS checkpoint {path} has wrong keys: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in expected.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise ValueError(f"UTMOS checkpoint {path} has wrong shapes: {'; '.join(wrong[:5])} ({len(wrong)})")
    state = {k: v.to(torch.float32) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
