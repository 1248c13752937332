"""``RecordingWriter``: appends recorded steps to ``RUN_DIR/recording`` crash-safely, in today's layout
(docs/recording.md; the only one written: older recordings are read, and upgraded by ``compact``).

A step is complete once all of its records are appended; the reader ignores a torn tail. Full raw
chunks become checksummed blocks in the writer's own process, never in the training process (the
recorder runs this writer in a writer process, ``duckling.recording.process``): as they fill, encoded
on worker processes when ``encoder`` is given (else right there), or all at ``close`` (``defer=True``).
"""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import time
from pathlib import Path

import numpy as np

from duckling.config import N_LIVE, RecordConfig
from duckling.errors import DucklingError
from duckling.files import folder_lock, write_json
from duckling.recording.layout import (BLOCK_STEPS, LAYOUT_KEYS, SHAPE, SUBDIR, check_meta, f32_to_bf16_bits, make_streams,
                                       new_meta, older_layout, read_meta, snapshot_parts)
from duckling.recording.repair import finish_compaction
from duckling.recording.streams import CorruptBlock, Stream, pack_trailer

RESUME_KEYS = ("matrices", "shape", "dtype", "every", "n_live")  # must match to append to a recording
_OPEN: set[Path] = set()  # recordings this process is writing (the run folder's lock is re-entrant here)


