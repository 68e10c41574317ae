#!/usr/bin/env python
"""Speed and memory of each stage, printed as a table. Random weights at full size: timings do
not depend on the values (except how many patches the random stop head lets through, so the
LLM is reported per patch).

    python bench.py                          # every stage except the full-size LIA-X render
    python bench.py --stages liax            # LIA-X at 512x512 (about 6 min on 2 CPU cores)
    python bench.py --device cuda --stages llm vae spk liax
    python bench.py --stages stream          # pipe.stream: first audio chunk / frame, real-time factor

Each stage runs in a fresh process, so "peak RSS" is that stage's own high-water mark (it includes
the ~0.4 GB of the imported libraries); on CUDA the peak allocated GPU memory is reported too.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

STAGES = ("llm_tiny", "llm", "vae", "spk", "liax", "train_tiny", "train", "stream")
DEFAULT_STAGES = ("llm_tiny", "llm", "vae", "spk", "train_tiny", "train")


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _llm_rows(model, device, label):
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.llm.config.vocab_size - 1, (1, 40), generator=g).to(device)
    ref_speech = torch.randn(125, 32, generator=g).to(device)  # 5 s of reference latents
    ref_motion = torch.randn(124, 40, generator=g).to(device)
    speaker = torch.randn(1, 256, generator=g).to(device)
    from generation import Sampling
    torch.manual_seed(0)
    never_stop = Sampling(stop_min_patches=10**6)
    run = lambda: model.generate(ids, 30, ref_speech, speaker, ref_motion, sampling=never_stop)  # noqa: E731
    model.generate(ids, 30, ref_speech, speaker, ref_motion, max_seconds=0.5)  # warm-up (few patches)
    out, seconds = _timed(run, device)
    return [dict(stage=label, what=f"T2AV AR loop, {out.n_patches} patches (no early stop)",
                 value=f"{seconds / out.n_patches * 1000:.1f} ms/patch",
                 note=f"{out.n_patches * 0.16 / seconds:.2f}x real time")]


def stage_llm_tiny(device, args):
    import torch
    from speech_llm import SpeechLLM, tiny_model_args_and_config
    torch.manual_seed(0)
    model = SpeechLLM(*tiny_model_args_and_config()).to(device).eval()
    return _llm_rows(model, device, "llm (tiny)")


def stage_llm(device, args):
    import torch
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    torch.manual_seed(0)
    (model, seconds) = _timed(lambda: SpeechLLM(released_model_args(), qwen3_0_6b_config()), device)
    if device.type == "cuda":
        model.llm.to(torch.bfloat16)  # as from_pretrained does on CUDA
    model = model.to(device).eval()
    n = sum(p.numel() for p in model.parameters())
    rows = [dict(stage="llm (full)", what=f"build, {n / 1e6:.0f} M params (random init)",
                 value=f"{seconds:.1f} s", note="")]
    return rows + _llm_rows(model, device, "llm (full)")


def stage_vae(device, args):
    import torch
    from whisperx_vae import WhisperXVAE, assumed_release_cfg
    from audio import log_mel_spectrogram, resample
    torch.manual_seed(0)
    model = WhisperXVAE(assumed_release_cfg()).to(device).eval()
    wav_24k = 0.1 * torch.randn(1, 1, 24000 * 5)
    mel = log_mel_spectrogram(resample(wav_24k[0, 0], 24000, 16000))[None, None]
    wav_24k, mel = wav_24k.to(device), mel.to(device)
    with torch.no_grad():
        latent, t_enc = _timed(lambda: model.encode(wav_24k, mel, "btc"), device)
        _, t_dec = _timed(lambda: model.decode(latent, "btc"), device)
    return [dict(stage="whisperx-vae", what="encode 5 s (Whisper large-v3 encoder on 30 s mel)",
                 value=f"{t_enc:.2f} s", note="assumed release codec config"),
            dict(stage="whisperx-vae", what="decode 5 s", value=f"{t_dec:.2f} s",
                 note=f"{5 / t_dec:.1f}x real time")]


def stage_spk(device, args):
    import torch
    from speaker_verification import init_model
    torch.manual_seed(0)
    model = init_model("wavlm_large").to(device).eval()
    wav = 0.1 * torch.randn(1, 16000 * 5, device=device)
    with torch.no_grad():
        _, seconds = _timed(lambda: model(wav), device)
    return [dict(stage="speaker encoder", what="WavLM-Large + ECAPA, 5 s", value=f"{seconds:.2f} s", note="")]


def stage_liax(device, args):
    import torch
    from lia_x import RELEASE_CONFIG, Generator
    from lia_x.render import time_render
    torch.manual_seed(0)
    generator = Generator(**RELEASE_CONFIG).to(device).eval().requires_grad_(False)
    rows = []
    settings = [(dtype, batch) for dtype in (torch.float32, torch.bfloat16) for batch in (1, args.liax_batch)]
    for dtype, batch in settings:
        r = time_render(generator, n_frames=max(batch, args.liax_frames), batch_size=batch, dtype=dtype)
        rows.append(dict(stage="lia-x 512x512", what=f"render, batch {batch}, {str(dtype)[6:]}",
                         value=f"{r['per_frame_s']:.2f} s/frame", note=f"encoder once: {r['encoder_s']:.1f} s"))
    return rows


def _train_rows(folder, n_clips, seconds):
    from training import synthetic
    paths = synthetic.write_dataset(folder, n_t2sv=n_clips // 2, n_tts=n_clips - n_clips // 2, seconds=seconds)
    return paths["jsonl"]


def stage_train_tiny(device, args):
    """Training throughput of the tiny preset (training/config_tiny.json, batch 2), online and cached features."""
    import json
    import tempfile

    import torch
    from training import precompute, train
    torch.set_num_threads(1)  # what train.py uses for the tiny preset
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _train_rows(os.path.join(tmp, "data"), 8, (3.0, 4.0, 5.0))
        cfg = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "training", "config_tiny.json")))
        cfg.update(data_path=manifest, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1000,
                   max_steps=args.train_steps, use_cpu=device.type == "cpu")
        t0 = time.perf_counter()
        precompute.run(dict(cfg, feature_cache=os.path.join(tmp, "cache")), log=lambda m: None)
        t_pre = time.perf_counter() - t0
        for label, extra in (("online features", {}), ("cached features", {"feature_cache": os.path.join(tmp, "cache")})):
            out = train.run(dict(cfg, output_dir=os.path.join(tmp, label.split()[0]), **extra), log=lambda m: None)
            per_step = out["train_seconds"] / out["global_step"]
            rows.append(dict(stage="train (tiny)", what=f"{label}, batch 2, clips 3-5 s, {out['global_step']} steps",
                             value=f"{per_step:.3f} s/step",
                             note=f"{2 / per_step:.1f} samples/s" + (f"; precompute {t_pre / 8:.2f} s/clip"
                                                                        if extra else "")))
    return rows


def stage_train(device, args):
    """One forward + backward of the released-size SpeechLLM at batch 1 (5 s clip with motion), with the frozen
    encoders running inside the step (online) and with cached features."""
    import torch
    from pipeline import demo_tokenizer
    from speaker_verification import init_model
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    from training.dataset import Collator, DataArguments, TalkerDataset, build_rows
    from whisperx_vae import WhisperXVAE, assumed_release_cfg
    import tempfile

    torch.manual_seed(0)
    model = SpeechLLM(released_model_args(), qwen3_0_6b_config())
    model.pretrained_speech_encoder = WhisperXVAE(assumed_release_cfg())
    model.spk = init_model("wavlm_large")
    model = model.freeze_for_training().to(device).train()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _train_rows(os.path.join(tmp, "data"), 2, (5.0,))
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
    _timed(lambda: step(cached), device)  # warm-up
    _, t_cached = _timed(lambda: step(cached), device)
    _, t_online = _timed(lambda: step(online), device)
    what = f"fwd+bwd batch 1, 5 s clip, {n / 1e6:.0f} M trainable"
    return [dict(stage="train (full)", what=f"{what}, cached features", value=f"{t_cached:.2f} s/step", note=""),
            dict(stage="train (full)", what=f"{what}, online (VAE + WavLM in the step)", value=f"{t_online:.2f} s/step",
                 note=f"encoders {t_online - t_cached:.2f} s")]


def _stream_rows(pipe, label, request, every, render):
    """Time to the first audio chunk / first frame and the stream's real-time factor (audio s / wall s)."""
    import time as _time

    from streaming import Chunk
    t0 = _time.perf_counter()
    first_audio = first_frame = None
    n_samples = 0
    for item in pipe.stream(request, every=every, render=render):
        if not isinstance(item, Chunk):
            break
        now = _time.perf_counter() - t0
        if first_audio is None and item.audio_24k.numel():
            first_audio = now
        if first_frame is None and item.frames is not None:
            first_frame = now
        n_samples += item.audio_24k.numel()
    wall = _time.perf_counter() - t0
    what = f"stream every {every} patch{'es' if every > 1 else ''}, {n_samples / 24000:.1f} s audio"
    rows = [dict(stage=label, what=what + ": first audio chunk", value=f"{first_audio:.2f} s",
                 note="after the request starts (inputs included)"),
            dict(stage=label, what=what + (": real-time factor" if render else ": real-time factor, AR + decode"),
                 value=f"{n_samples / 24000 / wall:.2f}x real time", note=f"wall {wall:.1f} s")]
    if first_frame is not None:
        rows.insert(1, dict(stage=label, what=what + ": first video frame", value=f"{first_frame:.2f} s", note=""))
    return rows


