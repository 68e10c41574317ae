#!/usr/bin/env python
"""The Python half of tools/gpu_check.sh: what the first GPU session runs (issue 27, item 9).

    bash tools/gpu_check.sh [OUT_DIR]          # the whole check (under 8 minutes on one H100)
    python tools/gpu_check.py wheels           # HERE, with network: the packages the GPU image lacks -> .whl/

Subcommands (each writes one JSON file of figures; the shell script runs each under its own timeout):

    cuda      torch, CUDA, the device, nvidia-smi          exit 2 and a "no CUDA device: ..." line if none
    modules   the Python packages the checks import         exit 3 and the missing ones (nothing is installed)
    tests     the CUDA-only tests (found in tests/ by their skipif on torch.cuda.is_available()); a skip fails
    t2av      full-size random weights, 4 s t2av, backbone + render in bf16: per-stage timings and peak GPU
              memory, loop ms/patch, render ms/frame; then the same request on the eager loop (captured vs eager)
    train     a 2-step training run of training/config_tiny.json on CUDA in bf16 (python, or torchrun: NCCL)
    bench     bench.py stages (--json) with their rows kept as figures
    summarize steps.tsv + the JSON files -> summary.json, summary.md; exit status of the whole check
    wheels    (on a machine with network, not on the GPU machine) download the wheels of the packages the GPU
              image lacks into .whl/, for `run(..., carry=[".whl"])`

Nothing here fetches anything on the GPU machine: `wheels` is the only subcommand that uses the network.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# module -> (pip name, why). Imported by the checks on the GPU machine; the image lists
# /work/.library/device/KINDS.md ("Python packages already there") lack the ones marked "carry".
MODULES = {
    "torch": ("torch", "everything"),
    "numpy": ("numpy", "everything"),
    "transformers": ("transformers", "backbone (Qwen3), Whisper encoder, WavLM, Trainer"),
    "tokenizers": ("tokenizers", "tokenizer"),
    "safetensors": ("safetensors", "weights"),
    "huggingface_hub": ("huggingface_hub", "transformers"),
    "einops": ("einops", "models"),
    "tqdm": ("tqdm", "progress"),
    "yaml": ("pyyaml", "omegaconf"),
    "omegaconf": ("omegaconf", "whisperx_vae.py (carry: not in the GPU image)"),
    "soundfile": ("soundfile", "audio.py (carry: not in the GPU image)"),
    "cffi": ("cffi", "soundfile (carry: not in the GPU image)"),
    "imageio_ffmpeg": ("imageio-ffmpeg", "video_io.py: ffmpeg (carry: not in the GPU image)"),
    "accelerate": ("accelerate", "training (Trainer)"),
    "pytest": ("pytest", "the CUDA-only tests"),
}
# What `wheels` downloads: the packages the GPU image lacks, plus transformers at this project's pin (the image
# has 5.17; the code is tested with requirements-eval.txt's version). torch cannot travel (several GB): the image's
# torch is recorded in the summary.
# imageio-ffmpeg at 0.6.0 (ffmpeg 7.0.2, a 29 MiB wheel; tests/test_video_io.py passes with it): 0.8's wheel is
# 68 MiB, over the 64 MiB that travels with the working tree.
WHEELS = {"imageio-ffmpeg": "0.6.0", "omegaconf": None, "soundfile": None, "cffi": None, "pycparser": None,
          "transformers": None}
WHEELS_MAX_MIB = 56  # leaves room for the repository itself (~3 MiB) under the 64 MiB limit
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")

NO_CUDA_EXIT, MISSING_EXIT = 2, 3
T2AV_TEXT = "This is a check of the full size model on a graphics card, four seconds long."


def _write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def _pins() -> dict:
    """The == pins of requirements*.txt {name: version} (torch and transformers: requirements-eval.txt)."""
    pins = {}
    for path in sorted(REPO.glob("requirements*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                pins.setdefault(m.group(1).lower(), m.group(2))
    return pins


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False, "text": "nvidia-smi not found on PATH"}
    out = {"found": True}
    for key, cmd in (("query", [exe, "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"]), ("text", [exe])):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            out[key] = (proc.stdout + proc.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out[key] = f"failed: {e}"
    return out


# ------------------------------------------------------------------------------------------ cuda / modules

def cmd_cuda(args) -> int:
    """torch + CUDA + the device. Exit 2 with one "no CUDA device: <why>" line when there is none."""
    info = {"python": sys.version.split()[0], "executable": sys.executable,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "nvidia_smi": _nvidia_smi()}
    reason = None
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means no usable torch
        torch = None
        reason = f"torch is not importable with {sys.executable} ({type(e).__name__}: {e})"
    if torch is not None:
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif not torch.cuda.is_available():
            reason = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; "
                      f"{'nvidia-smi found' if info['nvidia_smi']['found'] else 'nvidia-smi not found'})")
        else:
            try:
                props = torch.cuda.get_device_properties(0)
                info.update(device_count=torch.cuda.device_count(), device=props.name,
                            capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                            multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
                try:
                    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
                except Exception as e:  # noqa: BLE001
                    info["nccl"] = f"unknown ({type(e).__name__})"
                x = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
                info["matmul_ok"] = bool(torch.isfinite((x @ x).float()).all())
            except Exception as e:  # noqa: BLE001 - a device that is listed but unusable is no device either
                reason = f"torch {torch.__version__} lists a GPU but cannot use it ({type(e).__name__}: {e})"
    info["cuda_ok"] = reason is None
    if reason:
        info["reason"] = "no CUDA device: " + reason
        print(info["reason"], flush=True)
    else:
        _say(f"CUDA ok: {info['device']} ({info['memory_gib']} GiB, sm {info['capability']}), torch {info['torch']} "
             f"CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}")
    if args.json:
        _write_json(args.json, info)
    return 0 if reason is None else NO_CUDA_EXIT


def cmd_modules(args) -> int:
    """Import every module the checks use; exit 3 naming what is missing and how to carry it (no pip here)."""
    from importlib import metadata
    found, missing = {}, {}
    for module, (dist, why) in MODULES.items():
        try:
            mod = __import__(module)
            try:
                found[module] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                found[module] = getattr(mod, "__version__", "?")
            if module == "imageio_ffmpeg":
                exe = mod.get_ffmpeg_exe()
                if not os.access(exe, os.X_OK):
                    raise RuntimeError(f"its ffmpeg {exe} is not executable")
        except Exception as e:  # noqa: BLE001
            missing[module] = {"pip": dist, "needed_for": why, "error": f"{type(e).__name__}: {e}"[:300]}
    pins = _pins()
    mismatches = {name: {"pinned": pins[name], "found": found[name]} for name in ("torch", "transformers")
                  if name in found and name in pins and found[name].split("+")[0] != pins[name]}
    info = {"found": found, "missing": missing, "pin_mismatches": mismatches,
            "pythonpath": os.environ.get("PYTHONPATH", "")}
    for name, v in mismatches.items():
        _say(f"note: {name} {v['found']} here, requirements pin {v['pinned']}")
    if missing:
        names = " ".join(sorted({v["pip"] for v in missing.values()}))
        info["reason"] = (f"missing Python packages: {names} ("
                          + "; ".join(f"{m}: {v['error']}" for m, v in missing.items())
                          + "). Nothing is installed here (no network): on a machine with network run "
                          "`python tools/gpu_check.py wheels` in the repository root, then carry .whl with the "
                          "working tree (gpu_check.sh installs .whl/*.whl with pip --no-index)")
        print(info["reason"], flush=True)
    else:
        _say("modules ok: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if args.json:
        _write_json(args.json, info)
    return MISSING_EXIT if missing else 0


# ------------------------------------------------------------------------------------------ tests

def cuda_only_tests(tests_dir=None) -> list:
    """Node ids of the tests that skip without CUDA: a skipif(... torch.cuda.is_available() ...) on the test
    function, its class, or the module's pytestmark."""
    tests_dir = Path(tests_dir or REPO / "tests")
    ids = []

    def needs_cuda(decorators) -> bool:
        for d in decorators:
            src = ast.unparse(d)
            if "skipif" in src and "cuda.is_available" in src:
                return True
        return False

    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark"
                                                              for t in n.targets)
                            and needs_cuda([n.value] if not isinstance(n.value, (ast.List, ast.Tuple))
                                           else n.value.elts) for n in tree.body)
        rel = path.relative_to(tests_dir.parent).as_posix()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if module_marked or needs_cuda(node.decorator_list):
                    ids.append(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                marked = module_marked or needs_cuda(node.decorator_list)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name.startswith("test") and (
                            marked or needs_cuda(item.decorator_list)):
                        ids.append(f"{rel}::{node.name}::{item.name}")
    return ids


def cmd_tests(args) -> int:
    """Run the CUDA-only tests; a skip counts as a failure here (this machine has the GPU they wait for)."""
    import xml.etree.ElementTree as ET
    ids = cuda_only_tests()
    info = {"tests": ids}
    if not ids:
        info["reason"] = "no CUDA-only tests found in tests/"
        _write_json(args.json, info)
        print(info["reason"])
        return 1
    xml = Path(args.json).with_suffix(".junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids]
    _say(" ".join(cmd))
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    info.update(pytest_rc=rc, seconds=round(time.perf_counter() - t0, 1))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    cases = []
    if xml.exists():
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for s in suites:
            for k in counts:
                counts[k] += int(s.get(k, 0))
            for case in s.iter("testcase"):
                state = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                detail = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
                cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "result": state,
                              "seconds": float(case.get("time", 0)), "message": detail[:300]})
    info.update(counts=counts, cases=cases, passed=counts["tests"] - counts["failures"] - counts["errors"]
                - counts["skipped"])
    ok = rc == 0 and counts["tests"] > 0 and counts["skipped"] == 0
    if counts["skipped"]:
        info["reason"] = f"{counts['skipped']} CUDA-only test(s) skipped on a machine that should run them"
        print(info["reason"])
    _write_json(args.json, info)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ t2av

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_full_size(device, render_dtype):
    """The released shapes with random weights (bench.py's recipe), built on `device` directly (no CPU init of
    ~2.5 B parameters); the backbone in bf16 on CUDA as SpeechLLM.from_pretrained keeps it."""
    import torch
    import lia_x
    import speaker_verification
    import whisperx_vae
    from lia_x import RELEASE_CONFIG, Generator
    from runtime.pipeline import TalkerPipeline
    from runtime.prompt import demo_tokenizer
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args

    def build(where):
        torch.manual_seed(0)
        with torch.device(where):
            llm = SpeechLLM(released_model_args(), qwen3_0_6b_config())
            vae = whisperx_vae.WhisperXVAE(whisperx_vae.assumed_release_cfg())
            spk = speaker_verification.init_model("wavlm_large")
            gen = Generator(**RELEASE_CONFIG)
        return llm, vae, spk, gen

    try:
        llm, vae, spk, gen = build(device)
        built_on = str(device)
    except Exception as e:  # noqa: BLE001 - some init does not follow the device context: build on CPU
        _say(f"building on {device} failed ({type(e).__name__}: {e}); building on CPU and moving")
        llm, vae, spk, gen = build("cpu")
        built_on = "cpu"
    if device.type == "cuda":
        llm.llm.to(torch.bfloat16)
    gen = gen.eval().requires_grad_(False)
    if render_dtype != torch.float32:
        lia_x.cast_conv_weights(gen, render_dtype)
    pipe = TalkerPipeline(llm.to(device).eval(), demo_tokenizer(), vae.to(device).eval(), spk.to(device).eval(),
                          gen.to(device), device=device, render_dtype=render_dtype)
    return pipe, built_on


