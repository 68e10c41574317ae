"""Nothing hangs: a stream stopped at any moment (an exception or Ctrl-C before the first frame, a reader of
stdout that leaves early) returns promptly, re-raises, and leaves no partial file."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import streaming
from media import video_io

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120  # a deadline against hangs, never a speed requirement


def _returns_in_time(fn):
    """fn() run in a thread: (returned, its exception) within HANG_GUARD_S."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG_GUARD_S)
    assert not t.is_alive(), "hung"
    return box


def test_incremental_video_aborted_before_any_frame_returns(tmp_path):
    video = video_io.IncrementalVideo(tmp_path / "o.mp4")
    _returns_in_time(video.abort)
    assert list(tmp_path.iterdir()) == []


def test_incremental_video_aborted_after_frames_returns(tmp_path):
    video = video_io.IncrementalVideo(tmp_path / "o.mp4")
    video.add(np.zeros((3, 16, 16, 3), np.uint8))
    _returns_in_time(video.abort)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["writers", "loop"])
def test_stream_interrupted_before_the_first_frame(demo_pipe, tmp_path, monkeypatch, error, where):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(streaming, "_Outputs" if where == "writers" else "_chunks", fail)
    box = _returns_in_time(lambda: list(demo_pipe.stream(text="Hello.", output=str(tmp_path / "o.mp4"),
                                                         mp4=str(tmp_path / "o.partial.mp4"))))
    assert type(box.get("error")) is type(error)
    assert list(tmp_path.iterdir()) == []  # neither the growing file nor a temp file is left


def test_reader_of_stdout_leaving_early_is_not_an_error(tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "infer.py"), "--demo", "--quiet", "--text", "Hello there.",
                             "--output", str(tmp_path / "o.mp4"), "--stream", "-"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(2000)  # `| head -c 2000`
    proc.stdout.close()
    _, err = proc.communicate(timeout=HANG_GUARD_S * 2)
    err = err.decode()
    assert head[4:8] == b"ftyp"
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "closed it before the end" in err
    assert (tmp_path / "o.mp4").is_file() and (tmp_path / "o.wav").is_file()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_any_moment_of_a_stream_ends_it_and_leaves_nothing(tmp_path, sig, code):
    """The CLI streaming, signalled at several moments from start-up to rendering: it ends within the guard
    with the shell's code (or 0 when the run had already finished) and leaves no file but finished outputs."""
    for delay in (0.3, 1.0, 2.0, 3.5):
        folder = tmp_path / f"{sig.name}_{delay}"
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, str(REPO / "infer.py"), "--demo", "--quiet", "--text",
                                 "Hello there, a sentence to stream.", "--stream", str(folder / "o.mp4")],
                                cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        lines = [line for line in err.decode().splitlines() if line.strip()]
        left = sorted(p.name for p in folder.iterdir())
        if proc.returncode == 0:  # finished before the signal
            assert left == ["o.mp4", "o.wav"], left
        elif proc.returncode == -sig:  # killed by the signal while Python starts, before any handler (or file)
            assert left == [], left
        else:  # the run ends with the one line of the interruption (the interpreter may have said more before)
            stopped = "interrupted" if sig == signal.SIGINT else sig.name
            assert proc.returncode == code and left == [], (delay, proc.returncode, left, lines)
            assert lines and lines[-1].startswith(f"infer.py: {stopped}"), (delay, lines[-12:])


def test_an_error_caused_by_a_signal_is_reported_as_the_interruption(tmp_path, capsys, monkeypatch):
    """A signal landing inside an import can leave a library half-imported and surface as another error: once
    a signal was received, the CLI reports the interruption (exit 128 + signal), not a traceback."""
    import infer

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # as from the terminal: the handler raises KeyboardInterrupt...
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # ...which a library swallows,
        raise ImportError("cannot import name 'WavLMModel' (half-imported)")  # and its next import fails

    monkeypatch.setattr(infer, "SIGNALS_SEEN", [])  # this process's record, put back after the test
    monkeypatch.setattr(infer, "run", run)
    assert infer.main(["--demo", "--output", str(tmp_path / "o.mp4")]) == 130
    err = capsys.readouterr().err
    assert "interrupted after" in err and "Traceback" not in err and "WavLMModel" not in err
    infer.SIGNALS_SEEN.clear()
    monkeypatch.setattr(infer, "run", lambda args: (_ for _ in ()).throw(ImportError("unrelated")))
    with pytest.raises(ImportError):  # without a signal an unexpected error is not hidden
        infer.main(["--demo", "--output", str(tmp_path / "o.mp4")])


def test_a_stop_swallowed_by_a_finaliser_is_sent_again(monkeypatch):
    """Python swallows an exception raised in __del__ ("Exception ignored in ..."): a Ctrl-C landing there
    would let the run go on. The CLI's hook sends the signal again instead; other unraisables pass through."""
    import types

    import infer

    sent, passed = [], []
    monkeypatch.setattr(infer, "SIGNALS_SEEN", [signal.SIGINT])
    monkeypatch.setattr(signal, "raise_signal", sent.append)
    hook = infer._redeliver_swallowed_stop(passed.append)
    hook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))
    hook(types.SimpleNamespace(exc_value=ValueError("a finaliser's own error")))
    assert sent == [signal.SIGINT] and len(passed) == 1
