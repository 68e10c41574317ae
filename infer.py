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
import re
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from runtime.request import GenerationRequest, RequestError, field_kind

PROG = "infer.py"
CLI_DEFAULTS = {"output": "output.mp4"}  # the library writes nothing unless asked; the CLI writes here
REQUEST_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(GenerationRequest)}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _add_request_options(ap: argparse.ArgumentParser) -> None:
    """One option per GenerationRequest field: type, default, help and choices come from the field."""
    groups = {}
    for f in fields(GenerationRequest):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], ap.add_argument_group(meta["group"]))
        default = CLI_DEFAULTS.get(f.name, f.default)
        if field_kind(f) == "bool" and f.default is None:  # None = auto: --name / --no-name
            group.add_argument(REQUEST_FLAGS[f.name], action=argparse.BooleanOptionalAction, default=None,
                               help=meta["help"])
            continue
        if field_kind(f) == "bool":
            group.add_argument(REQUEST_FLAGS[f.name], action="store_true", help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(field_kind(f), str)
        group.add_argument(REQUEST_FLAGS[f.name], type=kind, default=default, choices=meta.get("choices"),
                           help=meta["help"])
        if f.name == "output":
            group.add_argument("--batch-file", default=None, help=(
                "jsonl, one request per line with keys among: " + ", ".join(REQUEST_FLAGS) + "; missing keys "
                "take the command-line values. Under torchrun each rank takes lines i with i %% WORLD_SIZE == RANK"))
            group.add_argument("--batch-size", type=int, default=1, help=(
                "with --batch-file: run the generation loops of up to N lines together, as the rows of one loop "
                "(same samples as one by one; more patches per second on CPU and GPU; long-form lines run "
                "alone)"))


def add_model_options(ap: argparse.ArgumentParser):
    """The weights and devices options (load_pipeline reads them); returns the two argument groups."""
    g = weights_group = ap.add_argument_group("weights")
    g.add_argument("--demo", action="store_true",
                   help="tiny RANDOM models built in memory: runs offline in seconds, output is not speech")
    g.add_argument("--checkpoint-dir", default=None,
                   help="Talker-T2AV folder (model.safetensors, config.json, tokenizer). Default: $CHECKPOINT_DIR, "
                        "then the hub cache. With --demo: a tiny SpeechLLM folder (e.g. a tiny training run's "
                        "final/) used in place of the random one")
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

    g = devices_group = ap.add_argument_group("devices")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available; under "
                                                  "torchrun cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="SpeechLLM dtype, backbone and heads (auto: bfloat16 on CUDA as the reference, and on a CPU "
                        "with native bf16, AVX512-BF16/AMX/ARM BF16, where a GEMM probe at the loop's shape finds "
                        "it faster: ~1.7x per patch measured on AVX512-BF16; float32 on other CPUs, where bf16 is "
                        "emulated and 2-3x slower; the summary line says which and why; --demo on CPU: float32. "
                        "Error against float32: README, 'bfloat16 on CPU')")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="run each loop step as a captured CUDA graph over a preallocated KV cache (auto: on "
                        "with CUDA; same numbers as off up to float rounding)")
    g.add_argument("--packed-linear", choices=("auto", "on", "off"), default="auto",
                   help="CPU: the heads' linear layers through oneDNN with their weights packed once (auto: on "
                        "CPU, the layers large enough to gain; on: all of them; same numbers as off up to float "
                        "rounding; +1.2 GiB at full size in float32; the gain depends on the CPU, see the README)")
    g.add_argument("--render-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="LIA-X decoder convolution dtype (auto: bfloat16 on a GPU or CPU with native bf16, as "
                        "--dtype decides: ~2x faster on an AVX512-BF16 CPU; float32 elsewhere; --demo: float32; "
                        "bf16's frame error is of the order of the H.264 encode's own, see the README)")
    g.add_argument("--render-batch-size", type=int, default=None,
                   help="frames per LIA-X batch (default: chosen from free memory)")
    return weights_group, devices_group


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0],
                                 formatter_class=HelpFormatter)
    _add_request_options(ap)
    weights_group, devices_group = add_model_options(ap)
    weights_group.add_argument("--licences", action="store_true",
                               help="print the licence of each weight file and exit")
    devices_group.add_argument("--quiet", action="store_true", help="no progress bars")
    g = ap.add_argument_group("streaming")
    g.add_argument("--stream", nargs="?", const="", default=None, metavar="PATH",
                   help="write a fragmented mp4 (H.264/AAC) that grows while generating, playable at every "
                        "fragment, as <output>.partial.mp4, removed once the output (PATH if given: --stream PATH is "
                        "--output PATH) is written. '-': the stream goes to stdout (every message to stderr) and "
                        "the output is still written")
    g.add_argument("--stream-every", type=int, default=1, metavar="N",
                   help="with --stream: patches (160 ms each) per chunk")
    return ap


