#!/usr/bin/env python
"""Talker-T2AV evaluation: the paper's metrics (WER/CER, UTMOS, FID, FVD, Sync-C/D) and SIM on generated clips.

    python evaluate.py --demo                                        # 3 clips, random weights, offline, < 1 min
    python evaluate.py --manifest test.csv --outputs DIR             # score DIR/<id>.mp4 (or .wav) of any system
    python evaluate.py --manifest test.csv --outputs DIR --generate  # run Talker-T2AV over the manifest first
    torchrun --nproc_per_node=N evaluate.py --manifest test.csv --outputs DIR --generate   # ranks share rows
    python evaluate.py make-manifest --clips DIR --transcripts FILE --protocol cross-sentence --out test.csv
    python evaluate.py --licences                                    # the metric checkpoints and their licences

Manifest (CSV with a header; paths relative to the manifest): id, lang (zh|en) required; mode (t2av|a2v|v2a,
default t2av), text (the transcript), prompt_audio (speaker prompt), prompt_face (reference face),
gt_video (ground-truth clip with audio), driving_audio (a2v, default: gt_video's audio), speaker.
See evaluation/manifest.py for what each column feeds.

Metrics (--metrics, default all; a mode is scored on what it generates):
  wer    ASR (--asr qwen3-asr, the paper's, or whisper-large-v3) -> seed-tts-eval's WER (en) / CER (zh)  t2av v2a
  utmos  UTMOS22 strong predicted MOS                                                                 t2av v2a
  sim    cosine of WavLM-Large ECAPA-TDNN embeddings, generated vs prompt audio                       t2av v2a
  sync   SyncNet Sync-C / Sync-D / AV offset on S3FD face tracks (--face-crop aligned: whole frame)  all modes
  fid    pytorch-fid Inception pool3, generated frames vs gt_video frames, per (mode, lang) set       t2av a2v
  fvd    I3D (StyleGAN-V TorchScript), first 16 frames at 25 fps, per (mode, lang) set                 t2av a2v
Audio metrics read <id>.wav when it exists (Talker-T2AV writes it beside the mp4), else the mp4's audio.

Outputs (--results, default <outputs>/eval): results.csv (one row per clip, a `skipped` column), summary.json,
report.md (the paper's tables, its published rows and the difference), plots/*.png. Written all-or-nothing.
Exit codes: 0 report written; 1 bad command line or manifest; 2 metric or model weights not found.
Environment variables: SYNCNET_CKPT, S3FD_CKPT, UTMOS_CKPT, FID_INCEPTION_CKPT, I3D_CKPT, ASR_MODEL_DIR,
WAVLM_CKPT (and for --generate infer.py's CHECKPOINT_DIR, WHISPERVAE_CKPT, LIAX_CKPT).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROG = "evaluate.py"
METRICS = ("wer", "utmos", "sync", "fid", "fvd", "sim")
FVD_FRAMES = 16  # frames per FVD clip (StyleGAN-V's 16-frame protocol), taken from the start at 25 fps
DEMO_SEED = 1234
DEMO_BANNER = ("*" * 100 + "\n*** DEMO EVALUATION: the generator AND every metric network are RANDOMLY INITIALISED "
               "(fixed seeds),\n*** the ASR is a stand-in that returns random words, FVD's I3D is a tiny random "
               "TorchScript.\n*** THE NUMBERS BELOW MEAN NOTHING: they only show that the whole evaluation path "
               "runs.\n" + "*" * 100)


class UserError(Exception):
    """A problem with the command line or the inputs: one line, exit code 1."""


class WeightsMissing(Exception):
    """Metric checkpoints (or the model's weights for --generate) not found: one line, exit code 2."""


def _report(kind: str, text: str) -> None:
    print(f"{PROG}: {kind}: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    import infer

    ap = argparse.ArgumentParser(
        prog=PROG, description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]))
    g = ap.add_argument_group("what to score")
    g.add_argument("--manifest", help="CSV: id, lang, mode, text, prompt_audio, prompt_face, gt_video, "
                                      "driving_audio, speaker (details below)")
    g.add_argument("--outputs", help="folder of the clips to score: <id>.mp4 (and/or <id>.wav); --generate "
                                     "writes here. With --demo: default outputs/eval_demo")
    g.add_argument("--results", help="where results.csv, summary.json, report.md, plots/ go (default "
                                     "<outputs>/eval)")
    g.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of " + ",".join(METRICS))
    g.add_argument("--generate", action="store_true",
                   help="first run Talker-T2AV over the manifest (each row's mode) into --outputs: resumable "
                        "(clips already there are kept), rows shared over torchrun ranks (RANK/WORLD_SIZE; then "
                        "each rank only generates: run again without torchrun to score)")
    g.add_argument("--seed", type=int, default=0, help="generation seed (--generate)")
    g.add_argument("--asr", choices=("qwen3-asr", "whisper-large-v3"), default="qwen3-asr",
                   help="ASR for WER/CER: Qwen3-ASR (the paper's) or Whisper-large-v3 (seed-tts-eval's English)")
    g.add_argument("--asr-batch-size", type=int, default=8, help="clips per ASR batch")
    g.add_argument("--face-crop", choices=("s3fd", "aligned"), default=None,
                   help="SyncNet input: s3fd (default) = the reference's S3FD detect-track-crop pipeline; aligned "
                        "(the --demo default) = the whole frame resized to 224x224, a fast path for clips that "
                        "already are aligned face crops (e.g. LIA-X output)")
    g.add_argument("--fvd-variant", choices=("common_metrics", "stylegan_v"), default="common_metrics",
                   help="FVD pipeline: common_metrics (resize + centre crop outside the I3D, covariance over N-1) "
                        "or stylegan_v (the TorchScript resizes, covariance over N)")
    g.add_argument("--fid-frames", type=int, default=0,
                   help="frames per clip for FID, evenly spaced (0: every frame)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    g = ap.add_argument_group("metric checkpoints (flag > environment variable > hub cache > torch.hub folder)")
    from evaluation import metric_weights as mw

    for c in mw.CHECKPOINTS.values():
        g.add_argument(c.flag, metavar="PATH", help=f"{c.filename}: {c.what} (default: ${c.env})")
    g.add_argument("--asr-model", metavar="DIR", help=f"ASR model folder (default: ${mw.ASR_ENV}, then the hub "
                                                      f"cache of {', '.join(mw.ASR_REPOS.values())})")
    g.add_argument("--licences", action="store_true", help="print where every metric checkpoint comes from, its "
                                                           "size/sha256 where known and its licence, and exit")

    infer.add_model_options(ap)
    for action in ap._actions:  # the shared options, worded for this tool
        if "--demo" in action.option_strings:
            action.help = ("3-clip evaluation made from samples/: the demo generator, RANDOM metric networks and a "
                           "stand-in ASR; offline, under a minute on 2 CPU cores; the numbers mean nothing")
        elif "--download" in action.option_strings:
            action.help = ("fetch missing metric checkpoints (hub mirror or the publisher's URL; see --licences) and, "
                           "with --generate, the model's weights (infer.py --download); nothing is fetched otherwise")
        elif "--wavlm-ckpt" in action.option_strings:
            action.help = "wavlm_large_finetune.pth: the SIM speaker encoder (and the model's; default: $WAVLM_CKPT)"
    return ap


def build_make_manifest_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"{PROG} make-manifest",
        description="Build an evaluation manifest from a folder of talking-head clips and their transcripts.",
        epilog="The paper (§4.3) names its test sets (200 clips each; zh DH-FaceVid-1K, en HDTF + Hallo3) but not "
               "precisely how the prompt voice and face were chosen. cross-sentence (default) takes them from "
               "another clip of the same speaker, as seed-tts-eval's test sets do, so the prompt never contains "
               "the target sentence; continuation takes the clip's own first seconds (the target text stays "
               "the whole transcript: no aligner cuts it).")
    ap.add_argument("--clips", required=True, help="folder of clips (video with audio); one sub-folder per speaker "
                                                   "unless the transcripts have a speaker column")
    ap.add_argument("--transcripts", required=True, help="CSV/TSV with a header (clip, text, optional lang, "
                                                         "speaker) or JSONL with those keys; clip = a path under "
                                                         "--clips, extension optional")
    ap.add_argument("--protocol", choices=("cross-sentence", "continuation"), default="cross-sentence")
    ap.add_argument("--out", required=True, help="manifest to write (prompt files go to <out stem>_prompts/)")
    ap.add_argument("--lang", choices=("zh", "en"), help="language of clips without a lang value")
    ap.add_argument("--mode", choices=("t2av", "a2v", "v2a"), default="t2av", help="mode column of every row")
    ap.add_argument("--prompt-seconds", type=float, default=3.0, help="continuation: prompt length")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def parse_metrics(text: str) -> tuple:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown metric {unknown[0]!r} (choose from {','.join(METRICS)})")
    if not names:
        raise UserError("--metrics: no metric named")
    return tuple(m for m in METRICS if m in names)


