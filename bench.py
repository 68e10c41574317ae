#!/usr/bin/env python
"""Speed and memory of each stage, printed as a table. Random weights at full size: timings do
not depend on the values (except how many patches the random stop head lets through, so the
LLM is reported per patch).

    python bench.py                          # the default stages (marked * in --help)
    python bench.py --help                   # every stage, with what it measures
    python bench.py --stages liax            # LIA-X at 512x512 (about 6 min on 2 CPU cores)
    python bench.py --device cuda --stages llm vae spk liax
    python bench.py --stages stream          # pipe.stream: first audio chunk / frame, real-time factor
    python bench.py --stages eval            # evaluate.py's metric networks: seconds per clip per metric
    python bench.py --stages llm --timeout 600 --json   # stop a stage after 600 s; rows as JSON

Each stage runs in a fresh process, so "peak RSS" is that stage's own high-water mark (it includes
the ~0.4 GB of the imported libraries); on CUDA the peak allocated GPU memory is reported too.
The stage's process writes each row as soon as it is measured: a stage that fails, times out or is
interrupted (Ctrl-C, SIGTERM) keeps the rows it measured, followed by a FAILED row saying why.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

REPO = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("stage", "what", "value", "note", "memory")


@dataclass
class Row:
    """One measured figure: `value` in `unit` (None: no figure, as in a FAILED row)."""
    stage: str
    what: str
    value: Optional[float]
    unit: str
    note: str = ""
    memory: str = ""  # the stage's peak memory; filled in from the stage's process unless the stage sets it
    decimals: int = 2  # digits printed after the point
    figures: dict = field(default_factory=dict)  # more numbers behind the row, for --json

    def cells(self) -> tuple:
        """The row as the table prints it (COLUMNS)."""
        value = ""
        if self.value is not None:
            gap = "" if self.unit.startswith("x") else " "  # a ratio is written against its number: 1.23x
            value = f"{self.value:.{self.decimals}f}{gap}{self.unit}"
        return self.stage, self.what, value, self.note, self.memory


# ------------------------------------------------------------------------------------------ timing

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    """(fn(), seconds it took), the device synchronized on both ends."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _best_time(fn, device, repeats):
    """The fastest of `repeats` timed calls after one warm-up call."""
    fn()
    return min(_timed(fn, device)[1] for _ in range(repeats))


# ------------------------------------------------------------------------------------------ llm

def _loop_variants(device):
    """(loop backend, packed linear) pairs timed, the default first. static = the CUDA-graph loop's code without
    the capture; packed linear off = plain F.linear (the CPU loop before packed weights)."""
    from common import packed_linear
    if device.type == "cuda":
        return [("cuda_graphs", "off"), ("eager", "off"), ("static", "off")]
    if not packed_linear.available():
        return [("eager", "off"), ("static", "off")]
    return [("eager", "auto"), ("eager", "off"), ("static", "auto")]


def _llm_rows(model, device, label, max_seconds=None, variants=None):
    """ms per patch of the whole AR loop (never stopping early) for each (backend, packed linear) variant."""
    import torch
    from runtime.generation import Sampling, generate
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.llm.config.vocab_size - 1, (1, 40), generator=g).to(device)
    ref_speech = torch.randn(125, 32, generator=g).to(device)  # 5 s of reference latents
    ref_motion = torch.randn(124, 40, generator=g).to(device)
    speaker = torch.randn(1, 256, generator=g).to(device)
    never_stop = Sampling(stop_min_patches=10**6)
    for backend, packed in variants or _loop_variants(device):
        model.loop_backend, model.packed_linear = backend, packed
        torch.manual_seed(0)
        generate(model, ids, 30, ref_speech, speaker, ref_motion, max_seconds=0.5)  # warm-up (few patches)
        out, seconds = _timed(lambda: generate(model, ids, 30, ref_speech, speaker, ref_motion, sampling=never_stop,
                                               max_seconds=max_seconds), device)
        kernels = f", packed linear {packed}" if device.type == "cpu" else ""
        yield Row(label, f"T2AV AR loop, {out.n_patches} patches (no early stop), {backend}{kernels}",
                  seconds / out.n_patches * 1000, "ms/patch", f"{out.n_patches * 0.16 / seconds:.2f}x real time",
                  decimals=1)
    model.loop_backend, model.packed_linear = "auto", "auto"


def stage_llm_tiny(device, args):
    import torch
    from speech_llm import SpeechLLM, tiny_model_args_and_config
    torch.manual_seed(0)
    model = SpeechLLM(*tiny_model_args_and_config()).to(device).eval()
    yield from _llm_rows(model, device, "llm (tiny)")


def stage_llm(device, args):
    import torch
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    torch.manual_seed(0)
    model, seconds = _timed(lambda: SpeechLLM(released_model_args(), qwen3_0_6b_config()), device)
    if device.type == "cuda":
        model.llm.to(torch.bfloat16)  # as from_pretrained does on CUDA
    model = model.to(device).eval()
    n = sum(p.numel() for p in model.parameters())
    yield Row("llm (full)", f"build, {n / 1e6:.0f} M params (random init)", seconds, "s", decimals=1)
    yield from _llm_rows(model, device, "llm (full)", args.llm_seconds)


