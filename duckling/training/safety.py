"""A run folder's safety: the disk budget before step 1, Ctrl-C/SIGTERM as a clean stop with a
checkpoint, fsync of the recording before every checkpoint, and what a failure leaves behind
(status "failed", no partial files, advice that fits where the run stands)."""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
import sys
import threading
from pathlib import Path

from duckling.config import DucklingConfig
from duckling.errors import DucklingError
from duckling.files import LOCK, fsync_path
from duckling.recording.budget import check_run_disk
from duckling.training.model import count_parameters
from duckling.training.run_folder import last_checkpoint, update_run_info, update_status_file


def check_disk(run_dir: Path, cfg: DucklingConfig, model, start: int, record: bool, shape, n_live: int) -> None:
    """The budget (recording + checkpoints + final model) against record.budget_gb and the free disk
    (duckling.recording.budget), with the parameter count of the model itself."""
    check_run_disk(run_dir, cfg, count_parameters(model), start=start, record=record, shape=shape, n_live=n_live)


class StopOnSignal:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint there, stop (a second one stops now)."""

    def __init__(self):
        from transformers import TrainerCallback

        self.signal = None
        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if outer.signal is not None:
                    control.should_save = control.should_training_stop = True

        self.callback = Callback()

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.getsignal(s) for s in sigs}

        def handler(signum, frame):
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signal.Signals(signum).name
            print(f"\nduckling: {self.signal}: stopping after this step and saving a checkpoint "
                  "(again to stop at once)", file=sys.stderr, flush=True)

        for s in sigs:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s in sigs:
                signal.signal(s, old[s])


def sync_recording(run_dir: Path):
    """A callback that fsyncs the recording before every checkpoint: a checkpoint never refers to steps
    that a power loss could take back (docs/recording.md)."""
    from transformers import TrainerCallback

    class Sync(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if control.should_save:
                fsync_tree(run_dir / "recording")

    return Sync()


def fsync_tree(folder: Path) -> None:
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(folder)


def _cleanup_partial(run_dir: Path) -> None:
    """After a failure: no *.tmp files, no checkpoint folder (nor final/) without its trainer_state.json
    (the last file written into it)."""
    for p in run_dir.rglob("*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)
    for p in [*run_dir.glob("*checkpoint-*"), run_dir / "final"]:
        if p.is_dir() and not (p / "trainer_state.json").is_file():
            shutil.rmtree(p, ignore_errors=True)


# How libraries that do not raise OSError report a failed write: safetensors (Rust's io::Error in a
# SafetensorError) and torch.save (PytorchStreamWriter's RuntimeError).
_FULL = ("no space left", "storagefull", "os error 28", "disk quota", "os error 122")
_WRITE = (*_FULL, "file write failed", "error while serializing", "read-only file system", "permission denied")


def write_failure(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a failed write of a file: an OSError, or a library's own
    exception wrapping one."""
    while e is not None:
        if isinstance(e, OSError):
            return True
        if isinstance(e, Exception) and any(w in str(e).lower() for w in _WRITE):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(e).lower() for w in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def failure_advice(run_dir: Path, step: int, err: BaseException, removed: bool) -> str:
    root = _root(err)
    where = run_dir.resolve()
    fix = "fix the cause"
    if _disk_full(err):
        cause, fix = "the disk is full", "free disk space"
    elif isinstance(root, OSError):
        cause, fix = f"a write failed ({root.strerror or root})", "make the folder writable (or fix its disk)"
    elif not isinstance(err, DucklingError) and write_failure(err):
        cause, fix = f"a write failed ({str(err).strip().splitlines()[0][:200]})", "make the folder writable (or fix its disk)"
    else:
        cause = str(err)
    if removed:
        return (f"The run stopped before its first step completed: {cause.rstrip('.')}. Nothing of it was kept ({where} was "
                "removed), so the same command works once the cause is fixed.")
    ckpt = last_checkpoint(run_dir)
    if ckpt is not None:
        todo = (f"{fix}, then continue from {ckpt.name} with "
                f"`duckling train --run {run_dir} --resume`")
    else:
        todo = (f"it has no checkpoint yet, so it cannot be resumed: {fix} and start again in a new folder "
                "(a lower train.save_steps gives earlier resume points)")
    return (f"Training stopped at step {step}: {cause.rstrip('.')}. Every step recorded so far is kept and "
            f"readable in {where}; {todo}.")


def _root(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def after_failure(run_dir: Path, step: int, err: BaseException, fresh: bool) -> bool:
    """A failed or hard-interrupted run: no partial files; a fresh run that never completed a step (none
    trained, or none recorded and no checkpoint) leaves no folder (nothing in it is worth keeping, and
    the retry can use the same path)."""
    if fresh and (step == 0 or (last_checkpoint(run_dir) is None and _recorded_nothing(run_dir))):
        empty_run_dir(run_dir)  # (the writer process may report step 0's failed write a few steps later)
        return True
    _cleanup_partial(run_dir)
    status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
    with contextlib.suppress(OSError, ValueError):
        update_run_info(run_dir, status=status, global_step=step)
    meta = run_dir / "recording" / "meta.json"
    with contextlib.suppress(OSError, ValueError):  # the writer could not write its own final status
        if meta.is_file() and json.loads(meta.read_text()).get("status") == "recording":
            update_status_file(meta, status=status)
    return False


def _recorded_nothing(run_dir: Path) -> bool:
    """Whether the run's recording holds no complete step (False when it cannot tell)."""
    from duckling.recording.repair import stream_ends

    if not (run_dir / "recording" / "meta.json").is_file():
        return True
    try:
        return stream_ends(run_dir).get("scalars") is None
    except Exception:  # noqa: BLE001 - unreadable: keep what is there
        return False


def empty_run_dir(run_dir: Path) -> None:
    """Remove everything but the lock (run_lock removes the folder itself when it made it)."""
    for p in run_dir.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
