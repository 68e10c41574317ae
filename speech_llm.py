"""SpeechLLM: the generative core of Talker-T2AV.

A Qwen3 backbone reads one token per 4-frame patch, where a token is the sum of a speech patch
embedding and a motion patch embedding (each from its own PatchEncoder over projected frames).
Two CFM heads turn the backbone state into the next speech patch (32-d WhisperX-VAE latents,
speaker embedding as global condition) and the next motion patch (40-d normalized LIA-X motion,
first reference motion frame as global condition); a small MLP predicts when to stop.

State-dict names and shapes are those of the released `model.safetensors`. The audio VAE
(`pretrained_speech_encoder`) and the speaker encoder (`spk`) are optional submodules attached
by the pipeline; their keys are never saved or expected in the checkpoint.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from llama4nar import DecoderConfig, PatchEncoder
from local_dit import VoxCPMLocDiT
from unified_cfm import CfmConfig, UnifiedCFM

ENCODER_PREFIXES = ("pretrained_speech_encoder.", "spk.")
TIED_KEYS = ("llm.lm_head.weight",)
WEIGHTS_NAME = "model.safetensors"
ARGS_NAME = "speech_llm_args.json"  # written by save_pretrained; absent in the released folder
SPEECH_TOKEN, MOTION_TOKEN = "<SPEECH_FRAME>", "<MOTION_FRAME>"

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
    """Same fields and defaults as the reference; the last three are sizes the reference hard-codes."""
    llm_model_name_or_path: Optional[str] = field(default="Qwen/Qwen3-0.6B")
    encoder_ds_rate: int = 2
    encoder_projector_ds_rate: int = 12
    speech_embedding_dim: int = 128
    motion_embedding_dim: int = 40
    projector_model_path: Optional[str] = None
    tts_checkpoint_path: Optional[str] = None
    model_max_length: int = 8192
    max_speech_seconds: int = 30
    frames_per_second: int = 25
    patch_size: int = 4
    delay: int = 5  # patches by which motion lags speech
    motion_cfm_weight: float = 1.0
    context_patches: int = 1
    patch_encoder_n_layer: int = 4
    patch_encoder_n_head: int = 8
    cfm_k_repeat: int = 2
    tts_data_path: Optional[str] = None
    decode_instruction: Optional[str] = ""
    # not in the reference (fixed there); defaults = released model
    dit_n_layer: int = 8
    dit_n_head: int = 8
    speaker_embedding_dim: int = 256

    @property
    def ds_rate(self):
        return self.encoder_ds_rate * self.encoder_projector_ds_rate

    @property
    def max_mel_size(self):
        return self.max_speech_seconds * self.frames_per_second


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


class ProjectorConv1d(nn.Module):
    """Frame-wise linear projection of latents into the LLM width (name kept from the reference)."""

    def __init__(self, config, encoder_dim: int, llm_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(encoder_dim, llm_dim)

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
        if start + length > T or length > 187:  # truncated or too long: negatives only, row not counted
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


@dataclass
class GenerationOutput:
    speech_latents: torch.Tensor  # (frames, speech_dim) generated frames only (after the prefix)
    motion_norm: torch.Tensor  # (frames, motion_dim) generated normalized motion only
    prefix_speech_latents: torch.Tensor  # (Pf, speech_dim) reference latents fed as prefix
    prefix_motion_norm: torch.Tensor  # (Pm, motion_dim) reference motion fed as prefix
    n_patches: int  # loop steps that produced a patch
    stopped_by: str  # "stop_head" | "length_cap" | "given_length"


def _to_patches(frames_td: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(T, C) -> (ceil(T/P), P, C), zero-padding the last patch."""
    pad = (-frames_td.size(0)) % patch_size
    if pad:
        frames_td = F.pad(frames_td, (0, 0, 0, pad))
    return frames_td.reshape(-1, patch_size, frames_td.size(-1))


