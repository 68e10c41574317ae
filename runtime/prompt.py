"""The prompt of the inference loop, built in one place.

Text side: the Qwen3 chat template, the user turn holding the text and the assistant turn one
`<SPEECH_FRAME>` placeholder per patch (only the position of the first one matters at inference; training
places the patch tokens over the whole run). Embedding side (`build_prompt`): the text embeddings up to the
first placeholder, then the prefix patch tokens of the reference clip, and the histories that seed the two
heads' context. The prefix tokens are `SpeechLLM.patch_tokens`, the same function training uses.

t2av (infer.py's layout): prefix tokens = speech tokens of the reference latents + motion tokens of the
reference motion (placed after `delay` patches); task_embedding(1) is added to the first prefix token.
tts (speech_llm.generate_speech's layout): [task_embedding(0), text] then speech tokens + motion_pad_emb.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from runtime.request import RequestError
from speech_llm import to_patches

SPEECH_TOKEN, MOTION_TOKEN = "<SPEECH_FRAME>", "<MOTION_FRAME>"


# ------------------------------------------------------------------------------------------ tokenizer side

def add_placeholder_tokens(tokenizer):
    """Add the patch placeholder tokens to a tokenizer that lacks them (a plain Qwen3 tokenizer)."""
    if SPEECH_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SPEECH_TOKEN, MOTION_TOKEN]})
    return tokenizer


def load_tokenizer(source, model_max_length: int = 1000, local_files_only: bool = True):
    """AutoTokenizer of a checkpoint folder (or a hub id in the local cache) with the placeholders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), model_max_length=model_max_length,
                                              padding_side="right", local_files_only=local_files_only)
    return add_placeholder_tokens(tokenizer)


def control_tokens_in(tokenizer, text: str) -> list:
    """The tokenizer's added/special token strings that occur in `text` (chat markup, placeholders)."""
    strings = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    strings |= set(getattr(tokenizer, "all_special_tokens", []))
    return sorted(s for s in strings if s and s in text)


