"""The W store: the format's layout and size arithmetic, and ``Recording``, the lazy reader
(``duckling.recording.writer.RecordingWriter`` appends steps crash-safely).

The on-disk format is specified in ``docs/recording.md``. Everything here is numpy only: a
recording can be read without torch. Snapshot N is W after N optimizer updates (0 = init).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np

from duckling.config import N_LIVE, VOCAB_SIZE, ModelConfig
from duckling.errors import DucklingError
from duckling.recording.layout import put_values

FORMAT_VERSION = 2  # written by default; format 1 (uncompressed) stays readable
READABLE = (1, 2)
FIELDS = ("norm", "update_norm", "grad_norm", "adam_v")  # per-row scalars, in file order
SUBDIR = "recording"
SHAPE = (VOCAB_SIZE, ModelConfig.n_embd)  # W: (V, d)


# --- bf16 as raw uint16 bits -------------------------------------------------------------------
def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest even, like torch) and return the raw uint16 bits."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a NaN (the rounding could carry it into inf)
        rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    """Raw bf16 bits (uint16) -> float32, exactly."""
    u = np.asarray(u, dtype=np.uint16)
    out = np.empty(u.shape, np.float32)
    put_values(out, u, "u16")
    return out


# --- sizes and the budget ----------------------------------------------------------------------
def snapshot_parts(precision: str, n_rows: int, n_live: int) -> list[tuple[str, slice, type]]:
    """How one snapshot of a (n_rows, d) matrix is split into files: [(ext, row slice, dtype)]."""
    if precision == "bf16":
        return [("u16", slice(0, n_rows), np.uint16)]
    if precision == "float32":
        return [("f32", slice(0, n_rows), np.float32)]
    if precision == "mixed":  # live rows bf16, dead rows float32
        return [("u16", slice(0, n_live), np.uint16), ("f32", slice(n_live, n_rows), np.float32)]
    raise DucklingError(f"unknown recording precision {precision!r}: use 'bf16', 'float32' or 'mixed'.")


def n_snapshot_steps(start: int, end: int, every: int) -> int:
    """How many snapshot steps lie in (start, end]: multiples of ``every``, plus the last step ``end``
    (arithmetic, constant memory whatever the number of steps)."""
    if end <= start:
        return 0
    return end // every - start // every + (end % every != 0)


V1_CHUNK_STEPS = 256  # format 1: snapshots per file
RAW_TRAILER = 16  # format 2: bytes after each raw record (step, crc32, magic)
BLOCK_SLACK = 1.01  # the scratch of one compaction: its block, bounded with room to spare
FRAME_BYTES = 32  # at most per zstd frame besides its data: magic, header, checksum, one block header
GROUP_BYTES = 4 * FRAME_BYTES + 64  # per column group of a block: its frames (anchor, 2 ranges) + JSON


def _block_overhead(n_blocks: int, n_groups: int, payload_bytes: int, block_steps: int) -> int:
    """Upper bound of what n_blocks blocks add to their records' bytes: incompressible data is stored
    raw by zstd (+3 bytes per 128 KB), each frame adds at most FRAME_BYTES, each block its header."""
    return n_blocks * (n_groups * GROUP_BYTES + block_steps * 24 + 512) + 3 * (payload_bytes // 131072 + n_blocks)


def recording_bytes(record_cfg, n_steps: int, shape=SHAPE, n_live: int = N_LIVE,
                    n_matrices: int = 1, start_step: int = 0, every: int | None = None,
                    block_steps: int = 64, scratch: bool = True) -> int:
    """Bytes a recording of steps ``start_step..n_steps`` can add to disk (step 0 included if start
    is 0), constant memory. An upper bound for format 2: every record counted raw (compression's
    ratio is unknown before the run) plus the most a block can add to its records (frame and header
    bytes, as if every row were its own column group and nothing compressed), plus the scratch of the
    largest compaction (a block is written next to its raw chunk before the chunk is deleted; one at a
    time) at ``BLOCK_SLACK`` x its raw size (``scratch=False``: the bound of the finished recording)."""
    n_rows, d = shape
    every = every or record_cfg.every
    n_snap = n_snapshot_steps(start_step, n_steps, every) + (start_step == 0)
    n_scalar = n_steps - start_step + (start_step == 0)
    per_snap = sum((sl.stop - sl.start) * d * np.dtype(dt).itemsize
                   for _, sl, dt in snapshot_parts(record_cfg.dtype, n_rows, n_live)) + RAW_TRAILER
    per_scalar = n_matrices * len(FIELDS) * n_rows * 4 + d * 4 + 4 + RAW_TRAILER  # rows + hidden + lr
    n_probe = (n_scalar // record_cfg.probe_every + 1) if record_cfg.probe_every else 0
    scratch = 0 if not scratch else BLOCK_SLACK * max(min(block_steps, n_snap) * n_matrices * per_snap,  # one compaction at a time
                                min(block_steps, n_scalar) * per_scalar) + 65536
    blocks = lambda n: -(-n // block_steps)  # noqa: E731
    framing = (_block_overhead(blocks(n_snap) * n_matrices, n_rows, n_snap * n_matrices * per_snap, block_steps)
               + _block_overhead(blocks(n_scalar), 4 * n_matrices + 1, n_scalar * per_scalar, block_steps)
               + _block_overhead(blocks(n_probe), 1, n_probe * 8, block_steps))
    return int(n_snap * n_matrices * per_snap + n_scalar * per_scalar + n_probe * (8 + RAW_TRAILER) + framing + scratch)


def _free_bytes(path: Path) -> int:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_budget(run_dir, record_cfg, n_steps: int, shape=SHAPE, n_live: int = N_LIVE,
                 n_matrices: int = 1, start_step: int = 0, extra_bytes: int = 0) -> int:
    """Refuse (DucklingError) a recording that exceeds ``record_cfg.budget_gb`` or the free disk.

    ``extra_bytes``: what else the run writes (checkpoints, the final model), counted against both.
    Returns the bytes needed. The error names the bytes and the smallest stride that fits.
    Constant memory, O(log n_steps) time.
    """
    args = dict(shape=shape, n_live=n_live, n_matrices=n_matrices, start_step=start_step)
    need = recording_bytes(record_cfg, n_steps, **args) + extra_bytes  # + checkpoints and final model
    budget = int(record_cfg.budget_gb * 1e9)
    free = _free_bytes(run_dir)
    limit = min(budget, free)
    if need <= limit:
        return need
    what = f"the budget of {record_cfg.budget_gb:g} GB (RecordConfig.budget_gb / --budget-gb)" \
        if budget <= free else f"the free disk space at {run_dir} ({free / 1e9:.2f} GB)"
    fits = lambda k: recording_bytes(record_cfg, n_steps, every=k, **args) + extra_bytes <= limit  # noqa: E731
    lo, hi = record_cfg.every, max(n_steps, 1)  # smallest stride that fits (bytes fall as k grows)
    stride = None
    if fits(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        stride = lo
    hint = (f"record every {stride}th step (--record-every {stride}, RecordConfig.every) or train "
            f"fewer steps" if stride else "train fewer steps (the per-step scalars alone do not fit)")
    raise DucklingError(
        f"recording {n_steps - start_step} steps at {record_cfg.dtype} precision every "
        f"{record_cfg.every} step(s) needs {need / 1e9:.2f} GB ({need} bytes), more than {what}. "
        f"To fit, {hint}, use a smaller precision, or raise the budget / free disk space.")


# --- writer ------------------------------------------------------------------------------------
def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _rec_dir(run_dir) -> Path:
    p = Path(run_dir)
    return p if (p / "meta.json").exists() and p.name == SUBDIR else p / SUBDIR


def _count(path: Path, record_bytes: int) -> int:
    return path.stat().st_size // record_bytes if path.exists() else 0


class _Layout:
    """File names and record sizes shared by writer and reader (derived from meta.json)."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta = root, meta
        self.n_rows, self.d = meta["shape"]
        self.matrices = list(meta["matrices"])
        self.chunk = int(meta.get("chunk_steps") or V1_CHUNK_STEPS)  # format 1 only
        self.parts = snapshot_parts(meta["precision"], self.n_rows, int(meta["n_live"]))

    def chunk_path(self, m: str, c: int, ext: str) -> Path:
        return self.root / f"{m}.{c:05d}.{ext}"

    def part_bytes(self, sl: slice, dt) -> int:
        return (sl.stop - sl.start) * self.d * np.dtype(dt).itemsize

    def scalar_files(self) -> list[tuple[Path, int]]:
        """(path, record bytes) of every per-step file; scalar_steps.i64 is appended last."""
        files = [(self.root / f"{m}.rows.f32", len(FIELDS) * self.n_rows * 4) for m in self.matrices]
        return files + [(self.root / "hidden_mean.f32", self.d * 4), (self.root / "lr.f32", 4),
                        (self.root / "scalar_steps.i64", 8)]

    def counts(self) -> tuple[int, int]:
        """(complete scalar steps, complete snapshots): a torn final record is ignored."""
        n_scalar = min(_count(p, b) for p, b in self.scalar_files())
        n_snap = _count(self.root / "snap_steps.i64", 8)
        for m in self.matrices:
            for ext, sl, dt in self.parts:
                rb, c, total = self.part_bytes(sl, dt), 0, 0
                while (p := self.chunk_path(m, c, ext)).exists():
                    total += min(_count(p, rb), self.chunk)
                    c += 1
                n_snap = min(n_snap, total)
        if n_scalar and n_snap:  # a snapshot counts only once its step's scalars are complete
            last = np.fromfile(self.root / "scalar_steps.i64", np.int64, count=n_scalar)[-1]
            snaps = np.fromfile(self.root / "snap_steps.i64", np.int64, count=n_snap)
            n_snap = int(np.searchsorted(snaps, last, side="right"))
        return n_scalar, (n_snap if n_scalar else 0)


