"""SpeechLLM: the generative core of Talker-T2AV (modules, training loss, checkpoint I/O).

A Qwen3 backbone reads one token per 4-frame patch, where a token is the sum of a speech patch
embedding and a motion patch embedding (each from its own PatchEncoder over projected frames).
Two CFM heads turn the backbone state into the next speech patch (32-d WhisperX-VAE latents,
speaker embedding as global condition) and the next motion patch (40-d normalized LIA-X motion,
first reference motion frame as global condition); a small MLP predicts when to stop.

The inference loop lives beside the model, in runtime/generation.py (`generate(model, ...)`), the
prompt in runtime/prompt.py. State-dict names and shapes are those of the released `model.safetensors`. The audio VAE
(`pretrained_speech_encoder`) and the speaker encoder (`spk`) are optional submodules: training attaches
them to encode audio on the fly (without a feature cache); their keys are never saved or expected in the
checkpoint, and inference always passes latents and embeddings instead.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from common import packed_linear
from common.constants import SAMPLES_PER_FRAME, SAMPLES_PER_FRAME_16K
from llama4nar import DecoderConfig, PatchEncoder
from local_dit import VoxCPMLocDiT
from common.safe_load import key_report, mmap_safetensors, safetensors_header
from unified_cfm import CfmConfig, UnifiedCFM

ENCODER_PREFIXES = ("pretrained_speech_encoder.", "spk.")
TIED_KEYS = ("llm.lm_head.weight",)
WEIGHTS_NAME = "model.safetensors"
ARGS_NAME = "speech_llm_args.json"  # written by save_pretrained; absent in the released folder
MAX_LABELLED_PATCHES = 187  # stop labels: longer rows (~30 s) get no positive label (reference rule)

# The Qwen/Qwen3-0.6B config.json (embedded so that nothing is downloaded).
QWEN3_0_6B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def qwen3_0_6b_config(attn_implementation: str = "sdpa") -> Qwen3Config:
    config = Qwen3Config(**{k: v for k, v in QWEN3_0_6B_CONFIG.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = attn_implementation
    return config

@dataclass
class ModelArguments:
    """The reference's fields and defaults (the reference's training config.json sets them, and
    transformers.HfArgumentParser refuses unknown keys); the last three are sizes the reference hard-codes.
    `llm_model_name_or_path`, `tts_checkpoint_path` and `tts_data_path` are read by training only;
    `encoder_projector_ds_rate` is set by the reference's config but read by nothing."""
    llm_model_name_or_path: Optional[str] = "Qwen/Qwen3-0.6B"
    encoder_projector_ds_rate: int = 12
    speech_embedding_dim: int = 128
    motion_embedding_dim: int = 40
    tts_checkpoint_path: Optional[str] = None
    tts_data_path: Optional[str] = None
    model_max_length: int = 8192
    frames_per_second: int = 25
    patch_size: int = 4
    delay: int = 5  # patches by which motion lags speech
    motion_cfm_weight: float = 1.0
    context_patches: int = 1
    patch_encoder_n_layer: int = 4
    patch_encoder_n_head: int = 8
    cfm_k_repeat: int = 2
    # not in the reference (fixed there); defaults = released model
    dit_n_layer: int = 8
    dit_n_head: int = 8
    speaker_embedding_dim: int = 256


def released_model_args() -> ModelArguments:
    """The arguments the released infer.py builds the model with."""
    return ModelArguments(encoder_projector_ds_rate=12, frames_per_second=25, speech_embedding_dim=32,
                          motion_embedding_dim=40, tts_checkpoint_path=None, patch_size=4, delay=0,
                          motion_cfm_weight=10, context_patches=1, patch_encoder_n_layer=4, patch_encoder_n_head=8,
                          cfm_k_repeat=2, model_max_length=1000)


def tiny_model_args_and_config(attn_implementation: str = "sdpa"):
    """(ModelArguments, Qwen3Config) of the small model used by tests and `--demo`."""
    args = ModelArguments(speech_embedding_dim=32, motion_embedding_dim=40, patch_size=4, delay=0,
                          motion_cfm_weight=10, context_patches=1, patch_encoder_n_layer=2, patch_encoder_n_head=4,
                          cfm_k_repeat=2, model_max_length=1000, dit_n_layer=2, dit_n_head=4)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=False,
                         hidden_act="silu")
    config._attn_implementation = attn_implementation
    return args, config


