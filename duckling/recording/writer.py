"""``RecordingWriter``: appends recorded steps to ``RUN_DIR/recording`` crash-safely.

The format is ``docs/recording.md``; its layout helpers and the reader live in ``recording.py``.
A step is complete once all of its files are appended; the reader ignores a torn tail.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from duckling.config import N_LIVE, RecordConfig
from duckling.errors import DucklingError
from duckling.recording.layout import BLOCK_STEPS, FORMAT_V2, layout_keys, make_streams
from duckling.recording.reader import (FIELDS, SHAPE, SUBDIR, V1_CHUNK_STEPS, _atomic_json, _count, _Layout,
                        f32_to_bf16_bits, snapshot_parts)
from duckling.recording.streams import CorruptBlock, pack_trailer


class _Compactor:
    """One background thread that turns full raw chunks into blocks, in order, one at a time.

    A job is committed data already (its raw chunk is complete and checksummed on disk); the raw chunk
    is deleted only after its block is written, fsynced, renamed and read back (``Stream.compact``), so
    a kill at any moment loses nothing. At most one job waits behind the running one: a writer that
    outpaces compaction blocks in ``submit`` (memory and scratch disk stay bounded). The first failure
    is kept in ``error`` (later jobs are skipped) and raised by the writer on its next call."""

    def __init__(self):
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="duckling-compact", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if sys.platform == "linux":  # this thread only: training threads get the CPU first, compaction
            try:                     # runs in their gaps (on CPU, torch's threads fill both cores)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - surfaced in the writer's thread
                self.error = e
            finally:
                self._q.task_done()

    def submit(self, job) -> None:
        self._q.put(job)

    def wait(self) -> None:
        """Return once every submitted job has finished (or failed)."""
        self._q.join()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


class RecordingWriter:
    """Append-only writer of ``RUN_DIR/recording``. Not thread-safe: one writer thread at a time.

    ``resume_step=None`` starts a new recording (refuses to overwrite one); ``resume_step=k`` opens
    an existing recording, drops every record after step k (and any torn tail), and appends from k+1.
    ``format_version=2`` (default) compacts every ``block_steps`` records into a checksummed block,
    on a background thread of its own (``background=True``, so the caller - the training thread on
    CPU - does not wait for the codec) or inline in ``append_step`` (``background=False``), and the
    last partial block in ``close`` (which first waits for pending compaction). ``defer=True`` holds
    every block back until ``close`` (the recorder does this on CPU and MPS, where a codec thread
    competes with training for the same cores; on CUDA the codec runs beside the GPU). ``format_version=1``
    writes the old uncompressed layout in files of ``chunk_steps`` snapshots (kept for tests and for
    converting with ``compact``).
    """

    def __init__(self, run_dir, shape=SHAPE, n_live: int = N_LIVE, precision: str = RecordConfig.dtype,
                 every: int = RecordConfig.every, chunk_steps: int = V1_CHUNK_STEPS,
                 matrices=("wte",), extra_meta=None,
                 resume_step: int | None = None, format_version: int = FORMAT_V2,
                 block_steps: int = BLOCK_STEPS, background: bool = True, defer: bool = False):
        root = Path(run_dir) / SUBDIR
        if format_version not in (1, FORMAT_V2):
            raise DucklingError(f"unknown recording format_version {format_version}: use 1 or 2.")
        self.v2 = format_version == FORMAT_V2
        meta = {"format_version": format_version, "matrices": list(matrices), "shape": list(shape),
                "precision": precision, "every": int(every),
                "n_live": int(n_live), "n_dead": int(shape[0] - n_live), "fields": list(FIELDS),
                "probe_columns": ["step", "dead_mass", "max_dead_prob"], **(extra_meta or {})}
        if self.v2:
            meta.update(layout_keys(block_steps))
        else:
            meta["chunk_steps"] = int(chunk_steps)
        self._compactor = None
        snapshot_parts(precision, shape[0], n_live)  # validates precision
        if every < 1 or chunk_steps < 1 or block_steps < 1:
            raise DucklingError(f"recording stride ({every}), chunk_steps ({chunk_steps}) and "
                                f"block_steps ({block_steps}) must be >= 1.")
        self._fds: dict[str, int] = {}
        self._lock_fd = None
        try:
            if resume_step is None:
                if (root / "meta.json").exists():
                    raise DucklingError(
                        f"{root} already holds a recording. Resume the run (--resume) or choose a new "
                        f"run folder; a recording is never overwritten.")
                root.mkdir(parents=True, exist_ok=True)
                self._lock(root)
                meta["status"] = "recording"
                _atomic_json(root / "meta.json", meta)
                self.layout, self.n_scalar, self.n_snap = _Layout(root, meta), 0, 0
                if self.v2:
                    self._streams(root, meta)
            else:
                if (root / "meta.json").exists():
                    self._lock(root)
                if self.v2:
                    self._open_existing_v2(root, meta, resume_step)
                else:
                    self._open_existing(root, meta, resume_step)
            self.failed = False  # a write failed: the recording ends at last_step
            self.last_step = self.n_scalar - 1 if self.v2 else self._last_scalar_step()
            self.defer = self.v2 and defer  # compact everything in close() instead of as blocks fill
            if self.v2:
                self._handed = {st.name: 0 for st in self._all_streams()}
                if background and not self.defer:  # started after any truncation: nothing can be pending then
                    self._compactor = _Compactor()
                self._compact_full(self._all_streams())  # full raw chunks a kill left behind
        except PermissionError as e:
            self._unlock()
            raise DucklingError(f"cannot write the recording in {root} ({e.strerror}). Choose a run "
                                f"folder on a writable disk.") from e
        except BaseException:
            self._unlock()
            raise

    # open / truncate -------------------------------------------------------------------------
    def _lock(self, root: Path) -> None:
        """Hold an exclusive lock on recording/writer.lock while writing (``compact`` and a second
        writer refuse a locked recording; a killed writer's lock goes with its process)."""
        fd = os.open(root / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd
        except BlockingIOError:
            os.close(fd)
            raise DucklingError(f"{root} is being written by another process; wait for that run to "
                                f"end (or stop it) before writing this recording.") from None

    def _streams(self, root: Path, meta: dict) -> None:
        self.snaps, self.scalars, self.probe = make_streams(root, meta, self.layout.parts)
        self.counts = {s.name: 0 for s in self._all_streams()}

    def _all_streams(self):
        return [*self.snaps.values(), self.scalars, self.probe]

    def _open_existing_v2(self, root: Path, meta: dict, k: int) -> None:
        if not (root / "meta.json").exists():
            raise DucklingError(f"cannot resume: {root} holds no recording. Start a new run instead.")
        old = json.loads((root / "meta.json").read_text())
        for key in ("format_version", "matrices", "shape", "precision", "every", "n_live"):
            if old.get(key) != meta[key]:
                raise DucklingError(
                    f"cannot resume the recording in {root}: its {key} is {old.get(key)!r} but this run "
                    f"asks for {meta[key]!r}. Resume with the run's original recording settings.")
        self.layout = _Layout(root, old)
        self._streams(root, old)
        for st in self._all_streams():
            st.tidy()
        _, sc = self.scalars.scan()
        if len(sc) == 0 or sc[-1] < k:
            last = int(sc[-1]) if len(sc) else None
            raise DucklingError(
                f"cannot resume at step {k}: the recording in {root} ends at step {last}, so steps "
                f"after it would be missing. Resume from a checkpoint at or before step {last}, or "
                f"start a new run.")
        for st in self._all_streams():
            _, steps = st.scan()
            keep = int(np.searchsorted(steps, k, side="right"))
            st.truncate(keep)
            self.counts[st.name] = keep
        self.n_scalar = self.counts["scalars"]
        # the files' own layout wins (a block length is fixed when the recording is created)
        for key in layout_keys(old["block_steps"]):  # old's own (absent in older files: stays absent)
            meta.pop(key, None)
        old.update(meta, status="recording")
        _atomic_json(root / "meta.json", old)

    def _open_existing(self, root: Path, meta: dict, k: int) -> None:
        if not (root / "meta.json").exists():
            raise DucklingError(f"cannot resume: {root} holds no recording. Start a new run instead.")
        old = json.loads((root / "meta.json").read_text())
        for key in ("format_version", "matrices", "shape", "precision", "every", "chunk_steps", "n_live"):
            if old.get(key) != meta[key]:
                raise DucklingError(
                    f"cannot resume the recording in {root}: its {key} is {old.get(key)!r} but this run "
                    f"asks for {meta[key]!r}. Resume with the run's original recording settings.")
        lay = _Layout(root, old)
        n_scalar, n_snap = lay.counts()
        steps = np.fromfile(root / "scalar_steps.i64", np.int64, count=n_scalar) if n_scalar else []
        if n_scalar == 0 or steps[-1] < k:
            last = int(steps[-1]) if n_scalar else None
            raise DucklingError(
                f"cannot resume at step {k}: the recording in {root} ends at step {last}, so steps "
                f"after it would be missing. Resume from a checkpoint at or before step {last}, or "
                f"start a new run.")
        n_scalar = int(np.searchsorted(steps, k, side="right"))
        snaps = np.fromfile(root / "snap_steps.i64", np.int64, count=n_snap)
        n_snap = int(np.searchsorted(snaps, k, side="right"))
        for p, b in lay.scalar_files():
            os.truncate(p, n_scalar * b)
        os.truncate(root / "snap_steps.i64", n_snap * 8)
        for m in lay.matrices:
            for ext, sl, dt in lay.parts:
                c = n_snap // lay.chunk
                if n_snap % lay.chunk:
                    os.truncate(lay.chunk_path(m, c, ext), (n_snap % lay.chunk) * lay.part_bytes(sl, dt))
                    c += 1
                while (p := lay.chunk_path(m, c, ext)).exists():
                    p.unlink()
                    c += 1
        probe = root / "probe.f32"
        if probe.exists():
            pr = np.fromfile(probe, np.float32)[: _count(probe, 12) * 3].reshape(-1, 3)
            os.truncate(probe, int((pr[:, 0] <= k).sum()) * 12)
        old.update(meta, status="recording")  # structure checked equal above; run facts refreshed
        _atomic_json(root / "meta.json", old)
        self.layout, self.n_scalar, self.n_snap = lay, n_scalar, n_snap

    def _last_scalar_step(self) -> int:
        if self.n_scalar == 0:
            return -1
        return int(np.fromfile(self.layout.root / "scalar_steps.i64", np.int64)[self.n_scalar - 1])

    # appending --------------------------------------------------------------------------------
    def _write(self, name: str, arr: np.ndarray) -> None:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.layout.root / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(np.ascontiguousarray(arr)).cast("B")
        try:
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
        except OSError as e:
            self.failed = True
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DucklingError(
                f"{'the disk is full' if full else 'writing the recording failed'} while recording step "
                f"{self.last_step + 1} ({e.strerror}); steps 0..{self.last_step} are kept and readable "
                f"in {self.layout.root}. Free disk space (or record with a larger stride) and resume "
                f"from the last checkpoint with --resume.") from e

    def append_step(self, step: int, rows: dict, hidden_mean=None, lr: float = float("nan"),
                    snapshot: dict | None = None) -> None:
        """Append step ``step``: per-row scalars ``rows[m]`` (4, V) float32 for every matrix, the
        mean hidden state (d,), the lr, and optionally the snapshot ``{m: W}``. W is a float32
        (V, d) array (encoded here) or a dict ``{ext: array}`` already split per ``snapshot_parts``."""
        lay = self.layout
        self._raise_compaction_error()
        if step != self.last_step + 1:
            raise DucklingError(f"recording step {step} after step {self.last_step} would leave a gap "
                                f"or a duplicate; steps must be appended in order.")
        if self.v2:
            return self._append_v2(step, rows, hidden_mean, lr, snapshot)
        if snapshot is not None:  # snapshot first: scalar_steps.i64, written last, commits the step
            c = self.n_snap // lay.chunk
            for m, ext, arr in self._snapshot_parts(snapshot):
                self._write(lay.chunk_path(m, c, ext).name, arr)
            self._write("snap_steps.i64", np.array([step], np.int64))
            self.n_snap += 1
            if self.n_snap % lay.chunk == 0:  # chunk full: the next snapshot opens a new file
                for name in [n for n in self._fds if n.split(".")[1:2] == [f"{c:05d}"]]:
                    os.close(self._fds.pop(name))
        for m in lay.matrices:
            self._write(f"{m}.rows.f32", np.asarray(rows[m], np.float32).reshape(len(FIELDS), lay.n_rows))
        hm = np.full(lay.d, np.nan, np.float32) if hidden_mean is None else hidden_mean
        self._write("hidden_mean.f32", np.asarray(hm, np.float32).reshape(lay.d))
        self._write("lr.f32", np.array([lr], np.float32))
        self._write("scalar_steps.i64", np.array([step], np.int64))
        self.n_scalar += 1
        self.last_step = step

    def _snapshot_parts(self, snapshot: dict):
        """(matrix, ext, array) per ``layout.parts``: W as float32 (V, d) is split and bf16 parts are
        rounded to raw bits here; a dict ``{ext: array}`` is already split (the recorder's)."""
        for m in self.layout.matrices:
            parts = snapshot[m]
            for ext, sl, dt in self.layout.parts:
                arr = parts[ext] if isinstance(parts, dict) else parts[sl]
                if ext == "u16" and arr.dtype != np.uint16:
                    arr = f32_to_bf16_bits(arr)
                yield m, ext, arr.astype(dt, copy=False)

    def append_probe(self, step: int, dead_mass: float, max_dead_prob: float) -> None:
        if self.v2:
            self._raise_compaction_error()
            self._record(self.probe, step, np.array([dead_mass, max_dead_prob], np.float32))
            if not self.defer:
                self._compact_full([self.probe])
            return
        self._write("probe.f32", np.array([step, dead_mass, max_dead_prob], np.float32))

    # v2 --------------------------------------------------------------------------------------
    def _record(self, stream, step: int, arr: np.ndarray) -> None:
        """Append one raw record (payload + checksummed trailer) to the stream's open chunk."""
        c = self.counts[stream.name] // stream.block
        payload = memoryview(np.ascontiguousarray(arr)).cast("B")
        if len(payload) != stream.payload:
            raise DucklingError(f"a {stream.name} record of {len(payload)} bytes was appended; the "
                                f"recording's shape needs {stream.payload}.")
        self._write(stream.raw_path(c).name, np.frombuffer(payload, np.uint8))
        self._write(stream.raw_path(c).name, np.frombuffer(pack_trailer(step, payload), np.uint8))
        self.counts[stream.name] += 1

    def _append_v2(self, step, rows, hidden_mean, lr, snapshot) -> None:
        lay = self.layout
        if snapshot is not None:  # snapshot first: the scalars record, written last, commits the step
            for m, ext, arr in self._snapshot_parts(snapshot):
                self._record(self.snaps[(m, ext)], step, arr)
        hm = np.full(lay.d, np.nan, np.float32) if hidden_mean is None else hidden_mean
        self._record(self.scalars, step, np.concatenate(
            [np.asarray(rows[m], np.float32).reshape(-1) for m in lay.matrices]
            + [np.asarray(hm, np.float32).reshape(lay.d), np.array([lr], np.float32)]))
        self.n_scalar += 1
        self.last_step = step
        if not self.defer:
            self._compact_full(self._all_streams())

    def _compact_full(self, streams) -> None:
        """Compact every full chunk not handed over yet (its records are committed already): on the
        background thread, or here when there is none. On resume this also picks up full raw chunks
        that a kill left uncompacted."""
        for st in streams:
            full = self.counts[st.name] // st.block
            while self._handed[st.name] < full:
                c = self._handed[st.name]
                self._handed[st.name] += 1
                if not st.raw_path(c).exists():  # compacted already
                    continue
                fd = self._fds.pop(st.raw_path(c).name, None)  # the chunk is full: no more appends
                if fd is not None:
                    os.close(fd)
                if self._compactor is not None:
                    self._compactor.submit(lambda st=st, c=c: self._compact(st, c, st.block))
                else:
                    self._compact(st, c, st.block)

    def _raise_compaction_error(self) -> None:
        err = self._compactor.error if self._compactor is not None else None
        if err is not None:
            self.failed = True
            raise err

    def wait_compaction(self) -> None:
        """Block until every full chunk handed to the background thread is compacted (or failed)."""
        if self._compactor is not None:
            self._compactor.wait()

    def _compact(self, st, c: int, n: int) -> None:
        fd = self._fds.pop(st.raw_path(c).name, None)
        if fd is not None:
            os.close(fd)
        try:
            st.compact(c, n)
        except (OSError, CorruptBlock) as e:
            self.failed = True
            raise DucklingError(
                f"compacting {st.raw_path(c)} failed ({getattr(e, 'strerror', None) or e}); steps "
                f"0..{self.last_step} are kept and readable in {self.layout.root} (the raw records stay "
                f"until their block is written and verified). Free disk space and resume from the "
                f"last checkpoint with --resume.") from e

    def close(self, status: str = "complete") -> None:
        """Close the files and record the final status in meta.json (counts stay in the files)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        err = None
        if self._compactor is not None:  # finish pending compaction before the tails and the unlock
            self._compactor.wait()
            self._compactor.stop()
            err = None if self.failed else self._compactor.error  # not yet raised to the caller
            self._compactor = None
        try:
            if self.v2 and err is None and not self.failed and status != "failed":
                t0 = time.perf_counter()
                if self.defer:  # the full chunks held back during the run
                    self._compact_full(self._all_streams())
                self.close_compaction_s = time.perf_counter() - t0  # (benchmarks/recording_size.py)
                for st in self._all_streams():  # every byte verifiable: compact the tails
                    n = self.counts[st.name]
                    if n % st.block:
                        self._compact(st, n // st.block, n % st.block)
        finally:
            meta = dict(self.layout.meta, status=status, last_step=self.last_step)
            if getattr(self, "close_compaction_s", None) is not None:
                meta["close_compaction_s"] = round(self.close_compaction_s, 3)
            try:
                _atomic_json(self.layout.root / "meta.json", meta)
            except OSError:  # a full or read-only disk: the data files are what counts
                pass
            self._unlock()
        if err is not None:  # the steps are all on disk (raw, checksummed); say why they are not compacted
            self.failed = True
            raise err

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
