"""Training data: the reference's layouts, a JSONL manifest, per-sample loading, the padding collator,
the feature-cache reader and the failure budget.

Layouts (the reference's environment variables, read when the data set is built):
- T2SV CSV (`TRAIN_CSV`, default ./data/csv/train.csv): columns motion_pt_path, wav_path, text, duration, ...
  (only the first three are read). The published data set (HKUSTAudio/Talker-T2AV-Data) uses it with paths
  relative to its root: set `DATA_ROOT` to that root.
- TXT motion list (`TRAIN_TXT`, default ./data/txt/train_pt_list.txt): one motion path per line, the audio is
  `VIDEO_DIR/{name}.wav` (`VIDEO_DIR` default ./data/video). The reference reads no transcript for these rows
  (text ''); here a `{name}.json` {"text": ...} beside the wav is used when it exists.
- TTS list (`tts_data_path`): one wav path per line, the transcript in the sidecar `{wav stem}.json`
  {"text": ...}. The smaller of the T2SV and TTS sets is repeated round(big/small) times (as the reference).
- JSONL manifest (this project): one {"wav": ..., "motion": ..., "text": ...} a line; a row without "motion"
  is a TTS row; without "text", the sidecar .json is read.
Relative paths are prefixed with `DATA_ROOT` (or `data_root`) when set, else relative to the working directory.

Each sample is loaded as the reference's SpeechDataset does (motion normalised with the 40-d statistics, a
random 30 s window for longer T2SV clips with the audio cut to the same frames, 640 / 960 samples per frame
at 16 / 24 kHz, mel_len = floor(seconds * 25) in [1, 750], max(ceil(mel_len/4), motion_patches + delay)
placeholders). Differences: the 30 s window is drawn from (seed, epoch, index) instead of the global RNG
(so a resumed run draws the same windows), and a sample that cannot be loaded is reported and replaced by
the next loadable one (the reference substitutes a random sample without saying so); the trainer stops the
run when more than `max_failed_fraction` of the samples failed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pickle
import random
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch


from media.audio import load_audio, log_mel_spectrogram, resample
from common.constants import (CODEC_SAMPLE_RATE, FPS, MAX_FRAMES, MAX_SECONDS, MOTION_DIM, SAMPLES_PER_FRAME,
                       SAMPLES_PER_FRAME_16K, WHISPER_SAMPLE_RATE)
from common.motion_stats import normalize_motion
from runtime.inputs import checked_motion
from runtime.prompt import SPEECH_TOKEN, add_placeholder_tokens, build_chat_and_spans, control_tokens_in
from common.safe_load import safe_torch_load

DEFAULT_TRAIN_CSV = "./data/csv/train.csv"
DEFAULT_TRAIN_TXT = "./data/txt/train_pt_list.txt"
DEFAULT_VIDEO_DIR = "./data/video"
MAX_SUBSTITUTES = 100  # consecutive unloadable samples after which a worker gives up
# Manifests and transcripts are read as UTF-8 with undecodable bytes kept as surrogates: a path with such bytes
# still names its file (the file system's own convention), and a text with them is refused per sample
# (text_problem) instead of stopping the whole run.
MANIFEST_ERRORS = "surrogateescape"


@dataclass
class DataArguments:
    """Data fields of the training config (the first three are the reference's; it reads none of them)."""
    data_path: Optional[str] = field(default=None, metadata={
        "help": "training manifest: .csv (T2SV rows), .jsonl, or .txt (motion list); default: $TRAIN_CSV, or "
                "$TRAIN_TXT when only that is set, else ./data/csv/train.csv"})
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "reference field, not used"})
    test_data_path: Optional[str] = field(default=None, metadata={"help": "reference field, not used"})
    data_root: Optional[str] = field(default=None, metadata={
        "help": "prefix of relative paths in the manifests (default $DATA_ROOT)"})
    video_dir: Optional[str] = field(default=None, metadata={
        "help": "folder of {name}.wav for the TXT motion list (default $VIDEO_DIR, else ./data/video)"})
    feature_cache: Optional[str] = field(default=None, metadata={
        "help": "folder written by training/precompute.py: train on cached WhisperX-VAE latents and speaker "
                "embeddings instead of encoding the audio at every step"})
    max_failed_fraction: float = field(default=0.01, metadata={
        "help": "stop the run when more than this fraction of the distinct samples failed to load"})