# ------------------------------------------------------------------------------------------ roofline

PROBE_POOL_BYTES = 256 << 20  # the probe streams this much fp32 weight per pass: the model's heads do not fit in cache


def gemm_peak(m, k, n, dtype, device, repeats=3):
    """(GFLOP/s, kernel) of y = x W^T, x (m, k), W (n, k), on this machine at this dtype: the faster of F.linear
    and (on CPU) oneDNN with packed weights, cycling through enough distinct weights that they stream from
    memory as the model's weights do (a cached weight overstates small m)."""
    import torch
    from common import packed_linear
    n_weights = max(2, PROBE_POOL_BYTES // (n * k * 4))
    ws = [torch.randn(n, k, device=device).to(dtype) for _ in range(n_weights)]
    x = torch.randn(m, k, device=device).to(dtype)
    kernels = {"F.linear": lambda: [torch.nn.functional.linear(x, w) for w in ws]}
    if device.type == "cpu" and packed_linear.available():
        packed = [packed_linear.pack(w, m) for w in ws]
        kernels["packed"] = lambda: [packed_linear.packed_linear(x, p) for p in packed]
    rates = {name: 2 * m * k * n * n_weights / _best_time(run, device, repeats) / 1e9 for name, run in kernels.items()}
    best = max(rates, key=rates.get)
    return rates[best], best


def _flops(fn, model=None):
    """FLOPs of fn() as torch.utils.flop_counter counts them. It counts aten's matmuls, not oneDNN's packed
    linears: `model`'s packed layers are turned back into nn.Linear for the count and packed again after."""
    from common import packed_linear
    from torch.utils.flop_counter import FlopCounterMode
    if model is not None:
        packed_linear.uninstall(model)
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    if model is not None:
        model.prepare_loop_kernels()
    return counter.get_total_flops()


def _roof_row(stage, what, seconds, flops, peak_kernel, shape, part_of_patch):
    """A timed part against the floor of its FLOPs at the GEMM peak of its dominant shape. part_of_patch: the
    part runs once per patch (the loop's floor is the sum of these parts' floors)."""
    peak, kernel = peak_kernel
    floor = flops / (peak * 1e9)
    return Row(stage, what, seconds * 1000, "ms",
               f"{flops / 1e9:.2f} GFLOP, {flops / seconds / 1e9:.0f} GFLOP/s; peak {peak:.0f} GFLOP/s at "
               f"{shape} ({kernel}) -> {100 * floor / seconds:.0f} % of floor ({floor * 1000:.1f} ms)", decimals=1,
               figures=dict(ms=seconds * 1000, gflop=flops / 1e9, gflops=flops / seconds / 1e9, peak_gflops=peak,
                            peak_kernel=kernel, floor_ms=floor * 1000, pct_of_floor=100 * floor / seconds,
                            part_of_patch=part_of_patch))


def roofline_rows(model, device, dtype, repeats=3, n_cache=120):
    """Per patch: one backbone step, each head's Euler step (CFG pair in one batch) and its 10-step patch, and
    the whole loop per patch; each next to the GEMM peak of its dominant shape at this dtype."""
    import torch
    from runtime.generation import Sampling
    from transformers.cache_utils import DynamicCache
    label = "roofline " + str(dtype).replace("torch.", "")
    width = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    model.prepare_loop_kernels()  # the parts run on the loop's own kernels (packed linears on CPU)
    with torch.no_grad():
        cache = DynamicCache(config=model.llm.config)
        model.backbone(torch.randn(1, n_cache, width, generator=g).to(device, model.backbone_dtype), cache)
        token = torch.randn(1, 1, width, generator=g).to(device, model.backbone_dtype)
        step = lambda: model.backbone(token, cache)  # noqa: E731 - the cache grows by one per call, as in the loop
        inter = model.config.intermediate_size
        peak = gemm_peak(1, width, inter, model.backbone_dtype, device)
        yield _roof_row(label, f"backbone step (1 token, ~{n_cache} cached)", _best_time(step, device, repeats),
                        _flops(step, model), peak, f"1x{width}x{inter}", part_of_patch=True)
        h = torch.randn(1, width, generator=g).to(device)
        pt = model.patch_size
        heads = (("speech", model.speech_cfm, model.model_args.speaker_embedding_dim),
                 ("motion", model.motion_cfm, model.model_args.motion_embedding_dim))
        for head, cfm, gdim in heads:
            est = cfm.estimator
            c, hd = cfm.in_channels, est.config.hidden_size
            n_rows = 2 * (2 + pt * (model.context_patches + 1))  # CFG pair x (mu, global, context, frames)
            hdt = model.head_dtype
            x = torch.randn(2, c, pt, generator=g).to(device, hdt)
            cond = torch.randn(2, c, model.context_patches * pt, generator=g).to(device, hdt)
            gc = torch.randn(2, gdim, generator=g).to(device, hdt)
            t = torch.full((2,), 0.5, device=device, dtype=hdt)
            mu = h.expand(2, -1).to(hdt)
            euler = lambda: est(x, mu, t, cond, gc, torch.zeros_like(t))  # noqa: E731
            mlp = int(8 * hd / 3)
            peak = gemm_peak(n_rows, hd, mlp, hdt, device)
            yield _roof_row(label, f"{head} head, one Euler step (CFG pair batched)",
                            _best_time(euler, device, repeats), _flops(euler, model), peak, f"{n_rows}x{hd}x{mlp}",
                            part_of_patch=False)
            s = Sampling()
            patch = lambda: model.sample_patch(cfm, h, cond[:1].float(), gc[:1].float(), s.cfm_steps,  # noqa: E731
                                               s.cfm_temperature, s.cfm_cfg)
            yield _roof_row(label, f"{head} head, one patch ({s.cfm_steps} Euler steps)",
                            _best_time(patch, device, repeats), _flops(patch, model), peak, f"{n_rows}x{hd}x{mlp}",
                            part_of_patch=True)


def _loop_rows(model, device, label, parts, args):
    """The whole eager loop per patch, with its floor = the sum of its parts' floors; on CPU with and without
    the packed linears (before/after)."""
    per_patch = [r.figures for r in parts if r.figures["part_of_patch"]]
    floor_ms = sum(f["floor_ms"] for f in per_patch)
    gflop = sum(f["gflop"] for f in per_patch)
    variants = [v for v in _loop_variants(device) if v[0] != "static"]
    for loop in _llm_rows(model, device, label, args.llm_seconds, variants):
        pct = 100 * floor_ms / loop.value
        loop.note += f"; {gflop:.1f} GFLOP/patch, floor {floor_ms:.0f} ms/patch -> {pct:.0f} % of floor"
        loop.figures = dict(ms=loop.value, gflop=gflop, floor_ms=floor_ms, pct_of_floor=pct)
        yield loop


def liax_flop_rows(device, dtype):
    """FLOPs of one rendered 512x512 frame (decoder only; the identity is encoded once) counted on meta tensors,
    and the floor that means at this machine's large-GEMM peak."""
    import torch
    from lia_x import RELEASE_CONFIG, Generator
    with torch.device("meta"):
        gen = Generator(**RELEASE_CONFIG).eval()
        size = gen.size
        z, feats = gen.enc.enc_2r(torch.zeros(1, 3, size, size))
        flops = _flops(lambda: gen.dec(z, None, feats))
        enc_flops = _flops(lambda: gen.enc.enc_2r(torch.zeros(1, 3, size, size)))
    peak, kernel = gemm_peak(1024, 1024, 1024, dtype, device)
    floor = flops / (peak * 1e9)
    name = str(dtype).replace("torch.", "")
    yield Row(f"roofline {name}", f"LIA-X render, one {size}x{size} frame (decoder)", flops / 1e9, "GFLOP",
              f"floor {floor:.2f} s/frame at {peak:.0f} GFLOP/s (1024^3 GEMM, {kernel}); encoder pass "
              f"{enc_flops / 1e9:.0f} GFLOP (once per face, and per frame of extracted motion)", decimals=0,
              figures=dict(gflop=flops / 1e9, peak_gflops=peak, floor_ms=floor * 1000))


def stage_roofline(device, args):
    import torch
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    torch.manual_seed(0)
    base = SpeechLLM(released_model_args(), qwen3_0_6b_config()).eval()
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model = base.to(device=device, dtype=dtype)
        parts = []
        for row in roofline_rows(model, device, dtype):
            parts.append(row)
            yield row
        yield from _loop_rows(model, device, f"roofline {name}", parts, args)
        yield from liax_flop_rows(device, dtype)


# ------------------------------------------------------------------------------------------ batch

def stage_batch(device, args):
    """Throughput of batched requests (generation.run_rows) at full size: N requests of different prompt
    lengths, never stopping, `--llm-seconds` each (default 0.96 s = 6 patches)."""
    import torch
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    torch.manual_seed(0)
    model = SpeechLLM(released_model_args(), qwen3_0_6b_config()).to(device).eval()
    yield from _batch_rows(model, device, args, "batch (full)")


def stage_batch_tiny(device, args):
    import torch
    from speech_llm import SpeechLLM, tiny_model_args_and_config
    torch.manual_seed(0)
    model = SpeechLLM(*tiny_model_args_and_config()).to(device).eval()
    yield from _batch_rows(model, device, args, "batch (tiny)")


def _batch_rows(model, device, args, label):
    import torch
    from runtime.generation import LoopRow, Sampling, plan_lengths, run_rows
    from runtime.prompt import build_prompt
    g = torch.Generator().manual_seed(0)
    dims = model.model_args

    def request(k):
        """Request k: a prompt 3k tokens longer than request 0's, random references, its own seed k."""
        ids = torch.randint(0, model.llm.config.vocab_size - 1, (1, 40 + 3 * k), generator=g)
        speech = torch.randn(125, dims.speech_embedding_dim, generator=g)
        motion = torch.randn(124, dims.motion_embedding_dim, generator=g)
        speaker = torch.randn(1, dims.speaker_embedding_dim, generator=g)
        plan = plan_lengths("t2av", ref_speech_frames=125, ref_motion_frames=124, delay=model.delay,
                            max_seconds=args.llm_seconds or 0.96)
        return LoopRow(build_prompt(model, ids, 30 + 3 * k, speech, speaker, plan, motion), plan,
                       Sampling(stop_min_patches=10**6), generator=torch.Generator(device=device).manual_seed(k))

    run_rows(model, [request(0)])  # warm-up
    base = None
    for n in args.batch_sizes:
        requests = [request(k) for k in range(n)]
        outs, seconds = _timed(lambda: run_rows(model, requests), device)
        rate = sum(o.n_patches for o in outs) / seconds
        base = base or rate
        yield Row(label, f"{n} t2av requests together, {outs[0].n_patches} patches each", rate, "patches/s",
                  f"{rate / base:.2f}x batch 1; {rate * 0.16:.2f}x real time",
                  figures=dict(patches_per_s=rate, batch_size=n))


# ------------------------------------------------------------------------------------------ end-to-end memory

def write_release_files(folder) -> dict:
    """Random weights of the released shapes written in the released layout (~11.6 GB: SpeechLLM
    safetensors + tokenizer, WhisperX-VAE .ckpt, LIA-X .pt, WavLM ECAPA .pth), one model in memory at a
    time. Returns infer.py's weight flags for them."""
    import torch
    import speaker_verification
    import whisperx_vae
    from lia_x import RELEASE_CONFIG, Generator
    from runtime.prompt import demo_tokenizer
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    torch.manual_seed(0)
    args = released_model_args()
    SpeechLLM(args, qwen3_0_6b_config()).save_pretrained(
        os.path.join(folder, "talker-t2av"), tokenizer=demo_tokenizer(args.model_max_length))
    os.makedirs(os.path.join(folder, "whisperx-vae"), exist_ok=True)
    whisperx_vae.save_checkpoint(whisperx_vae.WhisperXVAE(whisperx_vae.assumed_release_cfg()),
                                 os.path.join(folder, "whisperx-vae", "model.ckpt"))
    torch.save(Generator(**RELEASE_CONFIG).state_dict(), os.path.join(folder, "lia-x.pt"))
    torch.save({"model": speaker_verification.init_model("wavlm_large").state_dict()},
               os.path.join(folder, "wavlm_large_finetune.pth"))
    return {"--checkpoint-dir": os.path.join(folder, "talker-t2av"),
            "--whisperx-vae-ckpt": os.path.join(folder, "whisperx-vae", "model.ckpt"),
            "--liax-ckpt": os.path.join(folder, "lia-x.pt"),
            "--wavlm-ckpt": os.path.join(folder, "wavlm_large_finetune.pth")}


def _child_peak_rss_gib(cmd) -> tuple:
    """(peak RSS of the command in GiB, wall seconds); RuntimeError with its last stderr line on failure.
    Run in a fresh process so that RUSAGE_CHILDREN holds this command's peak only."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, p.returncode); "
            "sys.stderr.write(p.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    peak_kb, wall, rc = proc.stdout.split()
    if int(rc):
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    return int(peak_kb) / 2**20, float(wall)


def stage_t2av_rss(device, args):
    """End-to-end peak RSS of `infer.py` t2av runs on release-format files of random weights (written
    first, ~11.6 GB on disk): one request as the CLI runs it (low_memory: each model dropped when its
    stage is done) and the same request as a one-line batch file (every model kept for the next line).
    Kept short: `--llm-seconds` of speech (default 0.16 s = 1 patch), a 0.16 s prefix, trimmed, so four
    frames render (float32: bf16 convolutions are emulated on CPUs without AVX512-BF16/AMX)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        flags = write_release_files(tmp)
        written = time.perf_counter() - t0
        seconds = args.llm_seconds or 0.16
        what = f"load + encode + {round(seconds / 0.16)} patch(es) + decode + {round(seconds * 25)} frames (float32)"
        request = ["--mode", "t2av", "--text", "Memory check.", "--max-seconds", str(seconds),
                   "--gt-prefix-seconds", "0.16", "--trim-prefix", "--device", str(device)]
        weight_flags = [x for kv in flags.items() for x in kv]
        infer = [sys.executable, os.path.join(REPO, "infer.py")]
        with open(os.path.join(tmp, "one.jsonl"), "w") as f:
            f.write(json.dumps({"output": os.path.join(tmp, "b.mp4")}) + "\n")
        runs = [("one request (CLI: models dropped per stage)", ["--output", os.path.join(tmp, "a.mp4")]),
                ("same, as a batch file (models kept)", ["--batch-file", os.path.join(tmp, "one.jsonl")])]
        if device.type == "cpu":  # the packed copies of the heads' weights (+1.2 GiB in float32) against none
            runs.insert(1, ("one request, --packed-linear off", ["--packed-linear", "off", "--output",
                                                                 os.path.join(tmp, "c.mp4")]))
        for label, extra in runs:
            peak, wall = _child_peak_rss_gib(infer + weight_flags + request + extra)
            yield Row("t2av (full)", f"infer.py peak RSS, {label}", peak, "GiB", f"wall {wall:.0f} s: {what}",
                      memory="see value")
    yield Row("t2av (full)", "writing the random release files", written, "s", "not part of a run",
              memory="see value", decimals=0)


# ------------------------------------------------------------------------------------------ encoders, render

def stage_vae(device, args):
    import torch
    from media.audio import log_mel_spectrogram, resample
    from whisperx_vae import WhisperXVAE, assumed_release_cfg
    torch.manual_seed(0)
    model = WhisperXVAE(assumed_release_cfg()).to(device).eval()
    wav_24k = 0.1 * torch.randn(1, 1, 24000 * 5)
    mel = log_mel_spectrogram(resample(wav_24k[0, 0], 24000, 16000))[None, None]
    wav_24k, mel = wav_24k.to(device), mel.to(device)
    with torch.no_grad():
        latent, t_enc = _timed(lambda: model.encode(wav_24k, mel, "btc"), device)
        yield Row("whisperx-vae", "encode 5 s (Whisper large-v3 encoder on 30 s mel)", t_enc, "s",
                  "assumed release codec config")
        _, t_dec = _timed(lambda: model.decode(latent, "btc"), device)
        yield Row("whisperx-vae", "decode 5 s", t_dec, "s", f"{5 / t_dec:.1f}x real time")


def stage_spk(device, args):
    import torch
    from speaker_verification import init_model
    torch.manual_seed(0)
    model = init_model("wavlm_large").to(device).eval()
    wav = 0.1 * torch.randn(1, 16000 * 5, device=device)
    with torch.no_grad():
        _, seconds = _timed(lambda: model(wav), device)
    yield Row("speaker encoder", "WavLM-Large + ECAPA, 5 s", seconds, "s")


def stage_liax(device, args):
    import torch
    from lia_x import RELEASE_CONFIG, Generator
    from lia_x.render import time_render
    torch.manual_seed(0)
    generator = Generator(**RELEASE_CONFIG).to(device).eval().requires_grad_(False)
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, args.liax_batch):
            r = time_render(generator, n_frames=max(batch, args.liax_frames), batch_size=batch, dtype=dtype)
            yield Row("lia-x 512x512", f"render, batch {batch}, {str(dtype)[6:]}", r["per_frame_s"], "s/frame",
                      f"encoder once: {r['encoder_s']:.1f} s")


