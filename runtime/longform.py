"""A run as windows: the loop of every request, and long-form generation of a text (or an a2v/v2a input)
of any length.

A single run is one window under the request's own length rule (released, max_seconds or the given
length). A long-form run is several, each one run of generation.PatchStream with its own LengthPlan:
- t2av/tts: the text is split into windows (split_windows): whole sentences packed while their estimated
  speech stays within WINDOW_SECONDS; a longer sentence is cut at clause marks, then between words (CJK:
  between characters). Each window's cap is the "text" rule of plan_lengths: min(30 s, 1.5 x estimate + 1 s).
- a2v/v2a: the given speech (or motion) is cut into 28 s windows (a window plus its prefix fits the model's
  30 s); the transcript is shared out over the windows by length.
Window 1 is prompted with the reference clip, as a single run. Window k > 1 is prompted with the last
gt_prefix_seconds of the output so far (speech latents and normalised motion) as the prefix, with the
ORIGINAL speaker embedding and first motion frame as global conditions; that replayed prefix is not repeated
in the output. The seed is set once, before window 1 (one noise generator runs through every window).
`WindowLoop` drives this for TalkerPipeline.generate and .stream alike.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

import torch

from common.constants import FPS, MAX_FRAMES, PATCH_SIZE
from runtime.generation import Collector, LengthPlan, LoopRow, Patch, PatchStream, Sampling, plan_lengths
from runtime.inputs import prefix_motion_frames
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
    plan: Optional[LengthPlan] = None  # set by plan_run (windows k > 1: for a tail of tail_frames)
    text_ids: Optional[tuple] = None  # (input_ids, speech_start) of its prompt for that plan


@dataclass
class WindowReport:
    index: int
    text: str
    prefix_frames: int  # frames replayed as the prompt prefix (window 1: of the reference clip)
    start_frame: int  # first output frame of the window's generated part (after the whole output's prefix)
    n_frames: int  # frames it generated
    stopped_by: str
    max_seconds: float


def plan_windows(req, inputs) -> Tuple[List[Window], bool]:
    """(the windows of a request, long_form): one window for a single run (long_form off, or auto and one
    window's worth)."""
    given = inputs.given_speech if req.mode == "a2v" else inputs.given_motion_raw
    n_given = 0 if given is None else given.shape[0]
    if req.mode in ("t2av", "tts"):
        texts = split_windows(req.text)
        if req.long_form is False or (req.long_form is None and len(texts) == 1):
            return [Window(0, req.text)], False
        return [Window(i, t) for i, t in enumerate(texts)], True
    if req.long_form is False or (req.long_form is None and n_given <= MAX_FRAMES):
        return [Window(0, req.text, 0, n_given)], False
    n_windows = max(1, math.ceil(n_given / GIVEN_WINDOW_FRAMES))
    texts = _share_text(req.text, n_windows)
    return [Window(i, texts[i], i * GIVEN_WINDOW_FRAMES, min(n_given, (i + 1) * GIVEN_WINDOW_FRAMES))
            for i in range(n_windows)], True


def tail_frames(req, task: str) -> int:
    """Frames of the output so far replayed as the prefix of windows k > 1 (plan_lengths' prefix length)."""
    if task == "tts":
        return int(round(req.gt_prefix_seconds * FPS))
    return prefix_motion_frames(req)


def window_plan(pipe, req, inputs, window: Window, ref_frames: Optional[int] = None,
                text_rule: bool = True) -> LengthPlan:
    """Window 1: the reference clip's lengths; later windows: a reference clip of `ref_frames` (the tail).
    text_rule=False: the request's own length rule (a single run: released, max_seconds or the given length)."""
    task = "tts" if req.mode == "tts" else "t2av"
    first = window.index == 0
    speech_frames = inputs.ref_latents.shape[0] if first else ref_frames
    motion_frames = inputs.ref_motion_frames if first else max(PATCH_SIZE, ref_frames)
    n_given = window.given_end - window.given_start
    return plan_lengths(task, ref_speech_frames=speech_frames, ref_motion_frames=motion_frames,
                        gt_prefix_seconds=req.gt_prefix_seconds, delay=pipe.delay, patch_size=pipe.patch_size,
                        given_speech_frames=n_given if req.mode == "a2v" else None,
                        given_motion_frames=n_given if req.mode == "v2a" else None, max_seconds=req.max_seconds,
                        text_seconds=estimate_speech_seconds(window.text) if text_rule else None)


def plan_run(pipe, req, inputs) -> Tuple[List[Window], bool]:
    """(windows, long_form), every window planned (k > 1: for a tail of tail_frames) with its prompt's text
    ids, so a prompt that does not fit the model fails before the loop starts."""
    windows, long_form = plan_windows(req, inputs)
    if long_form and pipe.delay != 0:
        raise ValueError(f"long-form windows need a model with delay 0 (the release); this one has {pipe.delay}")
    task = "tts" if req.mode == "tts" else "t2av"
    for w in windows:
        _plan_window(pipe, req, inputs, w, None if w.index == 0 else tail_frames(req, task), long_form)
    return windows, long_form


def _plan_window(pipe, req, inputs, window: Window, ref_frames: Optional[int], text_rule: bool) -> None:
    window.plan = window_plan(pipe, req, inputs, window, ref_frames, text_rule)
    window.text_ids = text_prompt(pipe.tokenizer, window.text, window.plan.n_placeholders,
                                  int(pipe.model_args.model_max_length), pipe.patch_size)


def cap_warnings(reports: List[WindowReport]) -> List[str]:
    return [f"long-form window {r.index + 1} hit its length cap ({r.max_seconds:.1f} s) before the model chose "
            f"to stop: its text may be cut short ({r.text[:40]!r}...)" for r in reports if r.stopped_by == "length_cap"]


# ------------------------------------------------------------------------------------------ the loop of a run

def sampling_of(req) -> Sampling:
    return Sampling(req.cfm_steps, req.cfm_temperature, req.cfm_cfg)


def noise_generator(pipe, req) -> torch.Generator:
    """The run's noise: seeded with the request's seed (the samples of torch.manual_seed(seed) and the
    global RNG, without touching the global RNG)."""
    return torch.Generator(device=pipe.llm.device).manual_seed(int(req.seed))


def window_row(pipe, run, window: Window, so_far: Optional[Collector] = None, first=None,
               generator: Optional[torch.Generator] = None) -> LoopRow:
    """The loop row of a window: window 1 prompted with the reference clip; window k > 1 with the tail of
    the output so far (`so_far`, after `first`, window 1's prompt), keeping window 1's identity."""
    pipe_llm, req, inputs = pipe.llm, run.request, run.inputs
    given_s = given_m = None
    if inputs.given_speech is not None:
        given_s = inputs.given_speech[window.given_start:window.given_end]
    if inputs.given_motion_raw is not None:
        given_m = normalize_motion(inputs.given_motion_raw[window.given_start:window.given_end])
    if window.index == 0:
        ref_latents, ref_motion = inputs.ref_latents, _normalised(inputs.ref_motion_raw)
    else:
        speech = torch.cat([first.prefix_speech_latents.cpu(), so_far.frames("speech")])
        n_tail = min(tail_frames(req, run.task), speech.shape[0])
        if n_tail != tail_frames(req, run.task):  # a tail shorter than planned: its own plan and prompt
            _plan_window(pipe, req, inputs, window, n_tail, True)
        ref_latents, ref_motion = speech[speech.shape[0] - n_tail:], None
        if run.task == "t2av":
            motion = torch.cat([first.prefix_motion_norm.cpu(), so_far.frames("motion")])
            ref_motion = motion[max(0, motion.shape[0] - max(n_tail, PATCH_SIZE)):]
    ids, speech_start = window.text_ids
    prompt = build_prompt(pipe_llm, ids, speech_start, ref_latents, inputs.speaker, window.plan, ref_motion)
    if window.index > 0:  # identity from the reference clip, not from the tail
        prompt = replace(prompt, speaker_emb=first.speaker_emb, first_motion_norm=first.first_motion_norm)
    return LoopRow(prompt, window.plan, sampling_of(req), given_s, given_m, generator)


def _normalised(motion_raw):
    return None if motion_raw is None else normalize_motion(motion_raw)


class WindowLoop:
    """The loop of one run, window after window (a single run: its one window). Iterate for (window, patch)
    as they are sampled; at the end `output` holds every window's patches as one GenerationOutput (on the
    CPU; its plan is window 1's), `prompts` each window's prompt and run.reports a WindowReport each."""

    def __init__(self, pipe, run):
        self.pipe, self.run = pipe, run
        self.output = None
        self.prompts: list = []

    @torch.no_grad()
    def __iter__(self) -> Iterator[Tuple[Window, Patch]]:
        pipe, run = self.pipe, self.run
        generator = noise_generator(pipe, run.request)
        patches = Collector(pipe.llm, "cpu")
        first, stopped_by = None, None
        for w in run.windows:
            row = window_row(pipe, run, w, patches, first, generator)
            first = first or row.prompt
            self.prompts.append(row.prompt)
            stream = PatchStream(pipe.llm, row.prompt, row.plan, row.sampling, row.given_speech_latents,
                                 row.given_motion_norm, generator)
            start = sum(s.shape[0] for s in patches.speech)
            for patch in stream:
                patches.add(patch)
                yield w, patch
            stopped_by = stream.stopped_by
            run.reports.append(WindowReport(w.index, w.text, row.prompt.prefix_speech_latents.shape[0], start,
                                            sum(s.shape[0] for s in patches.speech) - start, stopped_by,
                                            row.plan.max_seconds))
        self.output = patches.output(first, stopped_by, run.plan)