class SampleError(ValueError):
    """One sample cannot be used (the reason is the message)."""


class DataError(RuntimeError):
    """The data as a whole cannot be used (a bad manifest, the failure budget exceeded, ...)."""


SAMPLE_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, IndexError, pickle.UnpicklingError)


# ------------------------------------------------------------------------------------------ manifests

@dataclass(frozen=True)
class Row:
    task: str  # "t2sv" (speech + motion) | "tts" (speech only)
    wav: str
    motion: Optional[str]
    text: Optional[str]  # None: the sidecar {wav stem}.json holds it
    source: str  # "manifest:line"
    sidecar_optional: bool = False  # TXT motion list: '' when there is no sidecar

    @property
    def key(self) -> str:
        """Identity of the clip (feature cache key): task + absolute wav and motion paths."""
        ident = f"{self.task}|{os.path.abspath(self.wav)}|{os.path.abspath(self.motion) if self.motion else ''}"
        return hashlib.sha1(ident.encode("utf-8", "surrogatepass")).hexdigest()[:24]  # same bytes for valid text

    @property
    def label(self) -> str:
        return self.wav if self.motion is None else f"{self.wav} + {self.motion}"


def data_root(data_args: Optional[DataArguments] = None) -> str:
    if data_args is not None and data_args.data_root:
        return data_args.data_root
    return os.environ.get("DATA_ROOT", "")


def resolve(path: str, root: str) -> str:
    """`path` prefixed with `root` when relative and root is set (the reference's _resolve)."""
    path = os.path.expanduser(path)
    if not path or os.path.isabs(path) or not root:
        return path
    return os.path.join(root, path)


def _need_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")


def read_csv(path: str, root: str = "") -> List[Row]:
    _need_file(path, "T2SV CSV")
    with open(path, newline="", encoding="utf-8", errors=MANIFEST_ERRORS) as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("motion_pt_path", "wav_path") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
        return [Row("t2sv", resolve(r["wav_path"], root), resolve(r["motion_pt_path"], root), r.get("text") or "",
                    f"{path}:{n + 2}") for n, r in enumerate(reader)]


def _lines(path: str):
    with open(path, encoding="utf-8", errors=MANIFEST_ERRORS) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield n, line.strip()


def read_motion_list(path: str, video_dir: str, root: str = "") -> List[Row]:
    _need_file(path, "TXT motion list")
    rows = []
    for n, motion in _lines(path):
        name = os.path.splitext(os.path.basename(motion))[0]
        rows.append(Row("t2sv", resolve(os.path.join(video_dir, f"{name}.wav"), root), resolve(motion, root), None,
                        f"{path}:{n}", sidecar_optional=True))
    return rows


def read_tts_list(path: str, root: str = "") -> List[Row]:
    _need_file(path, "TTS list")
    return [Row("tts", resolve(wav, root), None, None, f"{path}:{n}") for n, wav in _lines(path)]


