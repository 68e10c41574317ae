"""A request's inputs: the request resolved (the bundled samples where an input is not named), checked
from the file headers before any model loads (preflight), where it writes, and what each mode feeds the loop
(ModeInputs, read by the pipeline's encoders: `pipe` below is a TalkerPipeline).

Modes: t2av reads the reference voice and face; a2v also the driving audio; v2a the driving video (or a
motion file); tts the reference voice only.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common.constants import FPS, MAX_FRAMES, MAX_SECONDS, MIN_SECONDS, MOTION_DIM, PATCH_SIZE
from media import audio as audio_io
from media import video_io
from runtime.request import GenerationRequest, RequestError, has_visible_text

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "samples"
DEFAULT_TEXT_FILE = SAMPLES / "default_text.txt"
DEFAULT_REF_AUDIO = SAMPLES / "reference_voice.wav"
DEFAULT_REF_VIDEO = SAMPLES / "reference_face.mp4"


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


@dataclass
class OutputPaths:
    mp4: Optional[str]  # None for tts
    wav: str
    latents: Optional[str]  # None unless save_latents

    def group(self) -> tuple:
        """(mp4, wav, latents): the files written together (atomic_outputs), None where not written."""
        return self.mp4, self.wav, self.latents

    def members(self) -> list:
        return [p for p in self.group() if p]


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


def check_count(name: str, value) -> None:
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
    return checked_motion(obj, path)


def checked_motion(obj, path) -> torch.Tensor:
    """What a motion file held as (T, 40) float32 raw motion; ValueError naming the file otherwise."""
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


def video_timeline(video):
    """(frames on the model's 25 fps timeline, at most 750; the file's frame rate)."""
    info = video_io.probe(video)
    if not info.get("n_frames"):
        raise ValueError(f"{video}: {video_io.NO_VIDEO_STREAM if info.get('video_codec') is None else video_io.NO_FRAMES}")
    fps = float(info.get("fps") or FPS)
    return min(len(resample_indices(int(info["n_frames"]), fps)), MAX_FRAMES), fps


@dataclass
class ModeInputs:
    """What a mode feeds the loop and its outputs, read from the request's files."""
    ref: audio_io.ReferenceAudio  # the reference voice
    ref_latents: torch.Tensor  # (Ls, 32) WhisperX-VAE latents of the reference voice
    speaker: torch.Tensor  # (1, 256) speaker embedding of the reference voice
    ref_motion_frames: int = 0  # length of the reference motion (t2av/a2v/v2a)
    ref_motion_raw: Optional[torch.Tensor] = None  # (Tm, 40): the loop reads its prefix rows (the rest repeat the last)
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


def hold_last(motion_raw: torch.Tensor, n_frames: int, cut: bool = True) -> torch.Tensor:
    """Motion extended to n_frames by holding its last frame (a video as long as its audio, a still face, a
    clip shorter than the one patch the loop reads); longer motion is cut to n_frames unless cut=False."""
    if motion_raw.shape[0] >= n_frames:
        return motion_raw[:n_frames] if cut else motion_raw
    return torch.cat([motion_raw, motion_raw[-1:].expand(n_frames - motion_raw.shape[0], -1)])


def prefix_motion_frames(req) -> int:
    """Reference motion frames a t2av prompt replays at most: gt_prefix_seconds in whole patches
    (plan_lengths' prefix, before it is capped by the clip's length)."""
    return (int(req.gt_prefix_seconds * FPS) // PATCH_SIZE) * PATCH_SIZE


def _prepare_reference(pipe, req, progress, *, with_motion: bool, needs_face: bool) -> ModeInputs:
    ref, cut_warning = load_reference_audio(req.ref_audio)
    ref_latents, speaker = pipe.encode_audio(ref)
    inputs = ModeInputs(ref, ref_latents, speaker, warnings=cut_warning)
    if with_motion:
        if req.ref_motion is not None:
            inputs.ref_motion_raw = hold_last(load_motion_file(req.ref_motion)[:MAX_FRAMES], PATCH_SIZE, cut=False)
            inputs.ref_motion_frames = inputs.ref_motion_raw.shape[0]
        else:
            inputs.ref_motion_frames = pipe.video_motion_frames(req.ref_video)
            if inputs.ref_motion_frames < PATCH_SIZE:  # a still image
                inputs.ref_motion_raw = _still_face_motion(pipe, req, ref_latents.shape[0])
                inputs.ref_motion_frames = inputs.ref_motion_raw.shape[0]
            else:  # only the frames the prompt's prefix reads are encoded (a few seconds each on CPU)
                motion = pipe.reference_motion(req.ref_video, max(1, prefix_motion_frames(req)), progress,
                                               req.face_crop)
                inputs.ref_motion_raw = hold_last(motion, PATCH_SIZE, cut=False)
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
    return hold_last(motion, max(n_voice_frames, PATCH_SIZE), cut=False)


def prepare_t2av(pipe, req, progress) -> ModeInputs:
    return _prepare_reference(pipe, req, progress, with_motion=True, needs_face=True)


def prepare_tts(pipe, req, progress) -> ModeInputs:
    return _prepare_reference(pipe, req, progress, with_motion=False, needs_face=False)


def prepare_a2v(pipe, req, progress) -> ModeInputs:
    inputs = _prepare_reference(pipe, req, progress, with_motion=True, needs_face=True)
    wav, sr = audio_io.load_audio(req.audio)
    check_audio_seconds(req.audio, wav.numel() / sr, "audio", any_length=long_input_allowed(req))
    piece = MAX_SECONDS * sr  # the encoder takes 30 s at a time: longer audio is encoded piece by piece
    drivings = [audio_io.reference_audio(wav[i:i + piece], sr) for i in range(0, wav.numel(), piece)
                if i == 0 or wav.numel() - i >= MIN_SECONDS * sr]
    inputs.given_speech = torch.cat([pipe.encode_audio(d)[0] for d in drivings])
    inputs.driving_audio_24k = torch.cat([d.audio_24k.float().cpu() for d in drivings])
    return inputs


def prepare_v2a(pipe, req, progress) -> ModeInputs:
    inputs = _prepare_reference(pipe, req, progress, with_motion=True, needs_face=req.motion is not None)
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


PREPARE = {"t2av": prepare_t2av, "a2v": prepare_a2v, "v2a": prepare_v2a, "tts": prepare_tts}
