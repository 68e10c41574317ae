#!/usr/bin/env python
"""Talker-T2AV: a talking-head video with speech, from text (t2av), audio (a2v), video (v2a), or speech only (tts).

    python infer.py --demo                                   # tiny random models, bundled samples, offline
    python infer.py --text "Hello there." --output out.mp4   # real weights (see --checkpoint-dir / --download)
    python infer.py --mode a2v --audio speech.wav --ref-video face.mp4 --output out.mp4
    python infer.py --mode v2a --video silent.mp4 --text "its transcript" --ref-audio voice.wav
    python infer.py --mode tts --text "Hello." --output out.wav
    torchrun --nproc_per_node=N infer.py --batch-file prompts.jsonl   # each rank takes its share of lines

Environment variables (as the reference): CHECKPOINT_DIR, WHISPERVAE_CKPT, LIAX_CKPT, WAVLM_CKPT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROG = "infer.py"
BATCH_KEYS = ("mode", "text", "ref_audio", "ref_video", "ref_motion", "audio", "video", "motion", "output", "seed",
              "cfm_steps", "cfm_temperature", "cfm_cfg", "gt_prefix_seconds", "trim_prefix", "max_seconds")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0],
                                 formatter_class=_HelpFormatter)
    g = ap.add_argument_group("what to generate")
    g.add_argument("--mode", choices=("t2av", "a2v", "v2a", "tts"), default="t2av",
                   help="t2av: text -> speech + face video; a2v: --audio drives the face; v2a: --video (or "
                        "--motion) gets new speech from --text; tts: speech only (wav)")
    g.add_argument("--text", default=None,
                   help="text to speak (the transcript in a2v/v2a). Default: samples/default_text.txt; in a2v "
                        "the default is no transcript (empty), the motion then follows the audio alone")
    g.add_argument("--ref-audio", default=None,
                   help="reference voice (speaker timbre + prompt prefix); any rate/channels, <= 30 s. "
                        "Default: samples/reference_voice.wav")
    g.add_argument("--ref-video", default=None,
                   help="reference face video: its first frame is the face; its motion is the prompt when "
                        "--ref-motion is absent. Default: samples/reference_face.mp4")
    g.add_argument("--ref-motion", default=None,
                   help="reference LIA-X motion (.pt, (frames, 40) raw); default: extracted from --ref-video")
    g.add_argument("--audio", default=None, help="a2v: the driving speech (<= 30 s). Default: the sample voice")
    g.add_argument("--video", default=None,
                   help="v2a: the talking-head video to dub (<= 30 s); its frames are kept. Default: sample face")
    g.add_argument("--motion", default=None, help="v2a: driving motion (.pt, (frames, 40) raw, 25 fps) instead "
                                                  "of --video; rendered on the --ref-video face")
    g.add_argument("--output", default="output.mp4",
                   help="output mp4; the wav is written beside it (tts: only the wav)")
    g.add_argument("--batch-file", default=None,
                   help="jsonl, one request per line with keys among: " + ", ".join(BATCH_KEYS) +
                        "; missing keys take the command-line values. Under torchrun each rank takes lines "
                        "i with i %% WORLD_SIZE == RANK")
    g.add_argument("--save-latents", action="store_true",
                   help="also write <output>.latents.safetensors (speech latents, motion)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="t2av/tts: cap on the generated length (at most 30). Default: as released, the "
                        "reference clip's length + 0.6 s")
    g.add_argument("--trim-prefix", action="store_true",
                   help="t2av/tts: drop the prefix replayed from the reference clip from the output (the "
                        "reference keeps it)")

    g = ap.add_argument_group("sampling (defaults = the released code)")
    g.add_argument("--cfm-steps", type=int, default=10, help="Euler steps per patch")
    g.add_argument("--cfm-temperature", type=float, default=0.3,
                   help="initial-noise scale (the released code uses 0.3; the paper reports 0.7)")
    g.add_argument("--cfm-cfg", type=float, default=2.0, help="classifier-free guidance scale")
    g.add_argument("--gt-prefix-seconds", type=float, default=0.5,
                   help="seconds of the reference clip fed before generation (0: voice/face identity only)")
    g.add_argument("--fps", type=int, default=25, help="frame rate (the model is 25 fps only)")
    g.add_argument("--seed", type=int, default=0, help="random seed: same seed, same output on the same device")

    g = ap.add_argument_group("weights")
    g.add_argument("--demo", action="store_true",
                   help="tiny RANDOM models built in memory: runs offline in seconds, output is not speech")
    g.add_argument("--checkpoint-dir", default=None,
                   help="Talker-T2AV folder (model.safetensors, config.json, tokenizer). Default: $CHECKPOINT_DIR, "
                        "then the hub cache")
    g.add_argument("--llm-name", default="Qwen/Qwen3-0.6B",
                   help="accepted for compatibility: the backbone weights are in model.safetensors; this only "
                        "names a tokenizer source (local path or hub cache) if the checkpoint folder has none")
    g.add_argument("--whisperx-vae-ckpt", default=None, help="WhisperX-VAE model.ckpt (default: $WHISPERVAE_CKPT)")
    g.add_argument("--liax-ckpt", default=None, help="LIA-X lia-x.pt (default: $LIAX_CKPT)")
    g.add_argument("--wavlm-ckpt", default=None, help="wavlm_large_finetune.pth (default: $WAVLM_CKPT)")
    g.add_argument("--wavlm-backbone-ckpt", default=None,
                   help="WavLM-Large.pt, only if the speaker checkpoint lacks the WavLM weights")
    g.add_argument("--download", action="store_true",
                   help="fetch missing weights from the Hugging Face hub into its cache (LIA-X: CC BY-NC 4.0)")
    g.add_argument("--wavlm-repo", default=None, help="hub repository of the speaker checkpoint "
                                                      "(default: bezzam/wavlm_large_finetune_seed_tts_eval)")
    g.add_argument("--wavlm-filename", default=None, help="file name in --wavlm-repo (default: "
                                                          "wavlm_large_finetune.pth; size checked for the default)")
    g.add_argument("--licences", action="store_true", help="print the licence of each weight file and exit")

    g = ap.add_argument_group("devices")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available; under "
                                                  "torchrun cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="backbone dtype (auto: bfloat16 on CUDA as the reference, float32 on CPU)")
    g.add_argument("--render-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="LIA-X decoder convolution dtype (bfloat16: ~2x faster on CPU, small error)")
    g.add_argument("--render-batch-size", type=int, default=None,
                   help="frames per LIA-X batch (default: chosen from free memory)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


class UserError(Exception):
    """A problem with the command line or the inputs: reported in one line, exit code 1."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    return " ".join(text.split()) or type(err).__name__