def read_jsonl(path: str, root: str = "") -> List[Row]:
    _need_file(path, "JSONL manifest")
    rows = []
    for n, line in _lines(path):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("wav"), str) or not obj["wav"]:
            raise DataError(f"{path}:{n}: expected an object with a \"wav\" path")
        for key in ("motion", "text"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DataError(f"{path}:{n}: \"{key}\" must be a string")
        motion = obj.get("motion") or None
        rows.append(Row("t2sv" if motion else "tts", resolve(obj["wav"], root),
                        resolve(motion, root) if motion else None, obj.get("text"), f"{path}:{n}"))
    return rows


def read_manifest(path: str, data_args: Optional[DataArguments] = None) -> List[Row]:
    root = data_root(data_args)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return read_csv(path, root)
    if ext in (".jsonl", ".json"):
        return read_jsonl(path, root)
    video_dir = (data_args.video_dir if data_args and data_args.video_dir
                 else os.environ.get("VIDEO_DIR", DEFAULT_VIDEO_DIR))
    return read_motion_list(path, video_dir, root)


def main_manifest_path(data_args: DataArguments) -> str:
    if data_args.data_path:
        return data_args.data_path
    if "TRAIN_CSV" not in os.environ and "TRAIN_TXT" in os.environ:
        return os.environ["TRAIN_TXT"]
    return os.environ.get("TRAIN_CSV", DEFAULT_TRAIN_CSV)


def build_rows(data_args: DataArguments, tts_data_path: Optional[str] = None, log=print) -> List[Row]:
    """The training rows: the main manifest, then the TTS list (the smaller set up-sampled, as the reference)."""
    main = read_manifest(main_manifest_path(data_args), data_args)
    rows = list(main)
    if tts_data_path:
        ext = os.path.splitext(tts_data_path)[1].lower()
        tts = (read_jsonl(tts_data_path, data_root(data_args)) if ext in (".jsonl", ".json")
               else read_tts_list(tts_data_path, data_root(data_args)))
        n_main, n_tts = len(rows), len(tts)
        if n_main and n_tts and n_main != n_tts:
            repeat = max(1, round(max(n_main, n_tts) / min(n_main, n_tts)))
            if n_tts > n_main:
                rows = rows * repeat
                log(f"[data] T2SV rows up-sampled {repeat}x: {n_main} -> {len(rows)}")
            else:
                tts = tts * repeat
                log(f"[data] TTS rows up-sampled {repeat}x: {n_tts} -> {len(tts)}")
        rows += tts
    if not rows:
        raise DataError(f"{main_manifest_path(data_args)}: no training rows")
    n_t2sv = sum(r.task == "t2sv" for r in rows)
    log(f"[data] {len(rows)} rows: {n_t2sv} T2SV (speech + motion), {len(rows) - n_t2sv} TTS (speech only)")
    return rows


# ------------------------------------------------------------------------------------------ files

def load_motion(path: str) -> torch.Tensor:
    """A motion file -> raw (T, 40) LIA-X motion, float32: .pt/.pth (a tensor, read weights-only through
    safe_load), .npy (no pickles), or a .safetensors with motion_raw (infer.py --save-latents)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: motion file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as e:  # noqa: BLE001 - any failure means "not a motion array"
            raise SampleError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    elif ext == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                obj = f.get_tensor("motion_raw")
        except Exception as e:  # noqa: BLE001
            raise SampleError(f"{path}: no readable motion_raw tensor ({type(e).__name__})") from None
    else:
        obj = safe_torch_load(path, "motion file")
    try:
        return checked_motion(obj, path)
    except ValueError as e:
        raise SampleError(str(e)) from None


def read_text(row: Row) -> str:
    if row.text is not None:
        return row.text
    sidecar = os.path.splitext(row.wav)[0] + ".json"
    if not os.path.isfile(sidecar):
        if row.sidecar_optional:
            return ""
        raise FileNotFoundError(f"{sidecar}: transcript (sidecar .json) not found")
    with open(sidecar, encoding="utf-8", errors=MANIFEST_ERRORS) as f:
        obj = json.load(f)
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise SampleError(f"{sidecar}: expected {{\"text\": \"...\"}}")
    return obj["text"]


def text_problem(text: str) -> Optional[str]:
    """Why a transcript cannot be tokenized, or None: bytes that are not UTF-8 (kept as U+DC80..U+DCFF when
    the manifest was read) or another lone surrogate (a JSON "\\ud800" escape)."""
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            return f"is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {i})"
        if 0xD800 <= code <= 0xDFFF:
            return f"holds a lone surrogate U+{code:04X} at character {i} (not a character)"
    return None


def printable(text: str) -> str:
    """`text` with lone surrogates (undecodable bytes of a path) written as \\udcff escapes, safe to print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def mel_frames(n_samples_16k: int) -> int:
    """The reference's mel_len: floor(seconds * 25), at least 1, at most 750."""
    raw = math.floor((n_samples_16k / float(WHISPER_SAMPLE_RATE)) * FPS) if n_samples_16k > 0 else 0
    return int(max(1, min(raw, MAX_FRAMES)))


def audio_inputs(wav_path: str, start_frame: int = 0, n_frames: Optional[int] = None) -> dict:
    """The audio side of one sample: 24 kHz and 16 kHz audio (the whole file resampled, then cut to the
    frames [start, start + n_frames) at 960 / 640 samples per frame, or to its first 30 s when n_frames is
    None), the Whisper log-mel (1, 128, 3000) and mel_len."""
    wav, sr = load_audio(wav_path)
    audio_24k = resample(wav, sr, CODEC_SAMPLE_RATE)
    audio_16k = resample(wav, sr, WHISPER_SAMPLE_RATE)
    if n_frames is None:
        audio_16k = audio_16k[:WHISPER_SAMPLE_RATE * MAX_SECONDS]
        audio_24k = audio_24k[:CODEC_SAMPLE_RATE * MAX_SECONDS]
    else:
        audio_16k = audio_16k[start_frame * SAMPLES_PER_FRAME_16K:(start_frame + n_frames) * SAMPLES_PER_FRAME_16K]
        audio_24k = audio_24k[start_frame * SAMPLES_PER_FRAME:(start_frame + n_frames) * SAMPLES_PER_FRAME]
    return {"audio": audio_24k.contiguous(), "audio16k": audio_16k.contiguous(),
            "feat": log_mel_spectrogram(audio_16k)[None], "mel_len": mel_frames(audio_16k.numel())}


def file_stamp(path: str) -> list:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


# ------------------------------------------------------------------------------------------ feature cache

class FeatureCache:
    """Reader of a folder written by training/precompute.py: cache_meta.json, index-*.jsonl (one line per
    clip: key, shard, mel_len, wav stamp) and safetensors shards holding <key>.latents (mel_len, 32) and
    <key>.speaker (256,)."""

    def __init__(self, folder: str):
        self.folder = folder
        meta_path = os.path.join(folder, "cache_meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"{folder}: not a feature cache (no cache_meta.json; run training/precompute.py)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.entries = {}
        for name in sorted(os.listdir(folder)):
            if name.startswith("index-") and name.endswith(".jsonl"):
                self.entries.update(read_index(os.path.join(folder, name)))
        self._open = {}

    def __len__(self):
        return len(self.entries)

    def entry(self, row: Row) -> dict:
        entry = self.entries.get(row.key)
        if entry is None:
            raise SampleError(f"{row.label}: not in the feature cache {self.folder} (run training/precompute.py "
                              "on this manifest)")
        if os.path.isfile(row.wav) and file_stamp(row.wav) != entry.get("wav_stamp"):
            raise SampleError(f"{row.wav}: changed since its features were cached (size/mtime differ); run "
                              "training/precompute.py again")
        return entry

    def tensors(self, entry: dict):
        from safetensors import safe_open

        shard = entry["shard"]
        handle = self._open.get(shard)
        if handle is None:
            if len(self._open) >= 32:
                self._open.clear()
            handle = self._open[shard] = safe_open(os.path.join(self.folder, shard), framework="pt")
        key = entry["key"]
        return handle.get_tensor(f"{key}.latents").float(), handle.get_tensor(f"{key}.speaker").float()

    def __getstate__(self):  # DataLoader workers re-open the shards themselves
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


def read_index(path: str) -> dict:
    """{key: entry} of one index file; a torn last line (a kill during the append) is ignored."""
    entries = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "key" in obj and "shard" in obj:
                entries[obj["key"]] = obj
    return entries


# ------------------------------------------------------------------------------------------ data set

class TalkerDataset(torch.utils.data.Dataset):
    """Map-style data set of training samples (see the module docstring)."""

    def __init__(self, rows: List[Row], tokenizer, model_args, feature_cache: Optional[FeatureCache] = None,
                 seed: int = 0):
        self.rows = rows
        self.tokenizer = add_placeholder_tokens(tokenizer)
        self.patch_size = int(model_args.patch_size)
        self.delay = int(model_args.delay)
        self.model_max_length = int(model_args.model_max_length)
        self.cache = feature_cache
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer's data loader at every epoch: the 30 s windows depend on it."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        skipped = []
        for attempt in range(min(len(self.rows), MAX_SUBSTITUTES)):
            j = (i + attempt) % len(self.rows)
            try:
                item = self.load(j)
            except SAMPLE_ERRORS as e:
                skipped.append((self.rows[j].label, failure_reason(e)))
                continue
            item["skipped"] = skipped
            return item
        raise DataError(f"{len(skipped)} consecutive samples from index {i} failed to load, e.g. "
                        + "; ".join(f"{printable(label)}: {printable(reason)}" for label, reason in skipped[:3]))

    def window_start(self, i: int, n_frames: int) -> int:
        """Start of the 30 s window of a longer clip: random per (seed, epoch, index); 0 with a feature cache
        (which holds the first 30 s)."""
        if n_frames <= MAX_FRAMES or self.cache is not None:
            return 0
        return random.Random(f"{self.seed}:{self.epoch}:{i}").randint(0, n_frames - MAX_FRAMES)

    def load(self, i: int, start_frame: Optional[int] = None, with_audio: Optional[bool] = None) -> dict:
        """Sample i, or the reason it cannot be used (SampleError and the other SAMPLE_ERRORS).
        start_frame / with_audio: the window start and whether to load the audio (precompute: 0 / True)."""
        row = self.rows[i]
        with_audio = self.cache is None if with_audio is None else with_audio
        PS = self.patch_size
        text = read_text(row)
        problem = text_problem(text)
        if problem:
            raise SampleError(f"{row.source}: the text {problem}")
        found = control_tokens_in(self.tokenizer, text)
        if found:
            raise SampleError(f"{row.source}: the text contains the model's control tokens {', '.join(found)}")
        item = {"task_tag": 1 if row.task == "t2sv" else 0, "sample_path": row.label}
        start, n_motion = 0, None
        if row.task == "t2sv":
            motion = normalize_motion(load_motion(row.motion))
            start = self.window_start(i, motion.shape[0]) if start_frame is None else start_frame
            motion = motion[start:start + MAX_FRAMES]
            n_motion = motion.shape[0]
        else:
            motion = torch.zeros((0, MOTION_DIM))
        if with_audio:
            item.update(audio_inputs(row.wav, start, n_motion))
        else:
            entry = self.cache.entry(row)
            latents, speaker = self.cache.tensors(entry)
            item.update(speech_latents=latents, speaker_emb=speaker, mel_len=int(entry["mel_len"]))
        if item["mel_len"] <= PS:
            raise SampleError(f"{row.wav}: audio too short ({item['mel_len']} frames; the loss needs at least "
                              f"{PS + 1}, i.e. two patches)")
        if row.task == "t2sv":
            motion_len = max(PS, (n_motion // PS) * PS)
            motion = motion[:motion_len]
        else:
            motion_len = 0
        try:
            ids, mask, span = build_chat_and_spans(self.tokenizer, self.model_max_length, item["mel_len"],
                                                   motion_len, PS, text, self.delay, SPEECH_TOKEN)
        except ValueError as e:
            raise SampleError(f"{row.source}: {e}") from None
        item.update(input_ids=ids[0], attention_mask=mask[0], speech_span=span, motion=motion.float(),
                    motion_len=motion_len)
        return item


def failure_reason(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (SampleError, FileNotFoundError)) or text.startswith("/"):
        return text.splitlines()[0]
    return f"{type(err).__name__}: {text.splitlines()[0]}"


class Collator:
    """Pads a list of samples to the longest one (the reference's DynamicPadCollator): input ids with the
    pad id, motion to a multiple of the patch size, audio / latents with zeros; carries the samples' paths
    and the samples skipped to make the batch."""

    def __init__(self, pad_token_id: Optional[int], patch_size: int = 4):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.patch_size = patch_size

    @staticmethod
    def _pad(tensors, length, tail_shape=()):
        out = tensors[0].new_zeros((len(tensors), length) + tuple(tail_shape))
        for i, t in enumerate(tensors):
            out[i, :t.shape[0]] = t
        return out

    def __call__(self, batch: List[dict]) -> dict:
        PS, B = self.patch_size, len(batch)
        n_tok = max(s["input_ids"].numel() for s in batch)
        input_ids = torch.full((B, n_tok), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, n_tok), dtype=torch.bool)
        for i, s in enumerate(batch):
            input_ids[i, :s["input_ids"].numel()] = s["input_ids"]
            attention_mask[i, :s["attention_mask"].numel()] = s["attention_mask"]
        n_motion = max(s["motion"].shape[0] for s in batch)
        n_motion = -(-n_motion // PS) * PS
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "motion": self._pad([s["motion"] for s in batch], n_motion, (MOTION_DIM,)),
            "speech_span": torch.stack([s["speech_span"] for s in batch]),
            "mel_len": torch.tensor([s["mel_len"] for s in batch], dtype=torch.long),
            "motion_len": torch.tensor([s["motion_len"] for s in batch], dtype=torch.long),
            "task_tag": torch.tensor([s["task_tag"] for s in batch], dtype=torch.long),
        }
        if "speech_latents" in batch[0]:
            n_lat = max(s["speech_latents"].shape[0] for s in batch)
            out["speech_latents"] = self._pad([s["speech_latents"] for s in batch], n_lat,
                                              batch[0]["speech_latents"].shape[1:])
            out["speaker_emb"] = torch.stack([s["speaker_emb"] for s in batch])
        else:
            out["audio"] = self._pad([s["audio"] for s in batch], max(s["audio"].numel() for s in batch))[:, None]
            out["audio16k"] = self._pad([s["audio16k"] for s in batch],
                                        max(s["audio16k"].numel() for s in batch))[:, None]
            out["feat"] = torch.stack([s["feat"] for s in batch])
        out["sample_paths"] = [s["sample_path"] for s in batch]
        out["skipped"] = [pair for s in batch for pair in s.get("skipped", [])]
        return out


# ------------------------------------------------------------------------------------------ failure budget

class FailureMonitor:
    """Reports each sample that failed to load once (path and reason) and stops the run when more than
    `max_fraction` of the distinct samples (this rank's share) failed."""

    def __init__(self, rows: List[Row], max_fraction: float, world_size: int = 1, log_path: Optional[str] = None,
                 log=print):
        self.n_distinct = len({r.label for r in rows})
        self.max_fraction = float(max_fraction)
        self.limit = self.max_fraction * self.n_distinct / max(1, world_size)
        self.failed = {}
        self.log_path = log_path
        self.log = log

    def record(self, skipped) -> None:
        for label, reason in skipped or ():
            if label in self.failed:
                continue
            self.failed[label] = reason
            self.log(f"[data] skipped {printable(label)}: {printable(reason)}")
            if self.log_path:
                os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"sample": label, "reason": reason}) + "\n")
        if len(self.failed) > self.limit:
            examples = "; ".join(f"{printable(k)}: {printable(v)}" for k, v in list(self.failed.items())[:3])
            raise DataError(
                f"{len(self.failed)} of {self.n_distinct} samples failed to load, more than max_failed_fraction "
                f"{self.max_fraction:g} allows ({self.limit:.1f}"
                f"{' on this rank' if self.limit != self.max_fraction * self.n_distinct else ''}); e.g. {examples}")
