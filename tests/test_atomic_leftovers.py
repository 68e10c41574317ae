"""Outputs all-or-nothing, and nothing left over: temps of killed processes are swept by the next run, paths
through '..' make no folders, errors name the output (not a hidden temp), and a full disk says so."""
import os
import subprocess
import sys

import pytest

from media import atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temps_of_dead_processes_are_swept(tmp_path):
    target = tmp_path / "o.mp4"
    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f".o.{dead}-0123abcd.tmp.mp4", tmp_path / f".o.{dead}-0123abcd.tmp.mp4.video"]
    kept = [tmp_path / f".o.{alive}-89abcdef.tmp.mp4",  # a live writer's
            tmp_path / f".other.{dead}-0123abcd.tmp.mp4", tmp_path / f".o.{dead}-0123abcd.tmp.wav",  # other targets
            tmp_path / "o.notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"x")
    with atomic.atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_path_through_dotdot_makes_no_folder(tmp_path):
    with atomic.atomic_output(tmp_path / "sub" / ".." / "x.wav") as tmp:
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]


def test_an_error_naming_a_temp_names_the_output(tmp_path):
    with pytest.raises(ValueError) as info:
        with atomic.atomic_outputs(tmp_path / "o.mp4", tmp_path / "o.wav") as (tmp_mp4, _):
            raise ValueError(f"{tmp_mp4}: encoder failed")
    assert str(info.value) == f"{tmp_path / 'o.mp4'}: encoder failed" and list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        if os.environ.get("TALKER_CI") == "1":
            pytest.fail("mount -t tmpfs failed: CI must run the disk-full test (as root)")
        pytest.skip("a tiny tmpfs needs root (mount -t tmpfs)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_fs, capsys):
    import infer

    rc = infer.main(["--demo", "--quiet", "--text", "A sentence long enough to need more than the disk holds.",
                     "--output", str(tiny_fs / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "no space left on the device" in err and str(tiny_fs / "o.") in err and ".tmp" not in err, err
    assert list(tiny_fs.iterdir()) == []