# ------------------------------------------------------------------------------------------ messages

class UserError(Exception):
    """A problem with the command line or the inputs: reported in one line, exit code 1."""


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised like KeyboardInterrupt so that every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


SIGNALS_SEEN: list = []  # signals received by run_interruptible's handlers, first first


def _raise_terminated(signum, frame):
    SIGNALS_SEEN.append(signum)
    raise Terminated(signum)


def _raise_interrupt(signum, frame):
    SIGNALS_SEEN.append(signum)
    raise KeyboardInterrupt


def message_of(err: BaseException, in_batch_line: bool = False) -> str:
    """The one-line text of an error; request fields are named by their flag (by their key in a batch line)."""
    from runtime import weights

    if isinstance(err, weights.MissingWeightsError):
        return weights.missing_message(err.components, cli=True)
    if isinstance(err, RequestError):
        name = err.field if in_batch_line else REQUEST_FLAGS.get(err.field, "--" + err.field.replace("_", "-"))
        return " ".join(f"{name}: {err.problem}".split())
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    return " ".join(text.split()) or type(err).__name__


def in_flag_words(text: str) -> str:
    """A library message as the command line says it: request fields named by their flags
    ('face_crop=center' -> '--face-crop center', 'max_seconds' -> '--max-seconds')."""
    for name, flag in REQUEST_FLAGS.items():
        if "_" in name:
            text = re.sub(rf"(?<![\w-]){name}=(\S+)", rf"{flag} \1", text)
            text = re.sub(rf"(?<![\w-]){name}\b", flag, text)
    return text


def dist_env():
    """(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them, checked."""
    def read(name, default, low):
        text = os.environ.get(name, str(default))
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"environment variable {name}={text!r} is not a whole number") from None
        if value < low:
            raise UserError(f"environment variable {name}={value} must be >= {low}")
        return value

    rank, world = read("RANK", 0, 0), read("WORLD_SIZE", 1, 1)
    local_rank, local_world = read("LOCAL_RANK", rank, 0), read("LOCAL_WORLD_SIZE", world, 1)
    if rank >= world:
        raise UserError(f"RANK={rank} is not below WORLD_SIZE={world}: this rank would do nothing")
    return rank, world, local_rank, local_world


