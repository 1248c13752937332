"""``RecordingWriter``: appends recorded steps to ``RUN_DIR/recording`` crash-safely.

The format is ``docs/recording.md``; its layout helpers and the reader live in ``recording.py``.
A step is complete once all of its files are appended; the reader ignores a torn tail.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np

from .config import N_LIVE, RecordConfig
from .errors import DucklingError
from .recording import (FIELDS, FORMAT_VERSION, SHAPE, SUBDIR, _atomic_json, _count, _Layout,
                        f32_to_bf16_bits, snapshot_parts)


class RecordingWriter:
    """Append-only writer of ``RUN_DIR/recording``. Not thread-safe: one writer thread at a time.

    ``resume_step=None`` starts a new recording (refuses to overwrite one); ``resume_step=k`` opens
    an existing recording, drops every record after step k (and any torn tail), and appends from k+1.
    """

    def __init__(self, run_dir, shape=SHAPE, n_live: int = N_LIVE, precision: str = RecordConfig.dtype,
                 every: int = RecordConfig.every, chunk_steps: int = RecordConfig.chunk_steps,
                 matrices=("wte",), extra_meta=None,
                 resume_step: int | None = None):
        root = Path(run_dir) / SUBDIR
        meta = {"format_version": FORMAT_VERSION, "matrices": list(matrices), "shape": list(shape),
                "precision": precision, "every": int(every), "chunk_steps": int(chunk_steps),
                "n_live": int(n_live), "n_dead": int(shape[0] - n_live), "fields": list(FIELDS),
                "probe_columns": ["step", "dead_mass", "max_dead_prob"], **(extra_meta or {})}
        snapshot_parts(precision, shape[0], n_live)  # validates precision
        if every < 1 or chunk_steps < 1:
            raise DucklingError(f"recording stride ({every}) and chunk_steps ({chunk_steps}) must be >= 1.")
        try:
            if resume_step is None:
                if (root / "meta.json").exists():
                    raise DucklingError(
                        f"{root} already holds a recording. Resume the run (--resume) or choose a new "
                        f"run folder; a recording is never overwritten.")
                root.mkdir(parents=True, exist_ok=True)
                meta["status"] = "recording"
                _atomic_json(root / "meta.json", meta)
                self.layout, self.n_scalar, self.n_snap = _Layout(root, meta), 0, 0
            else:
                self._open_existing(root, meta, resume_step)
            self._fds: dict[str, int] = {}
            self.failed = False  # a write failed: the recording ends at last_step
            self.last_step = self._last_scalar_step()
        except PermissionError as e:
            raise DucklingError(f"cannot write the recording in {root} ({e.strerror}). Choose a run "
                                f"folder on a writable disk.") from e

    # open / truncate -------------------------------------------------------------------------
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
        if step != self.last_step + 1:
            raise DucklingError(f"recording step {step} after step {self.last_step} would leave a gap "
                                f"or a duplicate; steps must be appended in order.")
        if snapshot is not None:  # snapshot first: scalar_steps.i64, written last, commits the step
            c = self.n_snap // lay.chunk
            for m in lay.matrices:
                parts = snapshot[m]
                for ext, sl, dt in lay.parts:
                    arr = parts[ext] if isinstance(parts, dict) else parts[sl]
                    if ext == "u16" and arr.dtype != np.uint16:
                        arr = f32_to_bf16_bits(arr)
                    self._write(lay.chunk_path(m, c, ext).name, arr.astype(dt, copy=False))
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

    def append_probe(self, step: int, dead_mass: float, max_dead_prob: float) -> None:
        self._write("probe.f32", np.array([step, dead_mass, max_dead_prob], np.float32))

    def close(self, status: str = "complete") -> None:
        """Close the files and record the final status in meta.json (counts stay in the files)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        meta = dict(self.layout.meta, status=status, last_step=self.last_step)
        try:
            _atomic_json(self.layout.root / "meta.json", meta)
        except OSError:  # a full or read-only disk: the data files are what counts
            pass
