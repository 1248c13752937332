"""Recording format v2 (docs/recording.md): the streams a meta.json implies, checked before they are
trusted, and the v2 side of the reader (``Recording`` in recording.py delegates here)."""
from __future__ import annotations

import numpy as np

from duckling.errors import DucklingError
from duckling.recording.streams import Stream


def put_values(out: np.ndarray, stored: np.ndarray, ext: str) -> None:
    """out (float32, same shape) = the stored values: bf16 bits (ext "u16") widened exactly into
    float32's high half in one pass, or float32 as is."""
    if ext == "u16":
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = stored


FORMAT_V2 = 2
BLOCK_STEPS = 64  # records per block: 64 gives 95% of 256's ratio and decodes 4x faster
GROUP_ROWS = 16  # rows of W per zstd frame: a trajectory of a few rows decodes only their groups.
# Measured on a real run (docs/recording.md): 16 rows keep 98.6% of 64 rows' ratio and decode a
# 16-row trajectory 3x faster. Stored in meta.json as "group_rows" (absent: 64, the first v2 files).
LEGACY_GROUP_ROWS = 64
DEAD_GROUP_ROWS = 1  # dead rows get a frame each: their trajectories are what the research reads.
# Measured (docs/recording.md): 1-row frames cost the dead rows 10-19% of their ratio, and a 16-row
# dead trajectory decodes 16x fewer bytes. Stored as "dead_group_rows" (absent: group_rows).
KNOWN_MATRICES = ("wte", "lm_head")
PRECISIONS = ("bf16", "float32", "mixed")


