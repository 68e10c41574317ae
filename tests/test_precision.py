"""precision.py: what `auto` means (bf16 where the hardware runs it natively), its wiring into the pipeline and
the command line, and the renderer's bf16 error set against the H.264 encode's own.

The CPU flags and the GEMM probe are mocked to test both branches on any machine; one real probe runs too.
The loop's bf16 error bounds are tests/test_speed.py's (teacher-forced on the ar_loop fixture, and over a clip).
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import infer
from runtime import precision
from runtime.outputs import GenerationResult
from runtime.pipeline import TalkerPipeline

CUDA = torch.device("cuda")  # a device object only: get_device_capability is mocked where it is asked


@pytest.fixture
def cpu_with(monkeypatch):
    """cpu_with(features, speedup): this CPU's native bf16 features and the probe's bf16/float32 ratio."""
    calls = []

    def set_(features, speedup=2.0):
        monkeypatch.setattr(precision, "cpu_bf16_features", lambda: list(features))

        def probe():
            calls.append(1)
            return 2.0 * speedup, 2.0, speedup
        monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
        return calls
    monkeypatch.delenv(precision.PROBE_ENV, raising=False)
    return set_


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    assert {"avx512_bf16", "amx_bf16"} <= precision._proc_cpuinfo_flags(str(x86))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert "bf16" in precision._proc_cpuinfo_flags(str(arm))
    assert precision._proc_cpuinfo_flags(str(tmp_path / "none")) == set()

    def features(flags, machine="x86_64", torch_flags=()):
        monkeypatch.setattr(precision, "_proc_cpuinfo_flags", lambda: set(flags))
        monkeypatch.setattr(precision, "_torch_flag", lambda name: name in torch_flags)
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)
        return precision.cpu_bf16_features()
    assert features({"avx2", "avx512f"}) == []  # AVX-512 without BF16 (Ice Lake, Zen 3): emulated bf16
    assert features({"avx512_bf16"}) == ["AVX512-BF16"]
    assert features({"avx512_bf16", "amx_bf16"}) == ["AVX512-BF16", "AMX-BF16"]
    assert features(set(), torch_flags={"_is_avx512_bf16_supported"}) == ["AVX512-BF16"]  # no /proc (macOS ...)
    assert features({"asimd", "bf16"}, "aarch64") == ["ARM BF16"]
    assert features({"bf16"}) == []  # an x86 flag list never means ARM's bf16


def test_auto_on_a_cpu_with_native_bf16_is_bf16_when_the_probe_agrees(cpu_with):
    calls = cpu_with(["AVX512-BF16"], speedup=2.1)
    for part in ("loop", "render"):
        dtype, why = precision.resolve_dtype("auto", "cpu", part)
        assert dtype == torch.bfloat16 and why == "auto: CPU has AVX512-BF16, bf16 GEMM 2.1x float32"
    assert precision.resolve_dtype(None, "cpu")[0] == torch.bfloat16  # None is auto (the old default)
    assert calls  # decided by measuring, not by the flags alone

    cpu_with(["AVX512-BF16"], speedup=0.9)  # flags say yes, the kernels say no (an old oneDNN, a VM ...)
    dtype, why = precision.resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "only 0.90x" in why


def test_auto_on_a_cpu_without_native_bf16_is_float32_and_does_not_probe(cpu_with):
    calls = cpu_with([], speedup=5.0)
    for part in ("loop", "render"):
        dtype, why = precision.resolve_dtype("auto", "cpu", part)
        assert dtype == torch.float32 and "no native bf16" in why
    assert not calls


def test_probe_off_trusts_the_flags(cpu_with, monkeypatch):
    calls = cpu_with(["AMX-BF16"], speedup=0.5)
    monkeypatch.setenv(precision.PROBE_ENV, "0")
    dtype, why = precision.resolve_dtype("auto", "cpu")
    assert dtype == torch.bfloat16 and "TALKER_BF16_PROBE=0" in why and not calls


def test_named_dtypes_are_kept_whatever_the_hardware(cpu_with):
    calls = cpu_with(["AVX512-BF16"])
    assert precision.resolve_dtype("float32", "cpu") == (torch.float32, "requested")
    assert precision.resolve_dtype("bfloat16", "cpu", "render") == (torch.bfloat16, "requested")
    assert precision.resolve_dtype(torch.float32, CUDA) == (torch.float32, "requested")
    assert not calls
    cpu_with([])
    assert precision.resolve_dtype("bfloat16", "cpu")[0] == torch.bfloat16  # emulated, but asked for
    with pytest.raises(ValueError, match="expected one of auto, float32, bfloat16, got 'half'"):
        precision.resolve_dtype("half", "cpu")


def test_cuda_loop_is_bf16_as_the_reference_and_renders_bf16_where_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert precision.native_bf16(CUDA) == (True, "CUDA sm_90 has native bf16")
    assert precision.resolve_dtype("auto", CUDA, "loop") == (torch.bfloat16, "auto: CUDA, bf16 autocast as the "
                                                                              "reference")
    assert precision.resolve_dtype("auto", CUDA, "render")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: no native bf16
    assert precision.resolve_dtype("auto", CUDA, "loop")[0] == torch.bfloat16  # the reference's autocast, as ever
    dtype, why = precision.resolve_dtype("auto", CUDA, "render")
    assert dtype == torch.float32 and "sm_70 has no native bf16" in why


def test_the_real_probe_runs_once_per_process_and_leaves_threads_and_rng_alone():
    precision._probe.cache_clear()
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    t32, t16, speedup = precision.probe_bf16_speedup()
    assert t32 > 0 and t16 > 0 and speedup == pytest.approx(t32 / t16)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
    assert precision.probe_bf16_speedup() == (t32, t16, speedup)  # cached
    native, why = precision.native_bf16("cpu")
    assert isinstance(native, bool) and why.startswith("CPU ")


def test_summary_line_says_what_was_chosen_and_why():
    bf16 = (torch.bfloat16, "auto: CPU has AVX512-BF16, bf16 GEMM 2.1x float32")
    assert precision.summary_note(bf16, bf16) == "loop and render bfloat16 (auto: CPU has AVX512-BF16, bf16 GEMM " \
                                                 "2.1x float32)"
    assert precision.summary_note((torch.float32, "requested"), bf16).startswith(
        "loop float32 (requested), render bfloat16 (auto: CPU")
    r = GenerationResult(mode="tts", text="", seed=0, audio_24k=torch.zeros(24000), speech_latents=torch.zeros(1, 32),
                         motion_raw=None, generated_motion_norm=None, n_patches=1, stopped_by="stop_head",
                         timings={"generate": 1.0}, precision="loop float32 (requested)")
    assert r.summary().endswith("total 1.0s; loop float32 (requested)")


def test_demo_stays_float32_under_auto_and_takes_named_dtypes(demo_pipe, monkeypatch):
    from runtime import pipeline

    def no_probe(device):
        raise AssertionError("the demo's auto does not ask the hardware")
    monkeypatch.setattr(precision, "native_bf16", no_probe)
    for part in ("loop", "render"):
        assert pipeline._demo_dtype("auto", torch.device("cpu"), part)[0] == torch.float32
    pipe = demo_pipe  # TalkerPipeline.demo(): the golden demo outputs (test_pipeline.py) are float32 ones
    assert pipe.render_dtype == torch.float32 and pipe.llm.backbone_dtype == torch.float32
    assert pipe.precision_note("t2av") == "loop and render float32 (auto: the demo's tiny models stay float32)"
    assert pipe.precision_note("tts") == "loop float32 (auto: the demo's tiny models stay float32)"
    pipe = TalkerPipeline.demo(render_dtype="bfloat16", dtype=torch.bfloat16)
    assert pipe.render_dtype == torch.bfloat16 and pipe.generator.dec.conv1.conv.weight.dtype == torch.bfloat16
    assert pipe.llm.backbone_dtype == torch.bfloat16
    assert pipe.precision_note() == "loop and render bfloat16 (requested)"


@pytest.mark.parametrize("native", [True, False])
def test_from_pretrained_auto_follows_the_hardware(release_dir, tiny_loaders, no_env, cpu_with, native):
    from runtime import weights

    cpu_with(["AVX512-BF16"] if native else [], speedup=2.0)
    pipe = TalkerPipeline.from_pretrained(release_dir / "talker-t2av", liax_ckpt=release_dir / "lia-x.pt",
                                          wavlm_ckpt=release_dir / "wavlm_large_finetune.pth", device="cpu",
                                          needs=weights.needed_for("tts"))
    want = torch.bfloat16 if native else torch.float32
    assert pipe.render_dtype == want and pipe.llm.backbone_dtype == want and pipe.llm.head_dtype == want
    assert pipe.precision_note().startswith(f"loop and render {str(want)[6:]} (auto: CPU ")
    r = pipe.generate(mode="tts", seed=0, progress=False, max_seconds=0.5)
    assert r.summary().endswith(pipe.precision_note("tts")) and torch.isfinite(r.audio_24k).all()
    f32 = TalkerPipeline.from_pretrained(  # float32: one argument away
        release_dir / "talker-t2av", wavlm_ckpt=release_dir / "wavlm_large_finetune.pth", device="cpu",
        needs=weights.needed_for("tts"), dtype="float32", render_dtype=torch.float32)
    assert f32.llm.backbone_dtype == torch.float32 and f32.render_dtype == torch.float32
    with pytest.raises(ValueError, match="^render_dtype: expected one of"):
        TalkerPipeline.from_pretrained(release_dir / "talker-t2av", render_dtype="fp8")


def test_cli_defaults_to_auto_and_passes_it_on(monkeypatch):
    args = infer.build_parser().parse_args([])
    assert (args.dtype, args.render_dtype) == ("auto", "auto")
    assert infer._dtype(args.render_dtype) is None  # None: from_pretrained resolves auto
    seen = {}

    def fake_from_pretrained(*a, **kw):
        seen.update(kw)
        raise SystemExit(0)
    monkeypatch.setattr(TalkerPipeline, "from_pretrained", fake_from_pretrained)
    with pytest.raises(SystemExit):
        infer.load_pipeline(infer.build_parser().parse_args(["--device", "cpu"]), {"t2av"})
    assert seen["dtype"] is None and seen["render_dtype"] is None
    with pytest.raises(SystemExit):
        infer.load_pipeline(infer.build_parser().parse_args(["--device", "cpu", "--render-dtype", "float32",
                                                             "--dtype", "float32"]), {"t2av"})
    assert seen["dtype"] == torch.float32 and seen["render_dtype"] == torch.float32


@torch.no_grad()
def test_bf16_loop_over_a_clip_stays_within_its_bound(one_thread):
    """The loop in bf16 (what auto picks on a CPU with native bf16) against float32 over a 4 s t2av clip of the
    demo models, same seed and noise, a stop head that never fires (equal lengths). Measured: relative L2
    error 0.62 % audio, 0.61 % latents, 0.54 % motion; bound 2 %. Per part, teacher-forced on the released
    loop's fixture: tests/test_speed.py (BF16_BOUNDS)."""
    pipes = TalkerPipeline.demo(), TalkerPipeline.demo(dtype="bfloat16")
    for pipe in pipes:
        pipe.llm.head_stop.never_stop_()
    f32, bf16 = (pipe.generate(mode="t2av", seed=0, progress=False, max_seconds=4.0) for pipe in pipes)
    assert pipes[1].llm.backbone_dtype == torch.bfloat16 and bf16.n_patches == f32.n_patches >= 20

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())
    errs = {"audio": rel(bf16.audio_24k, f32.audio_24k), "latents": rel(bf16.speech_latents, f32.speech_latents),
            "motion": rel(bf16.motion_raw, f32.motion_raw)}
    assert all(1e-4 < e < 0.02 for e in errs.values()), errs  # and it really ran in bf16


