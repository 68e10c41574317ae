"""A clone without ../shared: every test module still collects, and the parity tests skip with one reason;
with CI's TALKER_CI=1 the same tests fail instead."""
import os
import subprocess
import sys

from conftest import NO_SHARED_REASON, REPO_ROOT

PARITY_TESTS = ("tests/test_local_dit.py", "tests/test_unified_cfm.py",
                "tests/test_speech_llm.py::test_released_size_matches_manifest")


def _pytest(tmp_path, *args, ci=False):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TALKER_CI", "TALKER_SKIP_MISSING_SHARED")}
    env["TALKER_SHARED_DIR"] = str(tmp_path / "no_shared")
    if ci:
        env["TALKER_CI"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_every_module_collects_without_shared(tmp_path):
    run = _pytest(tmp_path, "--collect-only")
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and "collected" in summary and "error" not in summary, run.stdout[-3000:]


def test_parity_tests_skip_with_one_reason_without_shared(tmp_path):
    run = _pytest(tmp_path, "-ra", *PARITY_TESTS)
    assert run.returncode == 0, run.stdout[-3000:]
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all(NO_SHARED_REASON in line for line in skipped), run.stdout[-3000:]


def test_ci_fails_instead_of_skipping_parity_tests(tmp_path):
    run = _pytest(tmp_path, *PARITY_TESTS, ci=True)
    assert run.returncode == 1 and "TALKER_CI=1" in run.stdout, run.stdout[-3000:]
