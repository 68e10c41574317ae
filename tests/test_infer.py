"""infer.py: the command line over the pipeline (tiny demo models; in-process main() and real subprocesses)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import infer
from media import video_io
from runtime import weights
from bad_inputs import bad_cases, cli_needle

REPO = Path(__file__).resolve().parents[1]
FRAME_S = 1 / 25


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def shared_demo_pipeline(monkeypatch):
    """Build the default demo models once for all in-process CLI runs (TalkerPipeline.demo is deterministic:
    a fresh build gives the same models); other arguments build their own."""
    from runtime.pipeline import TalkerPipeline

    if not hasattr(shared_demo_pipeline, "pipe"):
        shared_demo_pipeline.pipe = TalkerPipeline.demo()
    real_demo = TalkerPipeline.demo.__func__

    def demo(cls, device="cpu", seed=0, render_dtype=torch.float32, render_batch_size=None, checkpoint_dir=None):
        if (str(device), seed, render_dtype, render_batch_size, checkpoint_dir) != ("cpu", 0, torch.float32, None, None):
            return real_demo(cls, device, seed, render_dtype, render_batch_size, checkpoint_dir)
        return shared_demo_pipeline.pipe

    monkeypatch.setattr(TalkerPipeline, "demo", classmethod(demo))


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in weights.ENV_VARS.values():
        env.pop(var, None)
    env.update(extra)
    return env


def _probe_ok(path, n_frames=None):
    info = video_io.probe(path)
    assert (info["video_codec"], info["pix_fmt"], info["audio_codec"]) == ("h264", "yuv420p", "aac")
    assert info["fps"] == 25 and info["faststart"] is True
    assert abs(info["video_duration"] - info["n_frames"] * FRAME_S) < 1e-6
    assert abs(info["audio_duration"] - info["video_duration"]) <= FRAME_S
    if n_frames is not None:
        assert info["n_frames"] == n_frames
    return info


# ---------------------------------------------------------------------------------------------- end to end

def test_demo_from_a_fresh_directory(tmp_path):
    """`python infer.py --demo` as a user runs it: another working directory, no weights, no network."""
    res = subprocess.run([sys.executable, str(REPO / "infer.py"), "--demo"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub")))
    assert res.returncode == 0, res.stderr
    assert "RANDOMLY INITIALISED" in res.stdout
    assert "[talker] t2av:" in res.stdout and "total" in res.stdout
    n_frames = int(res.stdout.split(" frames (")[0].rsplit(" ", 1)[1])
    _probe_ok(tmp_path / "output.mp4", n_frames)
    data, sr = sf.read(tmp_path / "output.wav")
    assert sr == 24000 and abs(len(data) / sr - n_frames * FRAME_S) < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hub") == ["output.mp4", "output.wav"]


@pytest.mark.parametrize("mode,extra,files", [
    ("t2av", ["--text", "Hello there.", "--save-latents", "--trim-prefix"],
     ["o.latents.safetensors", "o.mp4", "o.wav"]),
    ("a2v", ["--audio", str(REPO / "samples" / "reference_voice.wav")], ["o.mp4", "o.wav"]),
    ("v2a", ["--video", str(REPO / "samples" / "reference_face.mp4"), "--text", "Dub this."], ["o.mp4", "o.wav"]),
    ("tts", ["--text", "Speech only."], ["o.wav"]),
])
def test_every_mode(tmp_path, capsys, mode, extra, files):
    rc = infer.main(["--demo", "--quiet", "--mode", mode, "--output", str(tmp_path / "o.mp4"), *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"[talker] {mode}:" in out.out
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    if "o.mp4" in files:
        _probe_ok(tmp_path / "o.mp4")


def test_sampling_flags_seed_and_device(tmp_path, capsys):
    common = ["--demo", "--quiet", "--device", "cpu", "--cfm-steps", "4", "--cfm-temperature", "0.7",
              "--cfm-cfg", "1.5", "--gt-prefix-seconds", "0.3", "--fps", "25", "--llm-name", "Qwen/Qwen3-0.6B",
              "--max-seconds", "5",
              "--mode", "tts"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert infer.main([*common, "--seed", seed, "--output", str(tmp_path / f"{name}.wav")]) == 0
    a, b, c = (sf.read(tmp_path / f"{n}.wav")[0] for n in "abc")
    assert np.array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)
    capsys.readouterr()


def test_render_flags_and_reference_motion_file(tmp_path, capsys):
    ref_motion = REPO.parent / "shared" / "reference_samples" / "reference_motion.pt"  # (125, 40) float16
    if not ref_motion.exists():
        ref_motion = tmp_path / "m.pt"
        torch.save((0.05 * torch.randn(60, 40)).half(), ref_motion)
    rc = infer.main(["--demo", "--quiet", "--render-dtype", "bfloat16", "--render-batch-size", "3",
                     "--ref-motion", str(ref_motion), "--output", str(tmp_path / "r.mp4")])
    assert rc == 0, capsys.readouterr().err
    _probe_ok(tmp_path / "r.mp4")


def test_licences(capsys):
    assert infer.main(["--licences"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| file | where it comes from | licence |" and len(lines) == 2 + 4  # a table, one row a file
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert any("lia-x.pt" in line and "CC BY-NC 4.0" in line for line in lines)


# ---------------------------------------------------------------------------------------------- batch files

def _write_batch(path, outdir, n=3, extra_lines=()):
    lines = [json.dumps({"text": f"Request number {i}.", "output": str(outdir / f"req{i}.mp4"),
                         "mode": "tts" if i == 1 else "t2av"}) for i in range(n)]
    path.write_text("\n".join(["# a comment", *lines, "", *extra_lines]) + "\n")


def test_batch_file(tmp_path, capsys):
    _write_batch(tmp_path / "p.jsonl", tmp_path)
    rc = infer.main(["--demo", "--quiet", "--batch-file", str(tmp_path / "p.jsonl")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p.jsonl", "req0.mp4", "req0.wav", "req1.wav", "req2.mp4", "req2.wav"]
    assert out.out.count("[talker] wrote") == 3


def test_bundled_example_batch_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its outputs are relative: outputs/batch_<i>.mp4
    rc = infer.main(["--demo", "--quiet", "--mode", "tts", "--batch-file", str(REPO / "samples" / "prompts.jsonl")])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (REPO / "samples" / "prompts.jsonl").read_text().splitlines() if x.strip()]
    for req in lines:
        assert (tmp_path / req["output"]).with_suffix(".wav").exists()


def test_batch_file_default_outputs_and_failed_lines(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "One.", "mode": "tts"}) + "\n" +
                                      json.dumps({"text": "", "mode": "tts"}) + "\n")
    rc = infer.main(["--demo", "--quiet", "--batch-file", str(tmp_path / "p.jsonl"),
                     "--output", str(tmp_path / "run.mp4")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{tmp_path / 'p.jsonl'}:2: text: empty text" in err
    assert (tmp_path / "run_0000.wav").exists() and not (tmp_path / "run_0001.wav").exists()


@pytest.mark.parametrize("content,needle", [
    ('{not json}\n', ":1: not valid JSON"),
    ('{"txt": "typo"}\n', ":1: txt: unknown option"),
    ('["a list"]\n', ":1: expected a JSON object"),
    ('{"cfm_steps": "many"}\n', ":1: cfm_steps: must be a number, got 'many'"),
    ('{"seed": "abc"}\n', ":1: seed: must be a number, got 'abc'"),
    ('{"trim_prefix": "yes"}\n', ":1: trim_prefix: must be true or false, got 'yes'"),
    ('{"text": 5}\n', ":1: text: must be a string, got 5"),
    ('{"seed": 1e20}\n', ":1: seed: must be in [0, 18446744073709551615]"),
    ('{"mode": "tts", "ref_audio": "missing.wav"}\n', ":1: missing.wav: file not found"),
])
def test_bad_batch_lines(tmp_path, capsys, content, needle):
    """A bad line is reported as FILE:LINE: problem, before any model is loaded, and the other lines run."""
    good = json.dumps({"mode": "tts", "text": "The good line.", "output": str(tmp_path / "good.wav")})
    (tmp_path / "p.jsonl").write_text(content + good + "\n")
    assert infer.main(["--demo", "--quiet", "--batch-file", str(tmp_path / "p.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"infer.py: error: {tmp_path / 'p.jsonl'}{needle}"), err
    assert err[-1] == "infer.py: error: 1 of 2 requests failed"
    assert (tmp_path / "good.wav").exists()


def test_batch_file_without_requests(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("\n# only comments\n")
    assert infer.main(["--demo", "--batch-file", str(tmp_path / "p.jsonl")]) == 1
    assert "no requests" in capsys.readouterr().err


def test_batch_file_under_torchrun(tmp_path):
    """Two ranks split one file: every request is written exactly once."""
    _write_batch(tmp_path / "p.jsonl", tmp_path, n=5)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "infer.py"), "--demo", "--quiet", "--batch-file", str(tmp_path / "p.jsonl")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    expected = {f"req{i}.wav" for i in range(5)} | {f"req{i}.mp4" for i in (0, 2, 3, 4)}
    assert {p.name for p in tmp_path.iterdir()} - {"p.jsonl"} == expected
    written = [line for line in res.stdout.splitlines() if "[talker] wrote" in line]
    assert len(written) == 5
    assert sorted(line.split(":")[1] for line in written) == sorted(str(n) for n in (2, 3, 4, 5, 6))  # line numbers


# ---------------------------------------------------------------------------------------------- errors

def _cli_bad_cases(tmp):
    cases = []
    for name, kwargs, needle in bad_cases(tmp):
        argv = []
        for key, value in kwargs.items():
            flag = key.replace('_', '-')
            if isinstance(value, bool):  # auto switches: --flag / --no-flag
                argv.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                argv += [f"--{flag}", str(value)]
        cases.append((name, argv, cli_needle(needle)))
    return cases


def test_bad_inputs_one_line_and_nonzero_exit(tmp_path, capsys):
    cases = _cli_bad_cases(tmp_path) + [
        ("batch file missing", ["--batch-file", str(tmp_path / "none.jsonl")], "none.jsonl"),
        ("render batch", ["--render-batch-size", "0"], "--render-batch-size"),
        ("batch size", ["--batch-file", str(REPO / "samples" / "prompts.jsonl"), "--batch-size", "0"],
         "--batch-size"),
        ("stream every", ["--stream", "--stream-every", "0"], "--stream-every"),
        ("graphs on cpu", ["--device", "cpu", "--cuda-graphs", "on"], "--cuda-graphs on needs a CUDA device"),
    ]
    for name, argv, needle in cases:
        if name == "mode":
            continue  # argparse rejects it (exit 2, usage line), see below
        rc = infer.main(["--demo", "--quiet", "--output", str(tmp_path / "x.mp4"), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 1, (name, err)
        assert err.startswith("infer.py: error: ") and needle in err and "\n" not in err, (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()
    with pytest.raises(SystemExit) as info:
        infer.main(["--mode", "t2v"])
    assert info.value.code == 2


def test_packed_linear_option(tmp_path, capsys, monkeypatch):
    """--packed-linear reaches the SpeechLLM; 'on' where oneDNN cannot run is refused before loading."""
    from common import packed_linear
    for mode in ("off", "on"):
        args = infer.build_parser().parse_args(["--demo", "--device", "cpu", "--packed-linear", mode])
        pipe = infer.load_pipeline(args, ["t2av"])
        assert pipe.packed_linear == mode and pipe.llm.packed_linear == mode
    monkeypatch.setattr(packed_linear, "available", lambda: False)
    rc = infer.main(["--demo", "--quiet", "--device", "cpu", "--packed-linear", "on", "--output",
                     str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == ("infer.py: error: --packed-linear on: packed linear layers need a CPU with oneDNN "
                               "(oneDNN is not available in this torch build)")
    assert not (tmp_path / "x.mp4").exists()


def test_missing_weights_is_one_clear_message(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "infer.py"), "--output", str(tmp_path / "o.mp4")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub")))
    assert res.returncode == 1
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    for needle in ("weights not found", "CHECKPOINT_DIR", "--download", "--demo"):
        assert needle in err
    assert not (tmp_path / "o.mp4").exists()


def test_dtype_bfloat16_on_cpu_is_accepted(tmp_path, capsys, monkeypatch):
    """bf16 on CPU is opt-in since the speed issue (backbone and heads in bf16): without weights the run fails
    for the weights, not for the dtype."""
    monkeypatch.setattr(weights, "hub_cached", lambda repo_id, filename: None)
    rc = infer.main(["--dtype", "bfloat16", "--device", "cpu", "--output", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 1 and "weights not found" in err and "--dtype" not in err


def test_ctrl_c_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    from lia_x import render as liax_render
    real = liax_render.render_frames

    def interrupted(*args, **kwargs):
        it = real(*args, **kwargs)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(liax_render, "render_frames", interrupted)
    assert infer.main(["--demo", "--quiet", "--output", str(tmp_path / "o.mp4")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- weights flags

def test_weight_flags_and_env_vars(release_dir, tiny_loaders, no_env, tmp_path, capsys, monkeypatch):
    rd = release_dir
    rc = infer.main(["--checkpoint-dir", str(rd / "talker-t2av"), "--whisperx-vae-ckpt",
                     str(rd / "whisperx-vae" / "model.ckpt"), "--liax-ckpt", str(rd / "lia-x.pt"),
                     "--wavlm-ckpt", str(rd / "wavlm_large_finetune.pth"), "--dtype", "float32",
                     "--device", "cpu", "--quiet", "--output", str(tmp_path / "flags.mp4")])
    assert rc == 0, capsys.readouterr().err
    _probe_ok(tmp_path / "flags.mp4")
    # the reference's environment variables; the VAE is found beside the checkpoint folder
    monkeypatch.setenv("CHECKPOINT_DIR", str(rd / "talker-t2av"))
    monkeypatch.setenv("LIAX_CKPT", str(rd / "lia-x.pt"))
    monkeypatch.setenv("WAVLM_CKPT", str(rd / "wavlm_large_finetune.pth"))
    torch.save((0.05 * torch.randn(30, 40)), tmp_path / "drive.pt")
    rc = infer.main(["--mode", "v2a", "--motion", str(tmp_path / "drive.pt"), "--text", "Moving.", "--quiet",
                     "--output", str(tmp_path / "env.mp4")])
    assert rc == 0, capsys.readouterr().err
    _probe_ok(tmp_path / "env.mp4", n_frames=30)
    # a checkpoint of the wrong kind: one line naming the file
    monkeypatch.setenv("WHISPERVAE_CKPT", str(rd / "lia-x.pt"))
    assert infer.main(["--quiet", "--output", str(tmp_path / "bad.mp4")]) == 1
    err = capsys.readouterr().err.strip()
    assert str(rd / "lia-x.pt") in err and "\n" not in err and not (tmp_path / "bad.mp4").exists()


def test_download_flag(release_dir, tiny_loaders, no_env, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(release_dir / "wavlm_large_finetune.pth")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    rc = infer.main(["--mode", "tts", "--download", "--checkpoint-dir", str(release_dir / "talker-t2av"),
                     "--wavlm-repo", "someone/mirror", "--wavlm-filename", "spk.pth", "--quiet",
                     "--output", str(tmp_path / "dl.wav")])
    assert rc == 0, capsys.readouterr().err
    assert calls == [("someone/mirror", "spk.pth")] and (tmp_path / "dl.wav").exists()


# ---------------------------------------------------------------------------------------------- the schema

# The flags of infer.py before the generation-core redesign (commit 58b56a0): none may disappear.
FLAGS_BEFORE_REDESIGN = {
    "--audio", "--batch-file", "--cfm-cfg", "--cfm-steps", "--cfm-temperature", "--checkpoint-dir", "--demo",
    "--device", "--download", "--dtype", "--fps", "--gt-prefix-seconds", "--help", "--liax-ckpt", "--licences",
    "--llm-name", "--max-seconds", "--mode", "--motion", "--output", "--quiet", "--ref-audio", "--ref-motion",
    "--ref-video", "--render-batch-size", "--render-dtype", "--save-latents", "--seed", "--text", "--trim-prefix",
    "--video", "--wavlm-backbone-ckpt", "--wavlm-ckpt", "--wavlm-filename", "--wavlm-repo", "--whisperx-vae-ckpt"}


def test_flags_come_from_the_request_schema():
    from dataclasses import fields

    from runtime.request import GenerationRequest
    parser = infer.build_parser()
    flags = {o for a in parser._actions for o in a.option_strings}
    assert FLAGS_BEFORE_REDESIGN <= flags
    defaults = vars(parser.parse_args([]))
    for f in fields(GenerationRequest):
        assert "--" + f.name.replace("_", "-") in flags, f.name  # every request field is a flag ...
        if f.name != "output":  # ... with the request's default (the CLI writes output.mp4 by default)
            assert defaults[f.name] == f.default, f.name
    assert infer.cli_request(parser.parse_args(["--cfm-steps", "4", "--trim-prefix"])) == GenerationRequest(
        cfm_steps=4, trim_prefix=True, output="output.mp4")


# ---------------------------------------------------------------------------------------------- faults

def test_non_finite_sampling_value_exits_1_and_writes_nothing(tmp_path, capsys):
    rc = infer.main(["--demo", "--quiet", "--mode", "tts", "--cfm-temperature", "nan", "--output",
                     str(tmp_path / "o.wav")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "infer.py: error: --cfm-temperature: must be a finite number, got nan"
    assert list(tmp_path.iterdir()) == []


_SLOW_RENDER = """
import pathlib, sys, time
sys.path.insert(0, {repo!r})
import infer
from lia_x import render
real = render.render_frames
def slow(*args, **kwargs):
    it = real(*args, **kwargs)
    yield next(it)
    pathlib.Path({marker!r}).write_text("rendering")
    time.sleep(120)
    yield from it