# ------------------------------------------------------------------------------------------ the renderer's error

def _h264(frames: np.ndarray) -> np.ndarray:
    """The frames after the product's encode (video_io: libx264 crf 18, yuv420p) and a decode."""
    from media import video_io

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.mp4"
        video_io.write_video(path, frames, fps=25)
        return video_io.read_frames(path)[0]


def _levels(a: np.ndarray, b: np.ndarray) -> tuple:
    """(mean, 99th percentile) of |a - b| in uint8 levels."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


def test_bf16_render_error_is_below_the_h264_encodes(one_thread):
    """bf16 rendering (the LIA-X decoder's convolutions, as `--render-dtype bfloat16` and auto on native-bf16
    hardware run it) against float32, set against what the H.264 encode at crf 18 does to the float32 frames.

    Here the demo's tiny generator (128x128, random weights), measured on an AVX512-BF16 CPU: mean / 99th
    percentile |err| in uint8 levels, bf16 0.66 / 4, the encode 3.4 / 16. Full size (512x512, the fixtures'
    synthetic weights; not run here, ~20-40 s a frame), measured once: lia_x_eq's motion-dependent frame bf16
    0.86 / 10 (PSNR 41.0 dB), the encode 1.38 / 8 (41.1 dB), encoded bf16 against float32 1.84 / 11 (38.5 dB);
    lia_x's frames bf16 0.004 / 0 (72 dB), the encode 1.39 / 5 (43.7 dB)."""
    import lia_x
    from lia_x.render import render_frames

    yy, xx = np.mgrid[0:128, 0:128]
    face = np.stack([128 + 100 * np.sin(xx / 9) * np.cos(yy / 13), 128 + 80 * np.cos((xx + yy) / 17),
                     96 + 60 * np.sin(yy / 7)], -1).clip(0, 255).astype(np.uint8)  # smooth, as faces are
    motion = 0.3 * np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
    f32 = np.concatenate(list(render_frames(lia_x.tiny_generator(3), face, motion)))
    gen = lia_x.cast_conv_weights(lia_x.tiny_generator(3), torch.bfloat16)  # as the pipeline loads it
    bf16 = np.concatenate(list(render_frames(gen, face, motion, dtype=torch.bfloat16)))
    bf16_mean, bf16_p99 = _levels(bf16, f32)
    codec_mean, codec_p99 = _levels(_h264(f32), f32)
    assert 0 < bf16_mean < codec_mean / 3 and bf16_p99 < codec_p99 / 2
    # what a viewer gets: the encoded bf16 frames are about as far from float32 as the encoded float32 ones
    assert _levels(_h264(bf16), f32)[0] < 1.2 * codec_mean