def check_device(name) -> None:
    """--device: cpu, cuda or cuda:N (checked before anything loads)."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this program runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# ------------------------------------------------------------------------------------------ requests

@dataclass
class Job:
    label: str  # "" or "prompts.jsonl:LINE: "
    request: Optional[GenerationRequest]  # None when the line is bad
    error: str = ""


def cli_request(args) -> GenerationRequest:
    """The command line's request (flags the user did not give keep the request's defaults)."""
    values = {name: getattr(args, name) for name in REQUEST_FLAGS}
    return GenerationRequest.from_mapping({k: v for k, v in values.items() if v is not None})


def read_batch_file(path: str) -> list:
    """[(line number, dict)] of a jsonl file, or (line number, problem) for lines that are not objects;
    blank lines and lines starting with # are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: batch file not found")
    entries = []
    for lineno, raw in enumerate(p.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            entries.append((lineno, f"not valid UTF-8 (byte {e.start + 1})"))
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            entries.append((lineno, f"not valid JSON ({e.msg})"))
            continue
        except RecursionError:
            entries.append((lineno, "JSON nested too deeply"))
            continue
        if not isinstance(value, dict):
            entries.append((lineno, f"expected a JSON object, got {type(value).__name__}"))
            continue
        entries.append((lineno, {k.replace("-", "_"): v for k, v in value.items()}))
    if not entries:
        raise ValueError(f"{path}: no requests in the batch file")
    return entries


def jobs(args) -> list:
    """This rank's requests, each already checked as far as possible without a model (pipeline.preflight),
    and none writing a file that it or another line reads or that another line writes."""
    from runtime.inputs import preflight

    base = cli_request(args)
    if not args.batch_file:
        return [_spare_files(Job("", preflight(base)), args, {})]
    rank, world, _, _ = dist_env()
    stem = os.path.splitext(args.output)[0]
    out, written = [], {}
    for i, (lineno, entry) in enumerate(read_batch_file(args.batch_file)):
        label = f"{args.batch_file}:{lineno}: "
        if isinstance(entry, str):
            job = Job(label, None, entry)
        else:
            try:
                line_base = GenerationRequest.from_mapping({"output": f"{stem}_{i:04d}.mp4"}, base=base)
                job = Job(label, preflight(GenerationRequest.from_mapping(entry, base=line_base)))
            except (ValueError, OSError, RecursionError) as e:
                job = Job(label, None, message_of(e, in_batch_line=True))
        job = _spare_files(job, args, written)  # every rank checks every line: collisions span ranks
        if i % world == rank:
            out.append(job)
    return out


def _spare_files(job: Job, args, written: dict) -> Job:
    """The job, or a failed job when its outputs (the output group and the stream file) would overwrite an
    input, the batch file, or another line's output (written: {real path: label}, updated)."""
    from runtime.inputs import check_outputs_spare_inputs, output_paths

    if job.request is None:
        return job
    req = job.request
    outputs = output_paths(req.output, req.mode, req.save_latents).members()
    partial = stream_path(args, req)
    if partial not in (None, "-"):
        if Path(os.path.expanduser(partial)).is_dir():
            return Job(job.label, None, f"--stream: {partial} (the growing stream file) is a directory")
        outputs.append(partial)
    try:
        check_outputs_spare_inputs(req, outputs, [("the batch file", args.batch_file)] if args.batch_file else [])
    except ValueError as e:
        return Job(job.label, None, message_of(e, in_batch_line=bool(args.batch_file)))
    for path in outputs:
        earlier = written.get(os.path.realpath(os.path.expanduser(path)))
        if earlier is not None:
            return Job(job.label, None, f"output: {path} is also written by {earlier.rstrip(': ')}")
    for path in outputs:
        written[os.path.realpath(os.path.expanduser(path))] = job.label or "this run"
    return job


# ------------------------------------------------------------------------------------------ running

def _dtype(name):
    import torch

    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_pipeline(args, modes):
    import torch

    from runtime import weights
    from runtime.pipeline import RANDOM_WEIGHTS_BANNER, TalkerPipeline, trained_demo_banner

    if args.render_batch_size is not None and args.render_batch_size < 1:
        raise UserError(f"--render-batch-size must be >= 1, got {args.render_batch_size}")
    rank, world, local_rank, local_world = dist_env()
    device = args.device
    if device is None:
        device = f"cuda:{local_rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cpu") and local_world > 1:  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if args.cuda_graphs == "on" and not str(device).startswith("cuda"):
        raise UserError(f"--cuda-graphs on needs a CUDA device (--device is {device})")
    loop_backend = {"auto": "auto", "on": "cuda_graphs", "off": "eager"}[args.cuda_graphs]
    from common import packed_linear
    try:
        packed_linear.resolve(args.packed_linear, torch.device(device))  # only 'on' without oneDNN fails
    except ValueError as e:
        raise UserError(f"--packed-linear {args.packed_linear}: {e}") from None
    if str(device).startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    render_dtype = _dtype(args.render_dtype)
    if args.demo:
        if rank == 0:
            print(trained_demo_banner(args.checkpoint_dir) if args.checkpoint_dir else RANDOM_WEIGHTS_BANNER,
                  flush=True)
        pipe = TalkerPipeline.demo(device=device, seed=0, render_batch_size=args.render_batch_size,
                                   checkpoint_dir=args.checkpoint_dir,
                                   **({"dtype": _dtype(args.dtype)} if _dtype(args.dtype) else {}),
                                   **({"render_dtype": render_dtype} if render_dtype else {}))
        pipe.loop_backend, pipe.packed_linear = loop_backend, args.packed_linear
        return pipe
    needs = sorted({c for m in modes for c in weights.needed_for(m)}, key=weights.COMPONENTS.index)
    return TalkerPipeline.from_pretrained(
        args.checkpoint_dir, args.whisperx_vae_ckpt, args.liax_ckpt, args.wavlm_ckpt,
        wavlm_backbone_ckpt=args.wavlm_backbone_ckpt, llm_name=args.llm_name, device=device,
        dtype=_dtype(args.dtype), render_dtype=render_dtype, render_batch_size=args.render_batch_size,
        needs=needs, download=args.download, wavlm_repo=args.wavlm_repo, wavlm_filename=args.wavlm_filename,
        low_memory=not args.batch_file,  # one request: each model is dropped once it is done
        loop_backend=loop_backend, packed_linear=args.packed_linear)


