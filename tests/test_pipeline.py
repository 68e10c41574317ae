"""TalkerPipeline on the tiny random demo models: every mode, seeding, outputs, atomic writes, bad inputs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from bad_inputs import bad_cases, library_needle
from conftest import REFERENCE_SAMPLES, shared

from media import video_io
from common.constants import SAMPLES_PER_FRAME
from common.motion_stats import MOTION_MEAN, MOTION_STD, denormalize_motion, normalize_motion
from runtime.inputs import DEFAULT_REF_AUDIO, DEFAULT_REF_VIDEO
from runtime.pipeline import TalkerPipeline
from runtime.prompt import demo_tokenizer
from runtime.request import GenerationRequest, RequestError

FRAME_S = 1 / 25


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(pipe, **kw):
    kw.setdefault("progress", False)
    return pipe.generate(**kw)


# ---------------------------------------------------------------------------------------------- motion stats

def test_motion_stats_match_released_npy():
    mean_path, std_path = shared(REFERENCE_SAMPLES / "motion_mean.npy"), shared(REFERENCE_SAMPLES / "motion_std.npy")
    assert np.array_equal(np.asarray(MOTION_MEAN, np.float32), np.load(mean_path))
    assert np.array_equal(np.asarray(MOTION_STD, np.float32), np.load(std_path))
    raw = torch.randn(7, 40)
    expected = (raw.numpy() - np.load(mean_path)) / np.clip(np.load(std_path), 1e-6, None)
    assert np.allclose(normalize_motion(raw).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(denormalize_motion(normalize_motion(raw)), raw, atol=1e-6)


def test_demo_tokenizer_is_small_and_has_the_placeholders():
    tok = demo_tokenizer()
    assert len(tok) < 512
    ids = tok.apply_chat_template([{"role": "user", "content": "hé"}, {"role": "assistant",
                                   "content": "<SPEECH_FRAME>" * 3}], tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids.count(tok.convert_tokens_to_ids("<SPEECH_FRAME>")) == 3
    assert tok.decode(ids).startswith("<|im_start|>user\nhé<|im_end|>")


# ---------------------------------------------------------------------------------------------- modes

def test_t2av(pipe):
    r = _gen(pipe, mode="t2av", text="Hello there.")
    assert r.motion_raw.shape[1] == 40 and torch.isfinite(r.motion_raw).all()
    # output = reference prefix (0.5 s -> 12 frames) + generated patches, audio and motion aligned
    assert r.prefix_frames == 12
    assert r.motion_raw.shape[0] == 12 + 4 * r.n_patches
    assert r.audio_24k.numel() == r.motion_raw.shape[0] * SAMPLES_PER_FRAME
    assert r.speech_latents.shape == (r.motion_raw.shape[0], 32)
    assert r.stopped_by in ("stop_head", "length_cap")
    if r.stopped_by == "stop_head":  # p_stop >= 0.5 three times in a row, checked from patch 7 on
        assert r.n_patches >= 9


def test_t2av_trim_prefix(pipe):
    full = _gen(pipe, mode="t2av", seed=3)
    trimmed = _gen(pipe, mode="t2av", seed=3, trim_prefix=True)
    assert trimmed.prefix_frames == 0
    assert trimmed.motion_raw.shape[0] == full.motion_raw.shape[0] - full.prefix_frames
    assert torch.equal(trimmed.audio_24k, full.audio_24k[full.prefix_frames * SAMPLES_PER_FRAME:])


def test_t2av_without_prefix(pipe):
    r = _gen(pipe, mode="t2av", gt_prefix_seconds=0)
    assert r.prefix_frames == 0 and r.motion_raw.shape[0] == 4 * r.n_patches


def test_a2v_teacher_forces_the_input_audio(pipe):
    r = _gen(pipe, mode="a2v", audio=DEFAULT_REF_AUDIO)
    data, sr = sf.read(DEFAULT_REF_AUDIO, dtype="float32")
    assert sr == 24000
    assert np.array_equal(r.audio_24k.numpy(), data)  # the output carries the input audio unchanged
    n_frames = int(len(data) / sr * 25)
    assert r.motion_raw.shape == (n_frames, 40)
    assert r.stopped_by == "given_length" and r.n_patches == math.ceil(n_frames / 4)
    assert r.text == ""  # a2v defaults to no transcript


def test_v2a_teacher_forces_the_video_motion(pipe):
    r = _gen(pipe, mode="v2a", video=DEFAULT_REF_VIDEO, text="Some words.")
    frames, _ = video_io.read_frames(DEFAULT_REF_VIDEO)
    assert r.motion_raw.shape == (len(frames), 40)
    from lia_x.render import extract_motion
    assert torch.allclose(r.motion_raw, extract_motion(pipe.generator, frames), atol=1e-6)
    assert r.audio_24k.numel() == len(frames) * SAMPLES_PER_FRAME
    assert r.stopped_by == "given_length" and r.n_patches == math.ceil(len(frames) / 4)


def test_v2a_from_motion_file_renders_it(pipe, tmp_path):
    motion = 0.05 * torch.randn(37, 40)
    torch.save(motion.half(), tmp_path / "m.pt")
    r = _gen(pipe, mode="v2a", motion=tmp_path / "m.pt", output=tmp_path / "o.mp4")
    assert torch.equal(r.motion_raw, motion.half().float())
    info = video_io.probe(r.video_path)
    assert info["n_frames"] == 37 and abs(info["audio_duration"] - 37 * FRAME_S) <= FRAME_S


def test_tts(pipe, tmp_path):
    r = _gen(pipe, mode="tts", text="Only speech.", output=tmp_path / "speech.mp4")
    assert r.motion_raw is None and r.generated_motion_norm is None and r.video_path is None
    assert r.audio_24k.numel() == r.speech_latents.shape[0] * SAMPLES_PER_FRAME
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]
    data, sr = sf.read(tmp_path / "speech.wav", dtype="float32")
    assert sr == 24000 and np.allclose(data, r.audio_24k.numpy())


def test_stereo_and_other_sample_rates_are_accepted(pipe, tmp_path):
    t = np.arange(int(44100 * 1.5)) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], 1)
    sf.write(tmp_path / "voice.flac", stereo, 44100)
    r = _gen(pipe, mode="tts", ref_audio=tmp_path / "voice.flac", text="Hi.")
    assert r.audio_24k.numel() > 0
    r = _gen(pipe, mode="a2v", audio=tmp_path / "voice.flac")
    assert r.audio_24k.numel() == int(1.5 * 24000) and r.motion_raw.shape[0] == int(1.5 * 25)


# ---------------------------------------------------------------------------------------------- seeding

def test_same_seed_same_output_other_seed_differs(pipe):
    a = _gen(pipe, mode="t2av", seed=11, text="Seeded.")
    b = _gen(pipe, mode="t2av", seed=11, text="Seeded.")
    c = _gen(pipe, mode="t2av", seed=12, text="Seeded.")
    assert torch.equal(a.audio_24k, b.audio_24k) and torch.equal(a.motion_raw, b.motion_raw)
    n = min(a.motion_raw.shape[0], c.motion_raw.shape[0])
    assert not torch.equal(a.motion_raw[12:n], c.motion_raw[12:n])


def test_partial_reference_motion_extraction_is_exact(pipe, tmp_path):
    """Only the prefix rows of the reference motion are extracted; the result equals using all rows."""
    frames, _ = video_io.read_frames(DEFAULT_REF_VIDEO)
    from lia_x.render import extract_motion
    torch.save(extract_motion(pipe.generator, frames), tmp_path / "full.pt")
    a = _gen(pipe, mode="t2av", seed=5, ref_motion=tmp_path / "full.pt")
    b = _gen(pipe, mode="t2av", seed=5)
    assert torch.equal(a.audio_24k, b.audio_24k) and torch.allclose(a.motion_raw, b.motion_raw, atol=1e-6)
    assert pipe.reference_motion(DEFAULT_REF_VIDEO, n_needed=12, progress=False).shape == (len(frames), 40)


# ---------------------------------------------------------------------------------------------- files

def test_outputs_mp4_wav_latents(pipe, tmp_path):
    r = _gen(pipe, mode="t2av", output=tmp_path / "sub" / "clip.mp4", save_latents=True)
    info = video_io.probe(r.video_path)
    assert (info["video_codec"], info["pix_fmt"], info["audio_codec"]) == ("h264", "yuv420p", "aac")
    assert info["fps"] == 25 and info["faststart"] is True
    assert info["n_frames"] == r.motion_raw.shape[0]
    assert abs(info["video_duration"] - info["audio_duration"]) <= FRAME_S
    assert abs(info["video_duration"] - r.n_frames * FRAME_S) < 1e-6
    data, sr = sf.read(r.wav_path, dtype="float32")
    assert sr == 24000 and np.allclose(data, r.audio_24k.numpy())
    from safetensors import safe_open
    with safe_open(r.latents_path, "pt") as f:
        assert torch.equal(f.get_tensor("speech_latents"), r.speech_latents)
        assert torch.equal(f.get_tensor("motion_raw"), r.motion_raw)
        assert f.metadata()["mode"] == "t2av" and f.metadata()["stopped_by"] == r.stopped_by
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "clip.latents.safetensors", "clip.mp4", "clip.wav"]


def test_a2v_and_v2a_files(pipe, tmp_path):
    r = _gen(pipe, mode="a2v", output=tmp_path / "a2v.mp4")
    info = video_io.probe(r.video_path)
    assert info["n_frames"] == r.motion_raw.shape[0]
    assert abs(info["audio_duration"] - info["video_duration"]) <= FRAME_S
    r = _gen(pipe, mode="v2a", video=DEFAULT_REF_VIDEO, output=tmp_path / "v2a.mp4")
    src, out = video_io.read_frames(DEFAULT_REF_VIDEO)[0], video_io.read_frames(r.video_path)[0]
    assert np.array_equal(src, out)  # the input video's own frames, stream copied
    info = video_io.probe(r.video_path)
    assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - info["video_duration"]) <= FRAME_S


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_failure_mid_render_leaves_no_file(pipe, tmp_path, monkeypatch, exc):
    from lia_x import render as liax_render
    real = liax_render.render_frames

    def failing(*args, **kwargs):
        it = real(*args, **kwargs)
        yield next(it)
        raise exc("simulated failure while rendering")

    monkeypatch.setattr(liax_render, "render_frames", failing)
    with pytest.raises(exc):
        _gen(pipe, mode="t2av", output=tmp_path / "out.mp4", save_latents=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_one_line_naming_the_file(pipe, tmp_path):
    for name, kwargs, needle in bad_cases(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            _gen(pipe, **kwargs)
        message = str(info.value)
        assert library_needle(needle) in message and "--" not in message, (name, message)
        assert "\n" not in message.strip(), (name, message)


def test_length_cap_max_seconds_and_warning():
    never_stops = TalkerPipeline.demo()
    never_stops.llm.head_stop.never_stop_()  # p_stop = sigmoid(-64 * silu(1)) ~ 0
    r = _gen(never_stops, mode="t2av")
    # the released cap: patches of the reference clip (voice 121 frames -> 31 patches) - prefix (3) + 15
    assert (r.stopped_by, r.n_patches) == ("length_cap", 31 - 3 + 15)
    assert r.warnings and "length cap" in r.warnings[0]
    r = _gen(never_stops, mode="t2av", max_seconds=2.0)
    assert (r.stopped_by, r.n_patches) == ("length_cap", 13) and r.motion_raw.shape[0] == 12 + 52
    r = _gen(never_stops, mode="tts", max_seconds=1.0)
    assert r.n_patches == 7
    with pytest.raises(RequestError, match=r"^max_seconds: must be in \(0, 30\], got 31$"):
        _gen(never_stops, mode="tts", max_seconds=31)


# ---------------------------------------------------------------------------------------------- the redesign

def _stats(t):
    t = t.double().reshape(-1)
    idx = torch.linspace(0, t.numel() - 1, 9).long()
    return {"n": t.numel(), "sum": float(t.sum()), "sumsq": float((t * t).sum()), "samples": t[idx].tolist()}


def _close(got, want, name):
    assert got["n"] == want["n"], name
    for key in ("sum", "sumsq"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, key)
    assert np.allclose(got["samples"], want["samples"], rtol=1e-5, atol=1e-6), name


GOLDEN = json.loads((Path(__file__).parent / "data" / "demo_outputs.json").read_text())


def _drive(pipe, drive: str, requests: list) -> list:
    if drive == "generate":
        return [_gen(pipe, **r) for r in requests]
    if drive == "stream":
        return [list(pipe.stream(**r))[-1] for r in requests]
    return pipe.generate_batch([dict(r) for r in requests], batch_size=4)


@pytest.mark.parametrize("drive", ["generate", "stream", "batch"])
def test_same_outputs_as_before_the_redesign(drive):
    """The demo pipeline's outputs for fixed requests (every mode, trimmed, length caps, long-form) equal those
    of the code before the redesigns (tests/data/demo_outputs.json says which commits), however the run is
    driven: generate(), stream() drained, or generate_batch() (rows of batches of 4)."""
    for never_stop in (False, True):
        pipe = TalkerPipeline.demo()
        if never_stop:
            pipe.llm.head_stop.never_stop_()
        names = [n for n, case in GOLDEN["cases"].items() if bool(case.get("never_stop")) == never_stop]
        results = _drive(pipe, drive, [GOLDEN["cases"][n]["request"] for n in names])
        for name, r in zip(names, results):
            want = GOLDEN["results"][name]
            assert (r.n_patches, r.stopped_by, r.prefix_frames) == (
                want["n_patches"], want["stopped_by"], want["prefix_frames"]), (drive, name)
            assert len(r.windows) == want.get("windows", 0), (drive, name)
            _close(_stats(r.audio_24k), want["audio"], name + ".audio")
            _close(_stats(r.speech_latents), want["latents"], name + ".latents")
            assert (r.motion_raw is None) == (want["motion"] is None), name
            if r.motion_raw is not None:
                _close(_stats(r.motion_raw), want["motion"], name + ".motion")


def test_request_object_and_keywords_are_the_same_request(pipe):
    req = GenerationRequest(mode="tts", text="Same request.", seed=21, cfm_steps=4)
    a = _gen(pipe, request=req)
    b = _gen(pipe, mode="tts", text="Same request.", seed=21, cfm_steps=4)
    c = _gen(pipe, request=req, seed=22)  # keywords override the request's fields
    assert torch.equal(a.audio_24k, b.audio_24k)
    assert not (a.audio_24k.shape == c.audio_24k.shape and torch.equal(a.audio_24k, c.audio_24k))
    assert req.seed == 21  # the caller's request is not modified


def test_progress_callbacks_follow_the_length_plan(pipe):
    events = []
    pipe._encodings.clear()  # the module's pipe may have encoded this reference already (then no motion stage)
    r = pipe.generate(mode="t2av", text="Progress.", output=None, progress=lambda *e: events.append(e))
    patches = [e for e in events if e[0] == "t2av patches"]
    assert patches[-1] == ("t2av patches", r.n_patches, r.plan.max_steps)
    assert [e[1] for e in patches] == list(range(1, r.n_patches + 1))
    assert r.plan.rule == "released" and r.plan.max_steps == 31 - 3 + 15
    assert [e[:2] for e in events if e[0] == "reference motion"][-1] == ("reference motion", r.plan.prefix_frames)


def test_library_errors_name_the_request_field(pipe):
    for kwargs, field_name in ((dict(cfm_steps=0), "cfm_steps"), (dict(fps=30), "fps"), (dict(mode="x"), "mode"),
                               (dict(seed="abc"), "seed"), (dict(trim_prefix="yes"), "trim_prefix"),
                               (dict(speed=2), "speed")):
        with pytest.raises(RequestError) as info:
            _gen(pipe, **kwargs)
        assert info.value.field == field_name and str(info.value).startswith(field_name + ": ")


def test_saved_latents_drive_v2a(pipe, tmp_path):
    """<output>.latents.safetensors (what --save-latents writes) is accepted as `motion`."""
    first = _gen(pipe, mode="t2av", text="Move.", output=tmp_path / "a.mp4", save_latents=True)
    again = _gen(pipe, mode="v2a", text="Move.", motion=first.latents_path)
    assert torch.equal(again.motion_raw, first.motion_raw)
    tts = _gen(pipe, mode="tts", text="No motion.", output=tmp_path / "t.wav", save_latents=True)
    with pytest.raises(ValueError, match="no motion_raw"):
        _gen(pipe, mode="v2a", motion=tts.latents_path)


def test_non_finite_output_is_never_written(tmp_path):
    broken = TalkerPipeline.demo()
    with torch.no_grad():
        broken.llm.speech_cfm.estimator.out_proj.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        _gen(broken, mode="tts", output=tmp_path / "nan.wav")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- bad input holes

def test_v2a_keeps_the_input_frames_and_frame_rate(pipe, tmp_path):
    """A 30 fps input: the output keeps its 60 frames at 30 fps; the speech (25 Hz latents) spans the same 2 s."""
    src = tmp_path / "thirty.mp4"
    frames, _ = video_io.read_frames(DEFAULT_REF_VIDEO, max_frames=60)
    video_io.write_video(src, frames, fps=30)
    r = _gen(pipe, mode="v2a", video=src, text="Thirty.", output=tmp_path / "dub.mp4")
    assert (r.n_frames, r.video_fps) == (60, 30.0) and r.motion_raw.shape[0] == 50
    assert "60 frames at 30 fps (2.00 s video)" in r.summary()
    info = video_io.probe(r.video_path)
    assert (info["n_frames"], info["fps"]) == (60, 30.0)
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / 30
    assert sf.info(r.wav_path).frames == 50 * SAMPLES_PER_FRAME


@pytest.mark.parametrize("rows", [1, 3])
def test_reference_motion_shorter_than_a_patch(pipe, tmp_path, rows):
    """Audio and video stay within one frame for every input, even a 1-frame reference motion."""
    torch.save(0.05 * torch.randn(rows, 40), tmp_path / "short.pt")
    r = _gen(pipe, mode="t2av", ref_motion=tmp_path / "short.pt", output=tmp_path / "o.mp4")
    assert r.motion_raw.shape[0] == r.speech_latents.shape[0]
    info = video_io.probe(r.video_path)
    wav_seconds = sf.info(r.wav_path).frames / 24000
    assert abs(info["video_duration"] - wav_seconds) <= FRAME_S and abs(info["audio_duration"] - wav_seconds) <= FRAME_S


def test_reference_voice_shorter_than_the_prefix(pipe, tmp_path):
    short = tmp_path / "short.wav"
    data, sr = sf.read(DEFAULT_REF_AUDIO, dtype="float32")
    sf.write(short, data[: int(0.2 * sr)], sr)
    r = _gen(pipe, mode="t2av", ref_audio=short, gt_prefix_seconds=0.5)
    assert r.motion_raw.shape[0] == r.speech_latents.shape[0] == r.audio_24k.numel() // SAMPLES_PER_FRAME


def test_non_square_face_warns_or_is_cropped(pipe, tmp_path, monkeypatch):
    wide = tmp_path / "wide.mp4"
    frames, _ = video_io.read_frames(DEFAULT_REF_VIDEO, max_frames=8)
    video_io.write_video(wide, np.concatenate([frames, frames[:, :, :256]], axis=2), fps=25)  # 768 x 512
    from lia_x import render as liax_render
    seen = []
    real = liax_render.render_frames
    monkeypatch.setattr(liax_render, "render_frames", lambda gen, face, *a, **k: seen.append(face.shape) or real(gen, face, *a, **k))
    r = _gen(pipe, mode="t2av", ref_video=wide, output=tmp_path / "a.mp4")
    assert any("768x512, not square" in w and "face_crop=center" in w for w in r.warnings)
    assert seen[-1] == (512, 768, 3)  # squashed by the renderer, as the reference does
    r = _gen(pipe, mode="t2av", ref_video=wide, face_crop="center", output=tmp_path / "b.mp4")
    assert not any("not square" in w for w in r.warnings)
    assert seen[-1] == (512, 512, 3)


def test_unwritable_output_is_found_before_anything_runs(pipe, tmp_path, monkeypatch):
    from runtime.inputs import preflight
    (tmp_path / "file").write_text("x")
    with pytest.raises(RequestError, match=r"^output: .*file is a file, not a folder"):
        preflight(output=tmp_path / "file" / "out.mp4")
    locked = tmp_path / "locked"
    locked.mkdir()
    import subprocess
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        monkeypatch.setattr(pipe, "encode_audio", lambda *a: pytest.fail("generation started"))
        with pytest.raises(RequestError, match=r"^output: .*cannot write in .*locked"):
            _gen(pipe, mode="tts", output=locked / "out.wav")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_one_wording_per_problem(pipe, tmp_path):
    missing = str(tmp_path / "gone")
    for kwargs in (dict(ref_audio=missing + ".wav"), dict(ref_video=missing + ".mp4"), dict(ref_motion=missing + ".pt"),
                   dict(mode="a2v", audio=missing + ".wav"), dict(mode="v2a", video=missing + ".mp4"),
                   dict(mode="v2a", motion=missing + ".pt")):
        with pytest.raises(FileNotFoundError, match=r"gone\.\w+: file not found$"):
            _gen(pipe, **kwargs)
    sf.write(tmp_path / "voice.wav", np.sin(np.arange(16000) / 9).astype(np.float32) * 0.3, 16000)
    for kwargs in (dict(ref_video=tmp_path / "voice.wav"), dict(mode="v2a", video=tmp_path / "voice.wav")):
        with pytest.raises(ValueError, match=r"voice\.wav: no video stream \(audio-only or not a video\)$"):
            _gen(pipe, **kwargs)


def test_demo_runs_one_cpu_thread_as_the_cli_does(monkeypatch):
    """The tiny models lose ~6x to thread synchronisation on a busy 2-core machine: TalkerPipeline.demo()
    picks one intra-op thread on CPU (unless OMP_NUM_THREADS says otherwise), as infer.py --demo does."""
    import torch

    from runtime.pipeline import TalkerPipeline

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        TalkerPipeline.demo()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        TalkerPipeline.demo()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