# ------------------------------------------------------------------------------------------ training

def _write_train_data(folder, n_clips, seconds):
    """A synthetic dataset of n_clips (half t2sv, half tts) of the given lengths; its manifest's path."""
    from training import synthetic
    paths = synthetic.write_dataset(folder, n_t2sv=n_clips // 2, n_tts=n_clips - n_clips // 2, seconds=seconds)
    return paths["jsonl"]


def stage_train_tiny(device, args):
    """Training throughput of the tiny preset (training/config_tiny.json, batch 2), online and cached features."""
    import torch
    from training import precompute, train
    torch.set_num_threads(1)  # what train.py uses for the tiny preset
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _write_train_data(os.path.join(tmp, "data"), 8, (3.0, 4.0, 5.0))
        with open(os.path.join(REPO, "training", "config_tiny.json")) as f:
            cfg = json.load(f)
        cfg.update(data_path=manifest, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1000,
                   max_steps=args.train_steps, use_cpu=device.type == "cpu")
        cache = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        precompute.run(dict(cfg, feature_cache=cache), log=lambda m: None)
        t_pre = time.perf_counter() - t0
        for label, extra in (("online features", {}), ("cached features", {"feature_cache": cache})):
            out = train.run(dict(cfg, output_dir=os.path.join(tmp, label.split()[0]), **extra), log=lambda m: None)
            per_step = out["train_seconds"] / out["global_step"]
            note = f"{2 / per_step:.1f} samples/s" + (f"; precompute {t_pre / 8:.2f} s/clip" if extra else "")
            yield Row("train (tiny)", f"{label}, batch 2, clips 3-5 s, {out['global_step']} steps", per_step,
                      "s/step", note, decimals=3)


def stage_train(device, args):
    """One forward + backward of the released-size SpeechLLM at batch 1 (5 s clip with motion), with the frozen
    encoders running inside the step (online) and with cached features."""
    import torch
    from runtime.prompt import demo_tokenizer
    from speaker_verification import init_model
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    from training.dataset import Collator, DataArguments, TalkerDataset, build_rows
    from whisperx_vae import WhisperXVAE, assumed_release_cfg

    torch.manual_seed(0)
    model = SpeechLLM(released_model_args(), qwen3_0_6b_config())
    model.pretrained_speech_encoder = WhisperXVAE(assumed_release_cfg())
    model.spk = init_model("wavlm_large")
    model = model.freeze_for_training().to(device).train()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _write_train_data(os.path.join(tmp, "data"), 2, (5.0,))
        rows = build_rows(DataArguments(data_path=manifest), log=lambda m: None)
        dataset = TalkerDataset(rows[:1], demo_tokenizer(1000), model.model_args)
        batch = Collator(dataset.tokenizer.pad_token_id)([dataset[0]])
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    keys = ("input_ids", "attention_mask", "speech_span", "mel_len", "motion_len", "task_tag", "motion")
    online = {k: batch[k] for k in keys + ("audio", "audio16k", "feat")}
    with torch.no_grad(), model.amp():
        latents = model.get_speech_latents(batch["audio"], batch["feat"], batch["mel_len"])
        speaker = model.get_speaker_embeddings(batch["audio16k"], batch["mel_len"])
    cached = {k: batch[k] for k in keys} | {"speech_latents": latents, "speaker_emb": speaker}

    def step(inputs):
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = f"fwd+bwd batch 1, 5 s clip, {n / 1e6:.0f} M trainable"
    _timed(lambda: step(cached), device)  # warm-up
    _, t_cached = _timed(lambda: step(cached), device)
    yield Row("train (full)", f"{what}, cached features", t_cached, "s/step")
    _, t_online = _timed(lambda: step(online), device)
    yield Row("train (full)", f"{what}, online (VAE + WavLM in the step)", t_online, "s/step",
              f"encoders {t_online - t_cached:.2f} s")


# ------------------------------------------------------------------------------------------ streaming

def _stream_rows(pipe, label, request, every, render):
    """Time to the first audio chunk / first frame and the stream's real-time factor (audio s / wall s)."""
    from runtime.streaming import Chunk
    t0 = time.perf_counter()
    first_audio = first_frame = None
    n_samples = 0
    for item in pipe.stream(request, every=every, render=render):
        if not isinstance(item, Chunk):
            break
        now = time.perf_counter() - t0
        if first_audio is None and item.audio_24k.numel():
            first_audio = now
        if first_frame is None and item.frames is not None:
            first_frame = now
        n_samples += item.audio_24k.numel()
    wall = time.perf_counter() - t0
    what = f"stream every {every} patch{'es' if every > 1 else ''}, {n_samples / 24000:.1f} s audio"
    yield Row(label, what + ": first audio chunk", first_audio, "s", "after the request starts (inputs included)")
    if first_frame is not None:
        yield Row(label, what + ": first video frame", first_frame, "s")
    yield Row(label, what + (": real-time factor" if render else ": real-time factor, AR + decode"),
              n_samples / 24000 / wall, "x real time", f"wall {wall:.1f} s")


def _full_size_pipeline(device, render_dtype):
    """TalkerPipeline of the released sizes with random weights (the stop head never fires); its generator."""
    import torch
    import speaker_verification
    from lia_x import RELEASE_CONFIG, Generator
    from runtime.pipeline import TalkerPipeline
    from runtime.prompt import demo_tokenizer
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    from whisperx_vae import WhisperXVAE, assumed_release_cfg
    torch.manual_seed(0)
    llm = SpeechLLM(released_model_args(), qwen3_0_6b_config())
    if device.type == "cuda":
        llm.llm.to(torch.bfloat16)
    llm.head_stop.never_stop_()
    vae = WhisperXVAE(assumed_release_cfg())
    spk = speaker_verification.init_model("wavlm_large")
    gen = Generator(**RELEASE_CONFIG).eval().requires_grad_(False)
    pipe = TalkerPipeline(llm.to(device).eval(), demo_tokenizer(), vae.to(device).eval(), spk.to(device).eval(),
                          gen.to(device), device=device, render_dtype=render_dtype)
    return pipe, gen


def stage_stream(device, args):
    """pipe.stream on the tiny demo models, then at the released sizes (random weights) on `device`: the
    full-size LIA-X renders ~19 s/frame in float32 on 2 CPU cores, so the full-size rows stream without
    rendering (time to first audio, AR + decode real-time factor) and time the first frame's render alone
    (identity encode + 1 frame, float32). The full-size request reads its reference motion from a file
    (no LIA-X encoder pass, ~3 s per prefix frame on CPU, in the first-audio time)."""
    import torch
    from lia_x.render import FrameRenderer
    from media import video_io
    from runtime.inputs import DEFAULT_REF_VIDEO
    from runtime.pipeline import TalkerPipeline
    from runtime.request import GenerationRequest
    text = "Welcome to Talker. From a single sentence, it creates the speech and the talking face together."
    tiny = TalkerPipeline.demo(device=device)
    tiny.llm.head_stop.never_stop_()
    for every in (1, 4):
        yield from _stream_rows(tiny, "stream (tiny)", GenerationRequest(text=text, max_seconds=4.0), every, True)

    render_dtype = torch.float32  # bf16 convolutions are emulated on CPUs without AVX512-BF16/AMX (~40x slower)
    pipe, gen = _full_size_pipeline(device, render_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ref_motion = os.path.join(tmp, "ref_motion.pt")  # the LIA-X encoder (~3 s/frame) left out
        torch.save(torch.zeros(125, 40), ref_motion)
        request = GenerationRequest(text=text, max_seconds=float(args.stream_seconds), ref_motion=ref_motion)
        yield from _stream_rows(pipe, "stream (full)", request, 1, render=False)
    face = video_io.read_first_frame(DEFAULT_REF_VIDEO)
    renderer, t_identity = _timed(lambda: FrameRenderer(gen, face, render_dtype, batch_size=1), device)
    _, t_frame = _timed(lambda: renderer.render(torch.zeros(1, 40)), device)
    yield Row("stream (full)", f"first frame's render ({str(render_dtype)[6:]})", t_identity + t_frame, "s",
              f"identity encode {t_identity:.1f} s + 1 frame {t_frame:.1f} s; add it to the first audio chunk's time",
              decimals=1)


# ------------------------------------------------------------------------------------------ evaluation

def _eval_row(metric, what, fn, device, clip_seconds):
    """fn() timed after a warm-up call: what one clip of `clip_seconds` costs this metric."""
    import torch
    with torch.no_grad():
        fn()  # warm-up (allocations, oneDNN kernels)
        _, elapsed = _timed(fn, device)
    return Row("eval", f"{metric}: {what}", elapsed, "s", f"{elapsed / clip_seconds:.2f} s per clip-second")


def stage_eval(device, args):
    """evaluate.py's metric networks at their released sizes (random weights), per clip of --eval-seconds: what
    scoring a clip costs on this machine (the I3D of FVD is an opaque TorchScript file: not timed)."""
    import numpy as np
    import torch
    from evaluation import fid, s3fd, syncnet, utmos
    from speaker_verification import init_model

    seconds, rng = args.eval_seconds, np.random.default_rng(0)
    n_frames, n_16k = int(seconds * 25), int(seconds * 16000)
    torch.manual_seed(0)

    sync_net = syncnet.SyncNet().to(device).eval()
    crops = rng.integers(0, 256, (n_frames, 224, 224, 3), dtype=np.uint8)
    audio = (rng.standard_normal(n_16k) * 3000).astype(np.int16)
    yield _eval_row("Sync-C/D", f"SyncNet on a {seconds:g} s 224x224 crop (offset scan included)",
                    lambda: syncnet.evaluate_arrays(sync_net, crops, audio), device, seconds)
    detector = s3fd.S3FD().to(device).eval()
    frames = rng.integers(0, 256, (n_frames, 512, 512, 3), dtype=np.uint8)
    yield _eval_row("face track", f"S3FD at scale 0.25 on {n_frames} frames of 512x512",
                    lambda: s3fd.detect_faces_batch(detector, list(frames), conf_th=0.9, scales=(0.25,)),
                    device, seconds)
    mos = utmos.UTMOS22Strong().to(device).eval()
    wave = 0.1 * torch.randn(1, int(seconds * 24000), device=device)
    yield _eval_row("UTMOS", f"UTMOS22 strong, {seconds:g} s at 24 kHz", lambda: mos(wave, 24000), device, seconds)
    inception = fid.FIDInception().to(device).eval()
    images = torch.rand(n_frames, 3, 512, 512, device=device)
    yield _eval_row("FID", f"Inception pool3 of {n_frames} frames of 512x512", lambda: inception(images), device,
                    seconds)
    speaker = init_model("wavlm_large").to(device).eval()
    wav16k = 0.1 * torch.randn(1, n_16k, device=device)
    yield _eval_row("SIM", f"WavLM-Large + ECAPA, {seconds:g} s (the prompt's embedding is cached per voice)",
                    lambda: speaker(wav16k), device, seconds)


# ------------------------------------------------------------------------------------------ the stages

@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., Iterator[Row]]  # run(device, args): the stage's rows, each yielded once measured
    default: bool  # run when --stages is not given
    about: str  # one line for --help


STAGES = {s.name: s for s in [
    Stage("llm_tiny", stage_llm_tiny, True, "tiny SpeechLLM: AR loop ms/patch per loop backend"),
    Stage("llm", stage_llm, True, "full-size SpeechLLM: build time, AR loop ms/patch per loop backend"),
    Stage("roofline", stage_roofline, True, "the loop's parts and whole vs this machine's GEMM floor; LIA-X FLOPs"),
    Stage("batch_tiny", stage_batch_tiny, False, "tiny SpeechLLM: patches/s of N requests run together"),
    Stage("batch", stage_batch, False, "full-size SpeechLLM: patches/s of N requests run together"),
    Stage("vae", stage_vae, True, "WhisperX-VAE: encode and decode 5 s"),
    Stage("spk", stage_spk, True, "speaker encoder (WavLM-Large + ECAPA): 5 s"),
    Stage("liax", stage_liax, False, "LIA-X 512x512 render, float32 / bfloat16, batch 1 / --liax-batch"),
    Stage("train_tiny", stage_train_tiny, True, "tiny training preset: s/step, online and cached features"),
    Stage("train", stage_train, True, "full-size fwd+bwd at batch 1, online and cached features"),
    Stage("t2av_rss", stage_t2av_rss, False, "peak RSS of infer.py t2av runs (writes ~11.6 GB of random weights)"),
    Stage("stream", stage_stream, False, "pipe.stream: first audio chunk / frame, real-time factor"),
    Stage("eval", stage_eval, False, "evaluate.py's metric networks: seconds per clip per metric"),
]}


# ------------------------------------------------------------------------------------------ one stage, own process

def _peak_memory(device) -> str:
    import torch
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    return f"RSS peak {rss:.2f} GiB{gpu}"


def run_stage(stage, args):
    """In the stage's own process: append one JSON line {"row": fields} to args.rows_to per row as soon as it is
    measured, then {"memory": the stage's peak memory} (also when the stage raises)."""
    import torch
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    with open(args.rows_to, "a") as out:
        def write(record):
            out.write(json.dumps(record) + "\n")
            out.flush()

        try:
            for row in stage.run(device, args):
                write({"row": asdict(row)})
        finally:
            write({"memory": _peak_memory(device)})


def read_rows(path) -> list:
    """The rows a stage's process wrote to `path`, each given the stage's peak memory (when it got that far)."""
    if not os.path.exists(path):
        return []
    rows, memory = [], ""
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):  # cut off mid-write
                break
            record = json.loads(line)
            if "row" in record:
                rows.append(Row(**record["row"]))
            else:
                memory = record["memory"]
    for row in rows:
        row.memory = row.memory or memory
    return rows


