"""Building the model for training: the reference's start (Qwen3 backbone + TTS-stage warm start), fine-tuning
a release folder, the tiny preset, the frozen encoders for online features, LoRA (peft) and its merge.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
import transformers


from common.safe_load import key_report
from speech_llm import (ENCODER_PREFIXES, TIED_KEYS, WEIGHTS_NAME, ModelArguments, SpeechLLM,
                        _read_configs, tiny_model_args_and_config)

PRESETS = ("released", "tiny")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ModelArguments that fix the architecture or the data layout: with init_from they come from the folder
ARCHITECTURE_FIELDS = ("speech_embedding_dim", "motion_embedding_dim", "patch_size", "delay", "context_patches",
                       "patch_encoder_n_layer", "patch_encoder_n_head", "dit_n_layer", "dit_n_head",
                       "speaker_embedding_dim", "frames_per_second", "encoder_projector_ds_rate")


class ConfigError(ValueError):
    """A training config that cannot be run (the message says which field)."""


@dataclass
class TalkerArguments:
    """This project's training fields (the reference has none of them)."""
    model_preset: str = field(default="released", metadata={
        "help": "released: Qwen3 backbone from llm_model_name_or_path, encoders from the release checkpoints; "
                "tiny: the small test/demo architecture, random init, demo tokenizer and demo encoders"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "fine-tune a release-format folder (model.safetensors + config.json [+ speech_llm_args.json], "
                "tokenizer), loaded strictly; its architecture wins over the ModelArguments fields"})
    download: bool = field(default=False, metadata={
        "help": "allow fetching llm_model_name_or_path from the hub (otherwise a local folder or the cache)"})
    whisperx_vae_ckpt: Optional[str] = field(default=None, metadata={
        "help": "WhisperX-VAE checkpoint for online features (default $WHISPERVAE_CKPT, beside init_from, cache)"})
    wavlm_ckpt: Optional[str] = field(default=None, metadata={
        "help": "speaker-encoder checkpoint for online features (default $WAVLM_CKPT, then the hub cache)"})
    wavlm_backbone_ckpt: Optional[str] = field(default=None, metadata={
        "help": "WavLM-Large.pt, when the speaker checkpoint lacks the WavLM weights"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the backbone (0: off, full fine-tuning)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch"})
    lora_target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "backbone Linear layers that get LoRA adapters"})
    lora_train_heads: bool = field(default=True, metadata={
        "help": "with LoRA, still train the non-backbone modules (heads, patch encoders, projectors) fully"})
    weights_digest: bool = field(default=False, metadata={
        "help": "print a SHA-256 of the trainable weights on every rank at the end (DDP consistency check)"})


# ------------------------------------------------------------------------------------------ tokenizer + model

def tiny_demo_pipeline():
    """The demo's tiny models (same seeds as `infer.py --demo`): tokenizer, VAE and speaker encoder."""
    from runtime.pipeline import TalkerPipeline
    return TalkerPipeline.demo()


def build_model(model_args: ModelArguments, talker: TalkerArguments, log=print):
    """(SpeechLLM in float32 on CPU, tokenizer, effective ModelArguments) for the start the config asks for."""
    from runtime.prompt import add_placeholder_tokens, load_tokenizer

    if talker.model_preset not in PRESETS:
        raise ConfigError(f"model_preset: expected one of {PRESETS}, got {talker.model_preset!r}")
    if talker.init_from:
        model = SpeechLLM.from_pretrained(talker.init_from, device="cpu", llm_dtype=torch.float32)
        model_args = merged_model_args(model.model_args, model_args, talker.init_from, log)
        model.model_args = model_args
        model.motion_cfm_weight, model.cfm_k_repeat = model_args.motion_cfm_weight, model_args.cfm_k_repeat
        tokenizer = folder_tokenizer(talker.init_from, model_args)
        log(f"[model] fine-tuning {talker.init_from} (strict load, {n_params(model)} parameters)")
        return model.float(), add_placeholder_tokens(tokenizer), model_args
    if talker.model_preset == "tiny":
        from runtime.prompt import demo_tokenizer
        _, config = tiny_model_args_and_config()
        model = SpeechLLM(model_args, config)
        log(f"[model] tiny preset, random init ({n_params(model)} parameters)")
        return model, add_placeholder_tokens(demo_tokenizer(model_args.model_max_length)), model_args
    name = model_args.llm_model_name_or_path
    if not name:
        raise ConfigError("llm_model_name_or_path: needed for the released preset without init_from")
    from transformers import AutoConfig, Qwen3ForCausalLM
    local_only = not talker.download
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
        llm = Qwen3ForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=local_only,
                                               attn_implementation="sdpa")
        tokenizer = load_tokenizer(name, model_args.model_max_length, local_files_only=local_only)
    except OSError as e:
        hint = "" if talker.download else " (set download: true to fetch it, or give a local folder)"
        raise ConfigError(f"llm_model_name_or_path: {name} is not available{hint}: {str(e).splitlines()[0]}") \
            from None
    if getattr(config, "model_type", "") != "qwen3":
        raise ConfigError(f"llm_model_name_or_path: {name} is a {config.model_type!r} model, expected qwen3")
    model = SpeechLLM(model_args, llm.config)
    model.llm = llm
    model.config = llm.config
    log(f"[model] backbone {name}; heads and patch encoders random init ({n_params(model)} parameters)")
    return model, add_placeholder_tokens(tokenizer), model_args