render.render_frames = slow
sys.exit(infer.main(["--demo", "--quiet", "--output", {output!r}]))
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_during_rendering_leave_nothing(tmp_path, sig, code):
    import signal
    import time
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "marker"
    script = _SLOW_RENDER.format(repo=str(REPO), marker=str(marker), output=str(out_dir / "o.mp4"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no render started"
        assert any(out_dir.iterdir())  # temporary files exist while rendering ...
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=60) == code
    finally:
        proc.kill()
    assert "no partial output was left" in proc.stderr.read()
    assert list(out_dir.iterdir()) == []  # ... and none is left


def test_two_runs_writing_the_same_output_leave_a_matching_pair(tmp_path):
    """Concurrent runs: last writer wins, but the mp4 and wav always come from the same run (a2v carries its
    input audio unchanged, so each run's audio is recognisable by its tone)."""
    from bad_inputs import tone
    tone(tmp_path / "low.wav", 2.0, sr=24000)
    low, high = tmp_path / "low.wav", tmp_path / "high.wav"
    t = np.arange(48000) / 24000
    sf.write(high, (0.3 * np.sin(2 * np.pi * 900 * t)).astype(np.float32), 24000)
    out = tmp_path / "same.mp4"
    procs = [subprocess.Popen([sys.executable, str(REPO / "infer.py"), "--demo", "--quiet", "--mode", "a2v",
                               "--audio", str(a), "--output", str(out)], cwd=tmp_path, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for a in (low, high)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["high.wav", "low.wav", "same.mp4", "same.wav"]

    def dominant_hz(samples, sr):
        spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
        return np.argmax(spectrum) * sr / len(samples)

    wav, sr = sf.read(tmp_path / "same.wav")
    pcm = subprocess.run([video_io.ffmpeg_exe(), "-v", "error", "-i", str(out), "-map", "0:a:0", "-ac", "1", "-ar",
                          str(sr), "-f", "f32le", "pipe:1"], capture_output=True, check=True).stdout
    mp4_audio = np.frombuffer(pcm, np.float32)
    assert abs(dominant_hz(wav, sr) - dominant_hz(mp4_audio, sr)) < 20
    _probe_ok(out)


def test_default_outputs_are_ignored_by_git():
    res = subprocess.run(["git", "check-ignore", "output.mp4", "output.wav", "output.latents.safetensors"],
                         cwd=REPO, capture_output=True, text=True)
    if res.returncode == 128:
        pytest.skip("not a git checkout")
    assert res.stdout.split() == ["output.mp4", "output.wav", "output.latents.safetensors"]


def test_output_problems_are_found_before_the_models_load(tmp_path, capsys, monkeypatch):
    from runtime.pipeline import TalkerPipeline
    monkeypatch.setattr(TalkerPipeline, "demo", classmethod(lambda cls, *a, **k: pytest.fail("models loaded")))
    (tmp_path / "file").write_text("x")
    rc = infer.main(["--demo", "--output", str(tmp_path / "file" / "o.mp4")])
    assert rc == 1 and "infer.py: error: --output: " in capsys.readouterr().err
    # the inputs' kinds and lengths are checked from their headers before loading, too
    from bad_inputs import tone
    tone(tmp_path / "long.wav", 31)
    for argv, needle in ((["--ref-audio", str(tmp_path / "file")], "not a readable audio file"),
                         (["--ref-video", str(tmp_path / "long.wav")], "no video stream"),
                         (["--mode", "a2v", "--audio", str(tmp_path / "long.wav"), "--no-long-form"], "at most 30 s")):
        assert infer.main(["--demo", "--output", str(tmp_path / "o.mp4"), *argv]) == 1
        assert needle in capsys.readouterr().err


def test_length_cap_figure_is_15_patches_of_160_ms():
    """The released cap is the reference clip's length + 15 patches: 15 x 160 ms = 2.4 s (once written 0.6 s)."""
    from common import constants
    from runtime.request import GenerationRequest

    assert constants.RELEASED_CAP_MARGIN_SECONDS == pytest.approx(2.4)
    help_text = next(f.metadata["help"] for f in dataclasses.fields(GenerationRequest) if f.name == "max_seconds")
    assert "+ 2.4 s" in help_text
    readme = (REPO / "README.md").read_text()
    assert "0.6 s" not in readme and "length + 2.4 s" in readme
