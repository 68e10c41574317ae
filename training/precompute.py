#!/usr/bin/env python
"""Feature cache: encode every clip of the training manifests once (WhisperX-VAE latents at 25 Hz and the
speaker embedding), so that training runs neither Whisper-large-v3 nor WavLM-Large at every step.

    python training/precompute.py training/config.json feature_cache=/data/talker_cache
    torchrun --nproc_per_node=8 training/precompute.py training/config.json feature_cache=/data/talker_cache
    # then train with the same config and feature_cache=/data/talker_cache

It reads the same config as train.py (data fields, tts_data_path, model_preset and the encoder checkpoints).
Under torchrun rank r encodes the distinct clips i with i % WORLD_SIZE == r (no process group: ranks on
several nodes can share one cache folder). Each rank writes safetensors shards (<key>.latents (frames, 32),
<key>.speaker (256,), float32) and appends one line per clip to its index-r<rank>.jsonl after the shard is
complete; a rerun skips the clips already indexed (resumable), and a clip that cannot be loaded is reported
(failed-r<rank>.jsonl) and left out (training then reports it as not in the cache).

What the cache changes against online encoding (online = the reference's per-step encoding):
- speaker embedding: online, the reference crops every sample's 16 kHz audio to the shortest clip of the
  batch before WavLM (so a clip's embedding depends on its batch); the cache embeds each clip's own first
  mel_len frames (its whole clip, at most 30 s), which is what the online path gives a batch of clips of
  equal length, and what inference does with a reference clip;
- latents: online, the batch's audio is zero-padded to the longest clip before the (convolutional) codec
  encoder, so a shorter clip's last latent frames also see its audio past mel_len * 960 samples or the
  padding; the cache encodes each clip alone, cut to its mel_len frames (equal to online for a batch of
  clips of equal length, at float32 tolerance);
- T2SV clips over 30 s: online, a random 30 s window (motion and audio aligned) per epoch; the cache holds
  the first 30 s, and training with it uses that window every epoch;
- precision: the same as online (float32 on CPU; bf16 autocast on CUDA, as the online path runs inside the
  model's autocast), stored as float32.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

if not __package__:  # launched by path (python training/x.py, torchrun): the repository root is importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from training.dataset import (MAX_FRAMES, SAMPLE_ERRORS, DataArguments, DataError, Row, audio_inputs,  # noqa: E402
                              build_rows, failure_reason, file_stamp, load_motion, printable, read_index)
from training.modeling import ConfigError, TalkerArguments, load_encoders, write_json  # noqa: E402

META = "cache_meta.json"
CACHE_VERSION = 1


def parse(raw: dict):
    import transformers

    from speech_llm import ModelArguments

    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TalkerArguments))
    try:
        return parser.parse_dict(raw, allow_extra_keys=True)  # the TrainingArguments fields are not read
    except ValueError as e:
        raise ConfigError(str(e)) from None


class ClipAudio(torch.utils.data.Dataset):
    """The audio inputs of each clip as training loads them with a feature cache (window start 0)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        try:
            n_frames = None
            if row.task == "t2sv":
                n_frames = min(load_motion(row.motion).shape[0], MAX_FRAMES)
            item = audio_inputs(row.wav, 0, n_frames)
            item["wav_stamp"] = file_stamp(row.wav)
            return i, item, None
        except SAMPLE_ERRORS as e:
            return i, None, failure_reason(e)