def _run_child(stage, rows_to, args) -> Optional[str]:
    """Run one stage in a fresh process; None if it finished, else why not."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--run-stage", stage.name, "--rows-to", rows_to]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.timeout:g} s"
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return None


def _failed(stage, why) -> Row:
    return Row(stage.name, "FAILED", None, "", note=why[:120])


def run_stages(stages, args) -> list:
    """Every stage's rows; a stage that did not finish keeps the rows it measured, then a FAILED row. An
    interrupt (Ctrl-C, SIGTERM) stops the stage running and skips the rest."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            rows_to = os.path.join(tmp, f"{stage.name}.jsonl")
            try:
                failure = _run_child(stage, rows_to, args)
            except KeyboardInterrupt:
                return rows + read_rows(rows_to) + [_failed(stage, "interrupted")]
            rows += read_rows(rows_to) + ([_failed(stage, failure)] if failure else [])
    return rows


# ------------------------------------------------------------------------------------------ output

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu model unknown"


def print_table(rows):
    cells = [r.cells() for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    print(" | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


def parse_args():
    stage_list = "\n".join(f"  {s.name:<11}{'*' if s.default else ' '} {s.about}" for s in STAGES.values())
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="stages (* = default):\n" + stage_list,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), metavar="STAGE",
                    default=[s.name for s in STAGES.values() if s.default], help="stages to run (listed below)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--liax-frames", type=int, default=2, help="frames timed per LIA-X setting")
    ap.add_argument("--liax-batch", type=int, default=2, help="batch size of the batched LIA-X runs")
    ap.add_argument("--train-steps", type=int, default=20, help="optimizer steps timed per tiny training run")
    ap.add_argument("--stream-seconds", type=float, default=3.0, help="audio generated by the full-size stream rows")
    ap.add_argument("--llm-seconds", type=float, default=None,
                    help="seconds generated per timed AR loop (default: the released length cap, ~7 s)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                    help="dtypes of the roofline stage")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8], help="batch stage sizes")
    ap.add_argument("--eval-seconds", type=float, default=4.0, help="clip length of the eval stage's metric rows")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a stage may run; it is then stopped, keeping the rows it measured (default: none)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--run-stage", choices=list(STAGES), help=argparse.SUPPRESS)  # in the stage's own process
    ap.add_argument("--rows-to", help=argparse.SUPPRESS)  # where that process writes its rows
    return ap.parse_args()


def main():
    args = parse_args()
    if args.run_stage:
        return run_stage(STAGES[args.run_stage], args)

    import torch
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout`, `kill`: as Ctrl-C, print what was measured
    machine = (f"torch {torch.__version__}, device {args.device}, threads {args.threads or torch.get_num_threads()}, "
               f"cpus {os.cpu_count()}, {_cpu_model()}")
    if not args.json:
        print(machine, flush=True)
    rows = run_stages([STAGES[name] for name in args.stages], args)
    if args.json:
        print(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