def _never_stop(llm):
    import torch
    with torch.no_grad():
        llm.head_stop.proj.weight.zero_()
        llm.head_stop.proj.bias.fill_(1.0)
        llm.head_stop.head.weight.fill_(-1.0)


def stage_stream(device, args):
    """pipe.stream on the tiny demo models, then at the released sizes (random weights) on `device`: the
    full-size LIA-X renders ~19 s/frame in float32 on 2 CPU cores, so the full-size rows stream without
    rendering (time to first audio, AR + decode real-time factor) and time the first frame's render alone
    (identity encode + 1 frame, bfloat16 on CPU). The full-size request reads its reference motion from a file
    (no LIA-X encoder pass, ~3 s per prefix frame on CPU, in the first-audio time)."""
    import torch
    from pipeline import TalkerPipeline, demo_tokenizer
    from request import GenerationRequest
    rows = []
    tiny = TalkerPipeline.demo(device=device)
    _never_stop(tiny.llm)
    text = "Welcome to Talker. From a single sentence, it creates the speech and the talking face together."
    for every in (1, 4):
        rows += _stream_rows(tiny, "stream (tiny)", GenerationRequest(text=text, max_seconds=4.0), every, True)
    print("BENCH_ROWS " + json.dumps(rows), file=sys.stderr, flush=True)  # partial figures if cut short

    import speaker_verification
    from lia_x import RELEASE_CONFIG, Generator
    from lia_x.render import FrameRenderer
    from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args
    from whisperx_vae import WhisperXVAE, assumed_release_cfg
    torch.manual_seed(0)
    llm = SpeechLLM(released_model_args(), qwen3_0_6b_config())
    if device.type == "cuda":
        llm.llm.to(torch.bfloat16)
    _never_stop(llm)
    vae = WhisperXVAE(assumed_release_cfg())
    spk = speaker_verification.init_model("wavlm_large")
    render_dtype = torch.bfloat16 if device.type == "cpu" else torch.float32
    gen = Generator(**RELEASE_CONFIG).eval().requires_grad_(False)
    pipe = TalkerPipeline(llm.to(device).eval(), demo_tokenizer(), vae.to(device).eval(), spk.to(device).eval(),
                          gen.to(device), device=device, render_dtype=render_dtype)
    import tempfile

    import video_io
    from pipeline import DEFAULT_REF_VIDEO
    face = video_io.read_first_frame(DEFAULT_REF_VIDEO)
    ref_motion = os.path.join(tempfile.mkdtemp(), "ref_motion.pt")  # the LIA-X encoder (~3 s/frame) left out
    torch.save(torch.zeros(125, 40), ref_motion)
    request = GenerationRequest(text=text, max_seconds=float(args.stream_seconds), ref_motion=ref_motion)
    rows += _stream_rows(pipe, "stream (full)", request, 1, render=False)
    print("BENCH_ROWS " + json.dumps(rows), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    renderer = FrameRenderer(gen, face, render_dtype, batch_size=1)
    t_identity = time.perf_counter() - t0
    _, t_frame = _timed(lambda: renderer.render(torch.zeros(1, 40)), device)
    rows.append(dict(stage="stream (full)", what=f"first frame's render ({str(render_dtype)[6:]})",
                     value=f"{t_identity + t_frame:.1f} s", note=f"identity encode {t_identity:.1f} s + 1 frame "
                     f"{t_frame:.1f} s; add it to the first audio chunk's time"))
    return rows


def run_stage(name, device_name, args):
    import torch
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(device_name)
    rows = globals()[f"stage_{name}"](device, args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    for r in rows:
        r["memory"] = f"RSS peak {peak_mb / 1024:.2f} GiB{gpu}"
    print("BENCH_JSON " + json.dumps(rows))


def print_table(rows):
    cols = ("stage", "what", "value", "note", "memory")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(DEFAULT_STAGES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--liax-frames", type=int, default=2, help="frames timed per LIA-X setting")
    ap.add_argument("--liax-batch", type=int, default=2, help="batch size of the batched LIA-X runs")
    ap.add_argument("--train-steps", type=int, default=20, help="optimizer steps timed per tiny training run")
    ap.add_argument("--stream-seconds", type=float, default=3.0, help="audio generated by the full-size stream rows")
    ap.add_argument("--_stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stage:
        return run_stage(args._stage, args.device, args)

    import torch
    print(f"torch {torch.__version__}, device {args.device}, "
          f"threads {args.threads or torch.get_num_threads()}, cpus {os.cpu_count()}")
    rows = []
    for name in args.stages:
        cmd = [sys.executable, os.path.abspath(__file__), "--_stage", name] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append(dict(stage=name, what="FAILED", value="", note=err[:120], memory=""))
        else:
            rows += json.loads(lines[-1][len("BENCH_JSON "):])
    print_table(rows)


if __name__ == "__main__":
    main()