def _instrument(device, stats: dict):
    """Wrap pipeline.timed (per-stage GPU peak, synchronised timings) and lia_x.render.render_frames (pure
    render time per batch, without the ffmpeg encode). Returns an undo function."""
    import contextlib

    import torch
    from runtime import pipeline
    from lia_x import render as liax_render

    orig_timed, orig_render = pipeline.timed, liax_render.render_frames
    cuda = device.type == "cuda"

    @contextlib.contextmanager
    def timed(timings, key):
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with orig_timed(timings, key):
            try:
                yield
            finally:
                _sync(device)
        if cuda:
            peak = stats.setdefault("stage_peak_gib", {})
            peak[key] = round(max(peak.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 2**30), 3)

    def render_frames(*a, **k):
        it = orig_render(*a, **k)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            _sync(device)
            stats["render_s"] = stats.get("render_s", 0.0) + time.perf_counter() - t0
            stats["render_frames"] = stats.get("render_frames", 0) + int(batch.shape[0])
            stats["render_batch"] = max(stats.get("render_batch", 0), int(batch.shape[0]))
            yield batch

    pipeline.timed, liax_render.render_frames = timed, render_frames

    def undo():
        pipeline.timed, liax_render.render_frames = orig_timed, orig_render
    return undo


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def cmd_t2av(args) -> int:
    """Full-size random-weight t2av of `--seconds` (never stopping early), backbone bf16 (CUDA autocast) and
    render bf16: a short warm-up request (graph capture, cuDNN autotuning), the timed request written to
    `--video`, then the same request on the eager loop without rendering (captured vs eager)."""
    import torch
    from runtime.pipeline import TalkerPipeline
    from runtime.request import GenerationRequest

    device = torch.device(args.device)
    render_dtype = getattr(torch, args.render_dtype)
    fig = {"device": str(device), "seconds_requested": args.seconds, "render_dtype": args.render_dtype,
           "size": "tiny (dry run)" if args.tiny else "full (random weights, released shapes)"}
    out_path = Path(args.json)

    def save():
        _write_json(out_path, fig)

    t0 = time.perf_counter()
    if args.tiny:
        pipe = TalkerPipeline.demo(device=device, render_dtype=render_dtype)
        fig["built_on"] = str(device)
    else:
        pipe, fig["built_on"] = _build_full_size(device, render_dtype)
    _sync(device)
    fig["build_s"] = round(time.perf_counter() - t0, 2)
    fig["params_m"] = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                       for name, m in (("speech_llm", pipe.llm), ("whisperx_vae", pipe.vae),
                                       ("speaker_encoder", pipe.speaker_encoder), ("lia_x", pipe.generator))}
    fig["backbone_dtype"] = str(pipe.llm.backbone_dtype).replace("torch.", "")
    fig["head_dtype"] = str(pipe.llm.head_dtype).replace("torch.", "")
    if device.type == "cuda":
        fig["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    pipe.llm.head_stop.never_stop_()  # exactly --seconds of speech: the random stop head would end at random
    save()
    _say(f"built in {fig['build_s']} s on {fig['built_on']}: {fig['params_m']} M params")

    base = dict(mode="t2av", text=T2AV_TEXT, long_form=False, seed=0)
    stats: dict = {}
    undo = _instrument(device, stats)
    try:
        warm_dir = out_path.parent
        t0 = time.perf_counter()
        pipe.generate(GenerationRequest(**base, max_seconds=0.8, output=str(warm_dir / "t2av_warmup.mp4")),
                      progress=False)
        fig["warmup_s"] = round(time.perf_counter() - t0, 2)
        _say(f"warm-up request (0.8 s) took {fig['warmup_s']} s")
        stats.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = pipe.generate(GenerationRequest(**base, max_seconds=args.seconds, output=args.video), progress=False)
        _sync(device)
        wall = time.perf_counter() - t0
        t = res.timings
        n_frames = int(res.n_frames)
        fig.update(
            backend=pipe.llm.loop_backend, backend_resolved=_resolved_backend(pipe),
            wall_s=round(wall, 2), stage_s={k: round(v, 3) for k, v in t.items()},
            n_patches=int(res.n_patches), stopped_by=res.stopped_by, audio_s=round(res.audio_seconds, 2),
            n_frames=n_frames, prefix_frames=int(res.prefix_frames),
            loop_ms_per_patch=round(1000 * t["generate"] / max(1, res.n_patches), 1),
            loop_real_time=round(res.n_patches * 0.16 / t["generate"], 2),
            loop_note="the generate stage / patches: prompt prefill and CUDA-graph capture included (bench_loop "
                      "times the loop alone)",
            render_ms_per_frame=round(1000 * stats.get("render_s", 0.0) / max(1, stats.get("render_frames", 1)), 1),
            render_frames=stats.get("render_frames", 0), render_batch=stats.get("render_batch"),
            render_encode_ms_per_frame=round(1000 * t.get("render", 0.0) / max(1, n_frames), 1),
            real_time_factor=round(res.audio_seconds / wall, 2), video=args.video,
            precision=getattr(res, "precision", "") or (pipe.precision_note() if hasattr(pipe, "precision_note")
                                                         else ""),
            warnings=list(res.warnings))
        if device.type == "cuda":
            fig.update(peak_gpu_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                       peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
                       stage_peak_gib=dict(stats.get("stage_peak_gib", {})))
        fig["finite"] = bool(torch.isfinite(res.speech_latents).all() and torch.isfinite(res.audio_24k).all()
                             and torch.isfinite(res.motion_raw).all())
        save()
        _say(f"t2av {res.audio_seconds:.2f} s audio, {res.n_patches} patches, {n_frames} frames: "
             f"loop {fig['loop_ms_per_patch']} ms/patch, render {fig['render_ms_per_frame']} ms/frame "
             f"(batch {fig['render_batch']}), peak GPU {fig.get('peak_gpu_gib')} GiB; stages {fig['stage_s']}")

        # captured vs eager: the same request and seed on the eager loop (no rendering)
        cmp_backend = "eager"
        pipe.loop_backend = cmp_backend
        t0 = time.perf_counter()
        other = pipe.generate(GenerationRequest(**base, max_seconds=args.seconds), progress=False)
        _sync(device)
        pipe.loop_backend = "auto"
        ot = other.timings
        same_len = other.n_patches == res.n_patches and other.stopped_by == res.stopped_by
        cmp = {"backend": cmp_backend, "wall_s": round(time.perf_counter() - t0, 2),
               "loop_ms_per_patch": round(1000 * ot["generate"] / max(1, other.n_patches), 1),
               "n_patches": int(other.n_patches), "same_length_and_stop": bool(same_len)}
        if same_len:
            cmp["speech_latents_rel_err"] = _rel_err(res.speech_latents, other.speech_latents)
            cmp["motion_rel_err"] = _rel_err(res.generated_motion_norm, other.generated_motion_norm)
        cmp["speedup_captured_over_eager"] = round(cmp["loop_ms_per_patch"] / max(1e-9, fig["loop_ms_per_patch"]), 2)
        fig["captured_vs_eager"] = cmp
        save()
        _say(f"captured vs eager: {cmp}")
    finally:
        undo()
    ok = fig["finite"] and cmp["same_length_and_stop"] and all(
        math.isfinite(cmp.get(k, 0.0)) for k in ("speech_latents_rel_err", "motion_rel_err"))
    if not ok:
        fig["reason"] = ("non-finite output" if not fig["finite"] else
                         "the eager loop gave another length or stop, or a non-finite difference")
        save()
    return 0 if ok else 1


def _resolved_backend(pipe) -> str:
    from runtime import loop_steps
    try:
        return loop_steps.resolve_backend(pipe.llm.loop_backend, pipe.device)
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


# ------------------------------------------------------------------------------------------ train

def cmd_train(args) -> int:
    """A `--steps`-step run of training/config_tiny.json on the default device (CUDA when present), bf16 on
    CUDA, on a small synthetic set; `--launcher torchrun` runs it under torchrun --nproc_per_node 1 (NCCL)."""
    import torch
    from training import synthetic

    work = Path(args.work)
    fig = {"launcher": args.launcher, "steps_requested": args.steps}
    data = synthetic.write_dataset(work / f"data_{args.launcher}", n_t2sv=4, n_tts=2, seconds=(1.2, 1.6))
    out_dir = work / f"run_{args.launcher}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cuda = torch.cuda.is_available()
    overrides = [f"data_path={data['jsonl']}", f"output_dir={out_dir}", f"max_steps={args.steps}", "logging_steps=1",
                 "save_strategy=no", "report_to=none", "disable_tqdm=true", f"bf16={'true' if cuda else 'false'}"]
    config = str(REPO / "training" / "config_tiny.json")
    fig["overrides"] = overrides
    t0 = time.perf_counter()
    if args.launcher == "python":
        from training import train
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = train.run(config, overrides)
        fig.update(global_step=out["global_step"], train_s=round(out["train_seconds"], 2),
                   train_loss=out["train_loss"], final=str(out["final"]))
        if cuda:
            fig["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        history = out["log_history"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
               str(REPO / "training" / "train.py"), config, *overrides]
        _say(" ".join(cmd))
        env = dict(os.environ, NCCL_DEBUG=os.environ.get("NCCL_DEBUG", "INFO")) if cuda else None
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        rc = fig["torchrun_rc"] = proc.returncode
        if cuda:  # NCCL_DEBUG=INFO: NCCL prints its version when a communicator is made (not asserted)
            fig["nccl_lines"] = [ln.strip()[:200] for ln in proc.stdout.splitlines() if "NCCL INFO" in ln][:5]
        state = out_dir / "trainer_state.json"
        history = json.loads(state.read_text()).get("log_history", []) if state.exists() else []
        fig["global_step"] = json.loads(state.read_text()).get("global_step") if state.exists() else None
        fig["final"] = str(out_dir / "final") if (out_dir / "final").is_dir() else None
        if rc:
            fig["reason"] = f"torchrun exited {rc}"
    fig["wall_s"] = round(time.perf_counter() - t0, 2)
    fig["losses"] = [h["loss"] for h in history if "loss" in h]
    fig["device"] = "cuda" if cuda else "cpu"
    ok = (fig.get("global_step") == args.steps and fig["final"] is not None and bool(fig["losses"])
          and all(math.isfinite(x) for x in fig["losses"]) and not fig.get("torchrun_rc"))
    if not ok and "reason" not in fig:
        fig["reason"] = (f"expected {args.steps} steps with finite losses and a final folder; got step "
                         f"{fig.get('global_step')}, losses {fig['losses']}, final {fig['final']}")
    _write_json(args.json, fig)
    _say(f"train ({args.launcher}): {fig}")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ bench

def cmd_bench(args) -> int:
    """bench.py --json with the given arguments; its rows (and its own FAILED rows) become the figures."""
    cmd = [sys.executable, str(REPO / "bench.py"), "--json", *args.bench_args]
    _say(" ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    fig = {"command": " ".join(cmd[1:]), "rc": proc.returncode}
    try:
        start = proc.stdout.index("{")
        data = json.loads(proc.stdout[start:])
        fig.update(machine=data.get("machine"), rows=data.get("rows", []))
    except ValueError:
        fig["reason"] = "bench.py printed no JSON: " + (proc.stdout.strip().splitlines() or ["(nothing)"])[-1][:200]
        sys.stdout.write(proc.stdout)
    failed = [r for r in fig.get("rows", []) if r.get("what") == "FAILED"]
    if failed:
        fig["reason"] = "; ".join(f"stage {r['stage']} FAILED: {r.get('note', '')}" for r in failed)
    for r in fig.get("rows", []):
        _say(" | ".join(_bench_cells(r)))
    _write_json(args.json, fig)
    return 0 if proc.returncode == 0 and fig.get("rows") and not failed else 1


def _bench_cells(row: dict) -> tuple:
    """(stage, what, value with its unit, note, memory) of a bench.py --json row, as its table prints them."""
    from bench import Row
    return Row(**row).cells()


# ------------------------------------------------------------------------------------------ summary

def _key_figures(step: str, fig: dict) -> dict:
    """The few numbers worth a line in summary.md."""
    if not fig:
        return {}
    keys = {
        "cuda": ("device", "memory_gib", "capability", "torch", "torch_cuda", "cudnn", "nccl"),
        "modules": ("pin_mismatches",),
        "tests": ("passed", "counts"),
        "t2av": ("n_patches", "audio_s", "n_frames", "loop_ms_per_patch", "render_ms_per_frame", "render_batch",
                 "render_encode_ms_per_frame", "peak_gpu_gib", "stage_s", "stage_peak_gib", "build_s", "warmup_s",
                 "real_time_factor"),
        "train": ("global_step", "train_s", "losses", "peak_gpu_gib"),
        "wheels": ("wheels",),
    }
    base = re.sub(r"_.*", "", step)
    out = {k: fig[k] for k in keys.get(base, ()) if k in fig and fig[k] not in ({}, [], None, "")}
    if base == "t2av" and "captured_vs_eager" in fig:
        c = fig["captured_vs_eager"]
        out["eager_loop_ms_per_patch"] = c.get("loop_ms_per_patch")
        out["captured_speedup"] = c.get("speedup_captured_over_eager")
        out["captured_vs_eager_rel_err"] = {k: c[k] for k in ("speech_latents_rel_err", "motion_rel_err") if k in c}
    if base == "bench":
        out["rows"] = [f"{stage}: {what} = {value}" + (f" ({memory})" if memory else "")
                       for stage, what, value, _, memory in map(_bench_cells, fig.get("rows", []))]
    return out


def read_steps(work: Path) -> list:
    """steps.tsv rows: name, rc, seconds, timeout_s, note (written by gpu_check.sh)."""
    steps = []
    path = work / "steps.tsv"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 5 or not parts[0]:
            continue
        name, rc, seconds, limit, note = parts[:5]
        steps.append({"step": name, "rc": None if rc in ("", "-") else int(rc), "seconds": float(seconds or 0),
                      "timeout_s": float(limit or 0), "note": note})
    return steps


def _status(step: dict) -> str:
    if step["rc"] is None:
        return "skipped"
    if step["rc"] == 0:
        return "ok"
    if step["rc"] in (124, 137):
        return "timeout"
    return "failed"


def _tail(path: Path, n: int = 15) -> list:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def summarize(work: Path, out: Path, budget_s: float, total_s: float) -> int:
    """summary.json + summary.md from the steps' records; returns the check's exit status: 2 no CUDA device,
    3 packages missing, 1 a step failed or timed out, 0 all ran and passed."""
    steps = read_steps(work)
    env = {}
    for name in ("cuda", "modules"):
        p = work / f"{name}.json"
        if p.exists():
            try:
                env[name] = json.loads(p.read_text())
            except ValueError:
                env[name] = {"reason": f"{p.name} is not JSON"}
    rows = []
    for s in steps:
        fig = {}
        p = work / f"{s['step']}.json"
        if p.exists():
            try:
                fig = json.loads(p.read_text())
            except ValueError:
                fig = {"reason": f"{p.name} is not JSON"}
        status = _status(s)
        row = {"step": s["step"], "status": status, "seconds": round(s["seconds"], 1), "rc": s["rc"],
               "timeout_s": s["timeout_s"], "note": s["note"], "figures": fig,
               "key_figures": _key_figures(s["step"], fig)}
        if status == "timeout":
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"killed at its {s['timeout_s']:.0f} s limit"
        if status in ("failed", "timeout"):
            row["log_tail"] = _tail(work / f"{s['step']}.log")
            row["reason"] = fig.get("reason") or next((ln for ln in reversed(row["log_tail"]) if ln.strip()), "")
        rows.append(row)
    cuda = env.get("cuda", {})
    modules = env.get("modules", {})
    if not cuda.get("cuda_ok"):
        verdict, code = "no_cuda", NO_CUDA_EXIT
        headline = cuda.get("reason") or "no CUDA device: the CUDA probe did not run or wrote nothing"
    elif modules.get("missing") or "modules" not in env:
        verdict, code = "missing_packages", MISSING_EXIT
        headline = modules.get("reason") or "the module probe did not run or wrote nothing"
    elif any(r["status"] in ("failed", "timeout") for r in rows):
        verdict, code = "failed", 1
        bad = [r["step"] for r in rows if r["status"] in ("failed", "timeout")]
        headline = f"{len(bad)} step(s) failed or timed out: {', '.join(bad)}"
    elif any(r["status"] == "skipped" for r in rows):
        verdict, code = "incomplete", 1
        headline = "some steps were skipped: " + ", ".join(f"{r['step']} ({r['note']})" for r in rows
                                                             if r["status"] == "skipped")
    else:
        verdict, code = "ok", 0
        headline = f"all {len(rows)} steps passed"
    summary = {"verdict": verdict, "exit_code": code, "headline": headline, "budget_s": budget_s,
               "total_s": round(total_s, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "environment": env, "steps": rows}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(_markdown(summary))
    print(headline, flush=True)
    return code


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _markdown(s: dict) -> str:
    cuda, modules = s["environment"].get("cuda", {}), s["environment"].get("modules", {})
    lines = ["# GPU check (tools/gpu_check.sh)", "",
             f"**{s['verdict'].upper()}**: {s['headline']}", "",
             f"Exit status {s['exit_code']}; {s['total_s']} s of a {s['budget_s']:.0f} s budget; {s['finished']}.", ""]
    if not cuda.get("cuda_ok"):
        lines += [cuda.get("reason") or "no CUDA device: the CUDA probe wrote nothing", ""]
    lines += ["## Machine", ""]
    for k in ("device", "memory_gib", "capability", "multiprocessors", "torch", "torch_cuda", "cudnn", "nccl",
              "python", "executable"):
        if k in cuda:
            lines.append(f"- {k}: {cuda[k]}")
    smi = cuda.get("nvidia_smi", {})
    lines.append(f"- nvidia-smi: {smi.get('query') or smi.get('text') or 'not run'}")
    if modules.get("found"):
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in modules["found"].items()))
    for name, v in (modules.get("pin_mismatches") or {}).items():
        lines.append(f"- note: {name} {v['found']} here, requirements pin {v['pinned']}")
    if modules.get("missing"):
        lines.append(f"- MISSING: {modules.get('reason')}")
    lines += ["", "## Steps", "", "| step | status | seconds | key figures |", "| --- | --- | --- | --- |"]
    for r in s["steps"]:
        figs = "; ".join(f"{k} {_fmt(v)}" for k, v in r["key_figures"].items() if k != "rows")
        note = r.get("reason") or r.get("note") or ""
        cell = "; ".join(x for x in (figs, note) if x).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {cell[:600]} |")
    for r in s["steps"]:
        extra = r["key_figures"].get("rows")
        if extra:
            lines += ["", f"### {r['step']} (bench.py rows)", ""] + [f"- {x}" for x in extra]
    for r in s["steps"]:
        if r.get("log_tail"):
            lines += ["", f"### {r['step']}: end of its log", "", "```"] + r["log_tail"] + ["```"]
    return "\n".join(lines) + "\n"


def cmd_summarize(args) -> int:
    return summarize(Path(args.work), Path(args.out), args.budget, args.total)


# ------------------------------------------------------------------------------------------ wheels

def cmd_wheels(args) -> int:
    """Download (here, with network) the wheels of WHEELS for the GPU image's Python into `--dest`, at this
    environment's versions (transformers at requirements-eval.txt's pin); old wheels of these names are removed."""
    from importlib import metadata
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    pins = _pins()
    specs = []
    for name, fixed in WHEELS.items():
        version = fixed or pins.get(name)
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = None
        specs.append(f"{name}=={version}" if version else name)
    for old in dest.glob("*.whl"):
        stem = old.name.split("-")[0].lower().replace("_", "-")
        if stem in WHEELS:
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           args.python_version, "--implementation", "cp", "-d", str(dest)]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    cmd += specs
    _say(" ".join(cmd))
    rc = subprocess.run(cmd).returncode
    size = sum(p.stat().st_size for p in dest.glob("*.whl")) / 2**20
    _say(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {size:.1f} MiB. Then, with the device tool: "
         f"run(command='bash tools/gpu_check.sh', carry=['{dest.name}'], timeout_s=560)")
    if size > WHEELS_MAX_MIB:
        _say(f"too large: the working tree that travels (wheels included) is limited to 64 MiB; keep under "
             f"{WHEELS_MAX_MIB} MiB of wheels (remove other wheels from {dest})")
        return rc or 1
    return rc


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("cuda", "modules", "tests"):
        p = sub.add_parser(name)
        p.add_argument("--json", required=name == "tests")
    p = sub.add_parser("t2av")
    p.add_argument("--json", required=True)
    p.add_argument("--video", required=True, help="the timed request's mp4 (its wav is written beside it)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--render-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--tiny", action="store_true", help="the demo's tiny models (a dry run of this code on CPU)")
    p = sub.add_parser("train")
    p.add_argument("--json", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--launcher", choices=("python", "torchrun"), default="python")
    p = sub.add_parser("bench")
    p.add_argument("--json", required=True)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="bench.py's arguments (after --)")
    p = sub.add_parser("summarize")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--total", type=float, default=0)
    p = sub.add_parser("wheels")
    p.add_argument("--dest", default=str(REPO / ".whl"))
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python (KINDS.md: 3.12)")
    args = ap.parse_args(argv)
    if args.cmd == "bench" and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    return globals()[f"cmd_{args.cmd}"](args)


if __name__ == "__main__":
    sys.exit(main())