def dist_env():
    """(RANK, WORLD_SIZE) as torchrun sets them (checked by infer.py's reader)."""
    import infer

    return infer.dist_env()[:2]


def _device(args) -> str:
    import torch

    if args.device:
        if str(args.device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------ demo

def prepare_demo(args) -> None:
    """The demo's inputs from samples/ and its manifest: two t2av rows, one a2v row, and one deliberately
    broken row (its reference face does not exist) that shows how a bad row is reported."""
    from media import video_io
    from evaluation.manifest import extract_audio, write_manifest
    from runtime.inputs import DEFAULT_REF_AUDIO, DEFAULT_REF_VIDEO, DEFAULT_TEXT_FILE, SAMPLES

    outputs = Path(args.outputs or "outputs/eval_demo")
    inputs = outputs / "demo_inputs"
    # the demo's "real" clips: the sample face with the sample voice, forwards and backwards (two distinct
    # real videos, so that FVD has a covariance to compare)
    gt = [inputs / "ground_truth_a.mp4", inputs / "ground_truth_b.mp4"]
    if not gt[0].is_file():
        video_io.mux_audio(DEFAULT_REF_VIDEO, DEFAULT_REF_AUDIO, gt[0])
    if not gt[1].is_file():
        frames, fps = video_io.read_frames(DEFAULT_REF_VIDEO)
        video_io.write_video(gt[1], frames[::-1], fps=fps, audio_path=DEFAULT_REF_AUDIO)
    driving = inputs / "driving_2s.wav"
    if not driving.is_file():
        extract_audio(DEFAULT_REF_AUDIO, driving, seconds=2.0)
    texts = [json.loads(line)["text"] for line in (SAMPLES / "prompts.jsonl").read_text().splitlines() if line]
    texts = [DEFAULT_TEXT_FILE.read_text(encoding="utf-8").strip()] + texts
    face, voice = os.path.relpath(DEFAULT_REF_VIDEO, inputs), os.path.relpath(DEFAULT_REF_AUDIO, inputs)
    rows = [dict(id=f"demo_t2av_{i}", lang="en", mode="t2av", text=t, prompt_audio=voice, prompt_face=face,
                 gt_video=gt[i].name, speaker="sample") for i, t in enumerate(texts[:2])]
    rows.append(dict(id="demo_a2v_0", lang="en", mode="a2v", text="", prompt_audio=voice, prompt_face=face,
                     gt_video=gt[0].name, driving_audio=driving.name, speaker="sample"))
    rows.append(dict(id="demo_broken_row", lang="en", mode="t2av", text=texts[2], prompt_audio=voice,
                     prompt_face="no_such_face.mp4", gt_video=gt[0].name, speaker="sample"))
    write_manifest(rows, inputs / "manifest.csv")
    args.manifest, args.outputs = str(inputs / "manifest.csv"), str(outputs)
    args.generate = True
    args.face_crop = args.face_crop or "aligned"  # the demo's clips are LIA-X face crops
    if args.fid_frames == 0:
        args.fid_frames = 2  # keeps the random Inception's share of the demo to a few seconds


@contextlib.contextmanager
def _seeded(seed: int):
    """Random initialisation under a fixed seed, leaving the global generator as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class DemoASR:
    """Stand-in ASR for --demo: random words (seeded by the clip's length) from a fixed list."""
    WORDS = ("talking", "face", "speech", "random", "weights", "demo", "the", "a", "of", "voice", "video")

    def transcribe(self, waves_16k, lang) -> list:
        import numpy as np

        out = []
        for wave in waves_16k:
            rng = np.random.default_rng(len(wave))
            out.append(" ".join(rng.choice(self.WORDS, size=int(rng.integers(3, 12)))))
        return out


def tiny_i3d_standin():
    """A tiny random TorchScript with the I3D detector's interface, built in memory for --demo (the real
    i3d_torchscript.pt is 50+ MB): forward(x (B, 3, T, H, W), rescale, resize, return_features) -> (B, 400)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TinyI3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv3d(3, 400, kernel_size=(4, 16, 16), stride=(4, 16, 16))

        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = True) -> torch.Tensor:
            x = x.float()
            if rescale:
                x = x / 255.0 * 2 - 1
            if resize:
                x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
            return self.proj(x).mean(dim=(2, 3, 4))

    with _seeded(DEMO_SEED + 5):
        return torch.jit.script(TinyI3D().eval())


# ------------------------------------------------------------------------------------------ weights

@dataclass
class MetricModels:
    """Paths of the checkpoints (resolved up front), loaded one model at a time by the stage that needs it."""
    args: argparse.Namespace
    metrics: tuple
    paths: dict
    sources: dict
    demo: bool = False

    @classmethod
    def resolve(cls, args, metrics) -> "MetricModels":
        from evaluation import metric_weights as mw

        if args.demo:
            return cls(args, metrics, {}, {}, demo=True)
        names = mw.needed(metrics, args.face_crop)
        given = {n: getattr(args, n, None) for n in mw.CHECKPOINTS}
        given.update(asr=args.asr_model, wavlm=args.wavlm_ckpt)
        try:
            found = mw.locate(names, given, asr=args.asr, wavlm_repo=args.wavlm_repo,
                              wavlm_filename=args.wavlm_filename)
        except (FileNotFoundError, ValueError) as e:  # a flag or variable naming a missing file
            import infer

            raise WeightsMissing(infer.message_of(e)) from None
        if found.missing(names) and args.download:
            try:
                found = mw.download(names, found, asr=args.asr, progress=not args.quiet)
            except (OSError, ValueError) as e:
                raise WeightsMissing(" ".join(str(e).split())) from None
        missing = found.missing(names)
        if missing:
            raise WeightsMissing(mw.missing_message(missing, args.asr))
        return cls(args, metrics, found.paths, found.sources)

    def summary(self) -> dict:
        if self.demo:
            return {"all": {"path": "random initialisation (demo)", "source": f"seed {DEMO_SEED}"}}
        return {k: {"path": v, "source": self.sources.get(k)} for k, v in self.paths.items()}

    def load(self, name: str, device: str):
        """The model of a stage: the real class with the released weights, or (demo) randomly initialised."""
        if name == "asr":
            if self.demo:
                return DemoASR()
            from evaluation.asr import load_asr

            return load_asr(self.args.asr, self.paths["asr"], device=device, batch_size=self.args.asr_batch_size)
        if name == "i3d" and self.demo:
            return tiny_i3d_standin().to(device)
        if self.demo:
            with _seeded(DEMO_SEED + ("utmos", "syncnet", "s3fd", "fid_inception", "wavlm").index(name)):
                model = _demo_model(name)
            return model.to(device).eval()
        path = self.paths[name]
        if name == "utmos":
            from evaluation.utmos import load_utmos

            return load_utmos(path).to(device)
        if name == "syncnet":
            from evaluation.syncnet import load_syncnet

            return load_syncnet(path, device=device)
        if name == "s3fd":
            from evaluation.s3fd import load_s3fd

            return load_s3fd(path, device=device)
        if name == "fid_inception":
            from evaluation.fid import load_fid_inception

            return load_fid_inception(path, device=device)
        if name == "i3d":
            from evaluation.fvd import load_i3d

            return load_i3d(path, device=device)
        if name == "wavlm":
            from evaluation.sim import load_encoder

            return load_encoder(path, self.args.wavlm_backbone_ckpt, device=device)
        raise KeyError(name)


def _demo_model(name: str):
    if name == "utmos":
        from evaluation.utmos import UTMOS22Strong

        return UTMOS22Strong()
    if name == "syncnet":
        from evaluation.syncnet import SyncNet

        return SyncNet()
    if name == "s3fd":
        from evaluation.s3fd import S3FD

        return S3FD()
    if name == "fid_inception":
        from evaluation.fid import FIDInception

        return FIDInception()
    import speaker_verification

    return speaker_verification.tiny_speaker_encoder(DEMO_SEED)


def check_model_weights(args, rows) -> None:
    """--generate: the model's weights must be there before anything runs (infer.py's lookup)."""
    from runtime import weights

    if args.demo:
        return
    modes = {r.mode for r in rows}
    needs = sorted({c for m in modes for c in weights.needed_for(m)}, key=weights.COMPONENTS.index)
    extra = {k: v for k, v in (("wavlm_repo", args.wavlm_repo), ("wavlm_filename", args.wavlm_filename)) if v}
    try:
        paths = weights.locate(args.checkpoint_dir, args.whisperx_vae_ckpt, args.liax_ckpt, args.wavlm_ckpt, **extra)
    except (OSError, ValueError) as e:
        raise WeightsMissing(" ".join(str(e).split())) from None
    if paths.missing(needs) and not args.download:
        raise WeightsMissing(weights.missing_message(paths.missing(needs), cli=True).replace(
            "`python infer.py --demo`", "`python evaluate.py --demo`"))


# ------------------------------------------------------------------------------------------ generation

def _driving_audio(row, outputs: Path) -> str:
    """a2v's driving audio: driving_audio, else the gt_video's audio track extracted once to a wav."""
    from evaluation.manifest import extract_audio

    if row.driving_audio:
        return row.driving_audio
    wav = outputs / ".eval_inputs" / f"{row.id}.driving.wav"
    if not wav.is_file():
        extract_audio(row.gt_video, wav)
    return str(wav)


def generation_request(row, output: Path, args):
    from runtime.request import GenerationRequest

    fields = dict(mode=row.mode, ref_audio=row.prompt_audio, ref_video=row.prompt_face, output=str(output),
                  seed=args.seed)
    if row.mode == "t2av":
        fields.update(text=row.text, trim_prefix=True)  # only the generated part is scored
    elif row.mode == "a2v":
        fields.update(text=row.text or "", audio=_driving_audio(row, Path(args.outputs)))
    else:
        fields.update(text=row.text, video=row.gt_video)
    return GenerationRequest.from_mapping(fields)


def generate(args, rows, progress: bool) -> dict:
    """Run Talker-T2AV over this rank's rows whose <id>.mp4 is not there yet; {id: why it failed}."""
    import torch

    import infer
    from evaluation.manifest import GENERATE_FIELDS
    from runtime.inputs import preflight

    rank, world = dist_env()
    outputs = Path(args.outputs)
    mine = [r for i, r in enumerate(rows) if i % world == rank]
    todo, failed, done = [], {}, 0
    for row in mine:
        output = outputs / f"{row.id}.mp4"
        if output.is_file():  # written atomically: present = finished
            done += 1
            continue
        problem = row.problem_with(GENERATE_FIELDS[row.mode])
        try:
            if problem:
                raise ValueError(problem)
            todo.append((row, preflight(generation_request(row, output, args))))
        except (ValueError, OSError) as e:
            failed[row.id] = f"generation: {infer.message_of(e, in_batch_line=True)}"
            _report("error", f"{row.label}: {failed[row.id]}")
    print(f"[generate] rank {rank}/{world}: {len(mine)} rows, {done} already generated, {len(todo)} to generate, "
          f"{len(failed)} cannot be generated", flush=True)
    if not todo:
        return failed
    threads = torch.get_num_threads()
    args.batch_file = str(args.manifest)  # load_pipeline: many requests, keep every model resident
    pipe = infer.load_pipeline(args, {req.mode for _, req in todo})
    from tqdm.auto import tqdm

    try:
        for row, req in tqdm(todo, desc="generate", unit="clip", disable=not progress):
            try:
                result = pipe.generate(req, progress=False)
            except (ValueError, OSError) as e:
                failed[row.id] = f"generation: {infer.message_of(e, in_batch_line=True)}"
                _report("error", f"{row.label}: {failed[row.id]}")
                continue
            for warning in result.warnings:
                _report("warning", f"{row.label}: {warning}")
    finally:
        torch.set_num_threads(threads)  # the demo generator runs on one thread; the metric networks use all
        del pipe
    return failed


# ------------------------------------------------------------------------------------------ scoring

@dataclass
class Clip:
    row: object  # ManifestRow
    result: object  # report.ClipResult
    metrics: tuple = ()  # what this clip is scored on
    audio_path: Optional[str] = None
    video_path: Optional[str] = None
    video_has_audio: bool = False
    _audio: Optional[tuple] = None

    def wants(self, metric: str) -> bool:
        return metric in self.metrics and not any(s.startswith(metric + ":") for s in self.result.skipped)

    def audio(self):
        """(mono float32 waveform, native rate) of the clip, read once."""
        if self._audio is None:
            from evaluation.manifest import read_audio

            self._audio = read_audio(self.audio_path)
        return self._audio


def inspect_clips(rows, outputs: Path, metrics: tuple, generation_failures: dict, progress: bool) -> list:
    """The output files of each row, their streams, and which metrics can run (the others get their reason)."""
    from tqdm.auto import tqdm

    from evaluation.manifest import METRIC_FIELDS, MODE_METRICS, streams
    from evaluation.report import ClipResult

    clips = []
    for row in tqdm(rows, desc="inspect", unit="clip", disable=not progress):
        clip = Clip(row, ClipResult(row.id, row.lang, row.mode),
                    tuple(m for m in metrics if m in MODE_METRICS[row.mode]))
        clips.append(clip)
        mp4, wav = outputs / f"{row.id}.mp4", outputs / f"{row.id}.wav"
        if not mp4.is_file() and not wav.is_file():
            why = generation_failures.get(row.id) or f"no output: {mp4} (or .wav) not found"
            for m in clip.metrics:
                clip.result.skip(m, why)
            continue
        try:
            info = streams(mp4) if mp4.is_file() else {"video": False, "audio": False}
        except (ValueError, OSError) as e:
            info = {"video": False, "audio": False, "error": " ".join(str(e).split())}
        if info["video"]:
            clip.video_path = clip.result.video_file = str(mp4)
            clip.video_has_audio = info["audio"]
        if wav.is_file():
            clip.audio_path = str(wav)
        elif info["audio"]:
            clip.audio_path = str(mp4)
        clip.result.audio_file = clip.audio_path or ""
        for m in clip.metrics:
            problem = None
            if m in ("wer", "utmos", "sim") and clip.audio_path is None:
                problem = info.get("error") or f"{mp4.name}: no audio stream (and no {wav.name})"
            elif m in ("fid", "fvd", "sync") and clip.video_path is None:
                problem = info.get("error") or (f"{mp4.name}: no video stream" if mp4.is_file() else
                                                f"audio-only output ({wav.name})")
            elif m == "sync" and not clip.video_has_audio:
                problem = f"{mp4.name}: the video has no audio track"
            problem = problem or row.problem_with(METRIC_FIELDS[m])
            if problem:
                clip.result.skip(m, problem)
    return clips


def _bar(items, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="clip", disable=not progress)


def _guard(clip, metric: str, fn) -> bool:
    """Run one clip's metric; a ValueError/OSError skips it with its one-line reason (other clips go on)."""
    try:
        fn()
        return True
    except (ValueError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        clip.result.skip(metric, reason)
        _report("warning", f"{clip.row.label}: {metric}: {reason}")
        return False


def score_wer(clips, models, device, progress) -> None:
    from evaluation.asr import fft_resample_16k
    from evaluation.text import utterance_wer

    todo = [c for c in clips if c.wants("wer")]
    if not todo:
        return
    asr = models.load("asr", device)
    for lang in ("zh", "en"):
        group = [c for c in todo if c.row.lang == lang]
        waves, ready = [], []
        for clip in _bar(group, f"wer ({lang}: read)", progress):
            if _guard(clip, "wer", lambda clip=clip: waves.append(fft_resample_16k(*clip.audio()))):
                ready.append(clip)
        batch = max(1, models.args.asr_batch_size)
        for start in _bar(range(0, len(ready), batch), f"wer ({lang}: asr)", progress):
            chunk = ready[start:start + batch]
            texts = asr.transcribe(waves[start:start + batch], lang)
            for clip, hyp in zip(chunk, texts):
                clip.result.values["asr_text"] = hyp

                def one(clip=clip, hyp=hyp):
                    try:
                        clip.result.values["wer"] = utterance_wer(clip.row.text, hyp, lang)
                    except ValueError:
                        raise ValueError("text: the transcript has no words after normalisation") from None
                _guard(clip, "wer", one)


def score_utmos(clips, models, device, progress) -> None:
    import torch

    todo = [c for c in clips if c.wants("utmos")]
    if not todo:
        return
    model = models.load("utmos", device)
    with torch.no_grad():
        for clip in _bar(todo, "utmos", progress):
            def one(clip=clip):
                wave, sr = clip.audio()
                clip.result.values["utmos"] = float(model(wave[None].to(device), sr)[0])
            _guard(clip, "utmos", one)


def score_sim(clips, models, device, progress) -> None:
    from evaluation.manifest import read_audio
    from evaluation.sim import load_wav, speaker_similarity

    todo = [c for c in clips if c.wants("sim")]
    if not todo:
        return
    encoder = models.load("wavlm", device)
    for clip in _bar(todo, "sim", progress):
        def one(clip=clip):
            wave, sr = clip.audio()
            prompt = clip.row.prompt_audio
            prompt_wave, prompt_sr = load_wav(prompt) if Path(prompt).suffix.lower() in (".wav", ".flac") \
                else read_audio(prompt)
            clip.result.values["sim"] = speaker_similarity(encoder, wave, sr, prompt_wave, prompt_sr)
        _guard(clip, "sim", one)


def aligned_crop(video_path, out_path) -> str:
    """--face-crop aligned: the whole frame resized to SyncNet's 224x224 at 25 fps, audio kept, as an avi like
    the reference pipeline's crops (for clips that already are aligned face crops)."""
    from media import video_io

    cmd = [video_io.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(video_path),
           "-map", "0:V:0", "-map", "0:a:0", "-vf", "scale=224:224:flags=bicubic", "-r", "25",
           "-c:v", "mpeg4", "-qscale:v", "2", "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(out_path)]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ValueError(f"{video_path}: cannot make the 224x224 clip ({err[-1] if err else res.returncode})")
    return str(out_path)


def score_sync(clips, models, device, face_crop: str, progress) -> None:
    from evaluation.syncnet import evaluate_file

    todo = [c for c in clips if c.wants("sync")]
    if not todo:
        return
    syncnet = models.load("syncnet", device)
    detector = models.load("s3fd", device) if face_crop == "s3fd" else None
    for clip in _bar(todo, f"sync ({face_crop})", progress):
        def one(clip=clip):
            with tempfile.TemporaryDirectory(prefix="eval_sync_") as tmp:
                crop = os.path.join(tmp, "crop.avi")
                if detector is not None:
                    from evaluation.face_crop import crop_face_track

                    crop = crop_face_track(detector, clip.video_path, crop)
                else:
                    aligned_crop(clip.video_path, crop)
                res = evaluate_file(syncnet, crop, tmp_dir=tmp)
            clip.result.values.update(sync_offset=int(res.offset), sync_conf=float(res.conf),
                                      sync_min_dist=float(res.min_dist))
        _guard(clip, "sync", one)


def _frame_indices(n: int, want: int):
    import numpy as np

    if want <= 0 or want >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, want)).astype(np.int64))