def _report(kind: str, text: str) -> None:
    print(f"{PROG}: {kind}: {text}", file=sys.stderr, flush=True)


def _batched_results(pipe, runnable, batch_size: int) -> dict:
    """{id(job): its result, or the error that ended it} of the lines run as rows of batches of batch_size
    (TalkerPipeline.generate_batch: a line that fails leaves the others going)."""
    if batch_size == 1:
        return {}
    results = pipe.generate_batch([j.request for j in runnable], batch_size, progress=False, errors="return")
    return {id(job): result for job, result in zip(runnable, results)}


def run(args) -> int:
    from runtime import weights

    if args.licences:
        print(weights.licence_text())
        return 0
    rank, world, _, _ = dist_env()
    if world > 1 and not args.batch_file and rank != 0:
        print(f"[rank {rank}] nothing to do: without --batch-file only rank 0 runs", flush=True)
        return 0
    todo = jobs(args)
    if not todo:
        print(f"[rank {rank}] no lines of {args.batch_file} fall to this rank", flush=True)
        return 0
    failed = [job for job in todo if job.request is None]
    for job in failed:
        _report("error", f"{job.label}{job.error}")
    runnable = [job for job in todo if job.request is not None]
    if runnable:
        pipe = load_pipeline(args, {job.request.mode for job in runnable})
        batching = args.batch_file and args.stream is None  # a streamed line runs alone
        batched = _batched_results(pipe, runnable, args.batch_size) if batching else {}
    for job in runnable:
        try:
            result = batched.pop(id(job), None) or _generate(pipe, job.request, args)
            if isinstance(result, Exception):
                raise result
        except (ValueError, OSError) as e:
            if not args.batch_file:
                raise
            failed.append(job)
            _report("error", f"{job.label}{message_of(e, in_batch_line=True)}")
            continue
        for warning in result.warnings:
            _report("warning", f"{job.label}{warning if args.batch_file else in_flag_words(warning)}")
        written = [p for p in (result.video_path, result.wav_path, result.latents_path) if p]
        print(f"{job.label}{result.summary()}", flush=True)
        print(f"{job.label}[talker] wrote " + ", ".join(written), flush=True)
        if pipe.is_demo:
            print("[talker] (demo: random weights, not real speech or faces)", flush=True)
    if failed and args.batch_file:
        _report("error", f"{len(failed)} of {len(todo)} requests failed")
    return 1 if failed else 0


def stream_path(args, request) -> Optional[str]:
    """Where --stream writes while generating: '-' (stdout) or <output>.partial.mp4 (removed once the output is
    written; main() has made --stream PATH mean --output PATH)."""
    if args.stream is None:
        return None
    if args.stream == "-":
        return "-"
    return os.path.splitext(request.output or CLI_DEFAULTS["output"])[0] + ".partial.mp4"


def check_stream_flags(args) -> None:
    """--stream PATH is where the result ends up (the --output); --stream - is one stream, so one request."""
    if args.stream == "-" and args.batch_file:
        raise UserError("--stream - writes one fragmented mp4 to stdout: it cannot carry the lines of "
                        f"--batch-file {args.batch_file} (use --stream, each line growing beside its output)")
    if args.stream in (None, "", "-"):
        return
    if args.batch_file:
        raise UserError(f"--stream {args.stream}: with --batch-file each line streams beside its own output: "
                        "give --stream without a path")
    if args.output != CLI_DEFAULTS["output"] and os.path.realpath(args.output) != os.path.realpath(args.stream):
        raise UserError(f"--stream {args.stream} and --output {args.output} name two files: the streamed result "
                        "ends up at the --stream path; give one of them")
    args.output, args.stream = args.stream, ""


