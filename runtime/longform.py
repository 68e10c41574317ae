"""Long-form generation: a text (or an a2v/v2a input) of any length as a run of windows.

Each window is one run of generation.PatchStream with its own LengthPlan:
- t2av/tts: the text is split into windows (split_windows): whole sentences packed while their estimated
  speech stays within WINDOW_SECONDS; a longer sentence is cut at clause marks, then between words (CJK:
  between characters). Each window's cap is the "text" rule of plan_lengths: min(30 s, 1.5 x estimate + 1 s).
- a2v/v2a: the given speech (or motion) is cut into 28 s windows (a window plus its prefix fits the model's
  30 s); the transcript is shared out over the windows by length.
Window 1 is prompted with the reference clip, as a single run. Window k > 1 is prompted with the last
gt_prefix_seconds of the output so far (speech latents and normalised motion) as the prefix, with the
ORIGINAL speaker embedding and first motion frame as global conditions; that replayed prefix is not repeated
in the output. The seed is set once, before window 1.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional

import torch

from common.constants import FPS, MAX_FRAMES, PATCH_SIZE
from runtime.generation import GenerationOutput, LengthPlan, Patch, PatchStream, Sampling, plan_lengths, stack_frames
from common.motion_stats import normalize_motion
from runtime.prompt import build_prompt, text_prompt

LATIN_CHARS_PER_SECOND = 14.0  # letters, digits, spaces and punctuation of alphabetic scripts
CJK_CHARS_PER_SECOND = 4.5  # one syllable per character
WINDOW_SECONDS = 12.0  # estimated speech per text window at most (its cap: 1.5 * 12 + 1 = 19 s)
GIVEN_WINDOW_FRAMES = 700  # a2v/v2a: 28 s of given frames per window (+ the prefix stays within 750)

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]»”’]*\s+|(?<=[。！？；])")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+|(?<=[，、：；])")


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F") and ch.isalpha()


def estimate_speech_seconds(text: str) -> float:
    """Seconds of speech a text takes, roughly: CJK characters at 4.5/s, everything else at 14/s."""
    n_cjk = sum(_is_cjk(ch) for ch in text)
    return n_cjk / CJK_CHARS_PER_SECOND + (len(text.strip()) - n_cjk) / LATIN_CHARS_PER_SECOND


def _pieces(text: str, pattern) -> List[str]:
    return [p.strip() for p in pattern.split(text) if p and p.strip()]


def _words(text: str, window_seconds: float = WINDOW_SECONDS) -> List[str]:
    """Words (split at spaces), CJK runs cut into characters: the smallest pieces a window may hold. A word
    longer than a window (a script written without spaces, such as Thai, or a run of letters) is cut at
    characters, never before a combining mark (Thai vowels and tones stay on their consonant)."""
    out = []
    for word in text.split():
        if any(_is_cjk(ch) for ch in word):
            out += list(word)
        elif estimate_speech_seconds(word) > window_seconds:
            out += _cut_at_characters(word, max(1, int(window_seconds * LATIN_CHARS_PER_SECOND)))
        else:
            out.append(word)
    return out


def _cut_at_characters(word: str, size: int) -> List[str]:
    pieces, start = [], 0
    while start < len(word):
        end = min(start + size, len(word))
        while start + 1 < end < len(word) and unicodedata.category(word[end]) in ("Mn", "Mc", "Me"):
            end -= 1
        pieces.append(word[start:end])
        start = end
    return pieces


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")  # CJK characters and punctuation


def _join(a: str, b: str) -> str:
    """Two pieces of a window: CJK is written without spaces."""
    if not a:
        return b
    return a + b if _wide(a[-1]) or _wide(b[0]) else a + " " + b


def _pack(pieces: List[str], limit: float) -> List[str]:
    """Greedy: pieces joined while the estimate stays within `limit` seconds."""
    windows, current = [], ""
    for piece in pieces:
        joined = _join(current, piece)
        if current and estimate_speech_seconds(joined) > limit:
            windows.append(current)
            current = piece
        else:
            current = joined
    if current:
        windows.append(current)
    return windows


def split_windows(text: str, window_seconds: float = WINDOW_SECONDS) -> List[str]:
    """The text as windows of at most `window_seconds` estimated speech: sentences, clauses, words."""
    pieces = []
    for sentence in _pieces(text, _SENTENCE_END):
        if estimate_speech_seconds(sentence) <= window_seconds:
            pieces.append(sentence)
            continue
        for clause in _pieces(sentence, _CLAUSE_END):
            if estimate_speech_seconds(clause) <= window_seconds:
                pieces.append(clause)
            else:
                pieces += _pack(_words(clause, window_seconds), window_seconds)
    return _pack(pieces, window_seconds) or [text.strip()]


def _share_text(text: str, n: int) -> List[str]:
    """The transcript of an a2v/v2a input cut into n windows of about equal length, at word boundaries."""
    words = text.split()
    if n <= 1 or not words:
        return [text] + [""] * (n - 1)
    cuts = [round(i * len(words) / n) for i in range(n + 1)]
    return [" ".join(words[cuts[i]:cuts[i + 1]]) for i in range(n)]


# ------------------------------------------------------------------------------------------ windows

@dataclass
class Window:
    index: int  # 0-based
    text: str
    given_start: int = 0  # a2v/v2a: first frame of the given input this window drives with
    given_end: int = 0


@dataclass
class WindowReport:
    index: int
    text: str
    prefix_frames: int  # frames replayed as the prompt prefix (window 1: of the reference clip)
    start_frame: int  # first output frame of the window's generated part (after the whole output's prefix)
    n_frames: int  # frames it generated
    stopped_by: str
    max_seconds: float


def plan_windows(req, inputs) -> Optional[List[Window]]:
    """The windows of a request, or None for one run as before (long_form off, or auto and one window)."""
    if req.mode in ("t2av", "tts"):
        texts = split_windows(req.text)
        if req.long_form is False or (req.long_form is None and len(texts) == 1):
            return None
        return [Window(i, t) for i, t in enumerate(texts)]
    given = inputs.given_speech if req.mode == "a2v" else inputs.given_motion_raw
    n = given.shape[0]
    if req.long_form is False or (req.long_form is None and n <= MAX_FRAMES):
        return None
    n_windows = max(1, math.ceil(n / GIVEN_WINDOW_FRAMES))
    texts = _share_text(req.text, n_windows)
    return [Window(i, texts[i], i * GIVEN_WINDOW_FRAMES, min(n, (i + 1) * GIVEN_WINDOW_FRAMES))
            for i in range(n_windows)]


def tail_frames(req, task: str) -> int:
    """Frames of the output so far replayed as the prefix of windows k > 1 (plan_lengths' prefix length)."""
    if task == "tts":
        return int(round(req.gt_prefix_seconds * FPS))
    return (int(req.gt_prefix_seconds * FPS) // PATCH_SIZE) * PATCH_SIZE


def window_plan(pipe, req, inputs, window: Window, ref_frames: Optional[int] = None) -> LengthPlan:
    """Window 1: the reference clip's lengths; later windows: a reference clip of `ref_frames` (the tail)."""
    task = "tts" if req.mode == "tts" else "t2av"
    first = window.index == 0
    speech_frames = inputs.ref_latents.shape[0] if first else ref_frames
    motion_frames = inputs.ref_motion_frames if first else max(PATCH_SIZE, ref_frames)
    n_given = window.given_end - window.given_start
    return plan_lengths(task, ref_speech_frames=speech_frames, ref_motion_frames=motion_frames,
                        gt_prefix_seconds=req.gt_prefix_seconds, delay=pipe.delay, patch_size=pipe.patch_size,
                        given_speech_frames=n_given if req.mode == "a2v" else None,
                        given_motion_frames=n_given if req.mode == "v2a" else None,
                        max_seconds=req.max_seconds, text_seconds=estimate_speech_seconds(window.text))


def check_windows(pipe, req, inputs, windows: List[Window]) -> None:
    """Every window's prompt fits the model (run before generating anything)."""
    if pipe.delay != 0:
        raise ValueError(f"long-form windows need a model with delay 0 (the release); this one has "
                         f"{pipe.delay}")
    for w in windows:
        plan = window_plan(pipe, req, inputs, w, tail_frames(req, "tts" if req.mode == "tts" else "t2av"))
        text_prompt(pipe.tokenizer, w.text, plan.n_placeholders, int(pipe.model_args.model_max_length),
                    pipe.patch_size)


@dataclass
class LongFormRun:
    """Iterate for (window, patch) as they are sampled; `output` (all windows as one GenerationOutput) and
    `reports` are set at the end."""
    pipe: object
    req: object
    inputs: object
    windows: List[Window]
    output: Optional[GenerationOutput] = None
    reports: List[WindowReport] = field(default_factory=list)
    first_plan: Optional[LengthPlan] = None  # window 1's plan when not the text rule (a single run as before)
    prompts: list = field(default_factory=list)  # the prompt of every window started
    output_plan: Optional[LengthPlan] = None

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple]:
        pipe, req, inputs = self.pipe, self.req, self.inputs
        task = "tts" if req.mode == "tts" else "t2av"
        sampling = Sampling(req.cfm_steps, req.cfm_temperature, req.cfm_cfg)
        ref_motion_norm = None if inputs.ref_motion_raw is None else normalize_motion(inputs.ref_motion_raw)
        given_motion = None if inputs.given_motion_raw is None else normalize_motion(inputs.given_motion_raw)
        speech, motion, stop_probs = [], [], []  # generated patches of every window
        first_prompt = None
        torch.manual_seed(req.seed)
        for w in self.windows:
            if w.index == 0:
                plan = self.output_plan = self.first_plan or window_plan(pipe, req, inputs, w)
                ref_latents, ref_motion = inputs.ref_latents, ref_motion_norm
            else:
                so_far_speech = torch.cat([first_prompt.prefix_speech_latents.cpu()] + speech)
                n_tail = min(tail_frames(req, task), so_far_speech.shape[0])
                plan = window_plan(pipe, req, inputs, w, n_tail)
                ref_latents = so_far_speech[so_far_speech.shape[0] - n_tail:]
                ref_motion = None
                if task == "t2av":
                    so_far_motion = torch.cat([first_prompt.prefix_motion_norm.cpu()] + motion)
                    ref_motion = so_far_motion[max(0, so_far_motion.shape[0] - max(n_tail, PATCH_SIZE)):]
            input_ids, speech_start = text_prompt(pipe.tokenizer, w.text, plan.n_placeholders,
                                                  int(pipe.model_args.model_max_length), pipe.patch_size)
            prompt = build_prompt(pipe.llm, input_ids, speech_start, ref_latents, inputs.speaker, plan, ref_motion)
            if w.index == 0:
                first_prompt = prompt
            else:  # identity from the reference clip, not from the tail
                prompt = replace(prompt, speaker_emb=first_prompt.speaker_emb,
                                 first_motion_norm=first_prompt.first_motion_norm)
            self.prompts.append(prompt)
            given_s = None if inputs.given_speech is None else inputs.given_speech[w.given_start:w.given_end]
            given_m = None if given_motion is None else given_motion[w.given_start:w.given_end]
            stream = PatchStream(pipe.llm, prompt, plan, sampling, given_s, given_m)
            start = sum(s.shape[0] for s in speech)
            for patch in stream:
                speech.append(patch.speech_latents.float().cpu())
                if patch.motion_norm is not None:
                    motion.append(patch.motion_norm.float().cpu())
                stop_probs.append(patch.stop_prob)
                yield w, plan, patch
            self.reports.append(WindowReport(w.index, w.text, prompt.prefix_speech_latents.shape[0], start,
                                             sum(s.shape[0] for s in speech) - start, stream.stopped_by,
                                             plan.max_seconds))
        m = pipe.model_args
        self.output = GenerationOutput(
            speech_latents=stack_frames(speech, m.speech_embedding_dim, "cpu"),
            motion_norm=stack_frames(motion, m.motion_embedding_dim, "cpu"),
            prefix_speech_latents=first_prompt.prefix_speech_latents.float(),
            prefix_motion_norm=first_prompt.prefix_motion_norm.float(),
            n_patches=len(stop_probs), stopped_by=self.reports[-1].stopped_by,
            plan=self.output_plan, stop_probs=stop_probs)


def cap_warnings(reports: List[WindowReport]) -> List[str]:
    return [f"long-form window {r.index + 1} hit its length cap ({r.max_seconds:.1f} s) before the model chose "
            f"to stop: its text may be cut short ({r.text[:40]!r}...)" for r in reports if r.stopped_by == "length_cap"]


def run(pipe, req, inputs, windows: List[Window], progress=None) -> LongFormRun:
    """All windows to the end, with a progress bar (pipeline.Progress) per window."""
    from contextlib import ExitStack

    from runtime.pipeline import progress_reporter

    lf = LongFormRun(pipe, req, inputs, windows)
    with ExitStack() as stack:
        current, update = None, None
        for w, plan, patch in lf:
            if w is not current:
                stack.close()
                stage = f"{req.mode} window {w.index + 1}/{len(windows)} patches"
                update = stack.enter_context(progress_reporter(progress, stage, plan.max_steps, "patch"))
                current = w
            update(patch.index + 1)
    return lf