def score_fid(clips, models, device, fid_frames: int, progress) -> dict:
    """{(mode, lang): (generated features, real features)} of every clip that can be scored."""
    import torch

    from media import video_io
    from evaluation.fid import pool3_features

    todo = [c for c in clips if c.wants("fid")]
    if not todo:
        return {}
    model = models.load("fid_inception", device)

    def features(path):
        frames, _ = video_io.read_frames(path)
        frames = frames[_frame_indices(len(frames), fid_frames)]
        return pool3_features(model, torch.from_numpy(frames).permute(0, 3, 1, 2), batch_size=32)

    return _set_features(todo, "fid", features, "fid_frames", len, progress)


def _set_features(todo, metric: str, features, count_key: str, count, progress, label=None) -> dict:
    """{(mode, lang): (generated features, real features)}: each clip's features beside those of its
    ground-truth clip, each real clip counted once per set (its features computed once)."""
    import numpy as np

    feats, real_cache, real_used = {}, {}, set()
    for clip in _bar(todo, label or metric, progress):
        def one(clip=clip):
            key, gt = (clip.row.mode, clip.row.lang), clip.row.gt_video
            if gt not in real_cache:
                real_cache[gt] = features(gt)
            fake = features(clip.video_path)
            f, r = feats.setdefault(key, ([], []))
            if (key, gt) not in real_used:
                real_used.add((key, gt))
                r.append(real_cache[gt])
            f.append(fake)
            clip.result.values[count_key] = count(fake)
        _guard(clip, metric, one)
    return {k: (np.concatenate(f), np.concatenate(r)) for k, (f, r) in feats.items() if f and r}