def folder_tokenizer(folder, model_args):
    from runtime.prompt import tokenizer_for
    return tokenizer_for(folder, model_args.llm_model_name_or_path, model_args.model_max_length)


def merged_model_args(folder_args: ModelArguments, config_args: ModelArguments, folder: str, log=print):
    """The folder's architecture fields, the config's training fields (motion_cfm_weight, cfm_k_repeat,
    model_max_length, paths); a differing architecture field in the config is reported and ignored."""
    merged = {}
    for f in fields(ModelArguments):
        mine, theirs = getattr(config_args, f.name), getattr(folder_args, f.name)
        if f.name in ARCHITECTURE_FIELDS:
            if mine != theirs:
                log(f"[model] {f.name}: {mine!r} in the config, {theirs!r} in {folder}: using the folder's")
            merged[f.name] = theirs
        else:
            merged[f.name] = mine
    return ModelArguments(**merged)


def n_params(model, trainable: bool = False) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


# ------------------------------------------------------------------------------------------ warm start

@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers.TrainingArguments with the reference's two changed defaults."""
    optim: str = field(default="adamw_torch_fused")
    ddp_find_unused_parameters: bool = field(default=False)


@dataclass
class WarmStartReport:
    source: str
    loaded: List[str]
    not_in_model: List[str]
    shape_mismatch: List[str]

    def per_component(self) -> dict:
        counts = {}
        for k in self.loaded:
            counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
        return counts

    def summary(self) -> str:
        lines = [f"[warm start] loaded {len(self.loaded)} keys from {self.source}: {self.per_component()}"]
        if self.not_in_model:
            lines.append(f"[warm start] skipped {len(self.not_in_model)} keys not in the model: "
                         + ", ".join(self.not_in_model[:10]) + (", ..." if len(self.not_in_model) > 10 else ""))
        if self.shape_mismatch:
            lines.append(f"[warm start] skipped {len(self.shape_mismatch)} keys of another shape: "
                         + "; ".join(self.shape_mismatch[:10]) + ("; ..." if len(self.shape_mismatch) > 10 else ""))
        return "\n".join(lines)


def tts_key(key: str) -> str:
    """A TTS-stage checkpoint key in this model's names (the reference's load_tts_checkpoint remapping):
    motion_cfm.* -> speech_cfm.* (the TTS model's speech head), .spk_proj. -> .global_cond_proj.,
    patch_encoder.in_proj. -> patch_encoder.input_proj., patch_encoder.* -> speech_patch_encoder.*"""
    if key.startswith("motion_cfm."):
        key = "speech_cfm." + key[len("motion_cfm."):]
    key = key.replace(".spk_proj.", ".global_cond_proj.")
    key = key.replace("patch_encoder.in_proj.", "patch_encoder.input_proj.")
    if key.startswith("patch_encoder."):
        key = "speech_patch_encoder." + key[len("patch_encoder."):]
    return key


def _shard_order(path: str):
    m = re.search(r"(\d+)-of-(\d+)\.safetensors$", os.path.basename(path))
    return (int(m.group(2)), int(m.group(1))) if m else (0, 0)


def read_safetensors_folder(path: str) -> dict:
    """All tensors of a .safetensors file, or of every .safetensors file of a folder (shards in order)."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        files = sorted((os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")),
                       key=_shard_order)
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors files in this folder")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: not found")
    merged = {}
    for f in files:
        try:
            merged.update(load_file(f))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return merged


def warm_start_from_tts(model: SpeechLLM, path: str, log=print) -> WarmStartReport:
    """Load a TTS-stage checkpoint (reference key names) into `model`: only keys that exist in the model
    with the same shape are loaded; the others are reported."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ENCODER_PREFIXES)}
    to_load, not_in_model, mismatch = {}, [], []
    for key, value in read_safetensors_folder(path).items():
        new = tts_key(key)
        if new.startswith(ENCODER_PREFIXES) or new not in own:
            not_in_model.append(key)
        elif tuple(own[new].shape) != tuple(value.shape):
            mismatch.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[new].shape)}")
        else:
            to_load[new] = value
    model.load_state_dict(to_load, strict=False)
    report = WarmStartReport(str(path), sorted(to_load), sorted(not_in_model), mismatch)
    log(report.summary())
    return report


