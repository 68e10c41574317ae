"""tools/gpu_check.sh (issue 27, item 9) where there is no GPU: it parses, says "no CUDA device" at once and
still writes its summary; the summary reports failed/timed-out/skipped steps; the CUDA-only tests are found."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


@needs_bash
def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_torch(folder: Path) -> dict:
    (folder / "torch.py").write_text("raise ImportError('fake: no torch in this environment')\n")
    return {"PYTHONPATH": str(folder)}


@needs_bash
@pytest.mark.parametrize("case", ["cuda_hidden", "torch_missing"])
def test_without_cuda_it_stops_at_once_and_says_so(tmp_path, case):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(work), CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    if case == "torch_missing":
        fake = tmp_path / "fake"
        fake.mkdir()
        env.update(_fake_torch(fake))
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    seconds = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode == gpu_check.NO_CUDA_EXIT, text
    assert seconds < 30, f"took {seconds:.1f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("no CUDA device: ")]
    assert lines, text
    if case == "torch_missing":
        assert "torch is not importable" in lines[0] and "fake: no torch" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "no_cuda" and summary["exit_code"] == gpu_check.NO_CUDA_EXIT
    assert summary["headline"].startswith("no CUDA device: ")
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["cuda"]["status"] == "failed"
    planned = ("modules", "tests", "t2av", "train", "bench_loop", "train_torchrun", "bench_liax", "bench_train")
    assert all(steps[name]["status"] == "skipped" and steps[name]["note"] == "no CUDA device" for name in planned)
    assert "wheels" not in steps  # nothing is installed without a GPU to check
    md = (out / "summary.md").read_text()
    assert "**NO_CUDA**" in md and lines[0] in md
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "summary.json", "summary.md"]
    assert "===== cuda: rc 2" in (out / "gpu_check.log").read_text()


def _step_files(work: Path, rows, figures):
    work.mkdir(parents=True, exist_ok=True)
    (work / "steps.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    for name, fig in figures.items():
        (work / f"{name}.json").write_text(json.dumps(fig))


def test_summary_reports_each_step(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    cuda = {"cuda_ok": True, "device": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "torch": "2.11.0+cu130"}
    modules = {"found": {"torch": "2.11.0"}, "missing": {},
               "pin_mismatches": {"torch": {"pinned": "2.13.0", "found": "2.11.0"}}}
    t2av = {"loop_ms_per_patch": 41.5, "render_ms_per_frame": 12.25, "peak_gpu_gib": 9.87, "n_patches": 25,
            "captured_vs_eager": {"loop_ms_per_patch": 120.0, "speedup_captured_over_eager": 2.89,
                                  "speech_latents_rel_err": 1e-3, "motion_rel_err": 2e-3}}
    bench = {"rows": [{"stage": "llm (full)", "what": "T2AV AR loop, cuda_graphs", "value": 40.0,
                       "unit": "ms/patch", "decimals": 1, "memory": "GPU peak 3.1 GiB"}]}  # bench.Row fields
    _step_files(work, [("cuda", 0, 3.2, 60, ""), ("modules", 0, 4.0, 90, ""), ("t2av", 0, 80.5, 210, ""),
                       ("train", 1, 20.0, 100, ""), ("bench_loop", 0, 50.0, 150, ""),
                       ("bench_liax", 124, 100.0, 100, ""), ("bench_train", "-", 0, 150, "out of budget (5 s left)")],
                dict(cuda=cuda, modules=modules, t2av=t2av, bench_loop=bench,
                     train={"reason": "expected 2 steps with finite losses"}))
    (work / "train.log").write_text("line one\nTraceback: boom\n")
    code = gpu_check.summarize(work, out, budget_s=480, total_s=300)
    assert code == 1
    s = json.loads((out / "summary.json").read_text())
    status = {r["step"]: r["status"] for r in s["steps"]}
    assert status == {"cuda": "ok", "modules": "ok", "t2av": "ok", "train": "failed", "bench_loop": "ok",
                      "bench_liax": "timeout", "bench_train": "skipped"}
    assert s["verdict"] == "failed" and "train" in s["headline"] and "bench_liax" in s["headline"]
    rows = {r["step"]: r for r in s["steps"]}
    assert rows["t2av"]["key_figures"]["loop_ms_per_patch"] == 41.5
    assert rows["t2av"]["key_figures"]["captured_speedup"] == 2.89
    assert rows["train"]["reason"] == "expected 2 steps with finite losses"
    assert rows["train"]["log_tail"][-1] == "Traceback: boom"
    md = (out / "summary.md").read_text()
    assert "| t2av | ok | 80.5 |" in md and "loop_ms_per_patch 41.5" in md and "render_ms_per_frame 12.25" in md
    assert "| bench_liax | timeout |" in md and "killed at its 100 s limit" in md
    assert "| bench_train | skipped |" in md and "out of budget" in md
    assert "llm (full): T2AV AR loop, cuda_graphs = 40.0 ms/patch (GPU peak 3.1 GiB)" in md
    assert "torch 2.11.0 here, requirements pin 2.13.0" in md

    # every step passed -> 0
    _step_files(work, [("cuda", 0, 1, 60, ""), ("modules", 0, 1, 90, ""), ("t2av", 0, 1, 210, "")],
                dict(cuda=cuda, modules=modules))
    assert gpu_check.summarize(work, out, budget_s=480, total_s=10) == 0


def test_missing_modules_are_named_with_the_remedy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "MODULES", {"json": ("json", "x"),
                                               "no_such_module_xyz": ("no-such-module-xyz", "a test")})
    path = tmp_path / "modules.json"
    code = gpu_check.main(["modules", "--json", str(path)])
    assert code == gpu_check.MISSING_EXIT
    line = capsys.readouterr().out
    assert "missing Python packages: no-such-module-xyz" in line and "gpu_check.py wheels" in line
    info = json.loads(path.read_text())
    assert list(info["missing"]) == ["no_such_module_xyz"] and "json" in info["found"]


def test_cuda_only_tests_are_found(tmp_path):
    found = gpu_check.cuda_only_tests()
    assert "tests/test_loop_steps.py::test_cuda_graph_loop_equals_eager_on_cuda" in found
    assert all(Path(REPO, i.split("::")[0]).is_file() for i in found)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='gpu')\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='gpu')\n"
        "class TestC:\n"
        "    def test_d(self): pass\n")
    (tmp_path / "tests" / "test_y.py").write_text(
        "import pytest, torch\npytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='gpu')\n"
        "def test_e(): pass\n")
    assert gpu_check.cuda_only_tests(tmp_path / "tests") == [
        "tests/test_x.py::test_a", "tests/test_x.py::TestC::test_d", "tests/test_y.py::test_e"]