def read_fvd_clip(path, n_frames: int):
    """The first n_frames frames of a video on a 25 fps timeline: uint8 (T, H, W, 3)."""
    from media import video_io
    from runtime.inputs import resample_indices

    info = video_io.media_info(path)["video"] or {}
    fps = info.get("fps") or 25.0
    frames, fps = video_io.read_frames(path, max_frames=int(math.ceil(n_frames * fps / 25.0)) + 1)
    frames = frames[resample_indices(len(frames), fps)]
    if len(frames) < n_frames:
        raise ValueError(f"{path}: {len(frames)} frames at 25 fps, FVD uses {n_frames}")
    return frames[:n_frames]


def score_fvd(clips, models, device, variant: str, progress) -> dict:
    """{(mode, lang): (generated features (N, 400), real features (M, 400))}."""
    import torch

    from evaluation.fvd import i3d_features

    todo = [c for c in clips if c.wants("fvd")]
    if not todo:
        return {}
    detector = models.load("i3d", device)

    def features(path):
        frames = torch.from_numpy(read_fvd_clip(path, FVD_FRAMES)).permute(0, 3, 1, 2)[None]  # (1, T, 3, H, W)
        videos = frames if variant == "stylegan_v" else frames.float() / 255
        return i3d_features(detector, videos, batch_size=1, variant=variant)

    return _set_features(todo, "fvd", features, "fvd_frames", lambda _: FVD_FRAMES, progress,
                         label=f"fvd ({variant})")