class ShardWriter:
    def __init__(self, folder: str, rank: int, shard_size: int):
        self.folder, self.rank, self.shard_size = folder, rank, max(1, int(shard_size))
        self.tensors, self.lines = {}, []
        self.index_path = os.path.join(folder, f"index-r{rank:04d}.jsonl")

    def add(self, row: Row, latents: torch.Tensor, speaker: torch.Tensor, mel_len: int, wav_stamp) -> None:
        self.tensors[f"{row.key}.latents"] = latents.contiguous()
        self.tensors[f"{row.key}.speaker"] = speaker.contiguous()
        self.lines.append({"key": row.key, "task": row.task, "wav": row.wav, "motion": row.motion,
                           "mel_len": int(mel_len), "frames": int(latents.shape[0]), "wav_stamp": wav_stamp})
        if len(self.lines) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        from safetensors.torch import save_file

        from media.atomic import atomic_output

        name = f"part-r{self.rank:04d}-{time.time_ns()}-{secrets.token_hex(3)}.safetensors"
        with atomic_output(os.path.join(self.folder, name)) as tmp:
            save_file(self.tensors, str(tmp), metadata={"format": "pt"})
        with open(self.index_path, "a", encoding="utf-8") as f:  # only after the shard is complete
            for line in self.lines:
                f.write(json.dumps(dict(line, shard=name)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.tensors, self.lines = {}, []


def done_keys(folder: str) -> set:
    keys = set()
    if not os.path.isdir(folder):
        return keys
    for name in os.listdir(folder):
        if name.startswith("index-") and name.endswith(".jsonl"):
            keys |= set(read_index(os.path.join(folder, name)))
    return keys


def check_meta(folder: str, meta: dict, rank: int) -> None:
    path = os.path.join(folder, META)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for key in ("version", "encoders", "speech_dim", "speaker_dim"):
            if old.get(key) != meta.get(key):
                raise ConfigError(f"feature_cache: {folder} was made with {key}={old.get(key)!r}, this run has "
                                  f"{meta.get(key)!r}; use another folder")
    elif rank == 0:
        from media.atomic import atomic_output
        with atomic_output(path) as tmp:
            write_json(str(tmp), meta)


def run(config, overrides=(), workers: int = 0, shard_size: int = 256, log=print) -> dict:
    from speech_llm import encode_speaker, encode_speech_latents
    from training.train import load_config

    raw = load_config(config, overrides)
    model_args, data_args, talker = parse(raw)
    folder = data_args.feature_cache
    if not folder:
        raise ConfigError("feature_cache: set the cache folder (feature_cache=DIR)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    say = log if rank == 0 else (lambda *a, **k: None)
    device = torch.device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available()
                          else "cpu")

    rows, seen = [], set()
    for row in build_rows(data_args, model_args.tts_data_path, say):
        if row.key not in seen:
            seen.add(row.key)
            rows.append(row)
    done = done_keys(folder)
    mine = [r for i, r in enumerate(rows) if i % world == rank and r.key not in done]
    say(f"[precompute] {len(rows)} distinct clips, {len(rows) - sum(r.key not in done for r in rows)} already "
        f"cached; {world} rank(s); device {device}")

    vae, spk, described = load_encoders(talker)
    vae, spk = vae.to(device), spk.to(device)
    os.makedirs(folder, exist_ok=True)  # only once the rows and the encoders are there: no empty folder otherwise
    meta = {"version": CACHE_VERSION, "encoders": described, "speech_dim": int(model_args.speech_embedding_dim),
            "speaker_dim": int(model_args.speaker_embedding_dim), "fps": 25, "window": "first 30 s",
            "speaker_audio": "each clip's own mel_len frames", "dtype": "float32",
            "autocast": "bf16 on CUDA" if device.type == "cuda" else "none"}
    check_meta(folder, meta, rank)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    writer = ShardWriter(folder, rank, shard_size)
    failed_path = os.path.join(folder, f"failed-r{rank:04d}.jsonl")
    loader = torch.utils.data.DataLoader(ClipAudio(mine), batch_size=None, num_workers=workers)
    t0, n_ok, n_failed = time.perf_counter(), 0, 0
    for i, item, reason in loader:
        row = mine[i]
        if item is None:
            n_failed += 1
            log(f"[precompute] skipped {printable(row.label)}: {printable(reason)}")
            with open(failed_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"sample": row.label, "reason": reason}) + "\n")
            continue
        n = item["mel_len"]
        with torch.no_grad(), amp:
            latents = encode_speech_latents(vae, item["audio"][None, None].to(device), item["feat"][None].to(device), n)
            speaker = encode_speaker(spk, item["audio16k"][None].to(device), n)
        writer.add(row, latents[0].float().cpu(), speaker[0].float().cpu(), n, item["wav_stamp"])
        n_ok += 1
        if n_ok % 100 == 0:
            log(f"[precompute] rank {rank}: {n_ok}/{len(mine)} clips, {n_ok / (time.perf_counter() - t0):.2f} clips/s")
    writer.flush()
    seconds = time.perf_counter() - t0
    log(f"[precompute] rank {rank}: encoded {n_ok} clips, skipped {n_failed}, in {seconds:.1f} s -> {folder}")
    return {"encoded": n_ok, "skipped": n_failed, "already_cached": len(rows) - len([r for r in rows
                                                                                    if r.key not in done]),
            "seconds": seconds, "folder": folder}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the training config (JSON)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of config fields (feature_cache=DIR)")
    ap.add_argument("--workers", type=int, default=2, help="data loader workers decoding audio (default 2)")
    ap.add_argument("--shard-size", type=int, default=256, help="clips per safetensors shard (default 256)")
    args = ap.parse_args(argv)
    try:
        from training.train import load_config, set_threads
        set_threads(load_config(args.config, args.overrides))
        run(args.config, args.overrides, args.workers, args.shard_size)
    except ConfigError as e:  # the config cannot run (train.py's exit status for it)
        print(f"precompute.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (DataError, FileNotFoundError) as e:
        print(f"precompute.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
