"""The released inference loop as a stream of patches, and the length plan it runs under.

    plan = plan_lengths("t2av", ref_speech_frames=..., ref_motion_frames=..., gt_prefix_seconds=0.5, delay=0)
    prompt = prompt.build_prompt(model, input_ids, speech_start, ref_latents, speaker, plan, ref_motion_norm)
    stream = PatchStream(model, prompt, plan, Sampling())
    for patch in stream:           # one Patch per 160 ms, as it is sampled
        ...
    stream.stopped_by              # "stop_head" | "length_cap" | "given_length"

Per step (infer.py: ar_generate_motion_continuation): from patch `stop_min_patches` on, stop once
`stop_patience` consecutive stop probabilities reach `stop_threshold`; sample a speech patch (then, from
step `delay` on, a motion patch) from the backbone state; feed their summed patch tokens back.
Teacher forcing (A2V / V2A): the given speech or motion frames stand in for one head's samples, the stop
head is not read, and the length is the given one. Long-form windows, streaming and `SpeechLLM.generate`
all consume this one loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from common.constants import (FPS, MAX_SECONDS, PATCH_SIZE, RELEASED_CAP_MARGIN_PATCHES, STOP_MIN_PATCHES, STOP_PATIENCE,
                       STOP_THRESHOLD)
from runtime.loop_steps import loop_steps
from runtime.prompt import Prompt, build_prompt
from speech_llm import check_frames, to_patches

TASKS = ("t2av", "tts")
TEXT_CAP_FACTOR, TEXT_CAP_PAD_SECONDS = 1.5, 1.0  # text rule: 1.5x the estimated speech + 1 s (<= 30 s)


# ------------------------------------------------------------------------------------------ length plan

@dataclass(frozen=True)
class LengthPlan:
    """How long the loop may run and how much of the reference clip it replays."""
    task: str  # "t2av" | "tts"
    prefix_frames: int  # t2av: reference motion frames fed as prefix; tts: reference speech frames
    prefix_patches: int  # patch tokens of the prefill (t2av: prefix + delay patches)
    history_speech_frames: int  # reference speech frames seeding the speech head's context
    ref_motion_patches: int  # t2av: patches of the reference motion the prompt reads (0 for tts)
    n_placeholders: int  # placeholder run of the chat prompt (only its start matters at inference)
    max_steps: int  # loop steps at most = patches generated at most
    rule: str  # why max_steps is what it is: "released", "max_seconds", "text", "given_speech", "given_motion"
    use_stop_head: bool = True

    @property
    def max_seconds(self) -> float:
        return self.max_steps * PATCH_SIZE / FPS


def plan_lengths(task: str, *, ref_speech_frames: int, ref_motion_frames: int = 0, gt_prefix_seconds: float = 0.5,
                 delay: int = 0, patch_size: int = PATCH_SIZE, given_speech_frames: Optional[int] = None,
                 given_motion_frames: Optional[int] = None, max_seconds: Optional[float] = None,
                 margin_patches: int = RELEASED_CAP_MARGIN_PATCHES,
                 text_seconds: Optional[float] = None) -> LengthPlan:
    """The length plan of one run of the loop.

    Released rule (the default): the loop runs at most (patches of the reference clip - prefix patches +
    `margin_patches`) steps. `max_seconds` replaces it by ceil(max_seconds * 25 / 4) steps. Teacher forcing
    sets the length: given speech of N frames -> ceil(N/4) steps; given motion of M frames -> ceil(M/4) +
    delay steps (the stop head is not read). Text rule (long-form windows, `text_seconds` = an estimate of
    the window's speech, longform.estimate_speech_seconds): min(30, 1.5 * text_seconds + 1) seconds.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    PS, D = patch_size, delay
    if task == "tts":
        prefix = max(0, min(int(round(gt_prefix_seconds * FPS)), ref_speech_frames))  # rounded, as generate_speech
        prefix_patches = math.ceil(prefix / PS)
        released = max(0, math.ceil(max(1, ref_speech_frames) / PS) - prefix_patches + margin_patches)
        plan = dict(prefix_frames=prefix, prefix_patches=prefix_patches, history_speech_frames=prefix,
                    ref_motion_patches=0, n_placeholders=max(math.ceil(ref_speech_frames / PS), D))
    else:
        motion_len = max(PS, (ref_motion_frames // PS) * PS)
        prefix = (max(0, min(int(gt_prefix_seconds * FPS), motion_len)) // PS) * PS  # floored, as infer.py
        total = max(math.ceil(ref_speech_frames / PS), motion_len // PS + D)
        prefix_patches = min(prefix // PS + D, total)
        released = total - prefix_patches + margin_patches
        speech_frames, motion_frames = ref_speech_frames, ref_motion_frames
        if given_speech_frames is not None or given_motion_frames is not None:
            speech_frames = motion_frames = given_speech_frames if given_speech_frames is not None \
                else given_motion_frames
        plan = dict(prefix_frames=prefix, prefix_patches=prefix_patches,
                    history_speech_frames=min((prefix // PS + D) * PS, ref_speech_frames),
                    ref_motion_patches=motion_len // PS,
                    n_placeholders=max(math.ceil(speech_frames / PS), motion_frames // PS + D))
    if given_speech_frames is not None:
        return LengthPlan(task, **plan, max_steps=math.ceil(given_speech_frames / PS), rule="given_speech",
                          use_stop_head=False)
    if given_motion_frames is not None:
        return LengthPlan(task, **plan, max_steps=math.ceil(given_motion_frames / PS) + D, rule="given_motion",
                          use_stop_head=False)
    if max_seconds is not None:
        return LengthPlan(task, **plan, max_steps=math.ceil(max_seconds * FPS / PS), rule="max_seconds")
    if text_seconds is not None:
        seconds = min(MAX_SECONDS, TEXT_CAP_FACTOR * text_seconds + TEXT_CAP_PAD_SECONDS)
        return LengthPlan(task, **plan, max_steps=max(1, int(seconds * FPS / PS)), rule="text")  # floored: <= 30 s
    return LengthPlan(task, **plan, max_steps=released, rule="released")


# ------------------------------------------------------------------------------------------ the loop

@dataclass(frozen=True)
class Sampling:
    """Sampling settings of the loop; the defaults are the released code's."""
    cfm_steps: int = 10
    cfm_temperature: float = 0.3
    cfm_cfg: float = 2.0
    stop_min_patches: int = STOP_MIN_PATCHES
    stop_patience: int = STOP_PATIENCE
    stop_threshold: float = STOP_THRESHOLD


@dataclass
class Patch:
    """One step of the loop: 4 frames (160 ms)."""
    index: int  # 0-based step
    speech_latents: torch.Tensor  # (4, 32) float32, sampled (or the given frames in A2V)
    motion_norm: Optional[torch.Tensor]  # (4, 40) normalised motion; None in tts and for the first `delay` steps
    stop_prob: Optional[float]  # p_stop read before this patch was sampled (None when not read)


class PatchStream:
    """Iterate to run the loop; `stopped_by` and `n_patches` are set when it ends."""

    def __init__(self, model, prompt: Prompt, plan: LengthPlan, sampling: Sampling = Sampling(),
                 given_speech_latents: Optional[torch.Tensor] = None,
                 given_motion_norm: Optional[torch.Tensor] = None):
        if prompt.task != plan.task:
            raise ValueError(f"prompt is for {prompt.task!r}, plan for {plan.task!r}")
        if (given_speech_latents is not None or given_motion_norm is not None) and plan.task != "t2av":
            raise ValueError("teacher forcing needs task='t2av' with reference motion")
        self.model, self.prompt, self.plan, self.sampling = model, prompt, plan, sampling
        dev, PS = model.device, model.patch_size
        self._given_speech = None if given_speech_latents is None else to_patches(given_speech_latents.to(dev).float(), PS)
        self._given_motion = None if given_motion_norm is None else to_patches(given_motion_norm.to(dev).float(), PS)
        self.stopped_by: Optional[str] = None
        self.n_patches = 0

    @torch.no_grad()
    def __iter__(self) -> Iterator[Patch]:
        m, p, s = self.model, self.prompt, self.sampling
        speech_hist, motion_hist = list(p.speech_history), list(p.motion_history)
        forced = self._given_speech is not None or self._given_motion is not None
        self.stopped_by = "given_length" if forced else "length_cap"
        steps = loop_steps(m, p.prefill_embeds.shape[1] + self.plan.max_steps)
        h = steps.prefill(p.prefill_embeds)
        streak = 0
        for step in range(self.plan.max_steps):
            stop_prob = None
            if self.plan.use_stop_head and not forced and step >= s.stop_min_patches:
                stop_prob = float(torch.sigmoid(torch.tensor(m.stop_logit(h))))
                streak = streak + 1 if stop_prob >= s.stop_threshold else 0
                if streak >= s.stop_patience:
                    self.stopped_by = "stop_head"
                    return
            speech = self._next_patch(steps, self._given_speech, step, m.speech_cfm, h, speech_hist, p.speaker_emb)
            speech_hist.append(speech)
            motion = None
            if p.task == "t2av" and step >= m.delay:
                motion = self._next_patch(steps, self._given_motion, step - m.delay, m.motion_cfm, h,
                                          motion_hist, p.first_motion_norm)
                motion_hist.append(motion)
            self.n_patches = step + 1
            yield Patch(step, speech, motion, stop_prob)
            if step + 1 < self.plan.max_steps:  # the state after the last possible patch is never used
                h = steps.advance(speech, motion, motion_pad=(p.task == "tts"))

    def _next_patch(self, steps, given, index, cfm, h, history, global_cond):
        """The given frames (teacher forcing) or a patch sampled by `cfm` from state h and the history."""
        if given is not None:
            return given[index]
        return steps.sample(cfm, h, self.model.cfm_context(history, cfm.in_channels), global_cond, self.sampling)


# ------------------------------------------------------------------------------------------ collecting

@dataclass
class GenerationOutput:
    speech_latents: torch.Tensor  # (frames, 32) generated frames only (after the prefix)
    motion_norm: torch.Tensor  # (frames, 40) generated normalized motion only
    prefix_speech_latents: torch.Tensor  # (Pf, 32) reference latents fed as prefix
    prefix_motion_norm: torch.Tensor  # (Pm, 40) reference motion fed as prefix
    n_patches: int  # loop steps that produced a patch
    stopped_by: str  # "stop_head" | "length_cap" | "given_length"
    plan: Optional[LengthPlan] = None
    stop_probs: list = field(default_factory=list)  # p_stop per patch (None where not read)


def collect(stream: PatchStream, progress: Optional[Callable[[int], None]] = None) -> GenerationOutput:
    """Run a stream to its end; progress(n) after every patch."""
    speech, motion, stop_probs = [], [], []
    for patch in stream:
        speech.append(patch.speech_latents)
        if patch.motion_norm is not None:
            motion.append(patch.motion_norm)
        stop_probs.append(patch.stop_prob)
        if progress is not None:
            progress(patch.index + 1)
    m, dev = stream.model, stream.model.device
    return GenerationOutput(
        speech_latents=stack_frames(speech, m.model_args.speech_embedding_dim, dev),
        motion_norm=stack_frames(motion, m.model_args.motion_embedding_dim, dev),
        prefix_speech_latents=stream.prompt.prefix_speech_latents.float(),
        prefix_motion_norm=stream.prompt.prefix_motion_norm.float(),
        n_patches=stream.n_patches, stopped_by=stream.stopped_by, plan=stream.plan, stop_probs=stop_probs)


def stack_frames(patches: list, dim: int, device) -> torch.Tensor:
    """(frames, dim) float32 from a list of (P, dim) patches; (0, dim) for none."""
    return torch.cat(patches).float() if patches else torch.zeros((0, dim), device=device)


# ------------------------------------------------------------------------------------------ over tensors

@torch.no_grad()
def generate(model, input_ids, speech_start: int, ref_speech_latents, speaker_emb, ref_motion_norm=None, *,
             gt_prefix_seconds: float = 0.5, cfm_steps: int = 10, cfm_temperature: float = 0.3, cfm_cfg: float = 2.0,
             given_speech_latents=None, given_motion_norm=None, task: str = "t2av", max_seconds: Optional[float] = None,
             plan: Optional[LengthPlan] = None, sampling: Optional[Sampling] = None,
             progress: Optional[Callable[[int], None]] = None) -> GenerationOutput:
    """The released inference loop (infer.py: ar_generate_motion_continuation) of a SpeechLLM over tensors.

    input_ids (1, T) prompt ids; speech_start = index of the first patch placeholder;
    ref_speech_latents (Ls, speech_dim) VAE latents of the reference audio; speaker_emb (1, 256);
    ref_motion_norm (Tm, motion_dim) normalized reference motion, or None for TTS.
    given_speech_latents (N, speech_dim): A2V teacher forcing (only motion is sampled);
    given_motion_norm (M, motion_dim): V2A (only speech is sampled). task="tts" (also chosen when
    ref_motion_norm is None) follows speech_llm.generate_speech's prompt with the released stop rule.
    The length is plan_lengths' (released rule unless `max_seconds` or `plan` is given).
    progress(n) is called after every generated patch with the number of patches so far. The noise comes
    from the global RNG (seed it with torch.manual_seed before the call).
    """
    task = check_generate_inputs(model, input_ids, speech_start, ref_speech_latents, speaker_emb, ref_motion_norm,
                                 given_speech_latents, given_motion_norm, task)
    if plan is None:
        plan = plan_lengths(
            task, ref_speech_frames=ref_speech_latents.size(0),
            ref_motion_frames=0 if ref_motion_norm is None else ref_motion_norm.size(0),
            gt_prefix_seconds=gt_prefix_seconds, delay=model.delay, patch_size=model.patch_size,
            given_speech_frames=None if given_speech_latents is None else given_speech_latents.size(0),
            given_motion_frames=None if given_motion_norm is None else given_motion_norm.size(0),
            max_seconds=max_seconds)
    prompt = build_prompt(model, input_ids.reshape(1, -1), speech_start, ref_speech_latents, speaker_emb, plan,
                          ref_motion_norm)
    sampling = sampling or Sampling(int(cfm_steps), float(cfm_temperature), float(cfm_cfg))
    return collect(PatchStream(model, prompt, plan, sampling, given_speech_latents, given_motion_norm), progress)


def check_generate_inputs(model, input_ids, speech_start, ref_speech, speaker_emb, ref_motion, given_speech,
                          given_motion, task) -> str:
    """The task to run (t2av without reference motion is tts); ValueError naming a bad argument."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    if given_speech is not None and given_motion is not None:
        raise ValueError("give at most one of given_speech_latents / given_motion_norm")
    if ref_motion is None and (given_speech is not None or given_motion is not None):
        raise ValueError("teacher forcing needs task='t2av' with reference motion (ref_motion_norm)")
    if ref_motion is None:
        task = "tts"
    if task == "tts" and (given_speech is not None or given_motion is not None):
        raise ValueError("teacher forcing needs task='t2av' with reference motion")
    if input_ids.dim() > 2 or input_ids.reshape(-1, input_ids.size(-1)).size(0) != 1:
        raise ValueError(f"input_ids: expected shape (1, T), got {tuple(input_ids.shape)}")
    if not 0 <= int(speech_start) <= input_ids.size(-1):
        raise ValueError(f"speech_start {speech_start} outside the prompt of {input_ids.size(-1)} tokens")
    if speaker_emb.numel() != model.model_args.speaker_embedding_dim:
        raise ValueError(f"speaker_emb: expected {model.model_args.speaker_embedding_dim} values, "
                         f"got shape {tuple(speaker_emb.shape)}")
    speech_dim, motion_dim = model.model_args.speech_embedding_dim, model.model_args.motion_embedding_dim
    check_frames("ref_speech_latents", ref_speech, speech_dim, allow_empty=True)
    if task == "t2av":
        check_frames("ref_motion_norm", ref_motion, motion_dim)
    if given_speech is not None:
        check_frames("given_speech_latents", given_speech, speech_dim)
    if given_motion is not None:
        check_frames("given_motion_norm", given_motion, motion_dim)
    return task