# ------------------------------------------------------------------------------------------ sets

def frechet_low_rank(fake, real) -> float:
    """The Fréchet distance of two feature sets (N1, D), (N2, D) (covariances over N-1) through the N1 x N2
    matrix of centred products: tr sqrtm(S1 S2) is the sum of the singular values of A B^T / sqrt((N1-1)(N2-1)),
    exact when the covariances are rank-deficient. The demo uses it for FID, whose 2048x2048 scipy sqrtm alone
    takes about a minute on 2 cores; real runs use evaluation.frechet (the reference's path)."""
    import numpy as np

    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    a, b = fake - fake.mean(axis=0), real - real.mean(axis=0)
    c1, c2 = len(fake) - 1, len(real) - 1
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt(c1 * c2)
    mean_term = float(np.square(fake.mean(axis=0) - real.mean(axis=0)).sum())
    return mean_term + float((a * a).sum() / c1 + (b * b).sum() / c2 - 2 * trace_sqrt)


def summarise(clips, metrics, fid_feats, fvd_feats, fvd_variant, demo: bool = False) -> dict:
    """One GroupResult per (mode, lang): the per-clip means and the set-level FID / FVD."""
    import numpy as np

    from evaluation.frechet import feature_stats, frechet_distance
    from evaluation.fvd import fvd_from_features, stylegan_v_batch_size
    from evaluation.manifest import MODE_METRICS
    from evaluation.report import GroupResult
    from evaluation.sim import aggregate
    from evaluation.text import corpus_wer

    groups = {}
    for clip in clips:
        key = (clip.row.mode, clip.row.lang)
        g = groups.setdefault(key, GroupResult(*key))
        g.n_clips += 1
    for key, g in groups.items():
        members = [c for c in clips if (c.row.mode, c.row.lang) == key]
        scored = set(MODE_METRICS[key[0]]) & set(metrics)

        def have(name):
            return [c for c in members if name in c.result.values]

        if "wer" in scored and have("wer"):
            g.values["wer"] = corpus_wer([(c.row.text, c.result.values["asr_text"]) for c in have("wer")], key[1])
            g.counts["wer"] = len(have("wer"))
        for metric, column in (("utmos", "utmos"), ("sync_c", "sync_conf"), ("sync_d", "sync_min_dist")):
            base = "sync" if metric.startswith("sync") else metric
            if base in scored and have(column):
                g.values[metric] = float(np.mean([c.result.values[column] for c in have(column)]))
                g.counts[metric] = len(have(column))
        if "sim" in scored and have("sim"):
            g.values["sim"] = aggregate([c.result.values["sim"] for c in have("sim")], ndigits=None)[0]
            g.counts["sim"] = len(have("sim"))
        if "fid" in scored:
            fake, real = fid_feats.get(key, (None, None))
            if fake is None or len(fake) < 2 or len(real) < 2:
                g.notes["fid"] = "needs at least 2 generated and 2 real frames"
            elif demo:
                g.values["fid"] = frechet_low_rank(fake, real)
                g.counts["fid"] = len(fake)
            else:
                (mu1, s1), (mu2, s2) = feature_stats(fake, ddof=1), feature_stats(real, ddof=1)
                g.values["fid"] = float(frechet_distance(mu1, s1, mu2, s2, variant="pytorch_fid"))
                g.counts["fid"] = len(fake)
        if "fvd" in scored:
            fake, real = fvd_feats.get(key, (None, None))
            if fake is None or len(fake) < 2 or len(real) < 2:
                n = 0 if fake is None else len(fake)
                n_real = 0 if real is None else len(real)
                g.notes["fvd"] = (f"needs at least 2 generated and 2 real videos of {FVD_FRAMES} frames "
                                  f"(got {n} and {n_real})")
            else:
                batch = stylegan_v_batch_size(FVD_FRAMES) if fvd_variant == "stylegan_v" else None
                g.values["fvd"] = float(fvd_from_features(fake, real, variant=fvd_variant, batch_size=batch))
                g.counts["fvd"] = len(fake)
        for metric in ("wer", "utmos", "sim", "fid", "fvd", "sync_c", "sync_d"):
            base = "sync" if metric.startswith("sync") else metric
            if metric not in g.values and metric not in g.notes:
                if base not in metrics:
                    g.notes[metric] = "not requested (--metrics)"
                elif base in MODE_METRICS[key[0]]:
                    g.notes[metric] = "every clip of the set was skipped (see Skipped)"
        for metric, value in list(g.values.items()):
            if value is None or not math.isfinite(value):
                g.values[metric] = None
                g.notes[metric] = "not finite (too few samples for a covariance?)"
    return groups