class FrameProjector(nn.Module):
    """Frame-wise Linear from latent channels to the backbone width (the reference calls it
    ProjectorConv1d; the submodule name `linear1` is the checkpoint's)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.linear1(x)


class StopPredictor(nn.Module):
    """Linear -> SiLU -> Linear(1, no bias): one stop logit per position."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.actn = nn.SiLU()
        self.head = nn.Linear(dim, 1, bias=False)

    def forward(self, x):
        """x (B, T, D) -> logits (B, T)."""
        return self.head(self.actn(self.proj(x))).squeeze(-1)

    @torch.no_grad()
    def never_stop_(self) -> None:
        """In place: weights whose p_stop is ~0 for every input (sigmoid(-D * silu(1))), for runs that must
        reach their length cap (benchmarks, tests)."""
        self.proj.weight.zero_()
        self.proj.bias.fill_(1.0)
        self.head.weight.fill_(-1.0)


def build_stop_labels_ditar(B, T, start_t, len_t, device, fps=25, patch_size=4, ignore_seconds=0.3):
    """DiTAR-style stop labels: 0 = continue, 1 = the last patch, -100 = ignored (including
    n_ignore patches just before the last one, to tolerate end-point errors).

    Returns (labels (B, T) long, pos_weight 0-dim float = mean number of negatives over counted rows).
    """
    n_ignore = max(1, round(ignore_seconds * fps / patch_size))
    labels = torch.full((B, T), -100, dtype=torch.long, device=device)
    negatives_per_row = []
    for i in range(B):
        start, length = int(start_t[i]), int(len_t[i])
        if length <= 0:
            continue
        lo, hi = max(0, start), min(T, start + length)
        if lo >= hi:
            continue
        if start + length > T or length > MAX_LABELLED_PATCHES:  # truncated or too long: negatives only, not counted
            labels[i, lo:hi] = 0
            continue
        last = hi - 1
        ignore_start = max(lo, last - n_ignore)
        labels[i, lo:ignore_start] = 0
        labels[i, last] = 1
        negatives_per_row.append(float(ignore_start - lo))
    if negatives_per_row:
        pos_weight = torch.tensor(sum(negatives_per_row) / len(negatives_per_row), device=device)
    else:
        pos_weight = torch.tensor(1.0, device=device)
    return labels, pos_weight


@dataclass
class SpeechLLMOutput(ModelOutput):
    """Training output; a transformers ModelOutput so that Trainer finds `loss`."""
    loss: Optional[torch.Tensor] = None
    loss_speech_cfm: Optional[torch.Tensor] = None
    loss_motion_cfm: Optional[torch.Tensor] = None
    stop_loss: Optional[torch.Tensor] = None
    inputs_embeds: Optional[torch.Tensor] = None  # (B, 1+T, D) fed to the backbone
    hidden: Optional[torch.Tensor] = None  # (B, 1+T, D) final-norm hidden states
    llm_attention_mask: Optional[torch.Tensor] = None  # (B, 1+T)
    stop_labels: Optional[torch.Tensor] = None
    stop_pos_weight: Optional[torch.Tensor] = None


def encode_speech_latents(vae, audio_24k_b1t, mel, n_frames: int) -> torch.Tensor:
    """WhisperX-VAE latents (B, n_frames, 32) of the first n_frames frames (audio cut to n_frames * 960)."""
    with torch.no_grad():
        return vae.encode(audio_24k_b1t[..., :n_frames * SAMPLES_PER_FRAME], mel, return_layout="btc").detach()


def encode_speaker(speaker_encoder, audio_16k_bt, n_frames: int) -> torch.Tensor:
    """Speaker embedding (B, 256) of the first n_frames frames (16 kHz audio cut to n_frames * 640)."""
    with torch.no_grad():
        return speaker_encoder(audio_16k_bt[..., :n_frames * SAMPLES_PER_FRAME_16K]).detach()