def _generate(pipe, request, args):
    """generate(), or with --stream the same result through pipe.stream writing the fragmented mp4."""
    if args.stream is None:
        return pipe.generate(request, progress=not args.quiet)
    result = None
    for item in pipe.stream(request, every=args.stream_every, progress=not args.quiet,
                            mp4=stream_path(args, request)):
        result = item
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--stream-every", args.stream_every), ("--batch-size", args.batch_size)):
        if value < 1:  # checked before anything loads
            _report("error", f"{flag} must be >= 1, got {value}")
            return 1
    try:
        check_stream_flags(args)
        check_device(args.device)
        dist_env()
    except UserError as e:
        _report("error", str(e))
        return 1
    if args.stream == "-":  # stdout carries the mp4: every message goes to stderr
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            return _main(args)
    return _main(args)


def _main(args) -> int:
    def body():
        try:
            return run(args)
        except (UserError, ValueError, OSError) as e:  # FileNotFoundError and MissingWeightsError are OSErrors
            if SIGNALS_SEEN:  # an error the interruption caused: reported as the interruption
                raise
            _report("error", message_of(e))
            return 1

    return run_interruptible(PROG, body)


STOP_HANDLERS = {signal.SIGINT: _raise_interrupt, signal.SIGTERM: _raise_terminated,
                 signal.SIGHUP: _raise_terminated}


def run_interruptible(prog: str, body) -> int:
    """body() with Ctrl-C, SIGTERM and SIGHUP ending it in one line with the shell's exit code (130, 128 + signal);
    the outputs' all-or-nothing writing leaves nothing partial. A signal that lands inside an import can leave a
    library half-imported and surface later as another error (an ImportError, a RecursionError): once a signal
    was received (SIGNALS_SEEN, from the start of the command), any error is reported as the interruption."""
    t0 = time.perf_counter()
    previous = {sig: signal.signal(sig, handler) for sig, handler in STOP_HANDLERS.items()}
    try:
        return body()
    except (KeyboardInterrupt, Terminated, Exception) as e:
        return _stopped(prog, e, t0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(prog: str, err: BaseException, t0: float) -> int:
    """The exit code of a run that a signal stopped, said in one line; other errors are re-raised."""
    if isinstance(err, Exception) and not SIGNALS_SEEN:
        raise err
    if SIGNALS_SEEN:
        signum = SIGNALS_SEEN[0]
    else:
        signum = err.exit_code - 128 if isinstance(err, Terminated) else signal.SIGINT
    what = "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"{prog}: {what} after {time.perf_counter() - t0:.0f} s; no partial output was left",
          file=sys.stderr, flush=True)
    return 128 + signum


def _redeliver_swallowed_stop(previous_hook):
    """A stop signal whose exception was raised inside a finaliser (`__del__`) is swallowed by Python (printed as
    "Exception ignored in ..."), and the run would go on: send the signal again instead, so that it lands outside."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)) and SIGNALS_SEEN:
            signal.raise_signal(SIGNALS_SEEN[0])
            return
        previous_hook(unraisable)

    return hook


def run_cli(main_fn, prog: str = PROG) -> None:
    """A command line's entry point: nothing fetched unless --download is given; the stop signals are caught
    from the first moment (a signal while the libraries load is one line and 128 + signal, nothing written)."""
    if "--download" not in sys.argv[1:]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    SIGNALS_SEEN.clear()
    for sig, handler in STOP_HANDLERS.items():
        signal.signal(sig, handler)
    sys.unraisablehook = _redeliver_swallowed_stop(sys.unraisablehook)
    t0 = time.perf_counter()
    try:
        code = main_fn()
    except (KeyboardInterrupt, Terminated, Exception) as e:
        code = _stopped(prog, e, t0)
    sys.exit(code)


if __name__ == "__main__":
    run_cli(main)
