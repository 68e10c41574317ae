"""The evaluation manifest: which clips are scored against what, read and checked before anything loads.

A manifest is a UTF-8 CSV file with a header row. Columns (only `id` and `lang` are required; paths are
relative to the manifest's folder unless absolute):

| column        | what                                                                                       |
| ------------- | ------------------------------------------------------------------------------------------ |
| id            | clip id; the system's output is `<outputs>/<id>.mp4` (or `<id>.wav` for audio only); letters, digits, `.`, `_`, `-` |
| lang          | `zh` or `en`: the ASR language, CER (zh) or WER (en), and the table row                    |
| mode          | `t2av` (default), `a2v` or `v2a`: the table the clip counts in, and what --generate runs    |
| text          | transcript of the clip: the WER/CER reference, and the text spoken by t2av / v2a           |
| prompt_audio  | speaker prompt (voice): SIM is measured against it; the generator's reference voice        |
| prompt_face   | reference face (video or image): the generator's reference face and motion prompt          |
| gt_video      | ground-truth clip (video, with audio): the FID / FVD reference set; a2v's driving audio and v2a's driving video when --generate runs |
| driving_audio | a2v only: the driving speech, if not the gt_video's audio track                            |
| speaker       | speaker name (informational; make-manifest fills it)                                       |

Checks: the header (unknown or missing columns), every row's id (present, unique, file-name safe), lang and
mode; a row failing one of these is left out, with one line naming it. A path that points nowhere or an
empty transcript does not drop the row: the metrics that need that field are skipped for it, with the reason.

`make_manifest` builds a manifest from a folder of talking-head clips and their transcripts (evaluate.py
make-manifest): the prompt is another clip of the same speaker (cross-sentence) or the clip's own first
seconds (continuation).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from media.atomic import atomic_output

COLUMNS = ("id", "lang", "mode", "text", "prompt_audio", "prompt_face", "gt_video", "driving_audio", "speaker")
REQUIRED = ("id", "lang")
PATH_COLUMNS = ("prompt_audio", "prompt_face", "gt_video", "driving_audio")
LANGS = ("zh", "en")
MODES = ("t2av", "a2v", "v2a")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")

# What each metric (and generation) reads from a row, besides the system's output clip.
METRIC_FIELDS = {"wer": ("text",), "utmos": (), "sim": ("prompt_audio",), "sync": (), "fid": ("gt_video",),
                 "fvd": ("gt_video",)}
GENERATE_FIELDS = {"t2av": ("text", "prompt_audio", "prompt_face"),
                   "a2v": ("prompt_audio", "prompt_face", "driving"),
                   "v2a": ("text", "prompt_audio", "prompt_face", "gt_video")}
# Which metrics a mode is scored on: a2v's audio is its input, v2a's frames are its input.
MODE_METRICS = {"t2av": ("wer", "utmos", "sim", "sync", "fid", "fvd"), "a2v": ("sync", "fid", "fvd"),
                "v2a": ("wer", "utmos", "sim", "sync")}


class ManifestError(ValueError):
    """The manifest file as a whole cannot be used (missing, unreadable, bad header): one line."""


@dataclass
class ManifestRow:
    line: int  # line number in the file (the header is line 1)
    id: str
    lang: str
    mode: str = "t2av"
    text: str = ""
    prompt_audio: str = ""
    prompt_face: str = ""
    gt_video: str = ""
    driving_audio: str = ""
    speaker: str = ""
    source: str = ""  # the manifest file
    problems: dict = field(default_factory=dict)  # field -> problem (the field is unusable)

    @property
    def label(self) -> str:
        return f"{self.source}:{self.line} ({self.id})"

    def problem_with(self, fields) -> Optional[str]:
        """'field: problem' of the first unusable field among `fields`, or None."""
        for name in fields:
            if name == "driving":  # a2v: driving_audio, else gt_video's audio track
                name = "driving_audio" if self.driving_audio else "gt_video"
                if not getattr(self, name):
                    return "driving_audio: a2v needs driving_audio or gt_video (its audio track)"
            if name in self.problems:
                return f"{name}: {self.problems[name]}"
            if not getattr(self, name):
                return f"{name}: {'empty transcript' if name == 'text' else 'not given'}"
        return None


@dataclass
class Manifest:
    path: str
    rows: list  # the usable rows
    errors: list  # one line per row that was left out


def _resolve(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def read_manifest(path) -> Manifest:
    """Read and check a manifest (see the module docstring). Raises ManifestError for file-level problems."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise ManifestError(f"{path}: manifest not found" if not p.exists() else f"{path}: not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text file") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise ManifestError(f"{path}: empty manifest (expected a CSV header with at least: {', '.join(REQUIRED)})")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ManifestError(f"{path}: unknown column {unknown[0]!r} (columns: {', '.join(COLUMNS)})")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column {missing[0]!r} (required: {', '.join(REQUIRED)})")
    reader.fieldnames = header
    base = p.parent
    rows, errors, seen = [], [], {}
    for values in reader:
        line = reader.line_num
        if None in values:  # more cells than header names
            errors.append(f"{path}:{line}: {len(header) + len(values[None])} cells for {len(header)} columns")
            continue
        cells = {k: (v or "").strip() for k, v in values.items()}
        if not any(cells.values()):
            continue
        rid = cells.get("id", "")
        where = f"{path}:{line}" + (f" ({rid})" if rid else "")
        problem = None
        if not rid:
            problem = "id: empty"
        elif not ID_RE.fullmatch(rid):
            problem = f"id: {rid!r} is not a file-name-safe id (letters, digits, '.', '_', '-')"
        elif rid in seen:
            problem = f"id: {rid!r} repeats line {seen[rid]}"
        elif cells.get("lang") not in LANGS:
            problem = f"lang: {cells.get('lang')!r} is not one of {', '.join(LANGS)}"
        elif (cells.get("mode") or "t2av") not in MODES:
            problem = f"mode: {cells.get('mode')!r} is not one of {', '.join(MODES)}"
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        seen[rid] = line
        row = ManifestRow(line=line, id=rid, lang=cells["lang"], mode=cells.get("mode") or "t2av",
                          text=cells.get("text", ""), speaker=cells.get("speaker", ""), source=str(path))
        for name in PATH_COLUMNS:
            if cells.get(name):
                setattr(row, name, _resolve(cells[name], base))
                target = Path(getattr(row, name))
                if not target.exists():
                    row.problems[name] = f"{cells[name]}: file not found"
                elif not target.is_file():
                    row.problems[name] = f"{cells[name]}: not a file"
        rows.append(row)
    if not rows and not errors:
        raise ManifestError(f"{path}: no rows in the manifest")
    return Manifest(str(path), rows, errors)