def n_placeholders(speech_frames: int, motion_frames: int, delay: int, patch_size: int) -> int:
    """Placeholder run of infer.py / the training data set: max(ceil(speech/P), motion//P + delay)."""
    return max(math.ceil(speech_frames / patch_size), motion_frames // patch_size + delay)


def build_chat_and_spans(tokenizer, model_max_length, speech_len_frames, motion_len_frames, patch_size=4, text="",
                         delay=0, speech_tok=SPEECH_TOKEN):
    """Chat prompt with one placeholder token per patch (infer.py and training layout).

    Returns input_ids (1, T) long, attention_mask (1, T) bool, speech_span (2,) long = [first, last+1)
    placeholder positions (truncated to model_max_length tokens, as the reference does; None: not truncated).
    """
    n = n_placeholders(speech_len_frames, motion_len_frames, delay, patch_size)
    chat = [{"role": "user", "content": text}, {"role": "assistant", "content": speech_tok * n}]
    kwargs = dict(tokenize=True, add_generation_prompt=False, padding=False)
    if model_max_length is not None:
        kwargs.update(truncation=True, max_length=model_max_length)
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


def text_prompt(tokenizer, text: str, n_patch_placeholders: int, max_tokens: int, patch_size: int = 4):
    """(input_ids (1, T), index of the first placeholder) for inference, refusing what would corrupt the
    prompt: the tokenizer's control tokens in the text, and prompts longer than the model takes."""
    found = control_tokens_in(tokenizer, text)
    if found:
        raise RequestError("text", f"contains the model's control tokens {', '.join(found)}; they would "
                                   "corrupt the prompt (remove them)")
    ids, _, span = build_chat_and_spans(tokenizer, None, n_patch_placeholders * patch_size, 0, patch_size, text)
    if ids.shape[1] > max_tokens:
        n_run = int(span[1] - span[0])
        raise RequestError("text", f"text too long for the length cap: the prompt needs {ids.shape[1]} tokens "
                                   f"({ids.shape[1] - n_run} for the text and chat markup + {n_run} patch "
                                   f"placeholders), the model takes at most {max_tokens}")
    return ids, int(span[0])


# ------------------------------------------------------------------------------------------ embedding side

@dataclass
class Prompt:
    """Everything the loop starts from (generation.PatchStream)."""
    task: str  # "t2av" (speech + motion heads) | "tts" (speech head, motion_pad_emb tokens)
    prefill_embeds: torch.Tensor  # (1, L, D): text up to the first placeholder + prefix patch tokens
    speech_history: List[torch.Tensor]  # (P, 32) patches seeding the speech head's context
    motion_history: List[torch.Tensor]  # (P, 40) patches seeding the motion head's context
    speaker_emb: torch.Tensor  # (1, 256) global condition of the speech head
    first_motion_norm: Optional[torch.Tensor]  # (1, 40) global condition of the motion head (t2av)
    prefix_speech_latents: torch.Tensor  # (frames, 32) reference latents fed as prefix
    prefix_motion_norm: torch.Tensor  # (frames, 40) reference motion fed as prefix (not bf16-rounded)


@torch.no_grad()
def build_prompt(model, input_ids, speech_start: int, ref_speech_latents, speaker_emb, plan,
                 ref_motion_norm=None) -> Prompt:
    """The prompt of the released loop for `plan` (generation.plan_lengths) on `model` (SpeechLLM)."""
    dev = model.device
    ref_speech = ref_speech_latents.to(dev, torch.float32)
    with model.amp():
        text_part = model.llm.get_input_embeddings()(input_ids.to(dev)[:, :speech_start])
    speaker = speaker_emb.to(dev, torch.float32).reshape(1, -1)
    if plan.task == "tts":
        return _tts_prompt(model, text_part, ref_speech, speaker, plan)
    return _t2av_prompt(model, text_part, ref_speech, speaker, plan, ref_motion_norm.to(dev, torch.float32))


def _tts_prompt(model, text_part, ref_speech, speaker, plan) -> Prompt:
    n_prefix, PS = plan.prefix_frames, model.patch_size
    with model.amp():
        tag = model.task_embedding(torch.zeros(1, dtype=torch.long, device=model.device))
        prefill = torch.cat([tag[None].to(text_part.dtype), text_part], dim=1)
        if n_prefix > 0:
            tokens = model.patch_tokens(model.projector_speech(ref_speech[:n_prefix]), plan.prefix_patches)
            prefill = torch.cat([prefill, tokens], dim=1)
    history = list(to_patches(ref_speech[:n_prefix], PS)) if n_prefix > 0 else []
    return Prompt("tts", prefill, history, [], speaker, None, ref_speech[:n_prefix],
                  ref_speech.new_zeros((0, model.model_args.motion_embedding_dim)))


def _t2av_prompt(model, text_part, ref_speech, speaker, plan, motion) -> Prompt:
    PS = model.patch_size
    motion_q = motion.to(torch.bfloat16).float()  # infer.py reads the reference motion in bf16
    motion_len = plan.ref_motion_patches * PS
    if motion_q.size(0) < motion_len:  # shorter than one patch: zero-pad (the reference fails here)
        motion_q = F.pad(motion_q, (0, 0, 0, motion_len - motion_q.size(0)))
    motion_q = motion_q[:motion_len]
    prefill = text_part
    if plan.prefix_patches > 0:
        with model.amp():
            tokens = model.patch_tokens(model.projector_speech(ref_speech), plan.prefix_patches,
                                        model.projector_motion(motion_q))
            tag = model.task_embedding(torch.ones(1, dtype=torch.long, device=model.device))
            tokens = torch.cat([tokens[:, :1] + tag[None], tokens[:, 1:]], dim=1)
            prefill = torch.cat([text_part, tokens], dim=1)
    n_hist = plan.history_speech_frames
    speech_history = list(to_patches(ref_speech[:n_hist], PS)) if n_hist > 0 else []
    n_motion = plan.prefix_frames
    motion_history = list(to_patches(motion_q[:n_motion], PS)) if n_motion > 0 else []
    return Prompt("t2av", prefill, speech_history, motion_history, speaker, motion_q[:1], ref_speech[:n_hist],
                  motion[:n_motion])


# ------------------------------------------------------------------------------------------ tokenizers

_DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def demo_tokenizer(model_max_length: int = 1000):
    """Offline byte-level tokenizer (263 ids) with Qwen3's chat markup and the patch placeholder tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>", SPEECH_TOKEN, MOTION_TOKEN],
        chat_template=_DEMO_CHAT_TEMPLATE, model_max_length=model_max_length, padding_side="right")
    return tokenizer


def tokenizer_for(checkpoint_dir, llm_name, model_max_length):
    """The checkpoint folder's tokenizer, else llm_name's (a local folder or the hub cache only)."""
    folder = Path(checkpoint_dir)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder, model_max_length=model_max_length)
    if llm_name:
        try:  # nothing is downloaded at run time
            return load_tokenizer(llm_name, model_max_length=model_max_length)
        except Exception:  # noqa: BLE001 - reported below with the ways forward
            pass
    raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json) in the checkpoint folder and "
                            f"the tokenizer {llm_name!r} is not available offline")
