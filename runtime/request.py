"""GenerationRequest: the one schema of a generation request.

Every option is a field here, with its type, default, help text and checks. infer.py builds its
argparse options and reads batch-file lines from these fields; TalkerPipeline.generate consumes a request.
Errors name the field (`cfm_steps: must be >= 1, got 0`); infer.py turns the field into its flag.
"""
from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Optional

from common.constants import FPS, MAX_SECONDS, RELEASED_CAP_MARGIN_SECONDS

MODES = ("t2av", "a2v", "v2a", "tts")
MAX_CFM_STEPS = 1000  # 10 is the released value; beyond ~100 nothing changes but the run time
MAX_SEED = 2 ** 64 - 1  # torch.manual_seed's range


class RequestError(ValueError):
    """A request field with a bad value: str(e) == 'field: problem'."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


def _opt(default, help: str, group: str = "what to generate", kind: str = "", low=None, high=None,
         low_open: bool = False, choices=None, unit: str = ""):
    """A request field; kind is 'path' for file paths (else the annotation's type is used)."""
    meta = dict(help=help, group=group, kind=kind, low=low, high=high, low_open=low_open, choices=choices,
                unit=unit)
    return field(default=default, metadata=meta)


SAMPLING = "sampling (defaults = the released code)"


@dataclass
class GenerationRequest:
    mode: str = _opt("t2av", "t2av: text -> speech + face video; a2v: --audio drives the face; v2a: --video (or "
                             "--motion) gets new speech from --text; tts: speech only (wav)", choices=MODES)
    text: Optional[str] = _opt(None, "text to speak (the transcript in a2v/v2a). Default: samples/default_text.txt; "
                                     "in a2v the default is no transcript (empty), the motion then follows the "
                                     "audio alone")
    ref_audio: Optional[str] = _opt(None, "reference voice (speaker timbre + prompt prefix); any rate/channels; "
                                          "a clip over 30 s is cut to its first 30 s. "
                                          "Default: samples/reference_voice.wav", kind="path")
    ref_video: Optional[str] = _opt(None, "reference face: a video (its first frame is the face; its motion is the "
                                          "prompt when --ref-motion is absent) or a still image (PNG/JPEG: the face "
                                          "held still through the prefix). Default: samples/reference_face.mp4",
                                    kind="path")
    ref_motion: Optional[str] = _opt(None, "reference LIA-X motion (.pt, (frames, 40) raw); default: extracted "
                                           "from --ref-video", kind="path")
    audio: Optional[str] = _opt(None, "a2v: the driving speech (any length: over 30 s in long-form windows). "
                                      "Default: the sample voice", kind="path")
    video: Optional[str] = _opt(None, "v2a: the talking-head video to dub (any length: over 30 s in "
                                      "long-form windows); its frames are kept. "
                                      "Default: sample face", kind="path")
    motion: Optional[str] = _opt(None, "v2a: driving motion (.pt, (frames, 40) raw, 25 fps) instead of --video; "
                                       "rendered on the --ref-video face", kind="path")
    output: Optional[str] = _opt(None, "output mp4; the wav is written beside it (tts: only the wav)", kind="path")
    save_latents: bool = _opt(False, "also write <output>.latents.safetensors (speech latents, motion)")
    max_seconds: Optional[float] = _opt(None, "t2av/tts: cap on the generated length (at most 30). Default: as "
                                              "released, the reference clip's length + "
                                              f"{RELEASED_CAP_MARGIN_SECONDS:g} s",
                                        low=0, high=MAX_SECONDS, low_open=True)
    face_crop: str = _opt("none", "how a non-square face is fitted to the renderer's square: none = squashed, as "
                                  "the reference does (with a warning); center = the largest centred square",
                          choices=("none", "center"))
    long_form: Optional[bool] = _opt(None, "t2av/tts: split the text into windows (sentences, then clauses) "
                                           "generated one after another, each prompted with the end of the "
                                           "previous one; a2v/v2a: inputs over 30 s in 28 s windows. Default: "
                                           "on when the text (or input) needs more than one window")
    trim_prefix: bool = _opt(False, "t2av/tts: drop the prefix replayed from the reference clip from the output "
                                    "(the reference keeps it)")
    cfm_steps: int = _opt(10, "Euler steps per patch", SAMPLING, low=1, high=MAX_CFM_STEPS)
    cfm_temperature: float = _opt(0.3, "initial-noise scale (the released code uses 0.3; the paper reports 0.7)",
                                  SAMPLING, low=0, high=10)
    cfm_cfg: float = _opt(2.0, "classifier-free guidance scale", SAMPLING, low=0, high=100)
    gt_prefix_seconds: float = _opt(0.5, "seconds of the reference clip fed before generation (0: voice/face "
                                         "identity only)", SAMPLING, low=0, high=MAX_SECONDS)
    fps: int = _opt(FPS, "frame rate (the model is 25 fps only)", SAMPLING, low=FPS, high=FPS,
                   unit="frames per second")
    seed: int = _opt(0, "random seed: same seed, same output on the same device", SAMPLING, low=0, high=MAX_SEED)

    # ---------------------------------------------------------------------------------------- reading
    @classmethod
    def from_mapping(cls, values: dict, base: Optional["GenerationRequest"] = None) -> "GenerationRequest":
        """A request from {field: value} (a batch-file line, keyword arguments), over `base`'s values.
        Unknown keys and values of the wrong type raise RequestError naming the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RequestError(unknown[0], f"unknown option (allowed: {', '.join(known)})")
        converted = {name: _convert(known[name], value) for name, value in values.items()}
        return replace(base or cls(), **converted)

    # ---------------------------------------------------------------------------------------- checks
    def validate(self) -> "GenerationRequest":
        """Check every field's type and range (no file is opened); returns self."""
        for f in fields(self):
            value = _convert(f, getattr(self, f.name))
            setattr(self, f.name, value)
            _check_range(f, value)
        if self.mode != "a2v" and self.text is not None and not has_visible_text(self.text):
            raise RequestError("text", f"empty text: {self.mode} needs the words to speak")
        return self


# Blanks that Unicode files as letters or symbols: Hangul fillers and the braille blank.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def has_visible_text(text: str) -> bool:
    """Whether text holds something to say: a letter, digit, punctuation mark or symbol (a text of only spaces,
    ZWSP, BOM, controls, Hangul fillers or lone combining marks is empty)."""
    return any(unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_LETTERS for ch in text)


def _check_unicode(name: str, value: str) -> None:
    """A lone surrogate (bytes that were not UTF-8, kept by Python's surrogateescape) cannot be tokenised."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(name, f"not valid UTF-8 text (a lone surrogate or undecodable byte at character "
                                 f"{e.start + 1})") from None


def field_kind(f) -> str:
    """'path', 'str', 'bool', 'int' or 'float': what a field holds (its annotation without Optional)."""
    if f.metadata.get("kind") == "path":
        return "path"
    return str(f.type).replace("Optional[", "").rstrip("]")


def _optional(f) -> bool:
    return f.default is None or f.default is MISSING or "Optional" in str(f.type)


def _convert(f, value):
    """`value` as the field's type, or RequestError; None stays None where the field allows it."""
    kind = field_kind(f)
    if value is None:
        if _optional(f):
            return None
        raise RequestError(f.name, "must be given (got null)")
    if kind == "path":
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise RequestError(f.name, f"must be a file path (a string), got {value!r}")
        _check_unicode(f.name, value)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise RequestError(f.name, f"must be a string, got {value!r}")
        _check_unicode(f.name, value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise RequestError(f.name, f"must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f.name, f"must be a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
            raise RequestError(f.name, f"must be a whole number, got {value!r}")
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(f.name, f"must be a finite number, got {value}")
    return value


def _check_range(f, value) -> None:
    m = f.metadata
    if value is None:
        return
    if m.get("choices") and value not in m["choices"]:
        raise RequestError(f.name, f"unknown {f.name} {value!r} (choose from {', '.join(m['choices'])})")
    low, high = m.get("low"), m.get("high")
    if low is not None and low == high:
        if value != low:
            raise RequestError(f.name, f"the model works at {low} {m.get('unit')}; {value} is not supported")
        return
    too_low = low is not None and (value < low or (m.get("low_open") and value == low))
    if too_low or (high is not None and value > high):
        raise RequestError(f.name, f"must be {_range_text(low, high, m.get('low_open'))}, got {_fmt(value)}")


def _fmt(number) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _range_text(low, high, low_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {_fmt(low)}"
    return f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}]"