def _advice(e: BaseException) -> str:
    """The fix for a failed write or compaction, by its cause (never "free disk space" for a checksum)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space (or record with a larger stride) and resume from the last checkpoint with --resume."
    if isinstance(e, CorruptBlock):
        return ("A raw record failed its checksum (corrupted on disk or in memory): restore the file from a copy of "
                "the run, or resume from a checkpoint before those steps with --resume.")
    return "Fix that cause (a read-only or failing disk), then resume from the last checkpoint with --resume."


class RecordingWriter:
    """Append-only writer of ``RUN_DIR/recording``. Not thread-safe: one writer thread at a time.

    ``resume_step=None`` starts a new recording (refuses to overwrite one); ``resume_step=k`` opens
    an existing recording, drops every record after step k (and any torn tail), and appends from k+1.
    Every ``block_steps`` records of a stream are compacted into a checksummed block by
    ``_compact_full``: as blocks fill, or (``defer=True``) at ``close``, which also compacts the last
    partial blocks. ``encoder``: a ``concurrent.futures`` executor of worker processes that encode
    blocks (``encode_chunk``) while this writer goes on appending; the blocks are committed (renamed,
    listed in the manifest) here, in order, by this one process. Without it a block is made where
    its chunk fills. The writer holds the run folder's lock (``duckling.files.folder_lock``) from
    opening to ``close``; ``locked=True``: the caller holds it already (the writer process holds a
    duplicate of its parent's lock descriptor, ``duckling.recording.process``).
    """

    def __init__(self, run_dir, shape=SHAPE, n_live: int = N_LIVE, dtype: str = RecordConfig.dtype,
                 every: int = RecordConfig.every, matrices=("wte",), extra_meta=None,
                 resume_step: int | None = None, block_steps: int = BLOCK_STEPS, defer: bool = False,
                 encoder=None, locked: bool = False):
        run_dir = Path(run_dir)
        root = run_dir / SUBDIR
        snapshot_parts(dtype, shape[0], n_live)  # validates dtype
        if every < 1 or block_steps < 1:
            raise DucklingError(f"recording stride ({every}) and block_steps ({block_steps}) must be >= 1.")
        meta = new_meta(matrices, shape, n_live, dtype, every, block_steps, extra_meta)
        self._fds: dict[str, int] = {}
        self.encoder = encoder
        self._pending: collections.deque = collections.deque()  # (stream, chunk, records, future), in order
        self._lock = contextlib.ExitStack()
        self.failed = False  # a write failed: the recording ends at last_step
        self.defer = defer
        try:
            if resume_step is None and (root / "meta.json").exists():
                raise DucklingError(
                    f"{root} already holds a recording. Resume the run (--resume) or choose a new "
                    f"run folder; a recording is never overwritten.")
            run_dir.mkdir(parents=True, exist_ok=True)
            if not locked:
                self._lock.enter_context(folder_lock(run_dir))
            if root.resolve() in _OPEN:
                raise DucklingError(f"{root} is already open for writing in this process; close that "
                                    f"RecordingWriter first (a recording has one writer).")
            _OPEN.add(root.resolve())
            self._lock.callback(_OPEN.discard, root.resolve())
            if resume_step is None:
                root.mkdir(exist_ok=True)
                write_json(root / "meta.json", meta)
                self.meta = meta
                self._streams(root)
            else:
                self._open_existing(root, meta, resume_step)
            self.last_step = self.counts["scalars"] - 1
            self.root = root
            self._handed = {st.name: 0 for st in self._all_streams()}
            if not defer:
                self._compact_full(self._all_streams())  # full raw chunks a kill left behind
        except PermissionError as e:
            self._lock.close()
            raise DucklingError(f"cannot write the recording in {root} ({e.strerror}). Choose a run "
                                f"folder on a writable disk.") from e
        except BaseException:
            self._lock.close()
            raise

    # open / truncate -------------------------------------------------------------------------
    def _streams(self, root: Path) -> None:
        self.snaps, self.scalars, self.probe = make_streams(root, self.meta)
        self.counts = {s.name: 0 for s in self._all_streams()}

    def _all_streams(self):
        return [*self.snaps.values(), self.scalars, self.probe]

    def _open_existing(self, root: Path, meta: dict, k: int) -> None:
        if not (root / "meta.json").exists():
            raise DucklingError(f"cannot resume: {root} holds no recording. Start a new run instead.")
        old = read_meta(root)
        if older_layout(old):
            raise DucklingError(
                f"cannot resume the recording in {root}: it is {older_layout(old)}, written by an earlier "
                f"duckling, and this one appends to today's layout only. Upgrade it in place with `duckling "
                f"compact {root.parent}` (lossless, verified), then resume.")
        check_meta(root, old)
        for key in RESUME_KEYS:
            if old[key] != meta[key]:
                raise DucklingError(
                    f"cannot resume the recording in {root}: its {key} is {old[key]!r} but this run "
                    f"asks for {meta[key]!r}. Resume with the run's original recording settings.")
        finish_compaction(root, upto=k)  # what a kill or a full disk left (repair.py: B's; one call)
        self.meta = old
        self._streams(root)
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
        # the files' own block layout wins (fixed when the recording was created); run facts refreshed
        self.meta = {**old, **{key: v for key, v in meta.items() if key not in LAYOUT_KEYS}}
        write_json(root / "meta.json", self.meta)

    # appending --------------------------------------------------------------------------------
    def _write(self, name: str, arr: np.ndarray) -> None:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.root / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
                f"in {self.root}. {_advice(e)}") from e

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

    def append_step(self, step: int, rows: dict, hidden_mean=None, lr: float = float("nan"),
                    snapshot: dict | None = None) -> None:
        """Append step ``step``: per-row scalars ``rows[m]`` (4, V) float32 for every matrix, the
        mean hidden state (d,), the lr, and optionally the snapshot ``{m: W}``. W is a float32
        (V, d) array (encoded here) or a dict ``{ext: array}`` already split per ``snapshot_parts``."""
        if step != self.last_step + 1:
            raise DucklingError(f"recording step {step} after step {self.last_step} would leave a gap "
                                f"or a duplicate; steps must be appended in order.")
        mats, d = self.meta["matrices"], self.meta["shape"][1]
        if snapshot is not None:  # snapshot first: the scalars record, written last, commits the step
            for m, ext, arr in self._snapshot_parts(snapshot):
                self._record(self.snaps[(m, ext)], step, arr)
        hm = np.full(d, np.nan, np.float32) if hidden_mean is None else hidden_mean
        self._record(self.scalars, step, np.concatenate(
            [np.asarray(rows[m], np.float32).reshape(-1) for m in mats]
            + [np.asarray(hm, np.float32).reshape(d), np.array([lr], np.float32)]))
        self.last_step = step
        if not self.defer:
            self._compact_full(self._all_streams())

    @property
    def parts(self) -> list[tuple[str, slice, type]]:
        """How a snapshot is split into streams: [(ext, row slice, stored dtype)] (layout.snapshot_parts)."""
        return snapshot_parts(self.meta["dtype"], self.meta["shape"][0], self.meta["n_live"])

    def _snapshot_parts(self, snapshot: dict):
        """(matrix, ext, array) per the dtype's parts: W as float32 (V, d) is split and bf16 parts are
        rounded to raw bits here; a dict ``{ext: array}`` is already split (the recorder's)."""
        for m in self.meta["matrices"]:
            parts = snapshot[m]
            for ext, sl, dt in self.parts:
                arr = parts[ext] if isinstance(parts, dict) else parts[sl]
                if ext == "u16" and arr.dtype != np.uint16:
                    arr = f32_to_bf16_bits(arr)
                yield m, ext, arr.astype(dt, copy=False)

    def append_probe(self, step: int, dead_mass: float, max_dead_prob: float) -> None:
        self._record(self.probe, step, np.array([dead_mass, max_dead_prob], np.float32))
        if not self.defer:
            self._compact_full([self.probe])

    # compaction -------------------------------------------------------------------------------
    def _compact_full(self, streams, tails: bool = False) -> None:
        """Compact every full chunk not handed over yet (its records are committed already), and with
        ``tails`` the last partial chunk too (at close). On resume this also picks up full raw chunks
        that a kill left uncompacted. The one place blocks are made."""
        for st in streams:
            n = self.counts[st.name]
            full = n // st.block + (tails and n % st.block > 0)
            while self._handed[st.name] < full:
                c = self._handed[st.name]
                self._handed[st.name] += 1
                if not st.raw_path(c).exists():  # compacted already
                    continue
                fd = self._fds.pop(st.raw_path(c).name, None)  # no more appends to this chunk
                if fd is not None:
                    os.close(fd)
                k = min(st.block, n - c * st.block)
                if self.encoder is None:
                    self._compact(st, c, k)
                else:
                    spec = (str(st.root), st.name, st.width, st.dtype.str, st.widths, st.block, st.segment)
                    self._pending.append((st, c, k, self.encoder.submit(encode_chunk, spec, c, k)))
        self.commit_encoded(wait=False)

    def commit_encoded(self, wait: bool = True) -> None:
        """Commit the blocks the workers have encoded, in order; ``wait``: all of them (else only
        those done, and the oldest ones while more than two per worker are in flight)."""
        bound = 2 * max(1, getattr(self.encoder, "_max_workers", 1))
        while self._pending and (wait or len(self._pending) > bound or self._pending[0][3].done()):
            st, c, k, fut = self._pending.popleft()
            try:
                encoded = fut.result()
            except (OSError, CorruptBlock) as e:
                self._failed_compaction(st, c, e)
            self._compact(st, c, k, encoded)

    def _compact(self, st, c: int, n: int, encoded=None) -> None:
        try:
            st.compact(c, n, encoded)
        except (OSError, CorruptBlock) as e:
            self._failed_compaction(st, c, e)

    def _failed_compaction(self, st, c: int, e: BaseException):
        self.failed = True
        for *_, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        raise DucklingError(
            f"compacting {st.raw_path(c)} failed ({getattr(e, 'strerror', None) or e}); steps "
            f"0..{self.last_step} are kept and readable in {self.root} (the raw records stay "
            f"until their block is written and verified). {_advice(e)}") from e

    def close(self, status: str = "complete", compact: bool = True) -> None:
        """Compact what is left (unless the recording failed, or ``compact=False``: the raw chunks
        are valid recorded data, and a resume continues them), close the files, record the final
        status in meta.json (counts stay in the files) and release the run folder's lock."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        err = None
        try:
            ok = compact and not self.failed and status != "failed"
            t0 = time.perf_counter()
            if ok:
                self._compact_full(self._all_streams())  # the full chunks held back (defer)
            self.commit_encoded(wait=ok)
            self.close_compaction_s = time.perf_counter() - t0  # (benchmarks/recording_size.py)
            if ok:
                self._compact_full(self._all_streams(), tails=True)  # every byte verifiable
                self.commit_encoded()
        except DucklingError as e:  # the steps are all on disk (raw, checksummed); say why they are not compacted
            err = e
        finally:
            for *_, fut in self._pending:
                fut.cancel()
            self._pending.clear()
            meta = dict(self.meta, status=status, last_step=self.last_step)
            if getattr(self, "close_compaction_s", None) is not None:
                meta["close_compaction_s"] = round(self.close_compaction_s, 3)
            try:
                write_json(self.root / "meta.json", meta)
            except OSError:  # a full or read-only disk: the data files are what counts
                pass
            self._lock.close()
        if err is not None:
            raise err


def encode_chunk(spec: tuple, c: int, n: int) -> tuple[bytes, np.ndarray]:
    """(block bytes, steps) of raw chunk c (n records) of the stream ``spec`` (root, name, width,
    dtype, widths, block, segment), read back, every record checked, encoded and verified: the pure
    part of a compaction, run on a worker process of the writer process."""
    root, name, width, dtype, widths, block, segment = spec
    st = Stream(Path(root), name, width, np.dtype(dtype), widths, block, segment)
    records, steps = st.raw_records(c, n)
    return st.encode(c, records, steps), steps
