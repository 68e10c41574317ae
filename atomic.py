"""Writing files all-or-nothing: each output is written to a temporary name beside it and renamed over
the target only when every output of the group is complete.

    with atomic_outputs("out.mp4", "out.wav") as (tmp_mp4, tmp_wav):
        write(tmp_mp4); write(tmp_wav)
    # both renamed here; on any exception (or Ctrl-C / SIGTERM) neither target changes and no temp is left

The renames of one group hold an exclusive lock on the folder, so two processes writing the same outputs
at once leave a matching pair from one of them (last writer wins), never a mixed one.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: renames are still atomic one by one, without the group lock
    fcntl = None


def temp_path_beside(path) -> Path:
    """A fresh hidden name in the target's folder (same file system, so the rename is atomic); the
    target's suffix is kept because writers such as ffmpeg pick the format from it."""
    path = Path(path)
    return path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"


@contextlib.contextmanager
def _folder_lock(folder: Path):
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_outputs(*paths):
    """Yield one temporary path per target (None for a None target); rename them all at the end."""
    targets = [None if p is None else Path(os.path.expanduser(os.fspath(p))) for p in paths]
    for target in targets:
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
    temps = [None if t is None else temp_path_beside(t) for t in targets]
    try:
        yield temps
        pairs = [(tmp, t) for tmp, t in zip(temps, targets) if t is not None]
        if pairs:
            with _folder_lock(pairs[0][1].parent):
                for tmp, target in pairs:
                    if tmp.exists():
                        os.replace(tmp, target)
    finally:
        for tmp in temps:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path):
    """atomic_outputs for one file: yields its temporary path."""
    with atomic_outputs(path) as (tmp,):
        yield tmp