def _dist_env():
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, world, local_rank, local_world


def read_batch_file(path: str) -> list:
    """[(line number, request dict)] of a jsonl file; blank lines and lines starting with # are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: batch file not found")
    requests = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(req, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(req).__name__}")
        req = {k.replace("-", "_"): v for k, v in req.items()}
        unknown = sorted(set(req) - set(BATCH_KEYS))
        if unknown:
            raise ValueError(f"{path}:{lineno}: unknown keys {unknown} (allowed: {', '.join(BATCH_KEYS)})")
        for key, kind in (("seed", int), ("cfm_steps", int), ("cfm_temperature", float), ("cfm_cfg", float),
                          ("gt_prefix_seconds", float), ("max_seconds", float),
                          ("trim_prefix", bool)):
            if key in req and req[key] is not None:
                if kind is bool and not isinstance(req[key], bool):
                    raise ValueError(f"{path}:{lineno}: {key} must be true or false, got {req[key]!r}")
                try:
                    req[key] = kind(req[key])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{lineno}: {key} must be a number, got {req[key]!r}") from None
        for key in ("mode", "text", "ref_audio", "ref_video", "ref_motion", "audio", "video", "motion", "output"):
            if key in req and req[key] is not None and not isinstance(req[key], str):
                raise ValueError(f"{path}:{lineno}: {key} must be a string, got {req[key]!r}")
        requests.append((lineno, req))
    if not requests:
        raise ValueError(f"{path}: no requests in the batch file")
    return requests


def _requests(args) -> list:
    """[(label, kwargs for TalkerPipeline.generate)] for this rank."""
    base = dict(mode=args.mode, text=args.text, ref_audio=args.ref_audio, ref_video=args.ref_video,
                ref_motion=args.ref_motion, audio=args.audio, video=args.video, motion=args.motion,
                output=args.output, seed=args.seed, cfm_steps=args.cfm_steps, cfm_temperature=args.cfm_temperature,
                cfm_cfg=args.cfm_cfg, gt_prefix_seconds=args.gt_prefix_seconds, trim_prefix=args.trim_prefix,
                fps=args.fps, max_seconds=args.max_seconds)
    if not args.batch_file:
        return [("", base)]
    rank, world, _, _ = _dist_env()
    stem = os.path.splitext(args.output)[0]
    out = []
    for i, (lineno, req) in enumerate(read_batch_file(args.batch_file)):
        if i % world != rank:
            continue
        kwargs = dict(base, output=f"{stem}_{i:04d}.mp4")
        kwargs.update(req)
        out.append((f"{args.batch_file}:{lineno}: ", kwargs))
    return out


def _dtype(name):
    import torch

    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_pipeline(args, modes):
    import torch

    import weights
    from pipeline import TalkerPipeline

    rank, world, local_rank, local_world = _dist_env()
    device = args.device
    if device is None:
        device = f"cuda:{local_rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cpu") and local_world > 1:  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if str(device).startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    render_dtype = _dtype(args.render_dtype)
    if args.demo:
        if str(device).startswith("cpu") and "OMP_NUM_THREADS" not in os.environ:
            # the tiny models are too small for intra-op threads: synchronisation would dominate (and
            # spin-waiting makes it 10x slower when another process holds a core)
            torch.set_num_threads(1)
        return TalkerPipeline.demo(device=device, seed=0, render_dtype=render_dtype,
                                   render_batch_size=args.render_batch_size, verbose=rank == 0)
    needs = sorted({c for m in modes for c in weights.needed_for(m)}, key=weights.COMPONENTS.index)
    return TalkerPipeline.from_pretrained(
        args.checkpoint_dir, args.whisperx_vae_ckpt, args.liax_ckpt, args.wavlm_ckpt,
        wavlm_backbone_ckpt=args.wavlm_backbone_ckpt, llm_name=args.llm_name, device=device,
        dtype=_dtype(args.dtype), render_dtype=render_dtype, render_batch_size=args.render_batch_size,
        needs=needs, download=args.download, wavlm_repo=args.wavlm_repo, wavlm_filename=args.wavlm_filename)


def run(args) -> int:
    import weights

    if args.licences:
        print(weights.licence_text())
        return 0
    if args.render_batch_size is not None and args.render_batch_size < 1:
        raise UserError(f"--render-batch-size must be >= 1, got {args.render_batch_size}")
    rank, world, _, _ = _dist_env()
    if world > 1 and not args.batch_file and rank != 0:
        print(f"[rank {rank}] nothing to do: without --batch-file only rank 0 runs", flush=True)
        return 0
    requests = _requests(args)
    if not requests:
        print(f"[rank {rank}] no lines of {args.batch_file} fall to this rank", flush=True)
        return 0

    pipe = load_pipeline(args, {kw.get("mode", "t2av") for _, kw in requests})
    failed = 0
    for label, kwargs in requests:
        try:
            result = pipe.generate(**kwargs, save_latents=args.save_latents, progress=not args.quiet)
        except (ValueError, OSError) as e:
            if not args.batch_file:
                raise
            failed += 1
            print(f"{PROG}: error: {label}{_one_line(e)}", file=sys.stderr, flush=True)
            continue
        for warning in result.warnings:
            print(f"{PROG}: warning: {label}{warning}", file=sys.stderr, flush=True)
        written = [p for p in (result.video_path, result.wav_path, result.latents_path) if p]
        print(f"{label}{result.summary()}", flush=True)
        print(f"{label}[talker] wrote " + ", ".join(written), flush=True)
        if pipe.is_demo:
            print("[talker] (demo: random weights, not real speech or faces)", flush=True)
    if failed:
        print(f"{PROG}: error: {failed} of {len(requests)} requests failed", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        return run(args)
    except (UserError, ValueError, OSError) as e:  # FileNotFoundError and MissingWeightsError are OSErrors
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted after {time.perf_counter() - t0:.0f} s; no partial output was left",
              file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    if "--download" not in sys.argv[1:]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched unless asked for
    sys.exit(main())