class SpeechLLM(nn.Module):
    def __init__(self, model_args: ModelArguments, llm_config: Optional[Qwen3Config] = None):
        super().__init__()
        self.model_args = model_args
        self.config = llm_config if llm_config is not None else qwen3_0_6b_config()
        self.patch_size = model_args.patch_size
        self.delay = model_args.delay
        self.motion_cfm_weight = model_args.motion_cfm_weight
        self.context_patches = model_args.context_patches
        self.loop_backend = "auto"  # loop_steps.BACKENDS: how the loop's steps run (auto: CUDA graphs on CUDA)
        self.packed_linear = "auto"  # packed_linear.MODES: oneDNN linears with packed weights (auto: on CPU)
        self.cfm_k_repeat = model_args.cfm_k_repeat

        # parameter registration order = key order of the released checkpoint
        width = self.config.hidden_size
        self.motion_pad_emb = nn.Parameter(torch.zeros(1, 1, width))  # stands in for motion in TTS tokens
        self.llm = Qwen3ForCausalLM(self.config)
        self.projector_speech = FrameProjector(model_args.speech_embedding_dim, width)
        self.projector_motion = FrameProjector(model_args.motion_embedding_dim, width)
        self.register_module("pretrained_speech_encoder", None)  # WhisperX-VAE, for online training features
        self.register_module("spk", None)  # WavLM speaker encoder, for online training features

        enc = dict(input_dim=width, hidden_size=width, n_layer=model_args.patch_encoder_n_layer,
                   n_head=model_args.patch_encoder_n_head)
        self.speech_patch_encoder = PatchEncoder(**enc)
        self.motion_patch_encoder = PatchEncoder(**enc)

        dit_cfg = DecoderConfig(n_layer=model_args.dit_n_layer, n_head=model_args.dit_n_head, feat_dim=width,
                                hidden_size=width)
        self.speech_cfm = UnifiedCFM(
            model_args.speech_embedding_dim, CfmConfig(),
            VoxCPMLocDiT(dit_cfg, model_args.speech_embedding_dim, model_args.speaker_embedding_dim))
        self.motion_cfm = UnifiedCFM(
            model_args.motion_embedding_dim, CfmConfig(),
            VoxCPMLocDiT(dit_cfg, model_args.motion_embedding_dim, model_args.motion_embedding_dim))
        self.head_stop = StopPredictor(width)
        self.task_embedding = nn.Embedding(2, width)  # 0 = TTS, 1 = speech + motion

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.motion_pad_emb.device

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.llm.model.norm.weight.dtype

    @property
    def head_dtype(self) -> torch.dtype:
        return self.speech_cfm.estimator.in_proj.weight.dtype

    def amp(self):
        """The backbone side runs under bf16 autocast on CUDA (as the reference). On CPU: float32, or bf16
        autocast over bf16 weights when the model was cast to bf16 (opt-in; inputs stay float32)."""
        if self.device.type == "cuda":
            # no weight-cast cache: each weight is cast once per call anyway, and a CUDA graph must not
            # keep a cast the context frees on exit
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
        return _cpu_autocast(self.backbone_dtype)

    def _fp32(self):
        """The CFM heads run in float32 on CUDA (as the reference); on CPU in their weights' dtype (the Euler
        state and the noise stay float32)."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", enabled=False)
        return _cpu_autocast(self.head_dtype)

    def patch_tokens(self, speech_proj_td, n_patches: int, motion_proj_td=None):
        """n_patches backbone tokens (1, n, D) from projected frames: speech frames from frame 0, motion
        frames from frame delay * P, zero vectors elsewhere, through the two patch encoders and summed.
        Without motion (TTS) motion_pad_emb is added instead. Used for the prompt prefix and in training."""
        PS, n_frames, width = self.patch_size, n_patches * self.patch_size, speech_proj_td.size(-1)
        speech = speech_proj_td.new_zeros((n_frames, width))
        n_speech = min(speech_proj_td.size(0), n_frames)
        speech[:n_speech] = speech_proj_td[:n_speech]
        tokens = self.speech_patch_encoder(speech.view(1, n_patches, PS, width))
        if motion_proj_td is None:
            return tokens + self.motion_pad_emb
        motion = speech_proj_td.new_zeros((n_frames, width))
        lo, hi = self.delay * PS, min(n_frames, self.delay * PS + motion_proj_td.size(0))
        if hi > lo:
            motion[lo:hi] = motion_proj_td[:hi - lo]
        return tokens + self.motion_patch_encoder(motion.view(1, n_patches, PS, width))

    def get_speech_latents(self, audio, feat, mel_len):
        """Latents (B, T, 32) of 24 kHz audio (B, 1, T24) through the attached VAE (online training features)."""
        if self.pretrained_speech_encoder is None:
            raise RuntimeError("no pretrained_speech_encoder attached; pass speech_latents instead")
        return encode_speech_latents(self.pretrained_speech_encoder, audio, feat, max(int(n) for n in mel_len))

    def get_speaker_embeddings(self, audio16k, mel_len):
        """Speaker embeddings (B, 256) of 16 kHz audio (B, 1, T16), cut to the batch's shortest clip (as the
        reference does)."""
        if self.spk is None:
            raise RuntimeError("no speaker encoder (spk) attached; pass speaker_emb instead")
        return encode_speaker(self.spk, audio16k[:, 0], min(int(n) for n in mel_len))

    # ------------------------------------------------------------------ training set-up
    def freeze_for_training(self):
        """Freeze what the reference freezes: the attached encoders (WhisperX-VAE, speaker encoder; also kept
        in eval mode, see train()) and lm_head (never used; tied to the token embeddings, which freezes
        those too, as in the reference)."""
        for module in (self.pretrained_speech_encoder, self.spk, self.llm.lm_head):
            if module is not None:
                module.requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        """nn.Module.train, except that the attached frozen encoders always stay in eval mode (the
        reference's Trainer puts them back in train mode: batch statistics in the speaker encoder's
        BatchNorm layers)."""
        super().train(mode)
        for module in (self.pretrained_speech_encoder, self.spk):
            if module is not None:
                module.eval()
        if mode:
            packed_linear.uninstall(self)  # training computes with the weights themselves; free the copies
        return self

    def prepare_loop_kernels(self) -> bool:
        """Before a run of the loop: with `packed_linear` on (auto: on CPU), oneDNN linears with weights
        packed for the rows each part computes per call (the CFG pair's rows in a head's Euler step, P + 1 in
        a patch encoder); auto packs only the weights large enough to gain (packed_linear.AUTO_MIN_WEIGHT_NUMEL),
        on packs them all. The backbone is left alone: its step is one row, a memory-bound GEMV that packing
        does not speed up, and its copy would cost 1.6 GiB."""
        if not packed_linear.resolve(self.packed_linear, self.device):
            packed_linear.uninstall(self)
            return False
        min_numel = 0 if self.packed_linear == "on" else packed_linear.AUTO_MIN_WEIGHT_NUMEL
        head_rows = 2 * (2 + self.patch_size * (self.context_patches + 1))  # CFG pair x (mu, global, context, x)
        for head in (self.speech_cfm, self.motion_cfm):
            packed_linear.install(head, head_rows, min_numel)
        for part in (self.speech_patch_encoder, self.motion_patch_encoder, self.projector_speech,
                     self.projector_motion, self.head_stop):
            packed_linear.install(part, self.patch_size + 1, min_numel)
        return True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Activation (gradient) checkpointing of the backbone's decoder layers (what Trainer calls for
        `gradient_checkpointing: true`); the heads and patch encoders are small and are not checkpointed."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs or {"use_reentrant": False},
                                                 every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        self.llm.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def enable_input_require_grads(self):
        self.llm.enable_input_require_grads()

    # ------------------------------------------------------------------ training
    def forward(self, input_ids, attention_mask, feat=None, mel_len=None, audio=None, audio16k=None,
                motion_len=None, speech_span=None, motion=None, task_tag=None,
                speech_latents=None, speaker_emb=None) -> SpeechLLMOutput:
        """Training loss, exactly as the reference computes it.

        input_ids/attention_mask (B, T_tok); speech_span (B, 2) [start, end) of the patch
        placeholders; motion (B, Tm, motion_dim) normalized; mel_len / motion_len frames per sample;
        task_tag (B,) 0 = TTS, 1 = speech + motion. speech_latents (B, Ls, speech_dim) and
        speaker_emb (B, 256) may be given directly instead of audio/feat/audio16k.
        """
        with self.amp():
            if speech_latents is None:
                speech_latents = self.get_speech_latents(audio, feat, mel_len)
            if speaker_emb is None:
                speaker_emb = self.get_speaker_embeddings(audio16k, mel_len)
            if task_tag is None:
                task_tag = (motion_len > 0).long() if motion_len is not None else input_ids.new_zeros(len(input_ids))
            inputs_embeds, attention_mask, speech_span = self._training_embeds(
                input_ids, attention_mask, speech_span, speech_latents, mel_len, motion, motion_len, task_tag)
            hidden = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
            loss_speech, loss_motion = self._cfm_losses(hidden, speech_span, speech_latents, mel_len, speaker_emb,
                                                        motion, motion_len)
            stop_loss, stop_labels, stop_pos_weight = self._stop_loss(hidden, speech_span)
            # zero-weighted terms keep every parameter in the graph (DDP), as in the reference; the patch
            # encoders too, which an all-TTS batch (motion) or a batch without placeholders would not reach
            keep = (self.projector_motion(motion.new_zeros((1, 1, motion.size(-1)))).sum() * 0
                    + self.motion_pad_emb.sum() * 0 + self._patch_encoders_in_graph(inputs_embeds) * 0)
            total = loss_speech + self.motion_cfm_weight * loss_motion + stop_loss + keep
        return SpeechLLMOutput(loss=total, loss_speech_cfm=loss_speech, loss_motion_cfm=loss_motion,
                               stop_loss=stop_loss, inputs_embeds=inputs_embeds, hidden=hidden,
                               llm_attention_mask=attention_mask, stop_labels=stop_labels,
                               stop_pos_weight=stop_pos_weight)

    def _training_embeds(self, input_ids, attention_mask, speech_span, speech_latents, mel_len, motion, motion_len,
                         task_tag):
        """Backbone input [task tag, text ..., patch tokens over the placeholders ...] (spans shift by one)."""
        PS = self.patch_size
        text_emb = self.llm.get_input_embeddings()(input_ids)
        speech_emb, motion_emb = self.projector_speech(speech_latents), self.projector_motion(motion)
        task_emb = self.task_embedding(task_tag.to(input_ids.device))
        inputs_embeds = torch.cat([task_emb.unsqueeze(1), text_emb], dim=1)  # cat promotes bf16 text under autocast
        attention_mask = torch.cat([attention_mask.new_ones((len(input_ids), 1)), attention_mask], dim=1)
        speech_span = speech_span.clone()
        valid = speech_span[:, 0] >= 0
        speech_span[valid] = speech_span[valid] + 1
        rows = []
        for i in range(len(input_ids)):
            s0, s1 = speech_span[i].tolist()
            if s0 < 0 or s1 <= s0:
                rows.append(inputs_embeds[i])
                continue
            ls = min(int(mel_len[i]), speech_emb.size(1))
            lm = min(int(motion_len[i]), motion_emb.size(1)) if motion_len is not None else 0
            n_patches = math.ceil(ls / PS) if lm <= 0 else max(math.ceil(ls / PS), math.ceil(lm / PS) + self.delay)
            n_patches = min(s1 - s0, n_patches)
            tokens = self.patch_tokens(speech_emb[i, :ls], n_patches, motion_emb[i, :lm] if lm > 0 else None)
            rows.append(torch.cat([inputs_embeds[i, :s0], tokens[0].to(inputs_embeds.dtype),
                                   inputs_embeds[i, s0 + n_patches:]]))
        return torch.stack(rows), attention_mask, speech_span

    def _cfm_targets(self, hidden_row, frames_td, n_valid: int, global_cond, start_tok: int) -> list:
        """(x1, cond, global_cond, mu) rows of one sample: patch 0 from hidden[start_tok-1] with zero
        context, then patch k+1 from hidden[start_tok+k] with the previous `context_patches` as context."""
        PS, ctx_frames = self.patch_size, self.context_patches * self.patch_size
        n_patches = math.ceil(n_valid / PS)
        if n_patches <= 1:
            return []
        patches = to_patches(frames_td[:n_valid], PS)  # (n, PS, C)
        dim = frames_td.size(-1)
        rows = []
        if start_tok > 0:
            rows.append((patches[0].T, frames_td.new_zeros((dim, ctx_frames)), global_cond, hidden_row[start_tok - 1]))
        for k in range(n_patches - 1):
            if start_tok + k >= hidden_row.size(0):
                break
            cond = frames_td.new_zeros((dim, ctx_frames))
            first = max(0, k + 1 - self.context_patches)
            n_real = min((k + 1) * PS, n_valid) - first * PS
            if n_real > 0:
                c0 = ctx_frames - (k + 1 - first) * PS
                cond[:, c0:c0 + n_real] = frames_td[first * PS:first * PS + n_real].T
            rows.append((patches[k + 1].T, cond, global_cond, hidden_row[start_tok + k]))
        return rows

    def _cfm_losses(self, hidden, speech_span, speech_latents, mel_len, speaker_emb, motion, motion_len):
        """Speech then motion CFM loss (this order: each draws from the RNG)."""
        speech_rows, motion_rows = [], []
        for i in range(len(hidden)):
            s0 = int(speech_span[i, 0])
            if s0 >= 0:
                ls = min(int(mel_len[i]), speech_latents.size(1))
                speech_rows += self._cfm_targets(hidden[i], speech_latents[i], ls, speaker_emb[i], s0)
        for i in range(len(hidden)):
            s0 = int(speech_span[i, 0])
            if s0 >= 0:
                lm = min(int(motion_len[i]), motion.size(1)) if motion_len is not None else motion.size(1)
                if lm > 0:  # (an all-TTS batch has no motion frame at all)
                    motion_rows += self._cfm_targets(hidden[i], motion[i], lm, motion[i, 0], s0 + self.delay)
        if speech_rows:
            loss_speech = self._cfm_loss(self.speech_cfm, speech_rows)
        else:  # no sample with two speech patches: a zero-weighted pass keeps the head in the graph (DDP)
            loss_speech = self._dummy_cfm_loss(self.speech_cfm, hidden, self.model_args.speaker_embedding_dim)
        if motion_rows:
            loss_motion = self._cfm_loss(self.motion_cfm, motion_rows)
        else:  # the reference still runs (and draws RNG for) a zero-weighted dummy motion loss
            loss_motion = self._dummy_motion_loss(hidden)
        return loss_speech, loss_motion

    def _cfm_loss(self, cfm, rows):
        x1, cond, gc, mu = (torch.stack(t).repeat_interleave(self.cfm_k_repeat, dim=0) for t in zip(*rows))
        mask = x1.new_ones((x1.size(0), 1, x1.size(2)))
        return cfm.compute_loss(x1=x1, mu=mu, cond=cond, global_cond=gc, tgt_mask=mask)

    def _dummy_motion_loss(self, hidden):
        return self._dummy_cfm_loss(self.motion_cfm, hidden, self.model_args.motion_embedding_dim)

    def _dummy_cfm_loss(self, cfm, hidden, global_dim: int):
        dim, PS = cfm.in_channels, self.patch_size
        return cfm.compute_loss(
            x1=hidden.new_zeros((1, dim, PS)), mu=hidden.new_zeros((1, hidden.size(-1))),
            cond=hidden.new_zeros((1, dim, self.context_patches * PS)), global_cond=hidden.new_zeros((1, global_dim)),
            tgt_mask=hidden.new_ones((1, 1, PS))) * 0

    def _patch_encoders_in_graph(self, like):
        """Sum of both patch encoders over one all-zero patch (multiplied by 0 by the caller)."""
        zeros = like.new_zeros((1, 1, self.patch_size, like.size(-1)))
        return self.speech_patch_encoder(zeros).sum() + self.motion_patch_encoder(zeros).sum()

    def _stop_loss(self, hidden, speech_span):
        labels, pos_weight = build_stop_labels_ditar(
            len(hidden), hidden.size(1), speech_span[:, 0], speech_span[:, 1] - speech_span[:, 0], hidden.device,
            fps=self.model_args.frames_per_second, patch_size=self.patch_size)
        logits = self.head_stop(hidden)
        counted = labels != -100
        if not counted.any():
            return hidden.new_zeros((), dtype=torch.float32), labels, pos_weight
        loss = F.binary_cross_entropy_with_logits(logits[counted].float(), labels[counted].float(),
                                                  pos_weight=pos_weight * 0.3)
        return loss, labels, pos_weight

    # ------------------------------------------------------------------ the loop's building blocks
    def backbone(self, inputs_embeds, cache: Optional[DynamicCache] = None, attention_mask=None, position_ids=None):
        """Causal pass of the backbone -> final-norm hidden states (B, L, D); extends `cache`. Rows of unequal
        length: left-padded, with attention_mask (B, cached + L) and each row's position_ids (B, L)."""
        with self.amp():
            out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def patch_token(self, speech_frames=None, motion_frames=None, motion_pad: bool = False):
        """The token fed back after one loop step: (P, speech_dim) and/or (P, motion_dim) -> (1, 1, D), or
        for a batch (B, P, dim) -> (B, 1, D). Unlike the prefix tokens, a step without a motion patch adds no
        motion token at all; `motion_pad` adds motion_pad_emb (TTS tokens)."""
        def rows(frames):  # (B, 1, P, dim) as the patch encoders read them
            return frames[None, None] if frames.dim() == 2 else frames[:, None]

        with self.amp():
            token = 0
            if speech_frames is not None:
                token = self.speech_patch_encoder(rows(self.projector_speech(speech_frames)))
            if motion_frames is not None:
                token = token + self.motion_patch_encoder(rows(self.projector_motion(motion_frames)))
            if motion_pad:
                token = token + self.motion_pad_emb
            return token

    def stop_logits(self, h) -> torch.Tensor:
        """(B,) float32 stop logits of backbone states (B, D) (p_stop = their sigmoid)."""
        with self.amp():
            return self.head_stop(h.float().unsqueeze(1)).reshape(h.shape[0], -1)[:, 0].float()

    def cfm_context(self, history: List[torch.Tensor], dim: int) -> torch.Tensor:
        """(1, dim, context_patches*P): the last context patches of the history, zeros where missing."""
        ctx = self.context_patches * self.patch_size
        cond = torch.zeros((1, dim, ctx), device=self.device, dtype=torch.float32)
        if history:
            recent = torch.cat(history[-self.context_patches:], dim=0)  # (k*P, dim)
            cond[:, :, ctx - recent.size(0):] = recent.T.float()
        return cond

    def sample_patch(self, cfm: UnifiedCFM, h, cond, global_cond, steps=10, temperature=0.3, cfg=2.0, noise=None):
        """One CFM patch in float32: (P, C). Draws randn(1, C, P) unless `noise` is given."""
        return self.sample_patches(cfm, h, cond, global_cond, steps, temperature, cfg, noise)[0]

    def sample_patches(self, cfm: UnifiedCFM, h, cond, global_cond, steps=10, temperature=0.3, cfg=2.0, noise=None):
        """One CFM patch per row of h (B, H): (B, P, C) float32."""
        with self._fp32():
            x = cfm(mu=h.float(), n_timesteps=int(steps), patch_size=self.patch_size, cond=cond,
                    global_cond=global_cond.float(), temperature=float(temperature), cfg_value=float(cfg),
                    sway_sampling_coef=1.0, use_cfg_zero_star=True, noise=noise)
        return x.transpose(1, 2).float().clone()

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def check_pretrained(cls, checkpoint_dir, attn_implementation: str = "sdpa") -> tuple:
        """(ModelArguments, Qwen3Config) of a release-format folder after checking its configs and the
        names and shapes in model.safetensors' header against the model's, without reading any weight.
        FileNotFoundError / ValueError naming the file otherwise."""
        model = cls._checked_meta_model(checkpoint_dir, attn_implementation)
        return model.model_args, model.config

    @classmethod
    def _checked_meta_model(cls, checkpoint_dir, attn_implementation: str) -> "SpeechLLM":
        """The model on the meta device, built from the folder's configs once its weight file's header
        matches it (check_pretrained)."""
        folder = str(checkpoint_dir)
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights}: file not found")
        model_args, llm_config = _read_configs(folder, attn_implementation)
        header, _ = safetensors_header(weights)
        with torch.device("meta"):
            model = cls(model_args, llm_config)
        found = {k: v["shape"] for k, v in header.items() if not k.startswith(ENCODER_PREFIXES)}
        report = key_report(model.checkpoint_shapes(), found, ignore=TIED_KEYS)
        if not report.ok():
            raise ValueError(f"{weights}: {report.message('SpeechLLM')}")
        return model

    @classmethod
    def from_pretrained(cls, checkpoint_dir, device="cpu", llm_dtype: Optional[torch.dtype] = None,
                        attn_implementation: str = "sdpa") -> "SpeechLLM":
        """Strictly load a release-format folder (model.safetensors [+ config.json, speech_llm_args.json]).

        config.json, when present, is the Qwen3 backbone config (the released model is a
        transformers PreTrainedModel whose config is the backbone's); otherwise the embedded
        Qwen3-0.6B config is used. The backbone is kept in `llm_dtype` (default: bfloat16 on CUDA
        as the reference, float32 on CPU); every other module is float32. On CPU, weights already in
        their compute dtype stay views of the memory-mapped file (safe_load.mmap_safetensors).
        """
        model = cls._checked_meta_model(checkpoint_dir, attn_implementation)
        weights = os.path.join(str(checkpoint_dir), WEIGHTS_NAME)
        device = torch.device(device)
        if llm_dtype is None:
            llm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tied = model.config.tie_word_embeddings
        state = {k: _loaded_tensor(t, llm_dtype if k.startswith("llm.") else torch.float32, device)
                 for k, t in mmap_safetensors(weights).items()
                 if not k.startswith(ENCODER_PREFIXES) and not (k in TIED_KEYS and tied)}
        model.load_state_dict(state, strict=False, assign=True)
        model._materialize_after_assign(device)
        return model.eval()

    def checkpoint_shapes(self) -> dict:
        return {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.startswith(ENCODER_PREFIXES)}

    def _materialize_after_assign(self, device):
        """Re-tie the LM head and rebuild the backbone's non-persistent rotary buffers after a meta build."""
        if self.config.tie_word_embeddings:
            self.llm.lm_head.weight = self.llm.model.embed_tokens.weight
        rotary = type(self.llm.model.rotary_emb)
        with torch.device("cpu"):
            self.llm.model.rotary_emb = rotary(config=self.llm.config).to(device)
        leftovers = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if leftovers:
            raise ValueError(f"not initialised after loading: {leftovers[:10]}")

    def save_pretrained(self, save_dir, tokenizer=None, state_dict=None):
        """Write model.safetensors (without encoder keys and the tied LM head), config.json (backbone
        config) and speech_llm_args.json; the tokenizer too when given. `state_dict`: the weights to write
        instead of this module's own (e.g. gathered from a sharded training run)."""
        from safetensors.torch import save_file

        from media.atomic import atomic_output

        os.makedirs(save_dir, exist_ok=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()
                 if not k.startswith(ENCODER_PREFIXES) and not (k in TIED_KEYS and self.config.tie_word_embeddings)}
        with atomic_output(os.path.join(save_dir, WEIGHTS_NAME)) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        self.config.to_json_file(os.path.join(save_dir, "config.json"))
        with open(os.path.join(save_dir, ARGS_NAME), "w") as f:
            json.dump(asdict(self.model_args), f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir)


