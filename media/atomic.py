"""Writing files all-or-nothing: each output is written to a temporary name beside it and renamed over
the target only when every output of the group is complete.

    with atomic_outputs("out.mp4", "out.wav") as (tmp_mp4, tmp_wav):
        write(tmp_mp4); write(tmp_wav)
    # both renamed here; on any exception (or Ctrl-C / SIGTERM) neither target changes and no temp is left

The renames of one group hold an exclusive lock on the folder, so two processes writing the same outputs
at once leave a matching pair from one of them (last writer wins), never a mixed one.

A temporary name holds its writer's process id: a process killed outright (SIGKILL, power loss) leaves its
temps behind, and the next run writing the same target on this machine removes those of dead processes.
An error that names a temporary file is reported with the target's name instead, and a full disk says so.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: renames are still atomic one by one, without the group lock
    fcntl = None


def temp_path_beside(path) -> Path:
    """A fresh hidden name in the target's folder (same file system, so the rename is atomic), holding this
    process's id; the target's suffix is kept because writers such as ffmpeg pick the format from it."""
    path = Path(path)
    return path.parent / f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(target: Path) -> list:
    """Delete the temps (and their companions, such as `.tmp.mp4.video`) that dead processes left for target."""
    pattern = re.compile(rf"\.{re.escape(target.stem)}\.(\d+)-[0-9a-f]{{8}}\.tmp{re.escape(target.suffix)}(\..*)?")
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _named_for_the_user(err: Exception, temps, targets) -> Exception:
    """err as the user should read it: a full disk said plainly, a temp name replaced by its target's."""
    text = str(err)
    named = [(tmp, t) for tmp, t in zip(temps, targets) if t is not None and str(tmp.name) in text]
    full = getattr(err, "errno", None) == errno.ENOSPC
    folder = next((t.parent for t in targets if t is not None), None)
    if not full and folder is not None:  # libsndfile says only "System error."
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(folder).free < 1 << 20
    if full:
        target = named[0][1] if named else next(t for t in targets if t is not None)
        return OSError(errno.ENOSPC, f"{target}: no space left on the device (nothing was written)")
    if not named:
        return err
    for tmp, target in named:
        text = text.replace(str(tmp), str(target)).replace(tmp.name, target.name)
    kind = type(err) if type(err) in (ValueError, OSError, RuntimeError) else OSError
    return kind(" ".join(text.split()))


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
    targets = [None if p is None else Path(os.path.abspath(os.path.expanduser(os.fspath(p)))) for p in paths]
    for target in targets:  # abspath: "sub/../x" makes no folder sub
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(target)
    temps = [None if t is None else temp_path_beside(t) for t in targets]
    try:
        try:
            yield temps
        except Exception as err:  # noqa: BLE001 - re-raised, renamed for the user where it names a temp
            renamed = _named_for_the_user(err, temps, targets)
            if renamed is err:
                raise
            raise renamed from err
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