class SpeechLLM(nn.Module):
    def __init__(self, model_args: ModelArguments, llm_config: Optional[Qwen3Config] = None):
        super().__init__()
        self.model_args = model_args
        self.config = llm_config if llm_config is not None else qwen3_0_6b_config()
        self.patch_size = model_args.patch_size
        self.delay = model_args.delay
        self.motion_cfm_weight = model_args.motion_cfm_weight
        self.context_patches = model_args.context_patches
        self.cfm_k_repeat = model_args.cfm_k_repeat

        # parameter registration order = key order of the released checkpoint
        llm_dim = self.config.hidden_size
        self.motion_pad_emb = nn.Parameter(torch.zeros(1, 1, llm_dim))  # stands in for motion in TTS tokens
        self.llm = Qwen3ForCausalLM(self.config)
        self.projector_speech = ProjectorConv1d(model_args, model_args.speech_embedding_dim, llm_dim)
        self.projector_motion = ProjectorConv1d(model_args, model_args.motion_embedding_dim, llm_dim)
        self.register_module("pretrained_speech_encoder", None)  # WhisperX-VAE, attached by the pipeline
        self.register_module("spk", None)  # WavLM speaker encoder, attached by the pipeline

        enc = dict(input_dim=llm_dim, hidden_size=llm_dim, n_layer=model_args.patch_encoder_n_layer,
                   n_head=model_args.patch_encoder_n_head)
        self.speech_patch_encoder = PatchEncoder(**enc)
        self.motion_patch_encoder = PatchEncoder(**enc)

        dit_cfg = DecoderConfig(n_layer=model_args.dit_n_layer, n_head=model_args.dit_n_head, feat_dim=llm_dim,
                                hidden_size=llm_dim)
        self.speech_cfm = UnifiedCFM(
            model_args.speech_embedding_dim, CfmConfig(),
            VoxCPMLocDiT(dit_cfg, model_args.speech_embedding_dim, model_args.speaker_embedding_dim))
        self.motion_cfm = UnifiedCFM(
            model_args.motion_embedding_dim, CfmConfig(),
            VoxCPMLocDiT(dit_cfg, model_args.motion_embedding_dim, model_args.motion_embedding_dim))
        self.head_stop = StopPredictor(llm_dim)
        self.task_embedding = nn.Embedding(2, llm_dim)  # 0 = TTS, 1 = speech + motion

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.motion_pad_emb.device

    def _amp(self):
        """The backbone side runs under bf16 autocast on CUDA (as the reference); no-op on CPU."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _fp32(self):
        """The CFM heads always run in float32."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", enabled=False)
        return nullcontext()

    def get_speech_embeddings(self, audio, feat, mel_len):
        """Encode 24 kHz audio with the attached VAE -> (projected frames (B,T,D), latents (B,T,C))."""
        if self.pretrained_speech_encoder is None:
            raise RuntimeError("no pretrained_speech_encoder attached; pass speech_latents instead")
        max_wav = int(max(int(n) for n in mel_len) * 24000 / 25)
        with torch.no_grad():
            latent = self.pretrained_speech_encoder.encode(audio[:, :, :max_wav], feat, return_layout="btc")
        return self.projector_speech(latent), latent.detach()

    def get_speaker_embeddings(self, audio16k, mel_len):
        if self.spk is None:
            raise RuntimeError("no speaker encoder (spk) attached; pass speaker_emb instead")
        min_wav = int(min(int(n) for n in mel_len) * 16000 / 25)
        with torch.no_grad():
            return self.spk(audio16k[:, 0, :min_wav]).detach()

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
        with self._amp():
            return self._forward(input_ids, attention_mask, feat, mel_len, audio, audio16k, motion_len,
                                 speech_span, motion, task_tag, speech_latents, speaker_emb)

    def _forward(self, input_ids, attention_mask, feat, mel_len, audio, audio16k, motion_len, speech_span,
                 motion, task_tag, speech_latent, speaker_emb):
        PS, DELAY, K = self.patch_size, self.delay, self.cfm_k_repeat
        ctx_frames = self.context_patches * PS
        speech_dim, motion_dim = self.model_args.speech_embedding_dim, self.model_args.motion_embedding_dim

        text_emb = self.llm.get_input_embeddings()(input_ids)
        B, _, D = text_emb.shape
        if speech_latent is None:
            speech_emb, speech_latent = self.get_speech_embeddings(audio, feat, mel_len)
        else:
            speech_emb = self.projector_speech(speech_latent)
        if speaker_emb is None:
            speaker_emb = self.get_speaker_embeddings(audio16k, mel_len)
        motion_emb = self.projector_motion(motion)

        if task_tag is None:
            task_tag = (motion_len > 0).long() if motion_len is not None else torch.zeros(B, dtype=torch.long)
        task_emb = self.task_embedding(task_tag.to(input_ids.device))
        # training layout: [task tag, text ..., patch tokens ...]; spans shift by one
        inputs_embeds = torch.cat([task_emb.unsqueeze(1), text_emb], dim=1)  # cat promotes bf16 text under autocast
        attention_mask = torch.cat([attention_mask.new_ones((B, 1)), attention_mask], dim=1)
        speech_span = speech_span.clone()
        valid = speech_span[:, 0] >= 0
        speech_span[valid] = speech_span[valid] + 1
        T = inputs_embeds.size(1)

        rows = []
        for i in range(B):
            s0, s1 = speech_span[i].tolist()
            n_slots = s1 - s0
            if s0 < 0 or n_slots <= 0:
                rows.append(inputs_embeds[i])
                continue
            has_motion = motion_len is not None and int(motion_len[i]) > 0
            ls = min(int(mel_len[i]), speech_emb.size(1))
            n_speech = math.ceil(ls / PS)
            if has_motion:
                lm = min(int(motion_len[i]), motion_emb.size(1))
                n_total = min(n_slots, max(n_speech, math.ceil(lm / PS) + DELAY))
            else:
                n_total = min(n_slots, n_speech)
            n_frames = n_total * PS
            speech_only = speech_emb.new_zeros((n_frames, D))
            speech_only[:min(ls, n_frames)] = speech_emb[i, :min(ls, n_frames)]
            tokens = self.speech_patch_encoder(speech_only.view(1, n_total, PS, D))[0]
            if has_motion:
                motion_only = speech_emb.new_zeros((n_frames, D))
                lo, hi = DELAY * PS, min(n_frames, DELAY * PS + lm)
                if hi > lo:
                    motion_only[lo:hi] = motion_emb[i, :hi - lo]
                tokens = tokens + self.motion_patch_encoder(motion_only.view(1, n_total, PS, D))[0]
            else:
                tokens = tokens + self.motion_pad_emb[0].expand(n_total, -1)
            tokens = tokens.to(inputs_embeds.dtype)
            rows.append(torch.cat([inputs_embeds[i, :s0], tokens, inputs_embeds[i, s0 + n_total:]]))
        inputs_embeds = torch.stack(rows)

        hidden = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state

        def targets(hidden_row, frames, n_valid, gc, start_tok, dim):
            """CFM rows for one sample: patch 0 from hidden[start_tok-1] with zero context, then
            patch k+1 from hidden[start_tok+k] with the previous patch as context."""
            n_patches = math.ceil(n_valid / PS)
            if n_patches <= 1:
                return []
            patches = _to_patches(frames[:n_valid], PS)  # (n, PS, dim)
            out = []
            if start_tok > 0:
                out.append((patches[0].T, frames.new_zeros((dim, ctx_frames)), gc, hidden_row[start_tok - 1]))
            for k in range(n_patches - 1):
                if start_tok + k >= T:
                    break
                cond = frames.new_zeros((dim, ctx_frames))
                first = max(0, k + 1 - self.context_patches)
                n_ctx = k + 1 - first
                n_real = min((k + 1) * PS, n_valid) - first * PS
                if n_real > 0:
                    c0 = ctx_frames - n_ctx * PS
                    cond[:, c0:c0 + n_real] = frames[first * PS:first * PS + n_real].T
                out.append((patches[k + 1].T, cond, gc, hidden_row[start_tok + k]))
            return out

        speech_rows, motion_rows = [], []
        for i in range(B):
            s0 = int(speech_span[i, 0])
            if s0 < 0:
                continue
            ls = min(int(mel_len[i]), speech_latent.size(1))
            speech_rows += targets(hidden[i], speech_latent[i], ls, speaker_emb[i], s0, speech_dim)
        for i in range(B):
            s0 = int(speech_span[i, 0])
            if s0 < 0:
                continue
            lm = min(int(motion_len[i]), motion.size(1)) if motion_len is not None else motion.size(1)
            motion_rows += targets(hidden[i], motion[i], lm, motion[i, 0], s0 + DELAY, motion_dim)

        def cfm_loss(cfm, rows_):
            x1, cond, gc, mu = (torch.stack(t).repeat_interleave(K, dim=0) for t in zip(*rows_))
            mask = x1.new_ones((x1.size(0), 1, x1.size(2)))
            return cfm.compute_loss(x1=x1, mu=mu, cond=cond, global_cond=gc, tgt_mask=mask, progress=0.0)

        loss_speech = cfm_loss(self.speech_cfm, speech_rows) if speech_rows else hidden.new_zeros(())
        if motion_rows:
            loss_motion = cfm_loss(self.motion_cfm, motion_rows)
        else:  # the reference still runs (and draws RNG for) a zero-weighted dummy motion loss
            loss_motion = self._dummy_motion_loss(hidden, D)

        stop_labels, stop_pos_weight = build_stop_labels_ditar(
            B, T, speech_span[:, 0], speech_span[:, 1] - speech_span[:, 0], input_ids.device,
            fps=self.model_args.frames_per_second, patch_size=PS)
        stop_logits = self.head_stop(hidden)
        stop_mask = stop_labels != -100
        if stop_mask.any():
            stop_loss = F.binary_cross_entropy_with_logits(
                stop_logits[stop_mask].float(), stop_labels[stop_mask].float(), pos_weight=stop_pos_weight * 0.3)
        else:
            stop_loss = hidden.new_zeros((), dtype=torch.float32)

        # zero-weighted terms keep every parameter in the graph (DDP), as in the reference
        keep = self.projector_motion(motion.new_zeros((1, 1, motion_dim))).sum() * 0 + self.motion_pad_emb.sum() * 0
        total = loss_speech + self.motion_cfm_weight * loss_motion + stop_loss + keep
        return SpeechLLMOutput(loss=total, loss_speech_cfm=loss_speech, loss_motion_cfm=loss_motion,
                               stop_loss=stop_loss, inputs_embeds=inputs_embeds, hidden=hidden,
                               llm_attention_mask=attention_mask, stop_labels=stop_labels,
                               stop_pos_weight=stop_pos_weight)

    def _dummy_motion_loss(self, hidden, D):
        dim, PS = self.model_args.motion_embedding_dim, self.patch_size
        return self.motion_cfm.compute_loss(
            x1=hidden.new_zeros((1, dim, PS)), mu=hidden.new_zeros((1, D)),
            cond=hidden.new_zeros((1, dim, self.context_patches * PS)), global_cond=hidden.new_zeros((1, dim)),
            tgt_mask=hidden.new_ones((1, 1, PS)), progress=0.0) * 0

    # ------------------------------------------------------------------ generation building blocks
    def backbone(self, inputs_embeds, cache: Optional[DynamicCache] = None):
        """Causal pass of the backbone -> final-norm hidden states (B, L, D); extends `cache`."""
        with self._amp():
            out = self.llm.model(inputs_embeds=inputs_embeds, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def patch_token(self, speech_frames=None, motion_frames=None, motion_pad: bool = False):
        """One backbone token from a generated patch: (PS, speech_dim) and/or (PS, motion_dim) -> (1, 1, D).
        The speech and motion embeddings are summed; `motion_pad` adds motion_pad_emb (TTS tokens)."""
        with self._amp():
            token = 0
            if speech_frames is not None:
                token = self.speech_patch_encoder(self.projector_speech(speech_frames)[None, None])
            if motion_frames is not None:
                token = token + self.motion_patch_encoder(self.projector_motion(motion_frames)[None, None])
            if motion_pad:
                token = token + self.motion_pad_emb
            return token

    def stop_logit(self, h) -> float:
        with self._amp():
            return float(self.head_stop(h.float().unsqueeze(1))[0, 0])

    def cfm_context(self, history: List[torch.Tensor], dim: int) -> torch.Tensor:
        """(1, dim, context_patches*PS): the last context patches of the history, zeros where missing."""
        ctx = self.context_patches * self.patch_size
        cond = torch.zeros((1, dim, ctx), device=self.device, dtype=torch.float32)
        if history:
            recent = torch.cat(history[-self.context_patches:], dim=0)  # (k*PS, dim)
            cond[:, :, ctx - recent.size(0):] = recent.T.float()
        return cond

    def sample_patch(self, cfm: UnifiedCFM, h, cond, global_cond, steps=10, temperature=0.3, cfg=2.0, noise=None):
        """One CFM patch in float32: (PS, C). Draws randn(1, C, PS) unless `noise` is given."""
        with self._fp32():
            x = cfm(mu=h.float(), n_timesteps=int(steps), patch_size=self.patch_size, cond=cond,
                    global_cond=global_cond.float(), temperature=float(temperature), cfg_value=float(cfg),
                    sway_sampling_coef=1.0, use_cfg_zero_star=True, noise=noise)
        return x[0].T.clone()

    @torch.no_grad()
    def prepare_prompt(self, input_ids, speech_start: int, ref_speech_latents, ref_motion_norm=None,
                       gt_prefix_seconds: float = 0.5, fps: int = 25, task: str = "t2av") -> dict:
        """Prefill embeddings, CFM histories, length cap and prefixes of the released inference loop.

        t2av (infer.py): prefix tokens = speech tokens of the reference latents + motion tokens of the
        reference motion (placed after `delay` patches), task_embedding(1) added to the first one.
        tts (speech_llm.generate_speech): [task_embedding(0), text] then speech tokens + motion_pad_emb.
        """
        PS, D = self.patch_size, self.delay
        dev = self.device
        input_ids = input_ids.to(dev)
        ref_speech = ref_speech_latents.to(dev, torch.float32)
        ls = ref_speech.size(0)
        with self._amp():
            text_part = self.llm.get_input_embeddings()(input_ids[:, :speech_start])
        plan = {"speech_hist": [], "motion_hist": [], "first_motion": None}

        if task == "tts":
            prefix_frames = max(0, min(int(round(gt_prefix_seconds * fps)), ls))  # rounded, as generate_speech
            with self._amp():
                tag = self.task_embedding(torch.zeros(1, dtype=torch.long, device=dev))
                prefill = torch.cat([tag[None].to(text_part.dtype), text_part], dim=1)
                if prefix_frames > 0:
                    proj = _to_patches(self.projector_speech(ref_speech[:prefix_frames]), PS)
                    tokens = self.speech_patch_encoder(proj[None]) + self.motion_pad_emb
                    prefill = torch.cat([prefill, tokens], dim=1)
            if prefix_frames > 0:
                plan["speech_hist"] = list(_to_patches(ref_speech[:prefix_frames], PS))
            total = math.ceil(max(1, ls) / PS)
            plan.update(prefill=prefill, total_patches=total, prefix_patches=len(plan["speech_hist"]),
                        prefix_speech=ref_speech[:prefix_frames],
                        prefix_motion=ref_speech.new_zeros((0, self.model_args.motion_embedding_dim)))
            return plan

        motion = ref_motion_norm.to(dev, torch.float32)
        motion_q = motion.to(torch.bfloat16).float()  # infer.py reads the reference motion in bf16
        motion_len = max(PS, (motion_q.size(0) // PS) * PS)
        if motion_q.size(0) < motion_len:  # shorter than one patch: zero-pad (the reference fails here)
            motion_q = F.pad(motion_q, (0, 0, 0, motion_len - motion_q.size(0)))
        motion_q = motion_q[:motion_len]
        prefix_frames = max(0, min(int(gt_prefix_seconds * fps), motion_len))
        prefix_frames = (prefix_frames // PS) * PS
        prefix_patches = prefix_frames // PS
        total = max(math.ceil(ls / PS), motion_len // PS + D)
        speech_prefix_frames = (prefix_patches + D) * PS
        prefix_total = min(prefix_patches + D, total)
        ptf = prefix_total * PS

        prefill = text_part
        if prefix_total > 0:
            with self._amp():
                speech_emb = self.projector_speech(ref_speech)
                dm = speech_emb.size(-1)
                speech_only = speech_emb.new_zeros((ptf, dm))
                n_sp = min(ls, ptf)
                speech_only[:n_sp] = speech_emb[:n_sp]
                motion_emb = self.projector_motion(motion_q)
                motion_only = motion_emb.new_zeros((ptf, dm))
                lo, hi = D * PS, min(ptf, D * PS + motion_len)
                if hi > lo:
                    motion_only[lo:hi] = motion_emb[:hi - lo]
                tokens = (self.speech_patch_encoder(speech_only.view(1, prefix_total, PS, dm))
                          + self.motion_patch_encoder(motion_only.view(1, prefix_total, PS, dm)))
                tag = self.task_embedding(torch.ones(1, dtype=torch.long, device=dev))
                tokens = torch.cat([tokens[:, :1] + tag[None], tokens[:, 1:]], dim=1)
                prefill = torch.cat([text_part, tokens], dim=1)
        n_hist = min(speech_prefix_frames, ls)
        if speech_prefix_frames > 0 and n_hist > 0:
            plan["speech_hist"] = list(_to_patches(ref_speech[:n_hist], PS))
        if prefix_frames > 0:
            plan["motion_hist"] = list(_to_patches(motion_q[:prefix_frames], PS))
        plan.update(prefill=prefill, total_patches=total, prefix_patches=prefix_total,
                    first_motion=motion_q[:1], prefix_speech=ref_speech[:n_hist], prefix_motion=motion[:prefix_frames])
        return plan

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, speech_start: int, ref_speech_latents, speaker_emb, ref_motion_norm=None, *,
                 gt_prefix_seconds: float = 0.5, fps: int = 25, cfm_steps: int = 10, cfm_temperature: float = 0.3,
                 cfm_cfg: float = 2.0, min_patches: int = 7, stop_patches: int = 3, stop_threshold: float = 0.5,
                 extra_patches: int = 15, given_speech_latents=None, given_motion_norm=None, task: str = "t2av",
                 progress: Optional[Callable[[int], None]] = None) -> GenerationOutput:
        """The released inference loop (infer.py: ar_generate_motion_continuation) over tensors.

        input_ids (1, T) prompt ids; speech_start = index of the first patch placeholder;
        ref_speech_latents (Ls, speech_dim) VAE latents of the reference audio; speaker_emb (1, 256);
        ref_motion_norm (Tm, motion_dim) normalized reference motion, or None for TTS.

        Per step: after `min_patches` steps, stop once `stop_patches` consecutive stop probabilities
        reach `stop_threshold`; sample a speech patch (then, from step `delay` on, a motion patch)
        from the current backbone state, feed their summed patch tokens back. The loop runs at most
        (patches of the reference clip - prefix patches + extra_patches) steps.

        Teacher forcing (the given frames continue after the prefix; a partial last patch is
        zero-padded; the stop head is not used, stopped_by = "given_length"):
        given_speech_latents (N*PS, speech_dim): A2V, the speech half of every token is given, only
        motion is sampled; N steps, so N - delay motion patches. given_motion_norm (M*PS, motion_dim):
        V2A, the motion half is given (fed as is, unlike the reference motion which is read in bf16
        as infer.py does), only speech is sampled; M + delay steps.

        task="tts" (also chosen when ref_motion_norm is None) follows speech_llm.generate_speech:
        a task_embedding(0) token before the text, a rounded (not floored) speech-only prefix whose
        tokens get motion_pad_emb added, no motion head. Unlike generate_speech, the stop head is
        always on (min_patches, stop_patches, stop_threshold as above; generate_speech defaults to
        use_stop=False with min 25//4 = 6 patches), the cap margin is extra_patches (it uses 25) and
        the speaker embedding is whatever the caller passes (it uses the prefix audio).

        progress(n) is called after every generated patch with the number of patches so far.
        """
        if task not in ("t2av", "tts"):
            raise ValueError(f"unknown task {task!r}: expected 't2av' or 'tts'")
        if ref_motion_norm is None and task == "t2av":
            if given_motion_norm is not None:
                raise ValueError("given_motion_norm needs ref_motion_norm (prefix and first motion frame)")
            task = "tts"
        if given_speech_latents is not None and given_motion_norm is not None:
            raise ValueError("give at most one of given_speech_latents / given_motion_norm")
        if task == "tts" and (given_speech_latents is not None or given_motion_norm is not None):
            raise ValueError("teacher forcing needs task='t2av' with reference motion")
        speech_dim, motion_dim = self.model_args.speech_embedding_dim, self.model_args.motion_embedding_dim
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.size(0) != 1:
            raise ValueError(f"input_ids: expected shape (1, T), got {tuple(input_ids.shape)}")
        if not 0 <= int(speech_start) <= input_ids.size(1):
            raise ValueError(f"speech_start {speech_start} outside the prompt of {input_ids.size(1)} tokens")
        if speaker_emb.numel() != self.model_args.speaker_embedding_dim:
            raise ValueError(f"speaker_emb: expected {self.model_args.speaker_embedding_dim} values, "
                             f"got shape {tuple(speaker_emb.shape)}")
        _check_frames("ref_speech_latents", ref_speech_latents, speech_dim, allow_empty=True)
        if task == "t2av":
            _check_frames("ref_motion_norm", ref_motion_norm, motion_dim)
        PS, D = self.patch_size, self.delay
        dev = self.device

        plan = self.prepare_prompt(input_ids, speech_start, ref_speech_latents, ref_motion_norm,
                                   gt_prefix_seconds, fps, task)
        speech_hist, motion_hist = plan["speech_hist"], plan["motion_hist"]
        speaker = speaker_emb.to(dev, torch.float32).reshape(1, -1)
        given_speech = given_motion = None
        if given_speech_latents is not None:
            _check_frames("given_speech_latents", given_speech_latents, speech_dim)
            given_speech = _to_patches(given_speech_latents.to(dev, torch.float32), PS)
            n_steps, stopped_by = given_speech.size(0), "given_length"
        elif given_motion_norm is not None:
            _check_frames("given_motion_norm", given_motion_norm, motion_dim)
            given_motion = _to_patches(given_motion_norm.to(dev, torch.float32), PS)
            n_steps, stopped_by = given_motion.size(0) + D, "given_length"
        else:
            n_steps, stopped_by = max(0, plan["total_patches"] - plan["prefix_patches"] + extra_patches), "length_cap"
        use_stop = given_speech is None and given_motion is None

        cache = DynamicCache(config=self.llm.config)
        h = self.backbone(plan["prefill"], cache)[:, -1]
        speech_out, motion_out = [], []
        streak = 0
        for step in range(n_steps):
            if use_stop and step >= min_patches:
                if torch.sigmoid(torch.tensor(self.stop_logit(h))) >= stop_threshold:
                    streak += 1
                    if streak >= stop_patches:
                        stopped_by = "stop_head"
                        break
                else:
                    streak = 0
            if given_speech is not None:
                speech_patch = given_speech[step]
            else:
                speech_patch = self.sample_patch(self.speech_cfm, h, self.cfm_context(speech_hist, speech_dim), speaker,
                                                 cfm_steps, cfm_temperature, cfm_cfg)
            speech_hist.append(speech_patch)
            speech_out.append(speech_patch)
            motion_patch = None
            if task == "t2av" and step >= D:
                if given_motion is not None:
                    motion_patch = given_motion[step - D]
                else:
                    motion_patch = self.sample_patch(self.motion_cfm, h, self.cfm_context(motion_hist, motion_dim),
                                                     plan["first_motion"], cfm_steps, cfm_temperature, cfm_cfg)
                motion_hist.append(motion_patch)
                motion_out.append(motion_patch)
            if progress is not None:
                progress(step + 1)
            if step + 1 < n_steps:  # the state after the last possible patch is never used
                token = self.patch_token(speech_patch, motion_patch, motion_pad=(task == "tts"))
                h = self.backbone(token, cache)[:, -1]

        def frames(patches, dim):
            return torch.cat(patches).float() if patches else torch.zeros((0, dim), device=dev)

        return GenerationOutput(
            speech_latents=frames(speech_out, speech_dim), motion_norm=frames(motion_out, motion_dim),
            prefix_speech_latents=plan["prefix_speech"].float(), prefix_motion_norm=plan["prefix_motion"].float(),
            n_patches=len(speech_out), stopped_by=stopped_by)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, checkpoint_dir, device="cpu", llm_dtype: Optional[torch.dtype] = None,
                        attn_implementation: str = "sdpa") -> "SpeechLLM":
        """Strictly load a release-format folder (model.safetensors [+ config.json, speech_llm_args.json]).

        config.json, when present, is the Qwen3 backbone config (the released model is a
        transformers PreTrainedModel whose config is the backbone's); otherwise the embedded
        Qwen3-0.6B config is used. The backbone is kept in `llm_dtype` (default: bfloat16 on CUDA
        as the reference, float32 on CPU); every other module is float32.
        """
        from safetensors import safe_open

        folder = str(checkpoint_dir)
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights}: checkpoint not found")
        model_args, llm_config = _read_configs(folder, attn_implementation)
        device = torch.device(device)
        if llm_dtype is None:
            llm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        with torch.device("meta"):
            model = cls(model_args, llm_config)
        expected = model._checkpoint_shapes()
        try:
            with safe_open(weights, framework="pt") as f:
                keys = [k for k in f.keys() if not k.startswith(ENCODER_PREFIXES)]
                problems = _key_problems(expected, {k: tuple(f.get_slice(k).get_shape()) for k in keys}, weights)
                if problems:
                    raise ValueError(problems)
                state = {}
                for k in keys:
                    if k in TIED_KEYS and model.config.tie_word_embeddings:
                        continue
                    t = f.get_tensor(k)
                    dtype = llm_dtype if k.startswith("llm.") else torch.float32
                    state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except ValueError:
            raise
        except Exception as e:  # unreadable / corrupt file
            raise ValueError(f"{weights}: cannot read safetensors ({type(e).__name__}: {e})") from None
        model.load_state_dict(state, strict=False, assign=True)
        model._materialize_after_assign(device)
        return model.eval()

    def _checkpoint_shapes(self) -> dict:
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

    def save_pretrained(self, save_dir, tokenizer=None):
        """Write model.safetensors (without encoder keys and the tied LM head), config.json (backbone
        config) and speech_llm_args.json; the tokenizer too when given."""
        from safetensors.torch import save_file

        os.makedirs(save_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith(ENCODER_PREFIXES) and not (k in TIED_KEYS and self.config.tie_word_embeddings)}
        tmp = os.path.join(save_dir, WEIGHTS_NAME + ".tmp")
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(save_dir, WEIGHTS_NAME))
        self.config.to_json_file(os.path.join(save_dir, "config.json"))
        with open(os.path.join(save_dir, ARGS_NAME), "w") as f:
            json.dump(asdict(self.model_args), f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir)


def _check_frames(name, x, dim, allow_empty=False):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.size(1) != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (frames, {dim}) tensor, got {shape}")
    if x.size(0) == 0 and not allow_empty:
        raise ValueError(f"{name}: empty (0 frames)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")


def _key_problems(expected: dict, found: dict, path: str) -> str:
    missing = sorted(k for k in expected if k not in found and k not in TIED_KEYS)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(f"{k} {found[k]} != {expected[k]}" for k in found if k in expected and found[k] != expected[k])
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            parts.append(f"{label}: {shown}")
    return f"{path}: " + "; ".join(parts) if parts else ""


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


def load_tokenizer(checkpoint_dir, model_max_length: int = 1000):
    """The tokenizer of a checkpoint folder, with the patch placeholder tokens added if missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), model_max_length=model_max_length,
                                              padding_side="right")
    if SPEECH_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SPEECH_TOKEN, MOTION_TOKEN]})
    return tokenizer


def build_chat_and_spans(tokenizer, model_max_length, speech_len_frames, motion_len_frames, patch_size=4, text="",
                         delay=0, speech_tok=SPEECH_TOKEN):
    """Chat prompt with one placeholder token per patch (infer.py layout).

    Returns input_ids (1, T) long, attention_mask (1, T) bool, speech_span (2,) long = [first, last+1)
    placeholder positions. Only span[0] matters at inference.
    """
    n_placeholders = max(math.ceil(speech_len_frames / patch_size), motion_len_frames // patch_size + delay)
    chat = [{"role": "user", "content": text}, {"role": "assistant", "content": speech_tok * n_placeholders}]
    kwargs = dict(tokenize=True, add_generation_prompt=False, padding=False, truncation=True,
                  max_length=model_max_length)
    try:
        ids = tokenizer.apply_chat_template(chat, enable_thinking=False, **kwargs)
    except TypeError:
        ids = tokenizer.apply_chat_template(chat, **kwargs)
    if hasattr(ids, "data"):
        ids = ids.data["input_ids"]
    elif isinstance(ids, dict):
        ids = ids["input_ids"]
    input_ids = torch.tensor(ids, dtype=torch.long).reshape(1, -1)
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    positions = (input_ids[0] == tokenizer.convert_tokens_to_ids(speech_tok)).nonzero(as_tuple=True)[0]
    if positions.numel() == 0:
        raise ValueError(f"prompt has no {speech_tok} placeholder (truncated to {model_max_length} tokens?)")
    speech_span = torch.tensor([int(positions[0]), int(positions[-1]) + 1], dtype=torch.long)
    return input_ids, attention_mask, speech_span