def method_notes(args, metrics) -> list:
    ddof = {"common_metrics": "N-1 (np.cov, as common_metrics_on_video_quality)",
            "stylegan_v": "N (StyleGAN-V FeatureStats, raw moments)"}[args.fvd_variant]
    notes = []
    if "wer" in metrics:
        asr = "a stand-in ASR (random words, demo)" if args.demo else args.asr
        notes.append(f"WER/CER: {asr} transcribes each clip in its manifest language; seed-tts-eval's "
                     "normalisation (punctuation removed, en lower-cased, zh hypothesis to simplified, zh scored per "
                     "character); the set figure is the unweighted mean of the per-clip rates, as a fraction.")
    if "utmos" in metrics:
        notes.append("UTMOS: UTMOS22 strong (tarepan/SpeechMOS) on each clip's whole audio at its own rate (resampled "
                     "to 16 kHz inside), mean over clips.")
    if "sync" in metrics:
        crop = ("S3FD face detection, tracking and crop (joonson/syncnet_python run_pipeline)"
                if args.face_crop == "s3fd" else "the whole frame resized to 224x224 (--face-crop aligned)")
        notes.append(f"Sync-C / Sync-D: SyncNet v2 (joonson/syncnet_python evaluate, vshift 15) on {crop}; "
                     "Sync-C = confidence, Sync-D = minimum mean distance; mean over clips.")
    if "fid" in metrics:
        frames = "every frame" if args.fid_frames <= 0 else f"{args.fid_frames} evenly spaced frames"
        notes.append(f"FID: pytorch-fid Inception pool3 of {frames} per clip, generated clips vs their gt_video, "
                     "per (mode, language) set; covariance over N-1 (np.cov); pytorch-fid's Fréchet distance"
                     + (" (demo: its trace term from the N x N matrix of centred products, exact for these "
                        "rank-deficient covariances, instead of the 2048 x 2048 sqrtm)." if args.demo else "."))
    if "fvd" in metrics:
        notes.append(f"FVD: variant {args.fvd_variant}; the first {FVD_FRAMES} frames of each clip on a 25 fps "
                     f"timeline; I3D Kinetics-400 logits; covariance over {ddof}; each gt_video counted once per set.")
    if "sim" in metrics:
        notes.append("SIM: cosine of WavLM-Large ECAPA-TDNN embeddings of the generated audio and the prompt audio "
                     "(seed-tts-eval); mean over clips. Not in the paper's tables.")
    notes.append("Audio metrics read <id>.wav when it exists (Talker-T2AV writes it beside the mp4), else the mp4's "
                 "audio track; --generate trims the replayed reference prefix from t2av outputs (trim_prefix).")
    return notes


