"""evaluate.py and its helpers: manifest checks, report layout, skip accounting, resumable generation,
metric checkpoint lookup, bad-input exits, make-manifest, and the --demo run end to end."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
from evaluation import metric_weights as mw
from evaluation.manifest import ManifestError, make_manifest, read_manifest, write_manifest
from evaluation.report import PAPER, ClipResult, GroupResult, write_report

REPO = Path(__file__).resolve().parents[1]
SAMPLE_WAV = REPO / "samples" / "reference_voice.wav"
SAMPLE_MP4 = REPO / "samples" / "reference_face.mp4"
DEMO_TIMEOUT_S = 600  # the demo takes well under a minute on 2 idle cores; shared CI machines are slower


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _tiny_video(path, n_frames=12, audio=True):
    from media import video_io

    frames = np.random.default_rng(0).integers(0, 255, (n_frames, 32, 32, 3), dtype=np.uint8)
    video_io.write_video(path, frames, fps=25, audio_path=SAMPLE_WAV if audio else None)
    return path


# ------------------------------------------------------------------------------------------ manifest

def test_manifest_bad_rows_are_named_and_left_out(tmp_path):
    header = ["id", "lang", "mode", "text", "prompt_audio", "gt_video"]
    path = _csv(tmp_path / "test.csv", header, [
        ["a", "en", "t2av", "Hello.", str(SAMPLE_WAV), "missing.mp4"],  # line 2: kept, gt_video unusable
        ["a", "en", "t2av", "Again.", "", ""],  # 3: repeated id
        ["b", "fr", "", "Bonjour.", "", ""],  # 4: language
        ["c", "en", "tts", "Hi.", "", ""],  # 5: mode
        ["", "en", "", "No id.", "", ""],  # 6: empty id
        ["d e", "en", "", "Space.", "", ""],  # 7: not file-name safe
        ["f", "zh", "", "", "", ""],  # 8: kept, empty transcript
    ])
    m = read_manifest(path)
    assert [r.id for r in m.rows] == ["a", "f"]
    assert [e.split(": ", 1)[0] for e in m.errors] == [f"{path}:3 (a)", f"{path}:4 (b)", f"{path}:5 (c)",
                                                        f"{path}:6", f"{path}:7 (d e)"]
    assert "repeats line 2" in m.errors[0] and "lang: 'fr'" in m.errors[1] and "mode: 'tts'" in m.errors[2]
    assert "id: empty" in m.errors[3] and "file-name-safe" in m.errors[4]
    a, f = m.rows
    assert a.problem_with(("gt_video",)) == "gt_video: missing.mp4: file not found"
    assert a.problem_with(("text", "prompt_audio")) is None
    assert a.prompt_audio == str(SAMPLE_WAV) and Path(a.gt_video).parent == tmp_path  # relative to the manifest
    assert f.problem_with(("text",)) == "text: empty transcript"


@pytest.mark.parametrize("content, problem", [
    ("id,lang,prompt_audo\nx,en,a.wav\n", "unknown column 'prompt_audo'"),
    ("id,text\nx,hello\n", "missing column 'lang'"),
    ("", "empty manifest"),
    ("id,lang\n", "no rows"),
])
def test_manifest_file_problems_are_one_line(tmp_path, content, problem, capsys):
    path = tmp_path / "m.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError, match=problem):
        read_manifest(path)
    (tmp_path / "out").mkdir()
    assert evaluate.main(["--manifest", str(path), "--outputs", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(path) in err[0]
    assert not (tmp_path / "out" / "eval").exists()


def test_cli_argument_errors(tmp_path, capsys):
    assert evaluate.main(["--outputs", str(tmp_path)]) == 1
    assert "--manifest and --outputs are required" in capsys.readouterr().err
    assert evaluate.main(["--manifest", "x.csv", "--outputs", str(tmp_path), "--metrics", "wer,mos"]) == 1
    assert "unknown metric 'mos'" in capsys.readouterr().err
    assert evaluate.main(["--manifest", str(tmp_path / "nope.csv"), "--outputs", str(tmp_path)]) == 1
    assert "manifest not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ report

def _groups():
    ours = GroupResult("t2av", "en", n_clips=3, values={"wer": 0.1, "utmos": 3.5, "fid": 20.0, "fvd": 250.0,
                                                        "sync_c": 6.0, "sync_d": 8.0, "sim": 0.6},
                       counts={"wer": 2, "utmos": 2, "fid": 40, "fvd": 2, "sync_c": 2, "sync_d": 2, "sim": 2})
    a2v = GroupResult("a2v", "zh", n_clips=1, values={"sync_c": 4.0, "sync_d": 10.0, "fid": 17.0},
                      notes={"fvd": "needs at least 2 generated and 2 real videos of 16 frames (got 1 and 1)"})
    return {("t2av", "en"): ours, ("a2v", "zh"): a2v}


def _clips():
    x = ClipResult("x", "en", "t2av", "x.wav", "x.mp4", values={"wer": 0.1, "asr_text": "hello, there", "utmos": 3.5,
                                                                 "sync_offset": 1, "sync_conf": 6.0,
                                                                 "sync_min_dist": 8.0})
    y = ClipResult("y", "en", "t2av", "y.wav", "y.mp4", values={"wer": 0.1, "utmos": 3.5})
    y.skip("sync", "/out/y.mp4: no face track found")
    z = ClipResult("z", "en", "t2av")
    for m in ("wer", "utmos", "sync"):
        z.skip(m, "no output: /out/z.mp4 (or .wav) not found")
    w = ClipResult("w", "zh", "a2v", "w.mp4", "w.mp4", values={"sync_offset": -3, "sync_conf": 4.0,
                                                              "sync_min_dist": 10.0})
    return [x, y, z, w]


def test_report_tables_in_the_papers_layout(tmp_path):
    meta = {"manifest": "test.csv", "fvd": "common_metrics (covariance over N-1; first 16 frames at 25 fps)",
            "notes": ["FVD: variant common_metrics"]}
    paths = write_report(tmp_path, meta, _groups(), _clips(), ["test.csv:9: lang: 'fr' is not one of zh, en"])
    md = Path(paths["report"]).read_text(encoding="utf-8")
    assert "| en | Talker-T2AV (paper) | 200 | 0.055 | 3.458 | 24.32 | 246.39 | 6.330 | 8.505 | n/a |" in md
    assert "| en | this run | 3 | 0.100 (2) | 3.500 (2) | 20.00 (40) | 250.00 (2) | 6.000 (2) | 8.000 (2) | 0.600 (2) |" in md
    assert "| en | difference (run − paper) | | +0.045 | +0.042 | -4.32 | +3.61 | -0.330 | -0.505 | — |" in md
    assert "| zh | Talker-T2AV (paper) | 200 | 17.32 | 107.09 | 3.970 | 10.090 |" in md
    assert "| zh | difference (run − paper) | | -0.32 | — | +0.030 | -0.090 |" in md
    assert "zh FVD: needs at least 2 generated" in md
    assert md.index("### Table 1") < md.index("### Table 2") and "### Table 3" not in md  # no V2A rows here
    assert "1 manifest row(s) left out; 2 of 4 clip(s) had a metric skipped (1 with no metric at all)" in md
    assert "| 1 | wer, utmos, sync | no output: /out/<id>.mp4 (or .wav) not found |" in md
    assert "| 1 | sync | /out/<id>.mp4: no face track found |" in md
    assert "test.csv:9: lang: 'fr'" in md and "covariance over N-1" in md

    rows = list(csv.DictReader(open(paths["results"], encoding="utf-8")))
    assert [r["id"] for r in rows] == ["x", "y", "z", "w"]
    assert rows[0]["asr_text"] == "hello, there" and rows[0]["sync_offset"] == "1" and rows[0]["skipped"] == ""
    assert rows[1]["skipped"] == "sync: /out/y.mp4: no face track found" and rows[1]["sync_conf"] == ""
    summary = json.loads(Path(paths["summary"]).read_text())
    assert summary["groups"]["t2av/en"]["difference"]["wer"] == pytest.approx(0.1 - PAPER[("t2av", "en")]["wer"])
    assert summary["groups"]["a2v/zh"]["paper"]["fvd"] == 107.09
    assert summary["skipped"]["clips_with_skips"] == 2 and summary["skipped"]["rows_left_out"] == 1
    for name in ("sync_offset", "sync_conf", "wer", "utmos"):  # linked from the report and present
        assert f"(plots/{name}.png)" in md and (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # nothing half-written left behind


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = write_report(tmp_path, {}, _groups(), _clips(), [])
    md = Path(paths["report"]).read_text(encoding="utf-8")
    assert "Plots skipped: matplotlib is not installed" in md and not (tmp_path / "plots").exists()


def test_frechet_low_rank_equals_the_reference_formula():
    """The demo's FID shortcut (trace term from the N x N products) equals evaluation.frechet's sqrtm path."""
    from evaluation.frechet import feature_stats, frechet_distance

    rng = np.random.default_rng(7)
    for n1, n2, dim in ((6, 9, 48), (40, 30, 8)):  # rank-deficient, then full rank
        fake, real = rng.normal(size=(n1, dim)), rng.normal(0.3, 1.5, size=(n2, dim))
        (mu1, s1), (mu2, s2) = feature_stats(fake), feature_stats(real)
        expected = frechet_distance(mu1, s1, mu2, s2, variant="common_metrics")
        assert evaluate.frechet_low_rank(fake, real) == pytest.approx(expected, rel=1e-7)


# ------------------------------------------------------------------------------------------ skip accounting

def test_inspect_names_what_each_clip_lacks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _tiny_video(out / "silent.mp4", audio=False)  # video without audio
    (out / "voice.wav").write_bytes(SAMPLE_WAV.read_bytes())  # audio only
    _tiny_video(out / "nogt.mp4")
    gt = _tiny_video(tmp_path / "gt.mp4")
    path = _csv(tmp_path / "m.csv", ["id", "lang", "text", "prompt_audio", "gt_video"], [
        ["silent", "en", "Hi.", str(SAMPLE_WAV), str(gt)], ["voice", "en", "Hi.", str(SAMPLE_WAV), str(gt)],
        ["absent", "en", "Hi.", str(SAMPLE_WAV), str(gt)], ["nogt", "en", "", str(SAMPLE_WAV), "gone.mp4"]])
    rows = read_manifest(path).rows
    clips = evaluate.inspect_clips(rows, out, evaluate.METRICS, {"absent": "generation: text: empty"}, False)
    skipped = {c.row.id: dict(s.split(": ", 1) for s in c.result.skipped) for c in clips}
    assert skipped["silent"] == {m: "silent.mp4: no audio stream (and no silent.wav)" for m in ("wer", "utmos", "sim")} \
        | {"sync": "silent.mp4: the video has no audio track"}
    assert skipped["voice"] == {m: "audio-only output (voice.wav)" for m in ("sync", "fid", "fvd")}
    assert skipped["absent"] == {m: "generation: text: empty" for m in evaluate.METRICS}
    assert skipped["nogt"] == {"wer": "text: empty transcript", "fid": "gt_video: gone.mp4: file not found",
                               "fvd": "gt_video: gone.mp4: file not found"}
    by_id = {c.row.id: c for c in clips}
    assert by_id["voice"].audio_path.endswith("voice.wav") and by_id["nogt"].video_has_audio
    assert by_id["nogt"].wants("sync") and not by_id["nogt"].wants("fid")


def test_a2v_and_v2a_are_scored_on_what_they_generate(tmp_path):
    path = _csv(tmp_path / "m.csv", ["id", "lang", "mode"], [["a", "en", "a2v"], ["v", "en", "v2a"]])
    clips = evaluate.inspect_clips(read_manifest(path).rows, tmp_path, evaluate.METRICS, {}, False)
    assert clips[0].metrics == ("sync", "fid", "fvd") and clips[1].metrics == ("wer", "utmos", "sync", "sim")


# ------------------------------------------------------------------------------------------ generation

class FakePipe:
    def __init__(self):
        self.made = []

    def generate(self, req, progress=False):
        Path(req.output).write_bytes(b"mp4")
        self.made.append((Path(req.output).stem, req.mode, req.trim_prefix))

        class Result:
            warnings = []
        return Result()


def _generate_args(tmp_path, manifest):
    args = evaluate.build_parser().parse_args(["--manifest", str(manifest), "--outputs", str(tmp_path / "out"),
                                               "--generate", "--quiet"])
    return args


def test_generate_is_resumable_and_sharded(tmp_path, monkeypatch):
    import infer

    rows = [[f"r{i}", "en", "t2av", f"Sentence {i}.", str(SAMPLE_WAV), str(SAMPLE_MP4)] for i in range(5)]
    rows[3][4] = "missing.wav"  # cannot be generated
    path = _csv(tmp_path / "m.csv", ["id", "lang", "mode", "text", "prompt_audio", "prompt_face"], rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "r1.mp4").write_bytes(b"done before")  # finished earlier: kept
    pipes = []
    monkeypatch.setattr(infer, "load_pipeline", lambda args, modes: pipes.append(FakePipe()) or pipes[-1])
    manifest_rows = read_manifest(path).rows

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    failed = evaluate.generate(_generate_args(tmp_path, path), manifest_rows, progress=False)
    assert failed == {"r3": "generation: prompt_audio: missing.wav: file not found"}
    assert pipes == []  # rank 1 holds r1 (already there) and r3 (broken): nothing to load
    monkeypatch.setenv("RANK", "0")
    failed = evaluate.generate(_generate_args(tmp_path, path), manifest_rows, progress=False)
    assert failed == {} and [m[0] for m in pipes[0].made] == ["r0", "r2", "r4"]
    assert all(mode == "t2av" and trim for _, mode, trim in pipes[0].made)  # only the generated part is scored
    assert (out / "r1.mp4").read_bytes() == b"done before"
    monkeypatch.setenv("WORLD_SIZE", "1")
    failed = evaluate.generate(_generate_args(tmp_path, path), manifest_rows, progress=False)
    assert len(pipes) == 1 and list(failed) == ["r3"]  # second full run: every clip is there, no model loads


def test_generation_request_per_mode(tmp_path):
    gt = _tiny_video(tmp_path / "gt.mp4")
    path = _csv(tmp_path / "m.csv", ["id", "lang", "mode", "text", "prompt_audio", "prompt_face", "gt_video"], [
        ["t", "en", "t2av", "Say this.", str(SAMPLE_WAV), str(SAMPLE_MP4), str(gt)],
        ["a", "en", "a2v", "", str(SAMPLE_WAV), str(SAMPLE_MP4), str(gt)],
        ["v", "en", "v2a", "Dub this.", str(SAMPLE_WAV), str(SAMPLE_MP4), str(gt)]])
    args = _generate_args(tmp_path, path)
    t, a, v = (evaluate.generation_request(r, tmp_path / "out" / f"{r.id}.mp4", args)
               for r in read_manifest(path).rows)
    assert (t.mode, t.text, t.trim_prefix, t.ref_audio, t.ref_video) == ("t2av", "Say this.", True, str(SAMPLE_WAV),
                                                                          str(SAMPLE_MP4))
    assert a.mode == "a2v" and Path(a.audio).name == "a.driving.wav" and Path(a.audio).is_file()  # gt's audio
    from media import audio as audio_io
    assert audio_io.audio_seconds(a.audio) == pytest.approx(12 / 25, abs=0.05)
    assert (v.mode, v.video, v.text, v.trim_prefix) == ("v2a", str(gt), "Dub this.", False)


# ------------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_lookup_order_flag_env_cache(tmp_path, monkeypatch):
    files = {name: tmp_path / name for name in ("flag.model", "env.model", "hub.model")}
    for f in files.values():
        f.write_bytes(b"x")
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / mw.CHECKPOINTS["utmos"].filename).write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(mw.weights, "hub_cached", lambda repo, filename: str(files["hub.model"])
                        if (repo, filename) == ("lithiumice/syncnet", "syncnet_v2.model") else None)
    env = {"SYNCNET_CKPT": str(files["env.model"])}

    found = mw.locate(["syncnet"], {"syncnet": str(files["flag.model"])}, env=env)
    assert (found.paths["syncnet"], found.sources["syncnet"]) == (str(files["flag.model"]), "flag")
    found = mw.locate(["syncnet"], {}, env=env)
    assert (found.paths["syncnet"], found.sources["syncnet"]) == (str(files["env.model"]), "env")
    found = mw.locate(["syncnet", "utmos", "i3d"], {}, env={})
    assert found.sources == {"syncnet": "hub cache", "utmos": "torch hub"} and found.missing(["i3d"]) == ["i3d"]
    assert mw.locate(["syncnet"], {}, env={}, use_cache=False).missing(["syncnet"]) == ["syncnet"]
    with pytest.raises(FileNotFoundError, match=r"--syncnet"):
        mw.locate(["syncnet"], {"syncnet": str(tmp_path / "nope")}, env=env)
    with pytest.raises(FileNotFoundError, match=r"\$SYNCNET_CKPT"):
        mw.locate(["syncnet"], {}, env={"SYNCNET_CKPT": str(tmp_path / "nope")})

    from runtime import weights
    monkeypatch.setattr(weights, "hub_cached", lambda repo_id, filename: None)
    found = mw.locate(["wavlm"], {}, env={"WAVLM_CKPT": str(files["env.model"])})
    assert (found.paths["wavlm"], found.sources["wavlm"]) == (str(files["env.model"]), "env")
    assert mw.locate(["wavlm"], {}, env={}).missing(["wavlm"]) == ["wavlm"]

    asr_dir = tmp_path / "asr"
    asr_dir.mkdir()
    found = mw.locate(["asr"], {}, env={mw.ASR_ENV: str(asr_dir)})
    assert (found.paths["asr"], found.sources["asr"]) == (str(asr_dir), "env")


def test_checkpoint_size_and_sha256_checks(tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"not the inception weights")
    with pytest.raises(ValueError, match="does not match the published 6726825d"):
        mw.check_file(str(path), mw.CHECKPOINTS["fid_inception"])
    sized = mw.MetricCheckpoint("x", "X", "x.pt", "X_CKPT", "https://example.invalid/x.pt", size=3)
    with pytest.raises(ValueError, match="has 25 bytes, expected 3"):
        mw.check_file(str(path), sized)
    table = mw.licence_table()
    for c in mw.CHECKPOINTS.values():
        assert c.filename in table and c.flag in table and c.url in table


@pytest.fixture
def no_metric_weights(monkeypatch, tmp_path, no_env):
    for c in mw.CHECKPOINTS.values():
        monkeypatch.delenv(c.env, raising=False)
    monkeypatch.delenv(mw.ASR_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(mw.weights, "hub_cached", lambda repo_id, filename: None)

    def no_load(self, name, device):
        raise AssertionError(f"{name} loaded although a checkpoint is missing")
    monkeypatch.setattr(evaluate.MetricModels, "load", no_load)


def test_missing_checkpoint_one_line_exit_2_no_output(tmp_path, capsys, no_metric_weights):
    path = _csv(tmp_path / "m.csv", ["id", "lang", "text"], [["a", "en", "Hello."]])
    out = tmp_path / "out"
    out.mkdir()
    assert evaluate.main(["--manifest", str(path), "--outputs", str(out), "--metrics", "utmos,sync,fvd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: metric checkpoints not found")
    for flag, var in (("--utmos", "$UTMOS_CKPT"), ("--syncnet", "$SYNCNET_CKPT"), ("--s3fd", "$S3FD_CKPT"),
                      ("--i3d", "$I3D_CKPT")):
        assert f"[{flag} or {var}]" in err[0]
    assert "--fid-inception" not in err[0] and "--download" in err[0]
    assert list(out.iterdir()) == []  # nothing written
    # the aligned fast path needs no face detector; a flag naming a missing file is named too
    assert evaluate.main(["--manifest", str(path), "--outputs", str(out), "--metrics", "sync", "--face-crop",
                          "aligned", "--syncnet", str(tmp_path / "nope.model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.model" in err[0] and "--syncnet" in err[0] and "--s3fd" not in err[0]
    # --generate: the model's own weights are checked before anything loads as well
    (tmp_path / "syncnet_v2.model").write_bytes(b"x")
    assert evaluate.main(["--manifest", str(path), "--outputs", str(out), "--metrics", "sync", "--face-crop",
                          "aligned", "--syncnet", str(tmp_path / "syncnet_v2.model"), "--generate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights not found" in err[0] and "--checkpoint-dir" in err[0]
    assert evaluate.main(["--manifest", str(path), "--outputs", str(out), "--metrics", "sim",
                          "--wavlm-ckpt", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: --wavlm-ckpt: ") and "none.pth" in err[0]
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------ make-manifest

def test_make_manifest_protocols(tmp_path):
    clips = tmp_path / "clips"
    for speaker, names in (("spk1", ("a", "b")), ("spk2", ("c",))):
        (clips / speaker).mkdir(parents=True)
        for name in names:
            _tiny_video(clips / speaker / f"{name}.mp4")
    transcripts = _csv(tmp_path / "t.csv", ["clip", "text"], [["spk1/a", "First."], ["spk1/b.mp4", "Second."],
                                                               ["spk2/c", "Third."]])
    n, left_out = make_manifest(clips, transcripts, "cross-sentence", tmp_path / "cs.csv", lang="en", progress=False)
    assert n == 2 and len(left_out) == 1 and "spk2" in left_out[0]
    m = read_manifest(tmp_path / "cs.csv")
    assert not m.errors and all(not r.problems for r in m.rows)
    a, b = m.rows
    assert (a.id, a.text, a.speaker) == ("spk1_a", "First.", "spk1")
    assert Path(a.prompt_face).name == "b.mp4" and Path(b.prompt_face).name == "a.mp4"  # another clip, same speaker
    assert Path(a.gt_video).name == "a.mp4" and Path(a.prompt_audio).parent.name == "cs_prompts"

    n, _ = make_manifest(clips, transcripts, "continuation", tmp_path / "cont.csv", lang="en", prompt_seconds=0.2,
                         progress=False)
    rows = read_manifest(tmp_path / "cont.csv").rows
    assert n == 3 and all(not r.problems for r in rows)
    from media import video_io
    assert video_io.probe(rows[0].prompt_face)["n_frames"] == 5  # its own first 0.2 s

    with pytest.raises(ManifestError, match="lang"):
        make_manifest(clips, transcripts, "continuation", tmp_path / "x.csv", progress=False)
    assert evaluate.main(["make-manifest", "--clips", str(clips), "--transcripts", str(tmp_path / "none.csv"),
                          "--out", str(tmp_path / "y.csv"), "--lang", "en"]) == 1


def test_write_manifest_round_trip(tmp_path):
    write_manifest([{"id": "x", "lang": "zh", "text": "你好，世界", "speaker": "s"}], tmp_path / "m.csv")
    (row,) = read_manifest(tmp_path / "m.csv").rows
    assert (row.id, row.lang, row.mode, row.text, row.speaker) == ("x", "zh", "t2av", "你好，世界", "s")


# ------------------------------------------------------------------------------------------ demo

def test_demo_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch_home"))
    res = subprocess.run([sys.executable, "evaluate.py", "--demo", "--outputs", str(tmp_path / "demo"), "--quiet"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("THE NUMBERS BELOW MEAN NOTHING") == 2  # at the start and at the end
    assert "demo_broken_row): generation: prompt_face: no_such_face.mp4: file not found" in res.stderr
    results = tmp_path / "demo" / "eval"
    md = (results / "report.md").read_text(encoding="utf-8")
    assert "DEMO RUN: RANDOM WEIGHTS. These numbers mean nothing." in md
    assert "| en | Talker-T2AV (paper) | 200 | 0.055 | 3.458 | 24.32 | 246.39 | 6.330 | 8.505 | n/a |" in md
    assert "| en | Talker-T2AV (paper) | 200 | 24.46 | 243.51 | 5.850 | 9.030 |" in md  # Table 2
    assert "| en | this run | 3 |" in md and "| en | this run | 1 |" in md
    assert "| 1 | wer, utmos, sync, fid, fvd, sim | generation: prompt_face: no_such_face.mp4: file not found |" in md
    assert "tiny random TorchScript stand-in" in md and "en FVD: needs at least 2 generated" in md

    rows = {r["id"]: r for r in csv.DictReader(open(results / "results.csv", encoding="utf-8"))}
    assert sorted(rows) == ["demo_a2v_0", "demo_broken_row", "demo_t2av_0", "demo_t2av_1"]
    for rid in ("demo_t2av_0", "demo_t2av_1"):
        r = rows[rid]
        assert r["skipped"] == "" and r["asr_text"]
        for key in ("wer", "utmos", "sim", "sync_conf", "sync_min_dist", "fid_frames", "fvd_frames"):
            assert np.isfinite(float(r[key])), (rid, key)
    assert rows["demo_a2v_0"]["wer"] == "" and float(rows["demo_a2v_0"]["sync_conf"]) == float(
        rows["demo_a2v_0"]["sync_conf"])
    assert rows["demo_broken_row"]["skipped"].count("no_such_face.mp4") == 6

    summary = json.loads((results / "summary.json").read_text())
    assert summary["meta"]["demo"] is True
    assert summary["skipped"]["clips_unscored"] == 1 and summary["skipped"]["rows_left_out"] == 0
    t2av = summary["groups"]["t2av/en"]
    assert set(t2av["values"]) == {"wer", "utmos", "fid", "fvd", "sync_c", "sync_d", "sim"}
    assert t2av["counts"]["fvd"] == 2 and t2av["difference"]["sync_c"] == pytest.approx(
        t2av["values"]["sync_c"] - 6.330)
    for name in ("sync_offset", "sync_conf", "wer", "utmos"):
        assert (results / "plots" / f"{name}.png").is_file()
    assert not [p for p in (tmp_path / "demo").rglob("*") if ".tmp" in p.name]