# --- reader ------------------------------------------------------------------------------------
class Recording:
    """Lazy reader of ``RUN_DIR/recording``: nothing large is loaded until asked for.

    ``steps``: recorded snapshot steps; ``snapshot(N)``: W after N updates (V, d) float32;
    ``trajectory(ids, steps)``: (n_steps, n_ids, d) float32; ``rows(field)``: exact per-step
    float32 scalars (n_scalar_steps, V) for field in norm/update_norm/grad_norm/adam_v.
    """

    def __init__(self, run_dir):
        self.root = _rec_dir(run_dir)
        self.run_dir = self.root.parent
        if not (self.root / "meta.json").exists():
            raise DucklingError(f"no recording at {self.root} (meta.json missing). Pass a run folder "
                                f"that was trained with recording enabled.")
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except ValueError as e:
            raise DucklingError(f"{self.root}/meta.json is not valid JSON ({e}); restore it from a copy.") from None
        if not isinstance(self.meta, dict) or self.meta.get("format_version") not in READABLE:
            version = self.meta.get("format_version") if isinstance(self.meta, dict) else None
            raise DucklingError(f"{self.root} has recording format {version}; this duckling reads "
                                f"formats {READABLE}. Use a matching version.")
        from duckling.recording.layout import V2Reader, check_meta
        if self.meta["format_version"] == 1:
            check_meta(self.root, {**self.meta, "block_steps": self.meta.get("chunk_steps")})  # names, shapes
        self._lay = _Layout(self.root, self.meta)
        self._v2 = V2Reader(self.root, self.meta, self._lay.parts) if self.meta["format_version"] == 2 else None
        self.reload()

    def reload(self) -> "Recording":
        """Re-read the file sizes (a recording that is still being written grows)."""
        if self._v2 is not None:
            self.scalar_steps, self.steps = self._v2.reload()
            self._index = {int(s): i for i, s in enumerate(self.steps)}
            return self
        n_scalar, n_snap = self._lay.counts()
        self.scalar_steps = np.fromfile(self.root / "scalar_steps.i64", np.int64, count=n_scalar)
        self.steps = np.fromfile(self.root / "snap_steps.i64", np.int64, count=n_snap) if n_snap \
            else np.zeros(0, np.int64)
        self._index = {int(s): i for i, s in enumerate(self.steps)}
        return self

    # shape facts
    matrices = property(lambda self: self._lay.matrices)
    shape = property(lambda self: (self._lay.n_rows, self._lay.d))
    precision = property(lambda self: self.meta["precision"])
    every = property(lambda self: self.meta["every"])
    n_live = property(lambda self: self.meta["n_live"])
    live_ids = property(lambda self: np.arange(self.meta["n_live"]))
    dead_ids = property(lambda self: np.arange(self.meta["n_live"], self._lay.n_rows))

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        last = int(self.steps[-1]) if len(self) else None
        return (f"Recording({str(self.run_dir)!r}: {len(self)} snapshots up to step {last}, "
                f"{self.precision}, every {self.every}, {self.bytes_on_disk / 1e6:.1f} MB)")

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())

    @property
    def raw_bytes(self) -> int:
        """Bytes the same steps take in format 1 (uncompressed), meta.json included."""
        n_sc, V, d = len(self.scalar_steps), self._lay.n_rows, self._lay.d
        per_snap = sum(self._lay.part_bytes(sl, dt) for _, sl, dt in self._lay.parts)
        per_scalar = len(self.matrices) * len(FIELDS) * V * 4 + d * 4 + 4 + 8
        return (len(self.steps) * (len(self.matrices) * per_snap + 8) + n_sc * per_scalar
                + len(self.probe) * 12 + (self.root / "meta.json").stat().st_size)

    @property
    def compression_ratio(self) -> float:
        """Format-1 bytes of this recording / its bytes on disk (1.0 for a format-1 recording)."""
        return self.raw_bytes / max(self.bytes_on_disk, 1)

    # snapshots
    def _positions(self, steps) -> np.ndarray:
        if steps is None:
            return np.arange(len(self.steps))
        try:
            return np.array([self._index[int(s)] for s in np.atleast_1d(steps)], dtype=np.int64)
        except KeyError as e:
            raise DucklingError(
                f"step {e.args[0]} was not recorded (recorded: {len(self.steps)} snapshots, steps "
                f"{self._span()}, every {self.every}). Pick steps from rec.steps.") from None

    def _span(self) -> str:
        return f"{self.steps[0]}..{self.steps[-1]}" if len(self.steps) else "none"

    def _chunk(self, m: str, c: int, ext: str, sl: slice, dt) -> np.memmap:
        lay = self._lay
        n = min(lay.chunk, len(self.steps) - c * lay.chunk)
        return np.memmap(lay.chunk_path(m, c, ext), dtype=dt, mode="r",
                         shape=(n, sl.stop - sl.start, lay.d))

    def trajectory(self, token_ids, steps=None, matrix: str = "wte") -> np.ndarray:
        """Rows ``token_ids`` at the recorded ``steps`` (default all): (n_steps, n_ids, d) float32.

        Reads only the requested rows, chunk by chunk through np.memmap."""
        if matrix not in self.matrices:
            raise DucklingError(f"matrix {matrix!r} was not recorded; this recording has {self.matrices}.")
        ids = np.atleast_1d(np.asarray(token_ids, dtype=np.int64))
        if ids.size and (ids.min() < 0 or ids.max() >= self._lay.n_rows):
            raise DucklingError(f"token ids must lie in 0..{self._lay.n_rows - 1}.")
        pos = self._positions(steps)
        if self._v2 is not None:
            return self._v2.trajectory(ids, pos, matrix)
        out = np.empty((len(pos), len(ids), self._lay.d), np.float32)
        for c in np.unique(pos // self._lay.chunk):
            sel = np.nonzero(pos // self._lay.chunk == c)[0]
            local = pos[sel] - c * self._lay.chunk
            for ext, sl, dt in self._lay.parts:
                mine = np.nonzero((ids >= sl.start) & (ids < sl.stop))[0]
                if not len(mine):
                    continue
                mm = self._chunk(matrix, int(c), ext, sl, dt)  # (k, rows, d) on disk
                block = mm[local[:, None], (ids[mine] - sl.start)[None, :]]  # reads only these rows
                if len(mine) == len(ids) and sel[-1] - sel[0] + 1 == len(sel):  # a plain slice of out
                    put_values(out[sel[0]:sel[-1] + 1], block, ext)
                else:
                    out[sel[:, None], mine[None, :]] = bf16_bits_to_f32(block) if ext == "u16" else block
        return out

    def preload(self, steps, matrix: str = "wte") -> None:
        """Decode the snapshots at ``steps`` once and keep them in memory (as stored: 2 bytes per value
        in bf16), so that analyses making several passes over the same steps decode each compressed
        block once. Replaces what an earlier call kept; ``preload([])`` frees it. Format 1 reads
        snapshots straight from disk and keeps nothing."""
        if matrix not in self.matrices:
            raise DucklingError(f"matrix {matrix!r} was not recorded; this recording has {self.matrices}.")
        if self._v2 is not None:
            self._v2.preload(self._positions(steps) if len(np.atleast_1d(steps)) else np.zeros(0, np.int64), matrix)

    def snapshot(self, step: int, matrix: str = "wte") -> np.ndarray:
        """W after ``step`` optimizer updates (0 = initialisation): (V, d) float32."""
        if matrix not in self.matrices:
            raise DucklingError(f"matrix {matrix!r} was not recorded; this recording has {self.matrices}.")
        (pos,) = self._positions([step])
        if self._v2 is not None:
            return self._v2.snapshot(int(pos), matrix)
        c, local = divmod(int(pos), self._lay.chunk)
        out = np.empty((self._lay.n_rows, self._lay.d), np.float32)
        for ext, sl, dt in self._lay.parts:  # one contiguous read per part, no fancy indexing
            put_values(out[sl], self._chunk(matrix, c, ext, sl, dt)[local], ext)
        return out

    # per-step scalars (every step, whatever the stride)
    def rows(self, field: str, matrix: str = "wte", steps=None) -> np.ndarray:
        """Exact float32 per-row ``field`` (norm | update_norm | grad_norm | adam_v):
        (n_steps, V), a memmap view; ``steps`` selects scalar steps (default all)."""
        if field not in FIELDS:
            raise DucklingError(f"unknown row field {field!r}; choose one of {FIELDS}.")
        if matrix not in self.matrices:
            raise DucklingError(f"matrix {matrix!r} was not recorded; this recording has {self.matrices}.")
        n = len(self.scalar_steps)
        if n == 0:
            return np.zeros((0, self._lay.n_rows), np.float32)
        if self._v2 is not None:
            view = self._v2.rows(FIELDS.index(field), self.matrices.index(matrix))
            return view if steps is None else view[self._scalar_positions(steps)]
        mm = np.memmap(self.root / f"{matrix}.rows.f32", np.float32, "r", shape=(n, len(FIELDS), self._lay.n_rows))
        view = mm[:, FIELDS.index(field), :]
        return view if steps is None else view[self._scalar_positions(steps)]

    def _scalar_positions(self, steps) -> np.ndarray:
        s = np.atleast_1d(np.asarray(steps, np.int64))
        pos = np.searchsorted(self.scalar_steps, s)
        bad = (pos >= len(self.scalar_steps)) | (self.scalar_steps[np.minimum(pos, len(self.scalar_steps) - 1)] != s)
        if bad.any():
            raise DucklingError(f"step {s[bad][0]} has no scalars; recorded scalar steps are "
                                f"{self.scalar_steps[0]}..{self.scalar_steps[-1]}.")
        return pos

    def _per_step(self, name: str, width: int) -> np.ndarray:
        n = len(self.scalar_steps)
        return np.fromfile(self.root / name, np.float32, count=n * width).reshape(n, width) if n \
            else np.zeros((0, width), np.float32)

    @property
    def hidden_mean(self) -> np.ndarray:
        """(n_scalar_steps, d) mean final hidden state (after ln_f) of the batch behind update N."""
        if self._v2 is not None:
            a = len(self.matrices) * len(FIELDS) * self._lay.n_rows
            return self._v2.per_step(slice(a, a + self._lay.d))
        return self._per_step("hidden_mean.f32", self._lay.d)

    @property
    def lr(self) -> np.ndarray:
        """(n_scalar_steps,) learning rate used by update N (NaN at step 0)."""
        if self._v2 is not None:
            a = len(self.matrices) * len(FIELDS) * self._lay.n_rows + self._lay.d
            return self._v2.per_step(slice(a, a + 1))[:, 0]
        return self._per_step("lr.f32", 1)[:, 0]

    @property
    def probe(self) -> np.ndarray:
        """(n_probes, 3) float32: [step, total dead softmax mass, max dead prob] on the probe batch."""
        if self._v2 is not None:
            return self._v2.probe()
        p = self.root / "probe.f32"
        if not p.exists():
            return np.zeros((0, 3), np.float32)
        pr = np.fromfile(p, np.float32, count=_count(p, 12) * 3).reshape(-1, 3)
        last = self.scalar_steps[-1] if len(self.scalar_steps) else -1
        return pr[pr[:, 0] <= last]

    @functools.cached_property
    def token_text(self) -> list[str] | None:
        """Text of every compact id, from the run's token_mapping.json copy (None if absent).

        Read straight from the JSON (which stores every token's text), so no tiktoken is needed."""
        path = self.run_dir / "token_mapping.json"
        if not path.exists():
            return None
        try:
            return [t["text"] for t in json.loads(path.read_text(encoding="utf-8"))["tokens"]][: self._lay.n_rows]
        except (ValueError, KeyError, TypeError) as e:
            raise DucklingError(f"{path} is not a valid token mapping ({e}); copy the mapping the run "
                                "was trained with into the run folder.") from e