def layout_keys(block_steps: int) -> dict:
    """meta.json's block layout for a new recording with blocks of ``block_steps`` records. Its
    "segment_steps" is half a block: the records after the anchor go in frames of that many, so a
    random snapshot decompresses the anchor and one half of its block (absent in the first v2 files:
    one frame per group over the whole block)."""
    return {"block_steps": int(block_steps), "group_rows": GROUP_ROWS, "dead_group_rows": DEAD_GROUP_ROWS,
            "segment_steps": max(1, int(block_steps) // 2)}


def _bad(root, what: str) -> DucklingError:
    return DucklingError(f"{root}/meta.json is not a valid v2 recording description ({what}). It was "
                         f"edited or damaged; restore it from the run's original meta.json.")


def check_meta(root, meta: dict) -> None:
    """Refuse metadata that would make the reader open the wrong files or the wrong shapes."""
    mats = meta.get("matrices")
    if not isinstance(mats, list) or not mats or len(set(mats)) != len(mats) \
            or any(m not in KNOWN_MATRICES for m in mats):
        raise _bad(root, f"matrices {mats!r}: expected distinct names from {KNOWN_MATRICES}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int and x > 0 for x in shape)):
        raise _bad(root, f"shape {shape!r}: expected [V, d] positive integers")
    n_live = meta.get("n_live")
    if type(n_live) is not int or not 0 <= n_live <= shape[0]:
        raise _bad(root, f"n_live {n_live!r}: expected an integer in 0..{shape[0]}")
    if meta.get("precision") not in PRECISIONS:
        raise _bad(root, f"precision {meta.get('precision')!r}: expected one of {PRECISIONS}")
    for key in ("every", "block_steps", "group_rows", "dead_group_rows", "segment_steps"):
        if key in ("group_rows", "dead_group_rows", "segment_steps") and key not in meta:
            continue
        if type(meta.get(key)) is not int or meta[key] < 1:
            raise _bad(root, f"{key} {meta.get(key)!r}: expected a positive integer")


def _row_widths(rows: slice, n_live: int, d: int, group: int, dead_group: int) -> list[int]:
    """Column group sizes of a stream holding rows ``rows`` of W: live rows in groups of ``group``
    rows, dead rows (ids >= n_live) in groups of ``dead_group``."""
    out = []
    for lo, hi, g in ((rows.start, min(rows.stop, n_live), group), (max(rows.start, n_live), rows.stop, dead_group)):
        out += [min(g, hi - r) * d for r in range(lo, hi, g)]
    return out


def make_streams(root, meta: dict, parts) -> tuple[dict, Stream, Stream]:
    """({(matrix, ext): snapshot stream}, scalars stream, probe stream) for a checked meta.json."""
    V, d = meta["shape"]
    B, n_m = meta["block_steps"], len(meta["matrices"])
    G = meta.get("group_rows", LEGACY_GROUP_ROWS)
    widths = {ext: _row_widths(sl, meta["n_live"], d, G, meta.get("dead_group_rows", G)) for ext, sl, _ in parts}
    snaps = {(m, ext): Stream(root, f"{m}.{ext}", (sl.stop - sl.start) * d, dt, widths[ext], B,
                              meta.get("segment_steps"))
             for m in meta["matrices"] for ext, sl, dt in parts}
    scalars = Stream(root, "scalars", n_m * 4 * V + d + 1, np.float32, [V] * (4 * n_m) + [d + 1], B)
    probe = Stream(root, "probe", 2, np.float32, [2], B)
    return snaps, scalars, probe


def _strictly_increasing(steps: np.ndarray) -> bool:
    return bool(len(steps) < 2 or (np.diff(steps) > 0).all())


class V2Reader:
    """Counts and reads of a v2 recording; positions are indices into the streams."""

    def __init__(self, root, meta: dict, parts):
        check_meta(root, meta)
        self.root, self.meta, self.parts = root, meta, parts
        self.V, self.d = meta["shape"]
        self.snaps, self.scalars, self.probe_stream = make_streams(root, meta, parts)
        self.kept: dict = {}  # (matrix, position, ext) -> stored values of a preloaded snapshot

    def reload(self) -> tuple[np.ndarray, np.ndarray]:
        """(scalar steps, snapshot steps) of complete steps; raises on an inconsistent structure."""
        _, sc = self.scalars.scan()
        if not np.array_equal(sc, np.arange(len(sc))):
            raise DucklingError(f"the per-step scalars in {self.root} are not steps 0..N in order "
                                f"(found {sc[:5].tolist()}...): the recording is damaged or edited.")
        last = len(sc) - 1
        snap = None
        for (m, ext), s in self.snaps.items():
            _, st = s.scan()
            if not _strictly_increasing(st):
                raise DucklingError(f"snapshot steps of {m}.{ext} in {self.root} are not strictly "
                                    f"increasing: the recording is damaged or edited.")
            st = st[st <= last]
            if last >= 0 and (len(st) == 0 or st[0] != 0):  # snapshot 0 is written before scalars 0
                raise DucklingError(f"{self.root} has no snapshot 0 of {m}.{ext} although its step 0 is "
                                    f"complete: meta.json (precision, matrices) does not match the files.")
            if snap is not None and not np.array_equal(st[:len(snap)], snap[:len(st)]):
                raise DucklingError(f"the snapshot streams in {self.root} disagree on their steps: "
                                    f"the recording is damaged or edited.")
            snap = st if snap is None or len(st) < len(snap) else snap
        _, pr = self.probe_stream.scan()
        if not _strictly_increasing(pr):
            raise DucklingError(f"probe steps in {self.root} are not increasing: the recording is damaged.")
        self.probe_steps = pr[pr <= last]
        self.scalar_steps, self.steps = sc, (snap if snap is not None else np.zeros(0, np.int64))
        return self.scalar_steps, self.steps

    # snapshots
    def preload(self, pos: np.ndarray, m: str) -> None:
        """Decode the snapshots at ``pos`` once, block by block, and keep their stored values (bf16
        bits: 2 bytes per value), replacing what was kept before; ``snapshot`` then only converts."""
        self.kept = {}
        for ext, _, _ in self.parts:
            raw = self.snaps[(m, ext)].read(pos, slice(None), self.steps)  # (len(pos), cols)
            self.kept.update({(m, int(p), ext): raw[i] for i, p in enumerate(pos)})

    def snapshot(self, pos: int, m: str) -> np.ndarray:
        out = np.empty((self.V, self.d), np.float32)
        for ext, sl, _ in self.parts:
            raw = self.kept.get((m, pos, ext))
            if raw is None:
                raw = self.snaps[(m, ext)].read([pos], slice(None), self.steps)[0]
            put_values(out[sl], raw.reshape(-1, self.d), ext)
        return out

    def trajectory(self, ids: np.ndarray, pos: np.ndarray, m: str) -> np.ndarray:
        out = np.empty((len(pos), len(ids), self.d), np.float32)
        for ext, sl, _ in self.parts:
            mine = np.nonzero((ids >= sl.start) & (ids < sl.stop))[0]
            if len(mine):
                cols = ((ids[mine] - sl.start)[:, None] * self.d + np.arange(self.d)).ravel()
                raw = self.snaps[(m, ext)].read(pos, cols, self.steps)  # (n_pos, len(mine) * d)
                raw = raw.reshape(len(pos), len(mine), self.d)
                if len(mine) == len(ids):
                    put_values(out, raw, ext)
                else:
                    part = np.empty(raw.shape, np.float32)
                    put_values(part, raw, ext)
                    out[:, mine] = part
        return out

    # per-step scalars
    def rows(self, field_index: int, m_index: int) -> "LazyRows":
        a = (m_index * 4 + field_index) * self.V
        return LazyRows(self, slice(a, a + self.V))

    def per_step(self, cols: slice) -> np.ndarray:
        n = len(self.scalar_steps)
        return self.scalars.read(np.arange(n), cols, self.scalar_steps) if n else \
            np.zeros((0, cols.stop - cols.start), np.float32)

    def probe(self) -> np.ndarray:
        n = len(self.probe_steps)
        if not n:
            return np.zeros((0, 3), np.float32)
        vals = self.probe_stream.read(np.arange(n), slice(None), self.probe_steps)
        return np.column_stack([self.probe_steps.astype(np.float32), vals])


class LazyRows:
    """(n_steps, V) float32 per-row scalars of a v2 recording, decoded block by block on indexing
    (``x[a:b]``, ``x[idx]``, ``x[i, cols]``, ``np.asarray(x)``), like v1's memmap view."""

    def __init__(self, reader: V2Reader, cols: slice):
        self.reader, self.cols = reader, cols
        self.shape = (len(reader.scalar_steps), cols.stop - cols.start)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        pos = np.arange(self.shape[0])[first]
        r = self.reader
        out = r.scalars.read(np.atleast_1d(pos), self.cols, r.scalar_steps)
        if np.ndim(pos) == 0:
            return out[0][rest] if rest else out[0]
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)
