"""The file primitives every layer uses: an atomic JSON write, the run folder's lock, its checkpoints.

- ``write_json(path, obj)``: the whole new file or the whole old one, never half of either (a temporary
  file beside it, fsync'd, then ``os.replace``); the temporary file never survives a failure, and
  non-finite floats are written as ``null`` so that the file is always valid JSON.
- ``folder_lock(folder)``: ``FOLDER/.lock`` held with ``fcntl.flock`` (exclusive) for as long as the
  ``with`` block runs. It is re-entrant within a process (a run that holds its folder can open its
  recording, which asks for the same lock), the kernel drops it when the holder dies (a lock left by a
  killed process never blocks), and the file names its holder for the error a second process gets.
- ``checkpoints(run_dir)``: the complete Trainer checkpoints, oldest first (training resumes from the
  last; analysis reads its trainer_state.json).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
from pathlib import Path

from duckling.errors import DucklingError

LOCK = ".lock"
_held: dict[str, list] = {}  # resolved folder -> [fd, depth]: this process's locks


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path, obj, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` atomically (see the module docstring)."""
    write_atomic(path, json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False) + "\n")


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, as ``write_json`` does: for files whose
    layout is not ``json.dumps``'s (token_mapping.json lists one token per line)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fsync_path(path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames and creations in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(run_dir) -> list[Path]:
    """A run folder's *complete* Trainer checkpoints (``checkpoint-N/`` holding trainer_state.json, the
    last file the Trainer writes), oldest first: ``checkpoints(run)[-1]`` is the one to resume from."""
    def step(p: Path) -> int:
        n = p.name.split("-")[-1]
        return int(n) if n.isdigit() else -1

    found = [p for p in Path(run_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=step)


class FolderBusy(DucklingError):
    """Another live process holds the folder's lock; ``holder`` says which."""

    def __init__(self, folder: Path, holder: str):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder.resolve()} is being written by {holder}. A run folder has one writer: wait for "
                         "that process to finish (or stop it with Ctrl-C, which saves a checkpoint), then try "
                         "again; or use another folder.")


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def holder(folder) -> str | None:
    """Who holds ``folder``'s lock: None when nobody (or this process) does."""
    folder = Path(folder)
    if str(folder.resolve()) in _held:
        return None
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def check_unlocked(folder) -> None:
    """Refuse a folder whose lock a live process holds."""
    who = holder(folder)
    if who is not None:
        raise FolderBusy(Path(folder), who)


def held_lock_fd(folder) -> int | None:
    """The descriptor of ``FOLDER/.lock`` while this process holds it (``folder_lock``), else None. A
    child process given a duplicate of it shares the lock: it stays held until both have closed it."""
    held = _held.get(str(Path(folder).resolve()))
    return held[0] if held else None


@contextlib.contextmanager
def folder_lock(folder):
    """Hold ``FOLDER/.lock`` for the duration of the block (the folder must exist)."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DucklingError(f"cannot lock {folder}: {e.strerror}. The folder must exist and be writable.") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise FolderBusy(folder, who) from None
    _held[key] = [fd, 1]
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
