"""WhisperX-VAE: the 24 kHz speech autoencoder whose 32-d, 25 Hz latents Talker-T2AV models.

    wav_24k --CodecEnc--> acoustic (B, hidden, T/960) --+
    mel_16k --Whisper audio encoder (50 Hz) -> pair-mean (25 Hz) --+--> vae.in_proj -> posterior mean
    latent (B, T/960, 32) --vae.out_proj--> CodecDec --> tanh --> wav_24k

CodecEnc / CodecDec are DAC-style conv stacks (weight-normalised convolutions, Snake activations);
the semantic branch is the Whisper large-v3 audio encoder, run by transformers' WhisperEncoder.
State-dict names are those of the released Lightning checkpoint (`whisperx-vae/model.ckpt`), except
inside the Whisper encoder, whose OpenAI names are converted at load time
(`openai_to_transformers_whisper_keys`) and back on export (`WhisperXVAE.checkpoint_state_dict`).
The checkpoint's Whisper text decoder (~0.9 B parameters, never used by encode/decode) is not built.
"""
from __future__ import annotations

import collections
import math
import os
import re
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.safe_load import key_report, safe_torch_load


# ---------------------------------------------------------------------------------------------
# Dimensions and configurations
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WhisperDims:
    """openai-whisper's ModelDimensions; the text_* fields describe the decoder we do not build."""
    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 32
    n_vocab: int = 51866
    n_text_ctx: int = 448
    n_text_state: int = 1280
    n_text_head: int = 20
    n_text_layer: int = 32


WHISPER_LARGE_V3_DIMS = WhisperDims()


def tiny_whisper_dims() -> WhisperDims:
    """The shrunken Whisper of the parity fixtures (and of `--demo`)."""
    return WhisperDims(n_mels=128, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                       n_vocab=32, n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1)


def tiny_cfg() -> DictConfig:
    """Codec configuration of the parity fixtures (whisperx_vae_tiny.ckpt), matching tiny_whisper_dims."""
    return OmegaConf.create({
        "model": {
            "codec_encoder": {"in_dim": 8, "ratios": [2, 4, 5, 6, 4], "hidden_dim": 64},
            "codec_decoder": {"hidden_dim": 96, "ratios": [4, 6, 5, 4, 2], "z_dim": 32},
        },
        "dataset": {"sr": 24000},
    })


def assumed_release_cfg() -> DictConfig:
    """Full-size codec configuration ASSUMED by the fixture manifest (the real one is stored in the
    released checkpoint's hyper_parameters.cfg). Used for meta-device checks and memory figures."""
    return OmegaConf.create({
        "model": {
            "codec_encoder": {"in_dim": 64, "ratios": [2, 4, 5, 6, 4], "hidden_dim": 1280},
            "codec_decoder": {"hidden_dim": 1536, "ratios": [4, 6, 5, 4, 2], "z_dim": 32},
        },
        "dataset": {"sr": 24000},
    })


def _as_whisper_dims(dims) -> WhisperDims:
    if dims is None:
        return WHISPER_LARGE_V3_DIMS
    if isinstance(dims, WhisperDims):
        return dims
    if isinstance(dims, dict):
        return WhisperDims(**dims)
    return WhisperDims(**{k: getattr(dims, k) for k in WhisperDims.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# DAC building blocks
# ---------------------------------------------------------------------------------------------

class Snake1d(nn.Module):
    """x + sin(alpha * x)^2 / alpha with one learned alpha per channel (DAC's Snake)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        # Same operation order as DAC (reciprocal first) so float32 results agree bit for bit.
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class _WeightNormConv(nn.Module):
    """Convolution with legacy torch weight norm (dim 0): weight = weight_g * weight_v / ||weight_v||,
    the norm taken over all dims but 0. Parameters are named exactly as in the checkpoint."""

    def __init__(self, weight_shape, out_channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_g = nn.Parameter(torch.empty(weight_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(weight_shape))
        if self.weight_v.device.type != "meta":
            nn.init.trunc_normal_(self.weight_v, std=0.02)
            with torch.no_grad():
                self.weight_g.copy_(self.weight_v.flatten(1).norm(dim=1)[:, None, None])

    def weight(self):
        return torch._weight_norm(self.weight_v, self.weight_g, 0)


class WNConv1d(_WeightNormConv):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__((out_channels, in_channels, kernel_size), out_channels)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x):
        return nn.functional.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNormConv):
    """Weight (in, out, k): weight norm dim 0 is the INPUT channel for a transposed conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0):
        super().__init__((in_channels, out_channels, kernel_size), out_channels)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding

    def forward(self, x):
        return nn.functional.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding,
                                              self.output_padding)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x):
        return x + self.block(x)  # padding keeps the length, no crop needed