def write_manifest(rows: list, path) -> None:
    """Write rows ({column: value} dicts) as a manifest, all-or-nothing; columns in COLUMNS order."""
    used = [c for c in COLUMNS if any(r.get(c) for r in rows) or c in REQUIRED]
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=used, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({c: r.get(c, "") for c in used})


# ------------------------------------------------------------------------------------------ media files

def streams(path) -> dict:
    """{'video': bool, 'audio': bool, 'duration': seconds or None} from the file header (nothing decoded)."""
    from media import video_io

    if Path(path).suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"):
        from media import audio as audio_io

        return {"video": False, "audio": True, "duration": audio_io.audio_seconds(path)}
    info = video_io.media_info(path)  # one `ffmpeg -i` call: the stream list
    return {"video": info["video"] is not None, "audio": info["audio"] is not None, "duration": info["duration"]}


def read_audio(path, sample_rate: Optional[int] = None):
    """(mono float32 1-D tensor, rate) of an audio file or a video's first audio track: native rate unless
    `sample_rate` is given (then ffmpeg resamples). Channels are mixed by their mean (ffmpeg -ac 1 for
    videos). ValueError naming the file when there is no audio."""
    import numpy as np
    import soundfile as sf
    import torch

    from media import video_io

    if Path(path).suffix.lower() in (".wav", ".flac", ".ogg") and sample_rate is None:
        # soundfile directly: a silent or very quiet clip is a (bad) output to score, not an input error
        try:
            samples_tc, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as err:  # noqa: BLE001 - libsndfile reports every format problem as its own type
            raise ValueError(f"{path}: not a readable audio file ({str(err).strip() or type(err).__name__})") from None
        if samples_tc.size == 0:
            raise ValueError(f"{path}: audio file holds no samples")
        return torch.from_numpy(np.ascontiguousarray(samples_tc.mean(axis=1))), int(rate)
    info = video_io.media_info(path)
    if info["audio"] is None:
        raise ValueError(f"{path}: no audio stream")
    rate = sample_rate or info["audio"]["sample_rate"] or 16000
    cmd = [video_io.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
           "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(rate), "-f", "f32le", "pipe:1"]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ValueError(f"{path}: cannot decode the audio ({err[-1] if err else res.returncode})")
    wav = torch.from_numpy(np.frombuffer(res.stdout, dtype=np.float32).copy())
    if wav.numel() == 0:
        raise ValueError(f"{path}: the audio track holds no samples")
    return wav, int(rate)


def extract_audio(src, dst, seconds: Optional[float] = None) -> str:
    """`src`'s audio (optionally its first `seconds`) as a 16-bit PCM mono wav at its own rate, atomically."""
    from media import video_io

    info = video_io.media_info(src)
    if info["audio"] is None:
        raise ValueError(f"{src}: no audio stream")
    cmd = [video_io.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
           "-map", "0:a:0", "-vn", "-ac", "1", "-c:a", "pcm_s16le"]
    if seconds is not None:
        cmd += ["-t", f"{seconds:.3f}"]
    with atomic_output(dst) as tmp:
        res = subprocess.run(cmd + ["-f", "wav", str(tmp)], stdin=subprocess.DEVNULL, capture_output=True)
        if res.returncode != 0:
            err = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
            raise ValueError(f"{src}: cannot extract the audio ({err[-1] if err else res.returncode})")
    return str(dst)


def cut_video(src, dst, seconds: float) -> str:
    """The first `seconds` of `src`'s frames (no audio) as an H.264 mp4, atomically."""
    from media import video_io

    frames, fps = video_io.read_frames(src, max_frames=max(1, round(seconds * (video_io.media_info(src)["video"]
                                                                               ["fps"] or 25))))
    video_io.write_video(dst, frames, fps=fps)
    return str(dst)


# ------------------------------------------------------------------------------------------ make-manifest

PROTOCOLS = ("cross-sentence", "continuation")


@dataclass
class Clip:
    path: Path
    id: str
    text: str
    lang: str
    speaker: str


def read_transcripts(path, clips_dir: Path, default_lang: Optional[str] = None) -> list:
    """Clips named in a transcript file: CSV with a header (columns clip, text, optional lang, speaker) or JSONL
    (the same keys). `clip` is a path under clips_dir, with or without its extension. The speaker is the
    `speaker` value, else the clip's folder under clips_dir."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{path}: transcript file not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text file") from None
    if p.suffix.lower() == ".jsonl":
        entries = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
        if not reader.fieldnames or "clip" not in reader.fieldnames or "text" not in reader.fieldnames:
            raise ManifestError(f"{path}: expected a header with the columns clip, text (optional: lang, speaker)")
        entries = [(i + 2, row) for i, row in enumerate(reader)]
    clips, ids = [], set()
    for lineno, entry in entries:
        name = str(entry.get("clip") or "").strip()
        if not name:
            raise ManifestError(f"{path}:{lineno}: clip: empty")
        clip = _find_clip(clips_dir, name)
        if clip is None:
            raise ManifestError(f"{path}:{lineno}: clip {name!r}: no such video under {clips_dir}")
        lang = str(entry.get("lang") or default_lang or "").strip()
        if lang not in LANGS:
            raise ManifestError(f"{path}:{lineno}: lang: {lang!r} is not one of {', '.join(LANGS)} (add a lang "
                                "column or pass --lang)")
        rel = clip.relative_to(clips_dir)
        speaker = str(entry.get("speaker") or "").strip() or (rel.parts[0] if len(rel.parts) > 1 else "")
        cid = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(rel.with_suffix("").parts)).strip("._-") or "clip"
        if cid in ids:
            raise ManifestError(f"{path}:{lineno}: clip {name!r} is listed twice")
        ids.add(cid)
        clips.append(Clip(clip, cid, str(entry.get("text") or "").strip(), lang, speaker))
    if not clips:
        raise ManifestError(f"{path}: no clips listed")
    return clips


def _find_clip(clips_dir: Path, name: str) -> Optional[Path]:
    direct = clips_dir / name
    if direct.is_file():
        return direct
    for suffix in VIDEO_SUFFIXES:
        candidate = clips_dir / (name + suffix)
        if candidate.is_file():
            return candidate
    return None


def make_manifest(clips_dir, transcripts, protocol: str, out, lang: Optional[str] = None, mode: str = "t2av",
                  prompt_seconds: float = 3.0, progress: bool = True) -> tuple:
    """Write a manifest for the clips in `transcripts` (see read_transcripts); returns (rows written, lines
    about clips left out). The prompt files (wav of the prompt's audio; for continuation also the first
    seconds of the video) go to `<out folder>/<out stem>_prompts/`.

    cross-sentence: prompt_audio / prompt_face come from the next clip of the same speaker (sorted by id,
    wrapping around), so the prompt never contains the target sentence; a speaker with one clip is left out.
    continuation: the clip's own first `prompt_seconds`; the target text stays the whole transcript (no
    aligner is used to cut it) and gt_video is the whole clip.
    """
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise ManifestError(f"--protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if mode not in MODES:
        raise ManifestError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    clips_dir = Path(clips_dir)
    if not clips_dir.is_dir():
        raise ManifestError(f"{clips_dir}: clips folder not found")
    clips = read_transcripts(transcripts, clips_dir, lang)
    out = Path(out)
    prompt_dir = out.parent / f"{out.stem}_prompts"
    by_speaker, skipped = {}, []
    for c in clips:
        by_speaker.setdefault(c.speaker, []).append(c)
    if protocol == "cross-sentence" and "" in by_speaker:
        raise ManifestError(f"cross-sentence needs each clip's speaker: put the clips in one folder per speaker "
                            f"under {clips_dir} or add a speaker column to {transcripts} (first: "
                            f"{by_speaker[''][0].path.name})")

    def rel(p) -> str:
        return os.path.relpath(p, out.parent)

    rows = []
    for c in tqdm(sorted(clips, key=lambda c: c.id), desc="make-manifest", unit="clip", disable=not progress):
        row = {"id": c.id, "lang": c.lang, "mode": mode, "text": c.text, "gt_video": rel(c.path),
               "speaker": c.speaker}
        try:
            if protocol == "cross-sentence":
                same = sorted(by_speaker[c.speaker], key=lambda x: x.id)
                if len(same) < 2:
                    skipped.append(f"{c.path}: speaker {c.speaker!r} has no other clip to prompt with")
                    continue
                prompt = same[(same.index(c) + 1) % len(same)]
                wav = prompt_dir / f"{prompt.id}.wav"
                if not wav.is_file():
                    extract_audio(prompt.path, wav)
                row.update(prompt_audio=rel(wav), prompt_face=rel(prompt.path))
            else:
                wav, face = prompt_dir / f"{c.id}.first{prompt_seconds:g}s.wav", prompt_dir / f"{c.id}.first{prompt_seconds:g}s.mp4"
                extract_audio(c.path, wav, prompt_seconds)
                cut_video(c.path, face, prompt_seconds)
                row.update(prompt_audio=rel(wav), prompt_face=rel(face))
        except (ValueError, OSError) as e:
            skipped.append(" ".join(str(e).split()))
            continue
        rows.append(row)
    if not rows:
        raise ManifestError("no clip could be used: " + (skipped[0] if skipped else "none listed"))
    write_manifest(rows, out)
    return len(rows), skipped