# ------------------------------------------------------------------------------------------ encoders

def load_encoders(talker: TalkerArguments):
    """(WhisperX-VAE, speaker encoder, description) in eval mode on CPU: the demo's tiny ones for the tiny
    preset, else the release checkpoints (whisperx_vae_ckpt / $WHISPERVAE_CKPT / beside init_from / hub
    cache; wavlm_ckpt / $WAVLM_CKPT / hub cache)."""
    if talker.model_preset == "tiny":
        demo = tiny_demo_pipeline()
        return demo.vae.eval(), demo.speaker_encoder.eval(), {"preset": "tiny (the demo's random encoders)"}
    import speaker_verification
    from runtime import weights
    import whisperx_vae

    paths = weights.locate(talker.init_from, talker.whisperx_vae_ckpt, None, talker.wavlm_ckpt)
    paths.require(("whisperx_vae", "wavlm"))
    vae = whisperx_vae.load_whisperx_vae(paths.whisperx_vae)
    spk = speaker_verification.init_model("wavlm_large", paths.wavlm, wavlm_checkpoint=talker.wavlm_backbone_ckpt)
    return vae.eval(), spk.eval(), {"whisperx_vae": os.path.abspath(paths.whisperx_vae),
                                    "wavlm": os.path.abspath(paths.wavlm)}


def attach_encoders(model: SpeechLLM, talker: TalkerArguments, log=print) -> None:
    """Attach the frozen WhisperX-VAE and speaker encoder for online features (no feature cache)."""
    model.pretrained_speech_encoder, model.spk, described = load_encoders(talker)
    log(f"[model] online features: {', '.join(f'{k} {v}' for k, v in described.items())}")
    model.freeze_for_training()


# ------------------------------------------------------------------------------------------ LoRA

def apply_lora(model: SpeechLLM, talker: TalkerArguments, log=print) -> None:
    """LoRA adapters (peft) on the backbone's Linear layers, in place (the module tree keeps its names, the
    adapted layers gain .base_layer / .lora_A / .lora_B); the backbone's own weights are frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=int(talker.lora_r), lora_alpha=talker.lora_alpha, lora_dropout=talker.lora_dropout,
                     target_modules=list(talker.lora_target_modules), bias="none")
    model.llm.requires_grad_(False)
    inject_adapter_in_model(cfg, model.llm)
    n_lora = 0
    for name, p in model.llm.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            n_lora += p.numel()
    if n_lora == 0:
        raise ConfigError(f"lora_target_modules: none of {talker.lora_target_modules} is in the backbone")
    if not talker.lora_train_heads:
        for name, p in model.named_parameters():
            if not name.startswith("llm."):
                p.requires_grad_(False)
    log(f"[model] LoRA r={talker.lora_r} alpha={talker.lora_alpha:g} on {', '.join(talker.lora_target_modules)}: "
        f"{n_lora:,} adapter parameters; trainable in all {n_params(model, trainable=True)}")


def lora_scale(talker: TalkerArguments) -> float:
    return float(talker.lora_alpha) / float(talker.lora_r)


def merge_lora_state_dict(state: dict, scale: float, adapter: str = "default") -> dict:
    """A state dict with peft LoRA layers -> the plain layers' names and weights W + scale * B @ A."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        prefix, param = key.split(".base_layer.", 1)
        if param == "weight" and f"{prefix}.lora_A.{adapter}.weight" in state:
            a = state[f"{prefix}.lora_A.{adapter}.weight"].float()
            b = state[f"{prefix}.lora_B.{adapter}.weight"].float()
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        merged[f"{prefix}.{param}"] = value
    return merged


# ------------------------------------------------------------------------------------------ release folders

def check_release_folder(folder: str) -> str:
    """Strict-load check of a release folder without reading the weights (what SpeechLLM.from_pretrained
    checks): every key and shape of the architecture its configs describe; '' when it fits."""
    from safetensors import safe_open

    model_args, llm_config = _read_configs(folder)
    with torch.device("meta"):
        model = SpeechLLM(model_args, llm_config)
    with safe_open(os.path.join(folder, WEIGHTS_NAME), framework="pt") as f:
        found = {k: f.get_slice(k).get_shape() for k in f.keys()}
    report = key_report(model.checkpoint_shapes(), found, ignore=TIED_KEYS)
    return "" if report.ok() else report.message("SpeechLLM")


def trainable_digest(model) -> str:
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