# ------------------------------------------------------------------------------------------ run

def run(args) -> int:
    from evaluation import metric_weights as mw
    from evaluation import report
    from evaluation.manifest import ManifestError, read_manifest

    if args.licences:
        from runtime import weights

        print(mw.licence_table())
        print("\nModel weights used by --generate (infer.py --licences):\n" + weights.licence_text())
        return 0
    metrics = parse_metrics(args.metrics)
    if args.asr_batch_size < 1:
        raise UserError(f"--asr-batch-size must be >= 1, got {args.asr_batch_size}")
    if args.demo:
        print(DEMO_BANNER, flush=True)
        prepare_demo(args)
    if not args.manifest or not args.outputs:
        raise UserError("--manifest and --outputs are required (or --demo)")
    args.face_crop = args.face_crop or "s3fd"
    progress = not args.quiet
    device = _device(args)
    try:
        manifest = read_manifest(args.manifest)
    except ManifestError as e:
        raise UserError(str(e)) from None
    for line in manifest.errors:
        _report("error", f"{line} (row left out)")
    for row in manifest.rows:
        for name, problem in row.problems.items():
            _report("warning", f"{row.label}: {name}: {problem}")
        if not row.text and row.mode != "a2v":
            _report("warning", f"{row.label}: text: empty transcript")
    if not manifest.rows:
        raise UserError(f"{args.manifest}: no usable row")
    outputs = Path(args.outputs)
    if not args.generate and not outputs.is_dir():
        raise UserError(f"--outputs {outputs}: folder not found")
    models = MetricModels.resolve(args, metrics)  # before any model loads: a missing checkpoint stops here
    if args.generate:
        check_model_weights(args, manifest.rows)
    results = Path(args.results) if args.results else outputs / "eval"

    rank, world = dist_env()
    failures = {}
    if args.generate:
        failures = generate(args, manifest.rows, progress)
        if world > 1:
            print(f"[rank {rank}] generation done; run `python {PROG} --manifest {args.manifest} --outputs "
                  f"{args.outputs}` (no torchrun) once every rank has finished to score", flush=True)
            return 0
    t0 = time.perf_counter()
    stage_seconds, stage_cpu_seconds = {}, {}

    def timed(name, fn, *a):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*a)
        stage_seconds[name] = round(time.perf_counter() - start, 2)
        stage_cpu_seconds[name] = round(time.process_time() - cpu, 2)
        return out

    clips = timed("inspect", inspect_clips, manifest.rows, outputs, metrics, failures, progress)
    timed("wer", score_wer, clips, models, device, progress)
    timed("utmos", score_utmos, clips, models, device, progress)
    timed("sim", score_sim, clips, models, device, progress)
    for clip in clips:
        clip._audio = None  # the audio stages are done
    timed("sync", score_sync, clips, models, device, args.face_crop, progress)
    fid_feats = timed("fid", score_fid, clips, models, device, args.fid_frames, progress)
    fvd_feats = timed("fvd", score_fvd, clips, models, device, args.fvd_variant, progress)
    groups = timed("sets", summarise, clips, metrics, fid_feats, fvd_feats, args.fvd_variant, args.demo)
    cov = "covariance over N-1" if args.fvd_variant == "common_metrics" else "covariance over N"
    meta = {
        "demo": bool(args.demo), "manifest": str(args.manifest), "outputs": str(outputs),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": list(metrics),
        "asr": ("stand-in (random words)" if args.demo else args.asr) if "wer" in metrics else None,
        "face_crop": args.face_crop if "sync" in metrics else None,
        "fvd": (f"{args.fvd_variant} ({cov}; first {FVD_FRAMES} frames at 25 fps)"
                + ("; I3D = tiny random TorchScript stand-in (demo)" if args.demo else "")) if "fvd" in metrics else None,
        "fid": (f"{'every frame' if args.fid_frames <= 0 else f'{args.fid_frames} frames'} per clip; covariance over N-1"
                if "fid" in metrics else None),
        "device": device, "seconds": round(time.perf_counter() - t0, 1), "stage_seconds": stage_seconds,
        "stage_cpu_seconds": stage_cpu_seconds,
        "notes": method_notes(args, metrics), "weights": models.summary(),
    }
    paths = report.write_report(results, meta, groups, [c.result for c in clips], manifest.errors)
    skips = report.skip_summary([c.result for c in clips], manifest.errors)
    print(report.console_table(groups), flush=True)
    print(f"[evaluate] {len(clips)} clips scored in {meta['seconds']} s; {skips['rows_left_out']} row(s) left out, "
          f"{skips['clips_with_skips']} clip(s) with a metric skipped (reasons in the report)", flush=True)
    print(f"[evaluate] wrote {paths['report']}, {paths['results']}, {paths['summary']}", flush=True)
    if args.demo:
        print(DEMO_BANNER, flush=True)
    return 0