class EncoderBlock(nn.Module):
    """Three dilated residual units at dim/2 channels, then a strided conv to dim channels."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            ResidualUnit(dim // 2, 1),
            ResidualUnit(dim // 2, 3),
            ResidualUnit(dim // 2, 9),
            Snake1d(dim // 2),
            WNConv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x):
        return self.block(x)


class DecoderBlock(nn.Module):
    """Transposed conv upsampling exactly by `stride` (odd strides need output_padding 1)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(in_dim),
            WNConvTranspose1d(in_dim, out_dim, kernel_size=2 * stride, stride=stride,
                              padding=math.ceil(stride / 2), output_padding=stride % 2),
            ResidualUnit(out_dim, 1),
            ResidualUnit(out_dim, 3),
            ResidualUnit(out_dim, 9),
        )

    def forward(self, x):
        return self.block(x)


class CodecEncoder(nn.Module):
    """(B, 1, T) waveform -> (B, d_latent, T / prod(strides)); channels double at every block."""

    def __init__(self, d_model: int, strides, d_latent: int):
        super().__init__()
        layers = [WNConv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, stride))
        layers += [Snake1d(d_model), WNConv1d(d_model, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, wav_b1t):
        return self.block(wav_b1t)


class CodecDecoder(nn.Module):
    """(B, in_channels, T_lat) -> (B, 1, T_lat * prod(strides)) in [-1, 1]; channels halve per block."""

    def __init__(self, in_channels: int, channels: int, strides):
        super().__init__()
        layers = [WNConv1d(in_channels, channels, kernel_size=7, padding=3)]
        for i, stride in enumerate(strides):
            layers.append(DecoderBlock(channels // 2 ** i, channels // 2 ** (i + 1), stride))
        out_dim = channels // 2 ** len(strides)
        layers += [Snake1d(out_dim), WNConv1d(out_dim, 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x_bct, apply_tanh: bool = True):
        return self.model(x_bct) if apply_tanh else self.model[:-1](x_bct)


class VAEBottleneck(nn.Module):
    """1x1 convs around the Gaussian latent; inference uses the posterior mean only."""

    def __init__(self, hidden_dim: int, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.in_proj = WNConv1d(hidden_dim, 2 * z_dim, kernel_size=1)   # -> (mean, scale)
        self.out_proj = WNConv1d(z_dim, hidden_dim, kernel_size=1)


# ---------------------------------------------------------------------------------------------
# Whisper audio encoder (transformers) with checkpoint-name conversion
# ---------------------------------------------------------------------------------------------

def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding (length, channels): [sin | cos], computed in float32."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def whisper_encoder_config(dims: WhisperDims) -> WhisperConfig:
    return WhisperConfig(
        num_mel_bins=dims.n_mels, max_source_positions=dims.n_audio_ctx, d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
        encoder_ffn_dim=4 * dims.n_audio_state, activation_function="gelu", scale_embedding=False,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        attn_implementation="sdpa",
    )


class SemanticModel(nn.Module):
    """Whisper with only its audio encoder built (the reference builds the text decoder too)."""

    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        self.encoder = WhisperEncoder(whisper_encoder_config(dims))
        if self.encoder.embed_positions.weight.device.type != "meta":
            with torch.no_grad():
                self.encoder.embed_positions.weight.copy_(whisper_sinusoids(dims.n_audio_ctx, dims.n_audio_state))

    def embed_audio(self, mel_bft):
        """(B, n_mels, 2 * n_audio_ctx) log-mel -> (B, n_audio_ctx, n_audio_state), 50 Hz."""
        return self.encoder(mel_bft).last_hidden_state


_ENCODER_PREFIX = "semantic_model.encoder."
_DECODER_PREFIX = "semantic_model.decoder."
# OpenAI Whisper AudioEncoder name -> transformers WhisperEncoder name (after the encoder prefix).
_OPENAI_TO_HF_TOP = {"positional_embedding": "embed_positions.weight", "ln_post.": "layer_norm.",
                     "conv1.": "conv1.", "conv2.": "conv2."}
_OPENAI_TO_HF_BLOCK = {"attn.query.": "self_attn.q_proj.", "attn.key.": "self_attn.k_proj.",
                       "attn.value.": "self_attn.v_proj.", "attn.out.": "self_attn.out_proj.",
                       "attn_ln.": "self_attn_layer_norm.", "mlp.0.": "fc1.", "mlp.2.": "fc2.",
                       "mlp_ln.": "final_layer_norm."}


def _rename(name: str, top: dict, block: dict, block_re: str, block_fmt: str) -> str | None:
    match = re.fullmatch(block_re, name)
    if match:
        index, rest = match.groups()
        for old, new in block.items():
            if rest.startswith(old):
                return block_fmt.format(index) + new + rest[len(old):]
        return None
    for old, new in top.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def openai_to_transformers_whisper_keys(state_dict: dict) -> tuple[dict, list[str]]:
    """Checkpoint names -> module names. `semantic_model.encoder.*` keys are renamed from OpenAI's
    AudioEncoder layout to transformers' WhisperEncoder layout, `semantic_model.decoder.*` (and other
    `semantic_model.*` entries the encoder does not use) are dropped untouched, everything else is
    passed through. Returns (renamed state dict, dropped keys)."""
    renamed, dropped = {}, []
    for key, tensor in state_dict.items():
        if not key.startswith("semantic_model."):
            renamed[key] = tensor
            continue
        new = None
        if key.startswith(_ENCODER_PREFIX):
            new = _rename(key[len(_ENCODER_PREFIX):], _OPENAI_TO_HF_TOP, _OPENAI_TO_HF_BLOCK,
                          r"blocks\.(\d+)\.(.*)", "layers.{}.")
        if new is None:
            dropped.append(key)
        else:
            renamed[_ENCODER_PREFIX + new] = tensor
    return renamed, dropped


def transformers_to_openai_whisper_keys(state_dict: dict) -> dict:
    """Inverse of openai_to_transformers_whisper_keys for the keys the model holds."""
    top = {v: k for k, v in _OPENAI_TO_HF_TOP.items()}
    block = {v: k for k, v in _OPENAI_TO_HF_BLOCK.items()}
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith(_ENCODER_PREFIX):
            new = _rename(key[len(_ENCODER_PREFIX):], top, block, r"layers\.(\d+)\.(.*)", "blocks.{}.")
            if new is None:
                raise KeyError(f"no checkpoint name for {key}")
            key = _ENCODER_PREFIX + new
        out[key] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------

class WhisperXVAE(nn.Module):
    """`cfg`: the OmegaConf config stored in the checkpoint's hyper_parameters.cfg (or a plain dict
    of the same shape); `whisper_dims`: Whisper audio-encoder dims, large-v3 by default."""

    def __init__(self, cfg, whisper_dims=None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        cfg = self.cfg
        enc_in_dim = int(cfg.model.codec_encoder.in_dim)
        enc_ratios = [int(r) for r in cfg.model.codec_encoder.ratios]
        hidden_dim = int(cfg.model.codec_encoder.hidden_dim)
        dec_hidden = int(cfg.model.codec_decoder.hidden_dim)
        dec_ratios = [int(r) for r in cfg.model.codec_decoder.ratios]
        z_dim = int(cfg.model.codec_decoder.z_dim)
        self.whisper_dims = _as_whisper_dims(whisper_dims)
        if hidden_dim != self.whisper_dims.n_audio_state:
            raise ValueError(f"codec_encoder.hidden_dim ({hidden_dim}) must equal the Whisper width "
                             f"n_audio_state ({self.whisper_dims.n_audio_state}): the branches are added")
        self.hop_length = math.prod(enc_ratios)  # waveform samples per latent frame (960 = 25 Hz at 24 kHz)
        self.z_dim = z_dim

        self.CodecEnc = CodecEncoder(enc_in_dim, enc_ratios, hidden_dim)
        self.CodecDec = CodecDecoder(hidden_dim, dec_hidden, dec_ratios)
        self.vae = VAEBottleneck(hidden_dim, z_dim)
        self.semantic_model = SemanticModel(self.whisper_dims)
        self.eval()

    # -- encode --------------------------------------------------------------------------------

    def encode_semantic(self, mel_b1ft, n_frames: int):
        """Whisper features at 25 Hz: encoder output cropped to 2 * n_frames rows, then consecutive
        pairs averaged. Returns (semantic_50hz_used (B, 2n, C), semantic_25hz (B, n, C))."""
        semantic_full_btc = self.semantic_model.embed_audio(mel_b1ft[:, 0])
        semantic_used_btc = semantic_full_btc[:, : 2 * n_frames]
        t_even = semantic_used_btc.shape[1] // 2 * 2
        b, _, c = semantic_used_btc.shape
        semantic_25_btc = semantic_used_btc[:, :t_even].reshape(b, t_even // 2, 2, c).mean(dim=2)
        return semantic_used_btc, semantic_25_btc

    @torch.no_grad()
    def encode(self, wav, mel, return_layout: str = "btc"):
        """wav (B, 1, T) or (B, T) at 24 kHz; mel (B, 1, 128, 3000) Whisper log-mel of the same
        audio at 16 kHz -> posterior-mean latent (B, T // 960, z_dim) ("btc") or its transpose ("bct")."""
        layout = return_layout.lower()
        if layout not in ("btc", "bct"):
            raise ValueError(f"return_layout must be 'btc' or 'bct', got {return_layout!r}")
        if wav.dim() == 2:
            wav = wav[:, None]
        param = self.vae.in_proj.weight_v
        wav, mel = wav.to(param), mel.to(param)
        acoustic_bct = self.CodecEnc(wav)
        n_frames = acoustic_bct.shape[-1]
        _, semantic_25_btc = self.encode_semantic(mel, n_frames)
        if semantic_25_btc.shape[1] != n_frames:
            raise ValueError(f"audio too long: {n_frames} latent frames but Whisper covers only "
                             f"{semantic_25_btc.shape[1]} (30 s)")
        posterior_bct = self.vae.in_proj(acoustic_bct + semantic_25_btc.transpose(1, 2))
        mean_bct = posterior_bct[:, : self.z_dim]
        return mean_bct.transpose(1, 2).contiguous() if layout == "btc" else mean_bct

    # -- decode --------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latent, latent_layout: str = "btc"):
        """latent (B, T_lat, z_dim) ("btc") or (B, z_dim, T_lat) ("bct") -> waveform (B, 1, T_lat * 960)."""
        layout = latent_layout.lower()
        if layout == "btc":
            latent = latent.transpose(1, 2)
        elif layout != "bct":
            raise ValueError(f"latent_layout must be 'btc' or 'bct', got {latent_layout!r}")
        latent_bct = latent.to(self.vae.out_proj.weight_v).contiguous()
        return self.CodecDec(self.vae.out_proj(latent_bct))

    # -- checkpoint names ----------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict:
        """state_dict() under the release checkpoint's names (OpenAI names inside the Whisper encoder)."""
        return transformers_to_openai_whisper_keys(self.state_dict())

    def load_checkpoint_state_dict(self, ckpt_state_dict: dict, assign: bool = False) -> list[str]:
        """Load a state dict that uses the checkpoint's names. Every tensor of the model must be
        present with its exact shape; the Whisper decoder and any other extra entries (training-only
        modules of a Lightning checkpoint) are ignored and returned."""
        expected = {k: tuple(v.shape) for k, v in self.checkpoint_state_dict().items()}
        report = key_report(expected, {k: tuple(v.shape) for k, v in ckpt_state_dict.items()
                                       if hasattr(v, "shape")})
        if not report.ok(allow_unexpected=True):
            raise ValueError(report.message("WhisperX-VAE", allow_unexpected=True))
        renamed, ignored = openai_to_transformers_whisper_keys(ckpt_state_dict)
        own = self.state_dict()
        ignored += [k for k in renamed if k not in own]
        self.load_state_dict({k: renamed[k] for k in own}, strict=True, assign=assign)
        return ignored


# ---------------------------------------------------------------------------------------------
# Loading the release checkpoint
# ---------------------------------------------------------------------------------------------

# Everything a Lightning checkpoint with an OmegaConf cfg needs unpickled besides tensors (found
# with torch.serialization.get_unsafe_globals_in_checkpoint; dict/list/int appear as globals inside
# omegaconf's Metadata). float/str/bool are added for configs holding such values. Nothing else.
CHECKPOINT_SAFE_GLOBALS = [
    collections.defaultdict, typing.Any, dict, list, int, float, str, bool,
    DictConfig, ListConfig, Metadata, ContainerMetadata, AnyNode,
]


def read_checkpoint(ckpt_path) -> tuple[dict, DictConfig]:
    """(state_dict, cfg) of a Lightning checkpoint, via torch.load(weights_only=True) and the
    allow-list above. Zip-format files are memory-mapped, so entries that are never used (the
    Whisper decoder) are never read into memory."""
    path = os.fspath(ckpt_path)
    ckpt = safe_torch_load(path, "WhisperX-VAE checkpoint", CHECKPOINT_SAFE_GLOBALS)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: not a WhisperX-VAE Lightning checkpoint (no 'state_dict' dict)")
    cfg = (ckpt.get("hyper_parameters") or {}).get("cfg") if isinstance(ckpt.get("hyper_parameters"), dict) else None
    if cfg is None:
        raise ValueError(f"{path}: not a WhisperX-VAE Lightning checkpoint (no hyper_parameters.cfg)")
    return ckpt["state_dict"], cfg


def load_whisperx_vae(ckpt_path, device="cpu", whisper_dims=None, dtype=torch.float32) -> WhisperXVAE:
    """Build the model from the checkpoint's cfg on the meta device and load its weights (strict for
    every tensor the model has; the Whisper decoder is skipped). `whisper_dims` defaults to large-v3,
    as in the reference, which hard-codes them."""
    path = os.fspath(ckpt_path)
    state_dict, cfg = read_checkpoint(path)
    hint = "" if whisper_dims is not None else " (Whisper dims default to large-v3; pass whisper_dims)"
    try:
        with torch.device("meta"):
            model = WhisperXVAE(cfg, whisper_dims)
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: unusable hyper_parameters.cfg ({err}){hint}") from None
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()
                  if not k.startswith(_DECODER_PREFIX)}
    try:
        model.load_checkpoint_state_dict(state_dict, assign=True)
    except ValueError as err:
        raise ValueError(f"{path}: {err}{hint}") from None
    return model.to(device).eval().requires_grad_(False)


def build_on_meta(cfg=None, whisper_dims=None) -> WhisperXVAE:
    """Full-size model skeleton without memory (default: the manifest's assumed release cfg)."""
    with torch.device("meta"):
        return WhisperXVAE(assumed_release_cfg() if cfg is None else cfg, whisper_dims)


def save_checkpoint(model: WhisperXVAE, path) -> None:
    """Write `model` in the release checkpoint format ({'state_dict', 'hyper_parameters': {'cfg'}})
    (without the Whisper decoder). Used for tests and demos."""
    torch.save({"state_dict": model.checkpoint_state_dict(), "hyper_parameters": {"cfg": model.cfg}},
               os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Chunked and streaming decode
# ---------------------------------------------------------------------------------------------

# The decoder's receptive field, measured (tests/test_streaming.py): perturbing latent frame i changes
# the samples of 32 consecutive output frames within i-16 .. i+16 only; decoding frames [a, b) from latents [a-16, b+16) is equal to
# the one-shot decode within float32 rounding. Same strides as the release ([4, 6, 5, 4, 2], kernels 7).
DECODER_CONTEXT_FRAMES = 16
SAMPLES_PER_LATENT = 960


@torch.no_grad()
def decode_span(vae: "WhisperXVAE", latents_td: torch.Tensor, start: int, end: int,
                left: int = DECODER_CONTEXT_FRAMES, right: int = DECODER_CONTEXT_FRAMES) -> torch.Tensor:
    """(T, 32) latents -> the (end - start) * 960 samples of frames [start, end), decoded from latents
    [start - left, end + right) (clipped to the sequence): with left = right = 16, equal to the same samples
    of vae.decode(all latents)."""
    n = latents_td.shape[0]
    a, b = max(0, start - left), min(n, end + right)
    wav = vae.decode(latents_td[a:b][None], latent_layout="btc").reshape(-1)
    return wav[(start - a) * SAMPLES_PER_LATENT:(end - a) * SAMPLES_PER_LATENT].float()


class StreamingDecoder:
    """Latents in as they are sampled, the waveform out as soon as it is final.

    push(latents) returns the samples of every frame that now has `lookahead` frames after it (16: equal to
    the one-shot decode; fewer: earlier audio, approximate); finish() returns the rest. The samples returned
    over a run add up to the one-shot decode of all the latents pushed."""

    def __init__(self, vae: "WhisperXVAE", lookahead: int = DECODER_CONTEXT_FRAMES,
                 context: int = DECODER_CONTEXT_FRAMES):
        if lookahead < 0 or context < 0:
            raise ValueError(f"lookahead and context must be >= 0, got {lookahead}, {context}")
        self.vae, self.lookahead, self.context = vae, lookahead, context
        self._latents = []  # (n, 32) chunks pushed so far
        self.n_frames = 0  # latent frames pushed
        self.n_emitted = 0  # frames whose samples were returned

    def push(self, latents_td: torch.Tensor) -> torch.Tensor:
        self._latents.append(latents_td.detach().float())
        self.n_frames += latents_td.shape[0]
        return self._emit(self.n_frames - self.lookahead)

    def finish(self) -> torch.Tensor:
        return self._emit(self.n_frames)

    def _emit(self, end: int) -> torch.Tensor:
        if end <= self.n_emitted:
            return torch.zeros(0)
        all_td = torch.cat(self._latents)
        self._latents = [all_td]
        wav = decode_span(self.vae, all_td, self.n_emitted, end, self.context, self.lookahead)
        self.n_emitted = end
        return wav.cpu()


__all__ = [
    "WhisperDims", "WHISPER_LARGE_V3_DIMS", "tiny_whisper_dims", "tiny_cfg", "assumed_release_cfg",
    "WhisperXVAE", "load_whisperx_vae", "read_checkpoint", "build_on_meta", "save_checkpoint",
    "openai_to_transformers_whisper_keys", "transformers_to_openai_whisper_keys", "whisper_sinusoids",
    "CHECKPOINT_SAFE_GLOBALS", "DECODER_CONTEXT_FRAMES", "decode_span", "StreamingDecoder",
]
