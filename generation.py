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

from constants import (FPS, MAX_SECONDS, PATCH_SIZE, RELEASED_CAP_MARGIN_PATCHES, STOP_MIN_PATCHES, STOP_PATIENCE,
                       STOP_THRESHOLD)
from loop_steps import loop_steps
from prompt import Prompt, to_patches

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
