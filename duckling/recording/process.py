"""The recording's writer process: the training process hands every recorded step to a child process
(``multiprocessing`` "spawn") that runs the ``RecordingWriter``, so that no codec, checksum or
``os.write`` call of the recording competes with training for the GIL (docs/recording.md, "The
writer process"). numpy only: the recorder (``duckling.training.recorder``) fills the slots with torch.

- A ``Ring`` of n slots in one ``multiprocessing.shared_memory`` segment, each laid out to hold one
  step (``step_fields``: the scalars, the snapshot parts, the probe). The training process writes a
  step into a free slot (on CUDA the recorder registers the segment as pinned memory, so the device's
  non-blocking copy lands in the slot itself), then sends one small message (slot, step, lr,
  snapshot, probe); the writer appends the step and sends the slot back. Training waits only when
  every slot is in flight; no step is ever dropped.
- The writer process encodes blocks on a thread of its own, or on ``procs`` worker processes, while
  it goes on appending (or all at close, ``defer``); it alone commits blocks (rename, manifest).
- It dies with its parent: when the training process is gone (the pipe ends, or its parent pid
  changes) it writes every step it was handed, closes the recording without compacting (raw chunks
  are valid recorded data; a resume continues them) and exits. It shares its parent's run lock (a
  duplicate of the lock's descriptor), so the run folder stays locked until it has exited.
- If it fails (a full disk) or dies (killed), the next call of the training process raises a
  DucklingError that names the cause; nothing waits forever.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import reduction, shared_memory, util
from pathlib import Path

import numpy as np

from duckling.errors import DucklingError
from duckling.files import LOCK, folder_lock, held_lock_fd, write_json
from duckling.recording.layout import snapshot_parts

POLL_S = 0.5  # how often a waiting side checks that the other one is alive
START_S = 300.0  # the writer opens (and, on resume, truncates) the recording within this


def step_fields(matrices, shape, dtype: str, n_live: int, probe: bool) -> list[tuple[str, tuple, np.dtype]]:
    """[(key, shape, dtype)] of one recorded step: "scalars" (every float32 of the step: per matrix
    4 x V row scalars, then the mean hidden state (d,)), "snap/<m>/<ext>" (the snapshot parts,
    ``layout.snapshot_parts``) and, with ``probe``, "probe" (2,) float32."""
    V, d = shape
    fields = [("scalars", (len(matrices) * 4 * V + d,), np.dtype(np.float32))]
    for m in matrices:
        fields += [(f"snap/{m}/{ext}", (sl.stop - sl.start, d), np.dtype(dt))
                   for ext, sl, dt in snapshot_parts(dtype, V, n_live)]
    if probe:
        fields.append(("probe", (2,), np.dtype(np.float32)))
    return fields


def auto_procs(cores: int | None = None) -> int:
    """Worker processes for block encoding on the spare cores: the training process keeps two (its
    Python thread and the device's feeding), the writer process one; at most 4."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 3))


class Ring:
    """``n`` slots of one step each in one shared-memory segment (slots page-aligned, fields 64-byte)."""

    def __init__(self, fields, n: int, name: str | None = None):
        self.fields = [(k, tuple(int(x) for x in shape), np.dtype(dt)) for k, shape, dt in fields]
        self.offsets, off = {}, 0
        for k, shape, dt in self.fields:
            self.offsets[k] = off
            off += -(-int(np.prod(shape)) * dt.itemsize // 64) * 64
        self.slot_bytes, self.n = -(-off // 4096) * 4096, int(n)
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=self.n * self.slot_bytes)
        else:  # the writer process attaches (it shares its parent's resource tracker, which unlinks
            self.shm = shared_memory.SharedMemory(name=name)  # the segment if both die)
        self.owner = name is None

    def spec(self) -> tuple:
        return self.fields, self.n, self.shm.name

    def field(self, i: int, key: str) -> tuple[int, tuple, np.dtype]:
        """(byte offset in the segment, shape, dtype) of field ``key`` of slot i."""
        _, shape, dt = next(f for f in self.fields if f[0] == key)
        return i * self.slot_bytes + self.offsets[key], shape, dt

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """numpy views of slot i's fields (drop them before ``close``)."""
        return {k: np.ndarray(shape, dt, buffer=self.shm.buf, offset=i * self.slot_bytes + self.offsets[k])
                for k, shape, dt in self.fields}

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes with the process
            self.shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
            self.owner = False


@contextlib.contextmanager
def _without_main():
    """Spawn without the caller's ``__main__``: the writer process imports duckling only, so a script
    that trains at top level (no ``if __name__ == "__main__":`` guard) is not run again in it."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _LockFd:
    """A descriptor that travels to the spawned child as a duplicate (as a Connection does)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


class WriterProcess:
    """The training process's side: holds the run lock, the ring and the child, and raises the
    child's failure or death as a DucklingError from ``acquire``/``hand``/``drain``/``close``.

    ``writer_kwargs``: ``RecordingWriter``'s arguments after ``run_dir``; ``procs``: encoding worker
    processes (0: the writer process encodes); ``defer``: compact at close instead of as blocks fill.
    ``setup``: a picklable callable the writer process runs first (the tests inject faults with it).
    """

    def __init__(self, run_dir, writer_kwargs: dict, fields, n_slots: int, procs: int = 0,
                 defer: bool = False, setup=None):
        self.run_dir = Path(run_dir)
        self.error: str | None = None
        self.proc, self.info, self._closed = None, None, False
        self._stack = contextlib.ExitStack()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(folder_lock(self.run_dir))  # released after the child has exited
        try:
            self.ring = Ring(fields, n_slots)
            self._stack.callback(self.ring.close)
            self.free = list(range(self.ring.n))[::-1]  # slots the writer does not hold (a stack)
            ctx = mp.get_context("spawn")
            self._rx, child_tx = ctx.Pipe(duplex=False)  # writer -> training: ready, free, error, closed
            child_rx, self._tx = ctx.Pipe(duplex=False)  # training -> writer: steps, close
            self.proc = ctx.Process(
                target=_main, name="duckling-writer",
                args=(str(self.run_dir), writer_kwargs, self.ring.spec(), child_rx, child_tx,
                      _LockFd(held_lock_fd(self.run_dir)), os.getpid(), int(procs), bool(defer), setup))
            with _without_main():
                self.proc.start()
            child_rx.close()  # the child's ends: its pipe ends when it exits, ours when we do
            child_tx.close()
            # at interpreter exit, before multiprocessing joins its children: the writer sees the end
            util.Finalize(self, self._tx.close, exitpriority=10)
            self.info = self._wait_for("ready", START_S)
        except BaseException:
            self._stop()
            raise

    # --- messages from the writer ---------------------------------------------------------------
    def _handle(self, msg) -> object:
        kind = msg[0]
        if kind == "free":
            self.free.append(msg[1])
        elif kind == "closed":
            self._closed = True
        elif kind == "error":
            self.error = self.error or msg[1]
        return msg

    def _recv(self, timeout: float):
        """The writer's next message within ``timeout`` s, else None; its death is a DucklingError."""
        try:
            if self._rx.poll(timeout):
                return self._handle(self._rx.recv())
        except (EOFError, OSError):
            self._died()
        if not self.proc.is_alive() and not self._rx.poll(0):
            self._died()
        return None

    def _died(self):
        self.proc.join(POLL_S)
        code = self.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.error = self.error or (
            f"the recording's writer process (pid {self.proc.pid}) died ({how}); the steps it wrote "
            f"are kept in {self.run_dir / 'recording'}. Find what stopped it (the system log names a "
            f"process killed for memory), then resume from the last checkpoint with --resume.")
        raise DucklingError(self.error)

    def _wait_for(self, kind: str, timeout: float):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self._recv(POLL_S)
            if msg is not None and msg[0] == "error" and kind != "closed":
                raise DucklingError(msg[1])
            if msg is not None and msg[0] == kind:
                return msg[1]
        raise DucklingError(f"the recording's writer process (pid {self.proc.pid}) did not answer within "
                            f"{timeout:.0f} s; is the machine overloaded? Resume from the last "
                            f"checkpoint with --resume.")

    def check(self) -> None:
        """Take in what the writer has sent; raise its failure (sticky: every later call raises)."""
        while self.error is None and self._recv(0) is not None:
            pass
        if self.error is not None:
            raise DucklingError(self.error)

    # --- the training process's calls ----------------------------------------------------------
    def acquire(self) -> int:
        """A free slot; waits (never drops a step) while the writer holds them all."""
        self.check()
        while not self.free:
            self._recv(POLL_S)
            self.check()
        return self.free.pop()

    def hand(self, slot: int, step: int, lr: float, snapshot: bool, probe: bool) -> None:
        """Slot ``slot`` holds step ``step`` (complete: on CUDA its copy has finished)."""
        try:
            self._tx.send(("step", slot, int(step), float(lr), bool(snapshot), bool(probe)))
        except OSError:
            self._died()

    def drain(self) -> None:
        """Return once the writer has appended every handed step (a checkpoint must be covered)."""
        while len(self.free) < self.ring.n:
            self.check()
            self._recv(POLL_S)
        self.check()

    def close(self, status: str) -> dict:
        """Have the writer finish (compact, unless it failed, and record ``status``), wait for it to
        exit, then release the ring and the run lock. Returns the writer's closing facts."""
        info = {}
        try:
            try:
                self.check()  # a writer that failed or died closes itself ("failed"; _stop ends its pipe)
                try:
                    self._tx.send(("close", status))
                except OSError:
                    self._died()
                info = self._wait_for("closed", float("inf"))
            except DucklingError:
                pass  # self.error says why
        finally:
            self._stop()
        if self.error is not None and status != "failed":
            raise DucklingError(self.error)
        return info

    def _stop(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._tx.close()  # the writer drains what it holds and exits
        if self.proc is not None and self.proc.pid is not None:
            self.proc.join()
        if self.info is not None and not self._closed:  # it died before closing: say so (we hold the lock)
            meta = self.run_dir / "recording" / "meta.json"
            with contextlib.suppress(OSError, ValueError):
                m = json.loads(meta.read_text())
                if m.get("status") == "recording":
                    write_json(meta, {**m, "status": "failed"})
        self._stack.close()


# --- the writer process ----------------------------------------------------------------------------
def _check_lock(run_dir: str, fd: int) -> None:
    """The descriptor we were given is the run lock, and it holds it (a fresh one is refused)."""
    path = Path(run_dir) / LOCK
    st, mine = os.stat(path), os.fstat(fd)
    probe = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        free = True
    except BlockingIOError:
        free = False
    finally:
        os.close(probe)
    if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino) or free:
        raise DucklingError(f"the recording's writer process was not handed the lock of {run_dir} by "
                            f"the training process; a recording is written only under its run's lock.")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already (shared with the parent): no wait


def _watch_parent(ppid: int) -> None:
    """Worker processes: ignore Ctrl-C (the training process handles it) and exit when the writer
    process is gone (no orphans)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == ppid:
            time.sleep(POLL_S)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def _append(writer, arrays: dict, step: int, lr: float, snapshot: bool, probe: bool) -> None:
    mats, V = writer.meta["matrices"], writer.meta["shape"][0]
    sc = arrays["scalars"]
    n = len(mats) * 4 * V
    rows = sc[:n].reshape(len(mats), 4, V)
    snap = {m: {ext: arrays[f"snap/{m}/{ext}"] for ext, _, _ in writer.parts} for m in mats} if snapshot else None
    writer.append_step(step, dict(zip(mats, rows)), sc[n:], lr, snap)
    if probe:
        writer.append_probe(step, float(arrays["probe"][0]), float(arrays["probe"][1]))


def _message(e: BaseException) -> str:
    if isinstance(e, DucklingError):
        return str(e)
    return (f"the recording's writer process failed: {e!r}. The steps written so far are kept; fix the "
            f"cause and resume from the last checkpoint with --resume.")


def _main(run_dir, writer_kwargs, ring_spec, rx, tx, lock_fd, ppid, procs, defer, setup) -> None:
    from duckling.recording.writer import RecordingWriter  # (the child imports what it needs)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's: it closes us
    ring = encoder = writer = None

    def send(*msg) -> None:
        with contextlib.suppress(OSError):  # the training process is gone: nobody to tell
            tx.send(msg)

    try:
        if setup is not None:
            setup()
        _check_lock(run_dir, lock_fd)
        ring = Ring(*ring_spec[:2], name=ring_spec[2])
        if procs > 0:
            encoder = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"),
                                          initializer=_watch_parent, initargs=(os.getpid(),))
        elif not defer:  # blocks encoded on a thread of this process: appends go on meanwhile (no
            encoder = ThreadPoolExecutor(1, thread_name_prefix="duckling-encode")  # Python-bound thread here)
        writer = RecordingWriter(run_dir, **writer_kwargs, defer=defer, encoder=encoder, locked=True)
    except BaseException as e:  # noqa: BLE001 - said to the training process
        send("error", _message(e))
        writer = None
    status, compact = "interrupted", False  # unless the training process closes us
    if writer is not None:
        send("ready", {"last_step": writer.last_step, "pid": os.getpid()})
        while True:
            try:
                if not rx.poll(POLL_S):
                    if os.getppid() != ppid:  # the training process is gone (a forked child holds its end)
                        break
                    continue
                msg = rx.recv()
            except (EOFError, OSError):  # the training process is gone: every step it handed is written
                break
            if msg[0] == "close":
                status, compact = msg[1], True
                break
            _, slot, step, lr, snapshot, probe = msg
            if not writer.failed:
                try:
                    _append(writer, ring.arrays(slot), step, lr, snapshot, probe)
                except BaseException as e:  # noqa: BLE001 - a full disk: said once, later steps skipped
                    writer.failed = True
                    send("error", _message(e))
            send("free", slot)
        try:
            writer.close("failed" if writer.failed else status, compact=compact)
        except BaseException as e:  # noqa: BLE001
            send("error", _message(e))
        send("closed", {"close_compaction_s": getattr(writer, "close_compaction_s", None),
                        "last_step": writer.last_step})
    if encoder is not None:
        encoder.shutdown(wait=True, cancel_futures=True)
    if ring is not None:
        ring.close()
    os.close(lock_fd)