def _loaded_tensor(t: torch.Tensor, float_dtype: torch.dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=float_dtype if t.is_floating_point() else t.dtype)


def _cpu_autocast(dtype: torch.dtype):
    """bf16 autocast on CPU for bf16 weights (mixed float32 inputs are cast per op); nothing for float32."""
    if dtype == torch.bfloat16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return nullcontext()


def to_patches(frames_td: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(T, C) -> (ceil(T/P), P, C), zero-padding the last patch."""
    pad = (-frames_td.size(0)) % patch_size
    if pad:
        frames_td = F.pad(frames_td, (0, 0, 0, pad))
    return frames_td.reshape(-1, patch_size, frames_td.size(-1))


def check_frames(name, x, dim, allow_empty=False):
    """ValueError unless x is a finite (frames, dim) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.size(1) != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (frames, {dim}) tensor, got {shape}")
    if x.size(0) == 0 and not allow_empty:
        raise ValueError(f"{name}: empty (0 frames)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")


def _read_configs(folder: str, attn_implementation: str = "sdpa"):
    """(ModelArguments, Qwen3Config) for a checkpoint folder; released defaults where files are absent."""
    model_args = released_model_args()
    args_path = os.path.join(folder, ARGS_NAME)
    if os.path.isfile(args_path):
        try:
            with open(args_path) as f:
                raw = json.load(f)
            known = {f_.name for f_ in fields(ModelArguments)}
            model_args = ModelArguments(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{args_path}: not a valid arguments file ({e})") from None
    llm_config = qwen3_0_6b_config(attn_implementation)
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                raw = json.load(f)
        except ValueError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and raw.get("model_type") == "qwen3":
            raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "transformers_version")}
            llm_config = Qwen3Config(**raw)
            llm_config._attn_implementation = attn_implementation
    return model_args, llm_config
