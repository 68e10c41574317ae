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
head is not read, and the length is the given one. `Loop` runs it for one request or several (the rows of
a batch); a single run, long-form windows, streaming, batches and `generate` (over tensors) all drive it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from common.constants import (FPS, MAX_SECONDS, PATCH_SIZE, RELEASED_CAP_MARGIN_PATCHES, STOP_MIN_PATCHES,
                              STOP_PATIENCE, STOP_THRESHOLD)
from runtime.loop_steps import loop_steps
from runtime.prompt import Prompt, build_prompt, n_placeholders
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
                    ref_motion_patches=0, n_placeholders=n_placeholders(ref_speech_frames, 0, D, PS))
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
                    n_placeholders=n_placeholders(speech_frames, motion_frames, D, PS))
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


@dataclass
class LoopRow:
    """One request's run of the loop."""
    prompt: Prompt
    plan: LengthPlan
    sampling: Sampling = Sampling()
    given_speech_latents: Optional[torch.Tensor] = None  # a2v: (N, 32) the speech half of every token
    given_motion_norm: Optional[torch.Tensor] = None  # v2a: (M, 40) the motion half of every token
    generator: Optional[torch.Generator] = None  # the row's noise (torch.Generator); None: the global RNG

    @property
    def forced(self) -> bool:
        return self.given_speech_latents is not None or self.given_motion_norm is not None


def batch_key(row: LoopRow) -> tuple:
    """Rows with equal keys can share one loop: one task, and the head settings that are one scalar per CFM
    call (the temperature is per row: it scales each row's own noise)."""
    return row.prompt.task, row.sampling.cfm_steps, float(row.sampling.cfm_cfg)


class _RowState:
    """A row while the loop runs: the head histories, the stop streak, the given patches and the noise source."""

    def __init__(self, row: LoopRow, model):
        dev, PS = model.device, model.patch_size
        self.row, self.plan, self.sampling = row, row.plan, row.sampling
        self.history = {"speech": list(row.prompt.speech_history), "motion": list(row.prompt.motion_history)}
        self.given = {"speech": None if row.given_speech_latents is None
                      else to_patches(row.given_speech_latents.to(dev).float(), PS),
                      "motion": None if row.given_motion_norm is None
                      else to_patches(row.given_motion_norm.to(dev).float(), PS)}
        self.global_cond = {"speech": row.prompt.speaker_emb, "motion": row.prompt.first_motion_norm}
        self.rng = row.generator
        self.reads_stop_head = row.plan.use_stop_head and not row.forced
        self.streak = 0
        self.stopped_by = "given_length" if row.forced else "length_cap"
        self.n_patches = 0

    def stops(self, step: int, stop_prob: Optional[float]) -> bool:
        """The released stop rule: stop_patience consecutive p_stop >= stop_threshold end the row."""
        if stop_prob is None:
            return False
        self.streak = self.streak + 1 if stop_prob >= self.sampling.stop_threshold else 0
        if self.streak >= self.sampling.stop_patience:
            self.stopped_by = "stop_head"
            return True
        return False