def make_manifest_main(argv) -> int:
    from evaluation.manifest import ManifestError, make_manifest

    args = build_make_manifest_parser().parse_args(argv)
    try:
        n, skipped = make_manifest(args.clips, args.transcripts, args.protocol, args.out, lang=args.lang,
                                   mode=args.mode, prompt_seconds=args.prompt_seconds, progress=not args.quiet)
    except (ManifestError, ValueError, OSError) as e:
        _report("error", " ".join(str(e).split()))
        return 1
    for line in skipped:
        _report("warning", f"left out: {line}")
    print(f"[make-manifest] wrote {args.out}: {n} rows ({args.protocol})", flush=True)
    return 0


def main(argv=None) -> int:
    import infer

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["make-manifest"]:
        return make_manifest_main(argv[1:])
    args = build_parser().parse_args(argv)

    def body():
        try:
            return run(args)
        except WeightsMissing as e:
            _report("error", str(e))
            return 2
        except (UserError, infer.UserError) as e:
            _report("error", str(e))
            return 1
        except (ValueError, OSError) as e:
            if infer.SIGNALS_SEEN:  # an error the interruption caused: reported as the interruption
                raise
            _report("error", infer.message_of(e))
            return 1

    return infer.run_interruptible(PROG, body)


if __name__ == "__main__":
    import infer

    infer.run_cli(main, PROG)
