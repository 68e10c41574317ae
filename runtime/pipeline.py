"""TalkerPipeline: every model of Talker-T2AV in one object, and the four generation modes.

    from runtime.pipeline import TalkerPipeline
    from runtime.request import GenerationRequest
    pipe = TalkerPipeline.from_pretrained()          # weights via weights.locate (arguments / env vars / hub cache)
    # pipe = TalkerPipeline.demo()                   # tiny random models, offline
    result = pipe.generate(GenerationRequest(mode="t2av", text="Hello there.", output="out.mp4"))
    result = pipe.generate(mode="tts", text="Hello.")  # keyword arguments work too

generate() reads as: prepare the mode's inputs -> plan the length -> run the patch stream -> assemble the
mode's outputs -> write. Modes (all run the released loop of generation.py):
- t2av: text -> speech + motion; the reference clip (ref audio + ref motion) is the prompt.
- a2v:  the latents of `audio` are fed as the speech half of every token; only the motion head samples.
- v2a:  the motion of `video` (or `motion`) is fed as the motion half of every token; only the speech head
        samples; the output is the input video's frames with the new speech.
- tts:  speech only (task tag 0, motion_pad_emb), a wav.
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from media import audio as audio_io
from media import video_io
from media.atomic import atomic_outputs
from common.constants import (CODEC_SAMPLE_RATE, FPS, MAX_FRAMES, MAX_SECONDS, MIN_SECONDS, MOTION_DIM, PATCH_SIZE,
                       SAMPLES_PER_FRAME)
from runtime import longform
from runtime import loop_steps
from common import packed_linear as packing  # (`packed_linear` is the mode's name here)
from runtime import precision
from runtime.generation import LengthPlan, PatchStream, Sampling, collect, plan_lengths
from common.motion_stats import denormalize_motion, normalize_motion
from runtime.prompt import MOTION_TOKEN, SPEECH_TOKEN, build_prompt, load_tokenizer, text_prompt
from runtime.request import GenerationRequest, RequestError, has_visible_text

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "samples"
DEFAULT_TEXT_FILE = SAMPLES / "default_text.txt"
DEFAULT_REF_AUDIO = SAMPLES / "reference_voice.wav"
DEFAULT_REF_VIDEO = SAMPLES / "reference_face.mp4"

RANDOM_WEIGHTS_BANNER = ("*** DEMO: tiny RANDOMLY INITIALISED models: the output is noise-like speech and a "
                         "garbled face, NOT Talker-T2AV quality. Use real weights for real results. ***")


def trained_demo_banner(checkpoint_dir) -> str:
    """--demo --checkpoint-dir: the SpeechLLM is trained, the codec, renderer and speaker encoder are not."""
    return (f"*** DEMO with the tiny SpeechLLM trained in {checkpoint_dir}; its codec, renderer and speaker encoder "
            "are tiny RANDOMLY INITIALISED models: the audio and face are not real. ***")

# progress: True (tqdm bars on stderr), False / None (silent), or a callable (stage, done, total)
Progress = Union[bool, None, Callable[[str, int, int], None]]


@dataclass
class GenerationResult:
    mode: str
    text: str
    seed: int
    audio_24k: torch.Tensor  # (T,) float32 waveform written to the wav (a2v: the input audio)
    speech_latents: torch.Tensor  # (F, 32) latents the waveform decodes from (prefix + generated; a2v: input)
    motion_raw: Optional[torch.Tensor]  # (T_video, 40) raw LIA-X motion of the output video (None for tts)
    generated_motion_norm: Optional[torch.Tensor]  # (frames, 40) what the motion head sampled (normalised)
    n_patches: int
    stopped_by: str
    sample_rate: int = CODEC_SAMPLE_RATE
    fps: int = FPS
    prefix_frames: int = 0  # leading output frames that replay the reference clip (t2av/tts)
    plan: Optional[LengthPlan] = None
    video_frames: Optional[int] = None  # frames of the output video when they are not the motion's (v2a of a
    video_fps: float = FPS              # video keeps that video's own frames and frame rate)
    video_path: Optional[str] = None
    wav_path: Optional[str] = None
    latents_path: Optional[str] = None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    windows: list = field(default_factory=list)  # long-form: longform.WindowReport per window
    precision: str = ""  # what the loop and renderer computed in, and why (precision.summary_note)

    @property
    def audio_seconds(self) -> float:
        return self.audio_24k.numel() / self.sample_rate

    @property
    def n_frames(self) -> int:
        """Frames of the output video."""
        if self.video_frames is not None:
            return self.video_frames
        return 0 if self.motion_raw is None else int(self.motion_raw.shape[0])

    def summary(self) -> str:
        t = self.timings
        parts = [f"{k} {t[k]:.1f}s" for k in ("load", "inputs", "generate", "decode", "render") if k in t]
        rate = "" if abs(self.video_fps - self.fps) < 1e-6 else f" at {self.video_fps:.3g} fps"
        video = f", {self.n_frames} frames{rate} ({self.n_frames / self.video_fps:.2f} s video)" if self.n_frames else ""
        return (f"[talker] {self.mode}: {self.audio_seconds:.2f} s audio{video}; {self.n_patches} patches "
                f"({self.stopped_by}); " + " · ".join(parts) + f" · total {sum(t.values()):.1f}s"
                + (f"; {self.precision}" if self.precision else ""))


# ------------------------------------------------------------------------------------------ input files

def load_motion_file(path) -> torch.Tensor:
    """A motion file -> (T, 40) raw LIA-X motion, float32. Reads the reference format (torch.save of a
    (T, 40) tensor, loaded weights-only) and this project's <output>.latents.safetensors (its motion_raw)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    if path.endswith(".safetensors"):
        obj = _motion_from_latents_file(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a motion file"
            raise ValueError(f"{path}: not a motion file (torch.load weights_only=True failed: "
                             f"{type(e).__name__})") from None
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a (frames, {MOTION_DIM}) tensor, found a {type(obj).__name__}")
    if obj.dim() != 2 or obj.shape[1] != MOTION_DIM or obj.shape[0] == 0:
        raise ValueError(f"{path}: expected a (frames, {MOTION_DIM}) motion tensor, got shape {tuple(obj.shape)}")
    if not obj.is_floating_point():
        raise ValueError(f"{path}: motion must be floating point, got {obj.dtype}")
    motion = obj.detach().float()
    if not torch.isfinite(motion).all():
        raise ValueError(f"{path}: motion contains NaN or infinite values")
    return motion


def _motion_from_latents_file(path: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            if "motion_raw" not in f.keys():
                raise ValueError(f"{path}: no motion_raw in this latents file (a tts run has no motion)")
            return f.get_tensor("motion_raw")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None


def check_audio_seconds(path, seconds: float, what: str, any_length: bool = False) -> None:
    """Refuse clips shorter than 0.1 s or (unless any_length) longer than 30 s."""
    if seconds < MIN_SECONDS:
        raise ValueError(f"{path}: {what} is {seconds * 1000:.0f} ms long; at least {MIN_SECONDS * 1000:.0f} ms "
                         "is needed")
    if seconds > MAX_SECONDS + 1e-3 and not any_length:
        raise ValueError(f"{path}: {what} is {seconds:.1f} s long; at most {MAX_SECONDS} s is supported (trim it, "
                         f"e.g. ffmpeg -i IN -t {MAX_SECONDS} OUT.wav)")


def load_audio_checked(path, what: str) -> audio_io.ReferenceAudio:
    """The model's inputs of an audio file (0.1 to 30 s)."""
    wav, sr = audio_io.load_audio(path)
    check_audio_seconds(path, wav.numel() / sr, what)
    return audio_io.reference_audio(wav, sr)


def load_reference_audio(path) -> tuple:
    """(the model's inputs of a reference voice, warnings): a clip over 30 s is cut to its first 30 s."""
    seconds = audio_io.audio_seconds(path)  # from the header: a long file is read only as far as it is used
    wav, sr = audio_io.load_audio(path, max_seconds=MAX_SECONDS + 1 if seconds > MAX_SECONDS + 1 else None)
    check_audio_seconds(path, seconds, "reference audio", any_length=True)
    cut = [f"{path}: reference audio is {seconds:.1f} s long; only its first {MAX_SECONDS} s are used"] \
        if seconds > MAX_SECONDS + 1e-3 else []
    return audio_io.reference_audio(wav, sr), cut


def long_input_allowed(req) -> bool:
    """a2v/v2a inputs over 30 s run in long-form windows unless long_form is off."""
    return req.long_form is not False


def resample_indices(n_frames: int, fps_in: float) -> np.ndarray:
    """Indices of the source frames nearest to a 25 fps timeline covering the same duration."""
    if abs(fps_in - FPS) < 1e-3:
        return np.arange(n_frames)
    n_out = max(1, int(round(n_frames * FPS / fps_in)))
    return np.minimum((np.arange(n_out) * fps_in / FPS + 1e-6).astype(np.int64), n_frames - 1)


def _video_timeline(video):
    """(frames on the model's 25 fps timeline, at most 750; the file's frame rate)."""
    info = video_io.probe(video)
    if not info.get("n_frames"):
        raise ValueError(f"{video}: {video_io.NO_VIDEO_STREAM if info.get('video_codec') is None else video_io.NO_FRAMES}")
    fps = float(info.get("fps") or FPS)
    return min(len(resample_indices(int(info["n_frames"]), fps)), MAX_FRAMES), fps


@dataclass
class OutputPaths:
    mp4: Optional[str]  # None for tts
    wav: str
    latents: Optional[str]  # None unless save_latents

    def members(self) -> list:
        return [p for p in (self.mp4, self.wav, self.latents) if p]


def output_paths(output, mode: str, save_latents: bool = False) -> OutputPaths:
    """Where a request writes, checked before anything runs: the suffix, and a folder that can be written."""
    out = Path(os.path.expanduser(os.fspath(output)))
    ext = out.suffix.lower()
    if ext not in ("", ".mp4", ".wav"):
        raise RequestError("output", f"{output}: must end in .mp4 (or .wav for mode tts)")
    if out.is_dir():
        raise RequestError("output", f"{output}: is a directory")
    _check_writable_folder(output, out.parent)
    base = str(out.with_suffix("") if ext else out)
    paths = OutputPaths(None if mode == "tts" else base + ".mp4", base + ".wav",
                        base + ".latents.safetensors" if save_latents else None)
    for member in paths.members():  # the group is committed as one: every member must be replaceable
        if Path(member).is_dir():
            raise RequestError("output", f"{output}: {member} (written with it) is a directory")
    return paths


def _check_count(name: str, value) -> None:
    """A library argument that counts things: a whole number >= 1 (not a bool, a float or a str)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def same_file(a, b) -> bool:
    """Whether two paths name one file (spelled differently, through links or '..'), existing or not."""
    a, b = Path(os.path.expanduser(os.fspath(a))), Path(os.path.expanduser(os.fspath(b)))
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs_spare_inputs(req: GenerationRequest, outputs, other_inputs=()) -> None:
    """No file the run writes (outputs: the output group and any stream file) is one it reads (the request's
    inputs, plus other_inputs such as a batch file): an overwritten input would be lost for good."""
    reads = {**input_files(req), **dict(other_inputs)}
    for out in outputs:
        for label, path in reads.items():
            if same_file(out, path):
                raise RequestError("output", f"{out} would overwrite the input {path} ({label}): "
                                             "choose another output")


def _check_writable_folder(output, folder: Path) -> None:
    """The nearest existing folder must accept a new file (tried for real: permissions, a read-only or
    immutable folder, a full disk all show up here rather than after generation)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RequestError("output", f"{output}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RequestError("output", f"{output}: cannot write in {existing} ({e.strerror or e})") from None


# ------------------------------------------------------------------------------------------ requests

def resolve_request(request: Optional[GenerationRequest] = None, **kwargs) -> GenerationRequest:
    """A validated copy of a request (and/or fields as keyword arguments), with the bundled samples filled
    in where the mode needs an input. Opens no file. `request` may also be a mapping of fields, or a str
    (the text to speak)."""
    if isinstance(request, str):
        request = GenerationRequest(text=request)
    elif isinstance(request, dict):
        request = GenerationRequest.from_mapping(request)
    elif request is not None and not isinstance(request, GenerationRequest):
        raise TypeError(f"request must be a GenerationRequest, a dict of its fields or the text (a str), got "
                        f"{type(request).__name__}")
    req = GenerationRequest.from_mapping(kwargs, base=request).validate()
    if req.text is None:
        req.text = "" if req.mode == "a2v" else DEFAULT_TEXT_FILE.read_text(encoding="utf-8")
    req.text = req.text.strip() if has_visible_text(req.text) else ""
    if not req.text and req.mode != "a2v":
        raise RequestError("text", f"empty text: {req.mode} needs the words to speak")
    req.ref_audio = req.ref_audio or str(DEFAULT_REF_AUDIO)
    req.ref_video = req.ref_video or str(DEFAULT_REF_VIDEO)
    if req.mode == "a2v":
        req.audio = req.audio or str(DEFAULT_REF_AUDIO)
    if req.mode == "v2a" and req.motion is None:
        req.video = req.video or str(DEFAULT_REF_VIDEO)
    return req


def input_files(req: GenerationRequest) -> dict:
    """{field: path} of the files a resolved request reads."""
    uses = {"ref_audio": True, "ref_motion": req.mode != "tts",
            "ref_video": req.mode in ("t2av", "a2v") or (req.mode == "v2a" and (req.motion is not None
                                                                               or req.ref_motion is None)),
            "audio": req.mode == "a2v", "video": req.mode == "v2a" and req.motion is None,
            "motion": req.mode == "v2a"}
    return {name: getattr(req, name) for name, used in uses.items() if used and getattr(req, name) is not None}


def preflight(request: Optional[GenerationRequest] = None, **kwargs) -> GenerationRequest:
    """resolve_request, then the checks that need no model, from file headers (nothing is decoded but the
    small motion files): every input exists, is of its kind (audio / video / motion) and within the length
    limits, and the output can be written. Run before any model loads; generate() checks the content."""
    req = resolve_request(request, **kwargs)
    for name, path in input_files(req).items():
        p = Path(os.path.expanduser(path))
        if not p.exists():
            raise FileNotFoundError(f"{path}: file not found")
        if not p.is_file():
            raise ValueError(f"{path}: not a regular file")
        if name in ("ref_audio", "audio"):
            check_audio_seconds(path, audio_io.audio_seconds(path), "reference audio" if name == "ref_audio" else "audio",
                                any_length=name == "ref_audio" or long_input_allowed(req))
        elif name in ("ref_video", "video"):
            video_io.check_video_stream(path)
        else:
            load_motion_file(path)
    if req.output is not None:
        check_outputs_spare_inputs(req, output_paths(req.output, req.mode, req.save_latents).members())
    return req


# ------------------------------------------------------------------------------------------ progress

@contextmanager
def progress_reporter(progress: Progress, stage: str, total: int, unit: str):
    """Yield update(done): a tqdm bar, the caller's callback(stage, done, total), or nothing."""
    if callable(progress):
        yield lambda done: progress(stage, int(done), int(total))
        return
    if not progress:
        yield lambda done: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=stage, unit=unit, leave=False, dynamic_ncols=True)
    try:
        yield lambda done: bar.update(done - bar.n)
    finally:
        bar.close()


@contextmanager
def _timed(timings: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ demo tokenizer

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


# ------------------------------------------------------------------------------------------ per mode

@dataclass
class ModeInputs:
    """What a mode feeds the loop and its outputs, read from the request's files."""
    ref: audio_io.ReferenceAudio  # the reference voice
    ref_latents: torch.Tensor  # (Ls, 32) WhisperX-VAE latents of the reference voice
    speaker: torch.Tensor  # (1, 256) speaker embedding of the reference voice
    ref_motion_frames: int = 0  # length of the reference motion (t2av/a2v/v2a)
    ref_motion_raw: Optional[torch.Tensor] = None  # (Tm, 40) when read from a file; else extracted after planning
    face: Optional[np.ndarray] = None  # (H, W, 3) uint8 identity frame to render on
    given_speech: Optional[torch.Tensor] = None  # a2v: (N, 32) latents of the driving audio
    driving_audio_24k: Optional[torch.Tensor] = None  # a2v: the waveform the output carries
    given_motion_raw: Optional[torch.Tensor] = None  # v2a: (M, 40) driving motion
    source_video: Optional[str] = None  # v2a from a video: its frames (and frame rate) are the output's
    source_frames: int = 0  # v2a from a video: its frame count
    source_fps: float = FPS
    warnings: list = field(default_factory=list)


def face_frames(frames_u8: np.ndarray, face_crop: str) -> np.ndarray:
    """(T, H, W, 3) frames as LIA-X gets them: as they are (it squashes them to its square) or the largest
    centred square (face_crop="center")."""
    h, w = frames_u8.shape[1:3]
    if face_crop != "center" or h == w:
        return frames_u8
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(frames_u8[:, top:top + side, left:left + side])


def _squash_warning(video, frame_u8, face_crop: str) -> list:
    h, w = frame_u8.shape[:2]
    if face_crop == "center" or h == w:
        return []
    return [f"{video}: the face is {w}x{h}, not square: it is squashed to the renderer's square as the reference "
            "does (face_crop=center crops the largest centred square instead)"]


def at_least_one_patch(motion_raw: torch.Tensor) -> torch.Tensor:
    """Motion of fewer than 4 frames (a still image, a very short clip) with its last frame held to 4: the
    loop reads whole patches (the reference fails on shorter motion)."""
    short = PATCH_SIZE - motion_raw.shape[0]
    return torch.cat([motion_raw, motion_raw[-1:].expand(short, -1)]) if short > 0 else motion_raw


def _prepare_reference(pipe, req, *, with_motion: bool, needs_face: bool) -> ModeInputs:
    ref, cut_warning = load_reference_audio(req.ref_audio)
    ref_latents, speaker = pipe.encode_audio(ref)
    inputs = ModeInputs(ref, ref_latents, speaker, warnings=cut_warning)
    if with_motion:
        if req.ref_motion is not None:
            inputs.ref_motion_raw = at_least_one_patch(load_motion_file(req.ref_motion)[:MAX_FRAMES])
            inputs.ref_motion_frames = inputs.ref_motion_raw.shape[0]
        else:
            inputs.ref_motion_frames = pipe.video_motion_frames(req.ref_video)
            if inputs.ref_motion_frames < PATCH_SIZE:  # a still image
                inputs.ref_motion_raw = _still_face_motion(pipe, req, ref_latents.shape[0])
                inputs.ref_motion_frames = inputs.ref_motion_raw.shape[0]
    if needs_face:
        face = video_io.read_first_frame(req.ref_video)
        inputs.warnings += _squash_warning(req.ref_video, face, req.face_crop)
        inputs.face = face_frames(face[None], req.face_crop)[0]
    return inputs


def _still_face_motion(pipe, req, n_voice_frames: int) -> torch.Tensor:
    """A face with no motion to speak of (an image, or a clip shorter than one patch) as a reference clip as
    long as the voice: its last frame held still. The prompt keeps the released layout (speech + motion
    prefix of gt_prefix_seconds) and the replayed prefix shows the still face over the voice's opening."""
    motion = pipe.reference_motion(req.ref_video, PATCH_SIZE, progress=False, face_crop=req.face_crop)
    n_frames = max(n_voice_frames, PATCH_SIZE, motion.shape[0])
    return torch.cat([motion, motion[-1:].expand(n_frames - motion.shape[0], -1)])


def prepare_t2av(pipe, req, progress) -> ModeInputs:
    return _prepare_reference(pipe, req, with_motion=True, needs_face=True)


def prepare_tts(pipe, req, progress) -> ModeInputs:
    return _prepare_reference(pipe, req, with_motion=False, needs_face=False)


def prepare_a2v(pipe, req, progress) -> ModeInputs:
    inputs = _prepare_reference(pipe, req, with_motion=True, needs_face=True)
    wav, sr = audio_io.load_audio(req.audio)
    check_audio_seconds(req.audio, wav.numel() / sr, "audio", any_length=long_input_allowed(req))
    piece = MAX_SECONDS * sr  # the encoder takes 30 s at a time: longer audio is encoded piece by piece
    drivings = [audio_io.reference_audio(wav[i:i + piece], sr) for i in range(0, wav.numel(), piece)
                if i == 0 or wav.numel() - i >= MIN_SECONDS * sr]
    inputs.given_speech = torch.cat([pipe.encode_audio(d)[0] for d in drivings])
    inputs.driving_audio_24k = torch.cat([d.audio_24k.float().cpu() for d in drivings])
    return inputs


def prepare_v2a(pipe, req, progress) -> ModeInputs:
    inputs = _prepare_reference(pipe, req, with_motion=True, needs_face=req.motion is not None)
    if req.motion is not None:
        inputs.given_motion_raw, source = load_motion_file(req.motion), req.motion
    else:
        frames, fps_in = video_io.read_frames(req.video)
        idx = resample_indices(len(frames), fps_in)
        if len(idx) > MAX_FRAMES and not long_input_allowed(req):
            raise ValueError(f"{req.video}: video is {len(frames) / fps_in:.1f} s long; at most {MAX_SECONDS} s "
                             "is supported")
        inputs.warnings += _squash_warning(req.video, frames[0], req.face_crop)
        inputs.given_motion_raw = pipe.extract_motion(face_frames(frames[idx], req.face_crop), progress,
                                                      "video motion")
        inputs.source_video, inputs.source_frames, inputs.source_fps = req.video, len(frames), fps_in
        source = req.video
    if inputs.given_motion_raw.shape[0] > MAX_FRAMES and not long_input_allowed(req):
        raise ValueError(f"{source}: motion has {inputs.given_motion_raw.shape[0]} frames; at most {MAX_FRAMES} "
                         f"({MAX_SECONDS} s at {FPS} fps) are supported")
    return inputs


@dataclass
class Assembled:
    speech_latents: torch.Tensor  # (F, 32) the latents of the output audio
    audio_24k: torch.Tensor  # (F * 960,) the output waveform
    motion_raw: Optional[torch.Tensor]  # (F, 40) the output motion (None for tts)
    prefix_frames: int  # leading frames replaying the reference clip


def hold_to_length(motion_raw: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Motion cut, or extended by holding its last frame, to n_frames: the video as long as the audio."""
    if motion_raw.shape[0] >= n_frames:
        return motion_raw[:n_frames]
    return torch.cat([motion_raw, motion_raw[-1:].expand(n_frames - motion_raw.shape[0], -1)])


def assemble_t2av(pipe, inputs, out) -> Assembled:
    """As the reference: the output starts with the prefix replayed from the reference clip. The speech
    decides the length (the motion prefix can differ from the speech prefix for a reference voice shorter
    than the prefix, and the motion lags by `delay` patches)."""
    speech = torch.cat([out.prefix_speech_latents.float().cpu(), out.speech_latents.float().cpu()])
    n_prefix = out.prefix_motion_norm.shape[0]
    motion = torch.cat([inputs.ref_motion_raw[:n_prefix], denormalize_motion(out.motion_norm.float().cpu())])
    return Assembled(speech, pipe.decode(speech), hold_to_length(motion, speech.shape[0]), n_prefix)


def assemble_tts(pipe, inputs, out) -> Assembled:
    prefix = out.prefix_speech_latents.float().cpu()
    speech = torch.cat([prefix, out.speech_latents.float().cpu()])
    return Assembled(speech, pipe.decode(speech), None, prefix.shape[0])


def assemble_a2v(pipe, inputs, out) -> Assembled:
    """The input audio, and the motion sampled along it."""
    motion = hold_to_length(denormalize_motion(out.motion_norm.float().cpu()), inputs.given_speech.shape[0])
    return Assembled(inputs.given_speech.cpu(), inputs.driving_audio_24k, motion, 0)


def assemble_v2a(pipe, inputs, out) -> Assembled:
    """The input motion, and the speech sampled along it."""
    speech = out.speech_latents.float().cpu()[:inputs.given_motion_raw.shape[0]]
    return Assembled(speech, pipe.decode(speech), inputs.given_motion_raw, 0)


MODES = {"t2av": (prepare_t2av, assemble_t2av), "a2v": (prepare_a2v, assemble_a2v),
         "v2a": (prepare_v2a, assemble_v2a), "tts": (prepare_tts, assemble_tts)}


def _trim_prefix(a: Assembled) -> Assembled:
    n = a.prefix_frames
    return Assembled(a.speech_latents[n:], a.audio_24k[n * SAMPLES_PER_FRAME:],
                     None if a.motion_raw is None else a.motion_raw[n:], 0)


def _check_finite(a: Assembled) -> None:
    """Never write a waveform or motion with NaN/inf, whatever produced it."""
    for name, tensor in (("audio", a.audio_24k), ("motion", a.motion_raw), ("speech latents", a.speech_latents)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(f"generation produced non-finite {name} (NaN or inf); nothing was written "
                             "(check the sampling settings and the weights)")


# ------------------------------------------------------------------------------------------ pipeline

# what low_memory drops when a stage is done: the next stage reloads what it needs (memory-mapped: seconds)
LOW_MEMORY_RELEASES = {
    "audio": ("speaker_encoder", "vae"),  # the LIA-X encoder runs next (reference or video motion)
    "inputs": ("speaker_encoder", "vae", "generator"),  # the loop runs next, alone
    "stream_inputs": ("speaker_encoder",),  # a stream decodes and renders while its loop runs
    "loop": ("llm",),  # the VAE decoder runs next
    "decode": ("vae",),  # the renderer runs next
}


def _model_slot(name: str, doc: str):
    """A pipeline model that may be dropped (TalkerPipeline.release) and is then loaded again on first use."""
    def get(self):
        model = getattr(self, "_" + name)
        if model is None:
            model = self._load(name)
            setattr(self, "_" + name, model)
        return model

    def set_(self, model):
        setattr(self, "_" + name, model)
    return property(get, set_, doc=doc)


def _demo_dtype(name, device: torch.device, part: str):
    """TalkerPipeline.demo's (dtype, why): auto is float32 for the tiny models (the loop on CUDA: the reference's
    bf16 autocast over float32 weights, as ever); a named dtype as precision.resolve_dtype."""
    if name is None or name == "auto":
        if part == "loop" and device.type == "cuda":
            return precision.resolve_dtype("auto", device, part)
        return torch.float32, "auto: the demo's tiny models stay float32"
    try:
        return precision.resolve_dtype(name, device, part)
    except ValueError as e:
        raise RequestError("dtype" if part == "loop" else "render_dtype", str(e)) from None


class TalkerPipeline:
    llm = _model_slot("llm", "SpeechLLM (backbone + heads)")
    vae = _model_slot("vae", "WhisperX-VAE (reference encoder, decoder)")
    speaker_encoder = _model_slot("speaker_encoder", "WavLM-Large + ECAPA-TDNN speaker encoder")
    generator = _model_slot("generator", "LIA-X generator (reference motion, rendering), loaded from "
                                         "`liax_ckpt` on first use")

    def __init__(self, speech_llm, tokenizer, whisperx_vae, speaker_encoder, generator=None, *,
                 liax_ckpt=None, device="cpu", render_dtype=torch.float32, render_batch_size=None,
                 is_demo=False, model_args=None, loaders=None, low_memory: bool = False,
                 loop_backend: str = "auto", packed_linear: str = "auto"):
        """`loaders` {name: () -> model} reload a model dropped by release() (from_pretrained sets them; a
        model given as None with a loader is loaded on first use). `low_memory`: generate() drops each model
        once the request no longer needs it (the CLI's single runs: peak memory = the largest stage).
        `loop_backend`: how the loop's steps run (loop_steps.BACKENDS; auto: CUDA graphs on CUDA).
        `packed_linear`: the loop's linears through oneDNN with packed weights (packed_linear.MODES; auto: on
        CPU)."""
        self._llm, self._vae, self._speaker_encoder = speech_llm, whisperx_vae, speaker_encoder
        self._generator = generator
        self.model_args = model_args if model_args is not None else speech_llm.model_args
        self.tokenizer = tokenizer
        self.liax_ckpt = liax_ckpt
        self.device = torch.device(device)
        self.render_dtype = render_dtype
        self.render_batch_size = render_batch_size
        self.is_demo = is_demo
        self.low_memory = low_memory
        self._loaders = dict(loaders or {})
        self.load_seconds = 0.0
        self._encodings = EncodingCache()  # content digest -> encoder outputs, reused across requests
        self.loop_backend = loop_backend
        self.packed_linear = packed_linear
        self.precision = {}  # "loop"/"render" -> (dtype, why) as from_pretrained/demo chose: the summary line's

    def precision_note(self, mode: str = "t2av") -> str:
        """What the loop (and, for modes that render, the renderer) compute in and why; '' when unknown."""
        if "loop" not in self.precision:
            return ""
        return precision.summary_note(self.precision["loop"],
                                      self.precision.get("render") if mode in ("t2av", "a2v") else None)

    @property
    def loop_backend(self) -> str:
        return self._loop_backend

    @loop_backend.setter
    def loop_backend(self, name: str) -> None:
        loop_steps.resolve_backend(name, self.device)  # refuses cuda_graphs off CUDA now, not mid-request
        self._loop_backend = name
        if self._llm is not None:
            self._llm.loop_backend = name

    @property
    def packed_linear(self) -> str:
        return self._packed_linear

    @packed_linear.setter
    def packed_linear(self, mode: str) -> None:
        packing.resolve(mode, self.device)  # refuses 'on' where oneDNN cannot run, before any loop
        self._packed_linear = mode
        if self._llm is not None:
            self._llm.packed_linear = mode

    def _load(self, name: str):
        from runtime import weights

        loader = self._loaders.get(name)
        if name == "generator" and loader is None and self.liax_ckpt is not None:
            import lia_x

            def loader():
                return lia_x.load_generator(self.liax_ckpt, device=self.device, dtype=self.render_dtype)
        if loader is None:
            if name == "generator":
                raise weights.MissingWeightsError(["liax"])
            raise RuntimeError(f"the pipeline's {name} was released and cannot be loaded again")
        t0 = time.perf_counter()
        model = loader()
        self.load_seconds += time.perf_counter() - t0
        if name == "llm":
            model.loop_backend, model.packed_linear = self.loop_backend, self.packed_linear
        return model

    def release(self, *names: str) -> list:
        """Drop the named models that can be loaded again (their loader, or LIA-X's checkpoint path); a
        later use reloads them (memory-mapped files: seconds). Returns the names dropped."""
        reloadable = set(self._loaders) | ({"generator"} if self.liax_ckpt is not None else set())
        dropped = [n for n in names if n in reloadable and getattr(self, "_" + n) is not None]
        for name in dropped:
            setattr(self, "_" + name, None)
        if dropped:
            gc.collect()
        return dropped

    def _stage_done(self, stage: str) -> None:
        """low_memory: drop what the next stage of a single request does not use (LOW_MEMORY_RELEASES), so
        that one large model family is resident at a time."""
        if self.low_memory:
            self.release(*LOW_MEMORY_RELEASES[stage])

    # -------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, checkpoint_dir=None, whisperx_vae_ckpt=None, liax_ckpt=None, wavlm_ckpt=None, *,
                        wavlm_backbone_ckpt=None, llm_name: Optional[str] = "Qwen/Qwen3-0.6B", device=None,
                        dtype="auto", render_dtype="auto", render_batch_size=None, needs=None,
                        download=False, wavlm_repo=None, wavlm_filename=None,
                        low_memory: bool = False, loop_backend: str = "auto",
                        packed_linear: str = "auto") -> "TalkerPipeline":
        """Load the released weights. Paths default to weights.locate() (env vars CHECKPOINT_DIR,
        WHISPERVAE_CKPT, LIAX_CKPT, WAVLM_CKPT, then the hub cache); download=True fetches what is missing.

        dtype: the SpeechLLM's ('auto' or None, 'float32', 'bfloat16' or a torch.dtype); render_dtype: the LIA-X
        decoder convolutions'. auto (precision.resolve_dtype): bfloat16 on CUDA (the loop as the reference's
        autocast; the renderer on GPUs with native bf16) and on CPUs with native bf16 that a GEMM probe finds
        faster, float32 elsewhere; pipe.precision and the summary line say which and why. LIA-X (3.6 GB) is
        loaded on first use, so a TTS-only session never reads it. `needs`: components to require now.
        Weight files are memory-mapped: a model's pages are read when it runs. low_memory=True (the CLI's
        single runs): every file is checked now, the SpeechLLM is loaded when the loop starts, and each
        model is dropped once the request no longer needs it (see _stage_done), so the peak is the
        largest stage rather than the sum of all models; a later request reloads what it needs."""
        import speaker_verification
        from runtime import weights
        import whisperx_vae
        from speech_llm import SpeechLLM

        t0 = time.perf_counter()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        chosen = {}
        for part, field_name, name in (("loop", "dtype", dtype), ("render", "render_dtype", render_dtype)):
            try:
                chosen[part] = precision.resolve_dtype(name, device, part)
            except ValueError as e:
                raise RequestError(field_name, str(e)) from None
        dtype, render_dtype = chosen["loop"][0], chosen["render"][0]
        if dtype == torch.float16 and device.type != "cuda":
            raise RequestError("dtype", "float16: half precision needs CUDA (on CPU use float32 or bfloat16)")
        packing.resolve(packed_linear, device)  # before gigabytes load, not after
        extra = {k: v for k, v in (("wavlm_repo", wavlm_repo), ("wavlm_filename", wavlm_filename)) if v}
        paths = weights.locate(checkpoint_dir, whisperx_vae_ckpt, liax_ckpt, wavlm_ckpt, **extra)
        needs = tuple(needs or weights.COMPONENTS)
        if download and paths.missing(needs):
            paths = weights.download(needs, paths, **extra)
        paths.require(needs)

        def load_llm():
            llm = SpeechLLM.from_pretrained(paths.checkpoint_dir, device=device, llm_dtype=dtype)
            if dtype == torch.bfloat16 and device.type == "cpu":
                llm.to(torch.bfloat16)  # backbone and heads compute in bf16 on CPU too (speech_llm.amp)
            return llm

        def load_vae():
            return whisperx_vae.load_whisperx_vae(paths.whisperx_vae, device=device)

        def load_speaker_encoder():
            return speaker_verification.init_model("wavlm_large", paths.wavlm,
                                                   wavlm_checkpoint=wavlm_backbone_ckpt).to(device).eval()

        if low_memory:  # checked now, loaded when the loop starts (after the encoders are gone)
            llm, (model_args, _) = None, SpeechLLM.check_pretrained(paths.checkpoint_dir)
        else:
            llm = load_llm()
            model_args = llm.model_args
        tokenizer = tokenizer_for(paths.checkpoint_dir, llm_name, model_args.model_max_length)
        pipe = cls(llm, tokenizer, load_vae(), load_speaker_encoder(), None, liax_ckpt=paths.liax, device=device,
                   render_dtype=render_dtype, render_batch_size=render_batch_size, model_args=model_args,
                   loaders=dict(llm=load_llm, vae=load_vae, speaker_encoder=load_speaker_encoder),
                   low_memory=low_memory, loop_backend=loop_backend, packed_linear=packed_linear)
        pipe.precision = chosen
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @classmethod
    def demo(cls, device="cpu", seed: int = 0, render_dtype="auto", render_batch_size=None,
             checkpoint_dir=None, dtype="auto", loop_backend: str = "auto",
             packed_linear: str = "auto") -> "TalkerPipeline":
        """Tiny randomly initialised models (fixed seeds), built in memory: the full product path, offline.
        checkpoint_dir: a tiny SpeechLLM saved with save_pretrained (a tiny training run's `final`) to use
        in place of the random one (with its tokenizer when the folder has one). dtype, render_dtype: as
        from_pretrained's, but auto keeps the tiny models in float32 (their GEMMs are too small for bf16 to
        pay, and the demo's outputs stay those the tests pin); on CUDA the loop runs under the reference's
        bf16 autocast whatever the weights' dtype.

        On CPU, unless OMP_NUM_THREADS is set, torch runs one intra-op thread (as infer.py --demo does): the
        tiny models are too small for threads, whose synchronisation dominates (about 6x slower on a busy
        2-core machine, spin-waiting while another process holds a core)."""
        import lia_x
        import speaker_verification
        import whisperx_vae
        from speech_llm import SpeechLLM, tiny_model_args_and_config

        t0 = time.perf_counter()
        if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        args, config = tiny_model_args_and_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            llm = SpeechLLM(args, config).eval()
            torch.manual_seed(seed + 1)
            vae = whisperx_vae.WhisperXVAE(whisperx_vae.tiny_cfg(), whisperx_vae.tiny_whisper_dims()).eval()
        tokenizer = demo_tokenizer(args.model_max_length)
        if checkpoint_dir is not None:
            llm = SpeechLLM.from_pretrained(checkpoint_dir)
            if (Path(checkpoint_dir) / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(checkpoint_dir, llm.model_args.model_max_length)
        chosen = {part: _demo_dtype(name, torch.device(device), part)
                  for part, name in (("loop", dtype), ("render", render_dtype))}
        dtype, render_dtype = chosen["loop"][0], chosen["render"][0]
        if dtype == torch.bfloat16 and chosen["loop"][1] == "requested":  # auto on CUDA: autocast, float32 weights
            llm.to(torch.bfloat16)
        spk = speaker_verification.tiny_speaker_encoder(seed + 2)
        gen = lia_x.tiny_generator(seed + 3)
        if render_dtype != torch.float32:
            lia_x.cast_conv_weights(gen, render_dtype)
        device = torch.device(device)
        pipe = cls(llm.to(device), tokenizer, vae.to(device), spk.to(device), gen.to(device), device=device,
                   render_dtype=render_dtype, render_batch_size=render_batch_size, is_demo=True,
                   loop_backend=loop_backend, packed_linear=packed_linear)
        pipe.precision = chosen
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @property
    def patch_size(self) -> int:
        return self.model_args.patch_size

    @property
    def delay(self) -> int:
        return self.model_args.delay

    # -------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_audio(self, ref: audio_io.ReferenceAudio):
        """(latents (speech_len, 32), speaker embedding (1, 256)), both of the first speech_len frames,
        as the reference's get_speech_embeddings / get_speaker_embeddings compute them."""
        from speech_llm import encode_speaker, encode_speech_latents

        key = ("audio", _digest(ref.audio_24k, ref.audio_16k))
        cached = self._encodings.get(key)
        if cached is None:  # a batch with one voice runs the Whisper encoder and WavLM once
            n = ref.speech_len
            latents = encode_speech_latents(self.vae, ref.audio_24k[None, None].to(self.device),
                                            ref.mel.to(self.device), n)
            speaker = encode_speaker(self.speaker_encoder, ref.audio_16k_pad[None].to(self.device), n)
            cached = self._encodings.put(key, (latents[0].float(), speaker.float()))
        latents, speaker = cached
        return latents.clone(), speaker.clone()

    @torch.no_grad()
    def extract_motion(self, frames_u8, progress: Progress = True, stage="motion") -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 40) raw LIA-X motion (the LIA-X encoder on every frame)."""
        from lia_x import render as liax_render

        key = ("motion", _digest(torch.from_numpy(np.ascontiguousarray(frames_u8))))
        motion = self._encodings.get(key)
        if motion is None:
            self._stage_done("audio")
            with progress_reporter(progress, stage, len(frames_u8), "frame") as update:
                motion = self._encodings.put(key, liax_render.extract_motion(self.generator, frames_u8,
                                                                             progress=update))
        return motion.clone()

    @staticmethod
    def video_motion_frames(video) -> int:
        """Frames of a video on the model's 25 fps timeline, at most 750."""
        return _video_timeline(video)[0]

    def reference_motion(self, ref_video, n_needed: int = 1, progress: Progress = True,
                         face_crop: str = "none") -> torch.Tensor:
        """(T, 40) raw motion of a reference video, T <= 750, of which only the first n_needed rows are
        extracted (the rest repeat the last one): the loop reads only the prefix rows (the first is the
        motion head's global condition); the clip length only sets the length cap. A full-scale encoder
        pass costs seconds per frame on CPU."""
        n_total, fps_src = _video_timeline(ref_video)
        n_read = max(1, min(n_needed, n_total))
        frames, fps_in = video_io.read_frames(ref_video, max_frames=int(math.ceil(n_read * max(fps_src, FPS) / FPS)) + 1)
        frames = face_frames(frames[resample_indices(len(frames), fps_in)][:n_read], face_crop)
        motion = self.extract_motion(frames, progress, "reference motion")
        if motion.shape[0] < n_total:
            motion = torch.cat([motion, motion[-1:].expand(n_total - motion.shape[0], -1)])
        return motion

    @torch.no_grad()
    def decode(self, speech_latents_td: torch.Tensor) -> torch.Tensor:
        """(F, 32) latents -> (F * 960,) float32 waveform at 24 kHz."""
        if speech_latents_td.shape[0] == 0:
            return torch.zeros(0)
        wav = self.vae.decode(speech_latents_td[None].to(self.device), latent_layout="btc")
        return wav.reshape(-1).float().cpu()

    # -------------------------------------------------------------- generation
    def generate(self, request: Optional[GenerationRequest] = None, *, progress: Progress = True,
                 **kwargs) -> GenerationResult:
        """Run one request (a GenerationRequest and/or its fields as keyword arguments). Inputs default to
        the bundled samples (text: samples/default_text.txt, except a2v whose default is no transcript).
        With `output`, writes the mp4 (not for tts) and the wav beside it, all-or-nothing; `save_latents`
        adds <output>.latents.safetensors."""
        req = resolve_request(request, **kwargs)
        paths = output_paths(req.output, req.mode, req.save_latents) if req.output is not None else None
        timings = {"load": self.load_seconds} if self.load_seconds else {}
        self.load_seconds = 0.0  # counted once, in the first result
        with _timed(timings, "inputs"):
            inputs, plan, windows = self._inputs(req, progress)
            self._stage_done("inputs")
            if windows is None:
                input_ids, speech_start = text_prompt(self.tokenizer, req.text, plan.n_placeholders,
                                                      int(self.model_args.model_max_length), self.patch_size)
        with _timed(timings, "generate"):
            if windows is None:
                out, reports = self._run(req, inputs, plan, input_ids, speech_start, progress), []
            else:
                lf = longform.run(self, req, inputs, windows, progress)
                out, reports = lf.output, lf.reports
        self._stage_done("loop")
        return self._finish(req, inputs, plan, out, reports, paths, timings, progress)

    def _inputs(self, req, progress):
        """(the mode's inputs, the plan of the run (of window 1), the long-form windows or None)."""
        inputs = self.prepare(req, progress)
        windows = longform.plan_windows(req, inputs)
        plan = self.plan(req, inputs) if windows is None else longform.window_plan(self, req, inputs, windows[0])
        if windows is not None:
            longform.check_windows(self, req, inputs, windows)
        if req.mode != "tts" and inputs.ref_motion_raw is None:
            inputs.ref_motion_raw = at_least_one_patch(self.reference_motion(
                req.ref_video, max(1, plan.prefix_frames), progress, req.face_crop))
        return inputs, plan, windows

    def prepare(self, req, progress):
        return MODES[req.mode][0](self, req, progress)

    def _finish(self, req, inputs, plan, out, reports, paths, timings, progress, write: bool = True):
        """Assemble the mode's outputs into the result; write them (`paths`) unless write=False."""
        assemble = MODES[req.mode][1]
        with _timed(timings, "decode"):
            assembled = assemble(self, inputs, out)
            if req.trim_prefix and assembled.prefix_frames:
                assembled = _trim_prefix(assembled)
            _check_finite(assembled)
        self._stage_done("decode")
        result = GenerationResult(
            mode=req.mode, text=req.text, seed=req.seed, audio_24k=assembled.audio_24k,
            speech_latents=assembled.speech_latents, motion_raw=assembled.motion_raw,
            generated_motion_norm=None if req.mode == "tts" else out.motion_norm.float().cpu(),
            n_patches=out.n_patches, stopped_by=out.stopped_by, prefix_frames=assembled.prefix_frames, plan=plan,
            timings=timings, warnings=list(inputs.warnings), windows=list(reports),
            precision=self.precision_note(req.mode))
        if inputs.source_video is not None:
            result.video_frames, result.video_fps = inputs.source_frames, inputs.source_fps
        if reports:
            result.warnings += longform.cap_warnings(reports)
        elif out.stopped_by == "length_cap":
            result.warnings.append(
                f"generation hit the length cap ({out.n_patches} patches = {plan.max_seconds:.1f} s) before "
                "the model chose to stop: the text may be cut short; use a longer reference clip or max_seconds")
        if paths is not None and write:
            with _timed(timings, "render"):
                self._write(result, paths, inputs, progress)
        return result

    def stream(self, request: Optional[GenerationRequest] = None, *, every: int = 1, progress: Progress = False,
               lookahead: int = 16, render: bool = True, mp4=None, **kwargs):
        """Generate while yielding streaming.Chunk's (new 24 kHz samples and new frames, with their times)
        every `every` patches; the last item is the GenerationResult generate() returns (written to
        `output` as generate does). See streaming.stream."""
        from runtime import streaming

        _check_count("every", every)
        return streaming.stream(self, request, every=every, progress=progress, lookahead=lookahead,
                                render=render, mp4=mp4, **kwargs)

    def generate_batch(self, requests, batch_size: int = 4, progress: Progress = False) -> list:
        """generate() for each request, the loops of up to batch_size t2av/tts requests run together
        (batching.generate_batch: same samples as one by one, up to float rounding)."""
        from runtime import batching

        _check_count("batch_size", batch_size)
        return batching.generate_batch(self, requests, batch_size, progress)

    def plan(self, req: GenerationRequest, inputs: ModeInputs) -> LengthPlan:
        """The length plan of a request (generation.plan_lengths with the request's lengths)."""
        return plan_lengths(
            "tts" if req.mode == "tts" else "t2av", ref_speech_frames=inputs.ref_latents.shape[0],
            ref_motion_frames=inputs.ref_motion_frames, gt_prefix_seconds=req.gt_prefix_seconds,
            delay=self.delay, patch_size=self.patch_size,
            given_speech_frames=None if inputs.given_speech is None else inputs.given_speech.shape[0],
            given_motion_frames=None if inputs.given_motion_raw is None else inputs.given_motion_raw.shape[0],
            max_seconds=req.max_seconds)

    def _run(self, req, inputs, plan, input_ids, speech_start, progress):
        """The patch stream of a request, collected (seeded immediately before the loop)."""
        ref_motion_norm = None if inputs.ref_motion_raw is None else normalize_motion(inputs.ref_motion_raw)
        given_motion = None if inputs.given_motion_raw is None else normalize_motion(inputs.given_motion_raw)
        prompt = build_prompt(self.llm, input_ids, speech_start, inputs.ref_latents, inputs.speaker, plan,
                              ref_motion_norm)
        sampling = Sampling(req.cfm_steps, req.cfm_temperature, req.cfm_cfg)
        stream = PatchStream(self.llm, prompt, plan, sampling, inputs.given_speech, given_motion)
        torch.manual_seed(req.seed)
        with progress_reporter(progress, f"{req.mode} patches", plan.max_steps, "patch") as update:
            return collect(stream, update)

    def _write(self, result: GenerationResult, paths: OutputPaths, inputs: ModeInputs, progress):
        """mp4 + wav (+ latents), all-or-nothing (atomic.atomic_outputs)."""
        from lia_x import render as liax_render

        with atomic_outputs(paths.mp4, paths.wav, paths.latents) as (tmp_mp4, tmp_wav, tmp_latents):
            audio_io.save_wav(tmp_wav, result.audio_24k, CODEC_SAMPLE_RATE, atomic=False)
            if tmp_latents is not None:
                save_latents(result, tmp_latents)
            if tmp_mp4 is not None and inputs.source_video is not None:
                video_io.mux_audio(inputs.source_video, tmp_wav, tmp_mp4, atomic=False)
            elif tmp_mp4 is not None:
                with progress_reporter(progress, "render", result.n_frames, "frame") as update:
                    frames = liax_render.render_frames(self.generator, inputs.face, result.motion_raw.numpy(),
                                                       batch_size=self.render_batch_size, dtype=self.render_dtype,
                                                       progress=update)
                    video_io.write_video(tmp_mp4, frames, fps=FPS, audio_path=tmp_wav, atomic=False)
        result.video_path, result.wav_path, result.latents_path = paths.mp4, paths.wav, paths.latents


class EncodingCache:
    """The reference encodings of the last `size` distinct inputs (least recently used dropped first), so a
    long-lived pipeline (the web page, a batch file) encodes a repeated voice or face once without growing
    without bound. An entry is small (a 30 s voice: ~100 kB of latents; motion: 40 floats a frame)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: "OrderedDict[tuple, object]" = OrderedDict()

    def get(self, key):
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def put(self, key, value):
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _digest(*tensors: torch.Tensor) -> str:
    """Content hash of tensors (shape, dtype and bytes): the key of a cached encoding."""
    import hashlib

    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_latents(result: GenerationResult, path) -> None:
    """speech_latents, motion_raw (reusable as a `motion` input) and generated_motion_norm, with metadata."""
    import json

    from safetensors.torch import save_file

    tensors = {"speech_latents": result.speech_latents.contiguous()}
    if result.motion_raw is not None:
        tensors["motion_raw"] = result.motion_raw.float().contiguous()
    if result.generated_motion_norm is not None:
        tensors["generated_motion_norm"] = result.generated_motion_norm.contiguous()
    meta = {"mode": result.mode, "text": json.dumps(result.text), "seed": str(result.seed), "fps": str(FPS),
            "n_patches": str(result.n_patches), "stopped_by": result.stopped_by,
            "prefix_frames": str(result.prefix_frames), "sample_rate": str(CODEC_SAMPLE_RATE)}
    save_file(tensors, os.fspath(path), metadata=meta)