class Loop:
    """The released loop (infer.py: ar_generate_motion_continuation) for one request or several: iterate for
    (row index, Patch), every live row's patch at each step in row order. `stopped_by[i]` and `n_patches[i]`
    are final when the iteration ends.

    Per step: a row ends at its plan's max_steps or, from patch stop_min_patches on, once stop_patience
    consecutive stop probabilities reach stop_threshold (teacher-forced rows: at the given length, the stop
    head unread). Each live row then gets a speech patch (from step `delay` on, also a motion patch): its given
    frames (teacher forcing), or sampled from its backbone state in one CFM call per head for all rows. The
    rows' summed patch tokens go back through one backbone step (loop_steps: eager, static cache or CUDA
    graphs). A row's noise comes from its own generator when it has one (else from the global RNG): one
    randn(1, C, P) per sampled patch, in the order a lone run draws them, so a generator seeded with s gives
    the samples of a lone run after torch.manual_seed(s), batched or not, up to the float rounding of batched
    GEMMs."""

    def __init__(self, model, rows: List[LoopRow]):
        if not rows:
            raise ValueError("the loop needs at least one row")
        if len({batch_key(r) for r in rows}) > 1:
            raise ValueError("rows of one loop need one task and one cfm_steps / cfm_cfg (see batch_key)")
        for r in rows:
            if r.prompt.task != r.plan.task:
                raise ValueError(f"prompt is for {r.prompt.task!r}, plan for {r.plan.task!r}")
            if r.forced and r.plan.task != "t2av":
                raise ValueError("teacher forcing needs task='t2av' with reference motion")
        self.model, self.rows = model, list(rows)
        self.stopped_by: List[Optional[str]] = [None] * len(rows)
        self.n_patches = [0] * len(rows)

    @torch.no_grad()
    def __iter__(self) -> Iterator[Tuple[int, Patch]]:
        m, task = self.model, self.rows[0].prompt.task
        states = [_RowState(r, m) for r in self.rows]
        prefills = [r.prompt.prefill_embeds for r in self.rows]
        steps = loop_steps(m, max(p.shape[1] for p in prefills) + max(r.plan.max_steps for r in self.rows),
                           batch=len(self.rows))
        try:
            live, h = list(range(len(states))), steps.prefill(prefills)
            step = 0
            while True:
                stop_probs = self._stop_probs(states, live, step, h)
                going = [k for k, i in enumerate(live)
                         if step < states[i].plan.max_steps and not states[i].stops(step, stop_probs[k])]
                if not going:
                    return
                if len(going) < len(live):
                    live, h, stop_probs = [live[k] for k in going], h[going], [stop_probs[k] for k in going]
                    steps.keep(going)
                speech = self._patches(steps, m.speech_cfm, "speech", states, live, step, h)
                motion = None
                if task == "t2av" and step >= m.delay:
                    motion = self._patches(steps, m.motion_cfm, "motion", states, live, step - m.delay, h)
                for k, i in enumerate(live):
                    states[i].n_patches = self.n_patches[i] = step + 1
                    yield i, Patch(step, speech[k], None if motion is None else motion[k], stop_probs[k])
                step += 1
                more = [k for k, i in enumerate(live) if step < states[i].plan.max_steps]
                if not more:  # the state after a row's last possible patch is never used
                    return
                if len(more) < len(live):
                    live, speech = [live[k] for k in more], speech[more]
                    motion = None if motion is None else motion[more]
                    steps.keep(more)
                h = steps.advance(speech, motion, motion_pad=(task == "tts"))
        finally:
            self.stopped_by = [s.stopped_by for s in states]

    def _stop_probs(self, states, live, step, h) -> list:
        """p_stop of each live row that reads the stop head at this step (None for the others)."""
        reads = [states[i].reads_stop_head and step >= states[i].sampling.stop_min_patches
                 and step < states[i].plan.max_steps for i in live]
        if not any(reads):
            return [None] * len(live)
        probs = torch.sigmoid(self.model.stop_logits(h)).tolist()
        return [p if r else None for p, r in zip(probs, reads)]

    def _patches(self, steps, cfm, head: str, states, live, index: int, h) -> torch.Tensor:
        """(B, P, C): the given patch of rows forced for this head, one CFM call for the others."""
        m = self.model
        out = [states[i].given[head][index] if states[i].given[head] is not None else None for i in live]
        todo = [k for k, patch in enumerate(out) if patch is None]
        if todo:
            rows = [states[live[k]] for k in todo]
            C, P = cfm.in_channels, m.patch_size
            cond = torch.cat([m.cfm_context(r.history[head], C) for r in rows])
            global_cond = torch.cat([r.global_cond[head].float() for r in rows])
            noise = torch.cat([torch.randn((1, C, P), generator=r.rng, device=m.device, dtype=torch.float32)
                               * float(r.sampling.cfm_temperature) for r in rows])
            sampled = steps.sample(cfm, h[todo] if len(todo) < len(live) else h, cond, global_cond, noise,
                                   rows[0].sampling)
            for j, k in enumerate(todo):
                out[k] = sampled[j]
        for k, i in enumerate(live):
            states[i].history[head].append(out[k])
        return torch.stack(out)


class PatchStream:
    """The loop of one request: iterate for its Patches; `stopped_by` and `n_patches` are set when it ends.
    The noise comes from the global RNG unless a `generator` is given."""

    def __init__(self, model, prompt: Prompt, plan: LengthPlan, sampling: Sampling = Sampling(),
                 given_speech_latents: Optional[torch.Tensor] = None,
                 given_motion_norm: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
        self.model, self.prompt, self.plan, self.sampling = model, prompt, plan, sampling
        self.loop = Loop(model, [LoopRow(prompt, plan, sampling, given_speech_latents, given_motion_norm,
                                         generator)])

    def __iter__(self) -> Iterator[Patch]:
        for _, patch in self.loop:
            yield patch

    @property
    def stopped_by(self) -> Optional[str]:
        return self.loop.stopped_by[0]

    @property
    def n_patches(self) -> int:
        return self.loop.n_patches[0]


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


class Collector:
    """Patches gathered into a GenerationOutput (on `device`; one run or the windows of a long-form run)."""

    def __init__(self, model, device=None):
        self.device = torch.device(device) if device is not None else model.device
        self.dims = model.model_args.speech_embedding_dim, model.model_args.motion_embedding_dim
        self.speech, self.motion, self.stop_probs = [], [], []

    def add(self, patch: Patch) -> None:
        self.speech.append(patch.speech_latents.to(self.device))
        if patch.motion_norm is not None:
            self.motion.append(patch.motion_norm.to(self.device))
        self.stop_probs.append(patch.stop_prob)

    def frames(self, head: str) -> torch.Tensor:
        """(frames, dim) float32 of what was gathered so far."""
        patches, dim = (self.speech, self.dims[0]) if head == "speech" else (self.motion, self.dims[1])
        return torch.cat(patches).float() if patches else torch.zeros((0, dim), device=self.device)

    def output(self, prompt: Prompt, stopped_by: str, plan: Optional[LengthPlan]) -> GenerationOutput:
        return GenerationOutput(self.frames("speech"), self.frames("motion"), prompt.prefix_speech_latents.float(),
                                prompt.prefix_motion_norm.float(), len(self.stop_probs), stopped_by, plan,
                                list(self.stop_probs))


def collect(stream: PatchStream, progress: Optional[Callable[[int], None]] = None) -> GenerationOutput:
    """Run a stream to its end; progress(n) after every patch."""
    patches = Collector(stream.model)
    for patch in stream:
        patches.add(patch)
        if progress is not None:
            progress(patch.index + 1)
    return patches.output(stream.prompt, stream.stopped_by, stream.plan)


def run_rows(model, rows: List[LoopRow]) -> List[GenerationOutput]:
    """The loop over several rows at once, each collected (batches of requests)."""
    loop = Loop(model, rows)
    patches = [Collector(model) for _ in rows]
    for i, patch in loop:
        patches[i].add(patch)
    return [p.output(r.prompt, loop.stopped_by[i], r.plan) for i, (p, r) in enumerate(zip(patches, rows))]


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
