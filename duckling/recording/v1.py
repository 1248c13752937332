"""Format 1, read only: the raw layout of the first releases (docs/recording.md, "Older recordings").

Nothing writes it any more; ``Recording`` opens it through ``V1Source`` so that old runs stay readable,
and ``duckling compact RUN`` upgrades it to today's layout. Its files, in RUN/recording/:
``scalar_steps.i64`` (appended last: it commits a step), ``{m}.rows.f32`` (4, V) float32 per step,
``hidden_mean.f32`` (d,), ``lr.f32``, ``probe.f32`` [step, dead_mass, max_dead_prob],
``snap_steps.i64`` and ``{m}.{chunk:05d}.{u16|f32}``: at most chunk_steps snapshots (k, rows, d) each."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from duckling.errors import DucklingError
from duckling.recording.layout import FIELDS, check_meta, put_values, snapshot_parts

CHUNK_STEPS = 256  # snapshots per file when meta.json does not say
REQUIRED = ("format_version", "matrices", "shape", "dtype", "every", "n_live")


def _count(path: Path, record_bytes: int) -> int:
    return path.stat().st_size // record_bytes if path.exists() else 0


def files(root: Path, meta: dict) -> list[Path]:
    """The format-1 files in ``root`` (what compact removes once the upgrade is verified)."""
    mats = meta.get("matrices", [])
    names = {"scalar_steps.i64", "snap_steps.i64", "hidden_mean.f32", "lr.f32", "probe.f32"}
    names |= {f"{m}.rows.f32" for m in mats}
    return [p for p in root.iterdir() if p.name in names or (p.name.split(".")[0] in mats and len(
        p.name.split(".")) == 3 and p.name.split(".")[1].isdigit())]


class V1Source:
    """Counts and reads of a format-1 recording; positions are indices into its snapshot steps."""

    def __init__(self, root: Path, meta: dict):
        check_meta(root, meta, REQUIRED)
        self.root, self.meta = root, meta
        self.V, self.d = meta["shape"]
        self.matrices = list(meta["matrices"])
        self.chunk = meta.get("chunk_steps", CHUNK_STEPS)
        if type(self.chunk) is not int or self.chunk < 1:
            raise DucklingError(f"{root}/meta.json is not a valid recording description (chunk_steps {self.chunk!r}: "
                                f"expected a positive integer). It was edited or damaged; restore it from the run's "
                                f"original meta.json.")
        self.parts = snapshot_parts(meta["dtype"], self.V, meta["n_live"])

    def _path(self, m: str, c: int, ext: str) -> Path:
        return self.root / f"{m}.{c:05d}.{ext}"

    def _part_bytes(self, sl: slice, dt) -> int:
        return (sl.stop - sl.start) * self.d * np.dtype(dt).itemsize

    def _scalar_files(self) -> list[tuple[Path, int]]:
        files = [(self.root / f"{m}.rows.f32", len(FIELDS) * self.V * 4) for m in self.matrices]
        return files + [(self.root / "hidden_mean.f32", self.d * 4), (self.root / "lr.f32", 4),
                        (self.root / "scalar_steps.i64", 8)]

    def reload(self) -> tuple[np.ndarray, np.ndarray]:
        """(scalar steps, snapshot steps) of complete steps: a torn final record is ignored, and a
        snapshot counts only once its step's scalars are complete."""
        n_scalar = min(_count(p, b) for p, b in self._scalar_files())
        n_snap = _count(self.root / "snap_steps.i64", 8)
        for m in self.matrices:
            for ext, sl, dt in self.parts:
                rb, c, total = self._part_bytes(sl, dt), 0, 0
                while rb and (p := self._path(m, c, ext)).exists():
                    size = p.stat().st_size
                    if size > self.chunk * rb or (c and total != c * self.chunk):  # only the last chunk is partial
                        raise DucklingError(
                            f"{p} holds {size} bytes, which the recording's meta.json (shape, n_live, dtype, chunk_steps) "
                            f"does not explain: chunks of at most {self.chunk} snapshots of {rb} bytes, all full but the "
                            f"last. meta.json or the files were edited; restore the run's original meta.json.")
                    total += size // rb
                    c += 1
                n_snap = min(n_snap, total) if rb else n_snap
        self.scalar_steps = np.fromfile(self.root / "scalar_steps.i64", np.int64, count=n_scalar)
        snaps = np.fromfile(self.root / "snap_steps.i64", np.int64, count=n_snap) if n_snap and n_scalar \
            else np.zeros(0, np.int64)
        self.steps = snaps[:int(np.searchsorted(snaps, self.scalar_steps[-1], side="right"))] if len(snaps) else snaps
        return self.scalar_steps, self.steps

    def _chunk(self, m: str, c: int, ext: str, sl: slice, dt) -> np.memmap:
        n = min(self.chunk, len(self.steps) - c * self.chunk)
        return np.memmap(self._path(m, c, ext), dtype=dt, mode="r", shape=(n, sl.stop - sl.start, self.d))

    def preload(self, pos, m: str) -> None:
        """Format 1 reads snapshots straight from disk: nothing to keep."""

    def snapshot(self, pos: int, m: str) -> np.ndarray:
        c, local = divmod(int(pos), self.chunk)
        out = np.empty((self.V, self.d), np.float32)
        for ext, sl, dt in self.parts:
            put_values(out[sl], self._chunk(m, c, ext, sl, dt)[local], ext)
        return out

    def trajectory(self, ids: np.ndarray, pos: np.ndarray, m: str) -> np.ndarray:
        out = np.empty((len(pos), len(ids), self.d), np.float32)
        for c in np.unique(pos // self.chunk):
            sel = np.nonzero(pos // self.chunk == c)[0]
            local = pos[sel] - c * self.chunk
            for ext, sl, dt in self.parts:
                mine = np.nonzero((ids >= sl.start) & (ids < sl.stop))[0]
                if len(mine):
                    block = self._chunk(m, int(c), ext, sl, dt)[local[:, None], (ids[mine] - sl.start)[None, :]]
                    if len(mine) == len(ids) and sel[-1] - sel[0] + 1 == len(sel):  # a plain slice of out
                        put_values(out[sel[0]:sel[-1] + 1], block, ext)
                        continue
                    part = np.empty(block.shape, np.float32)
                    put_values(part, block, ext)
                    out[sel[:, None], mine[None, :]] = part
        return out

    def rows(self, field_index: int, m_index: int) -> np.ndarray:
        n = len(self.scalar_steps)
        mm = np.memmap(self.root / f"{self.matrices[m_index]}.rows.f32", np.float32, "r",
                       shape=(n, len(FIELDS), self.V))
        return mm[:, field_index, :]

    def hidden_mean(self) -> np.ndarray:
        return self._per_step("hidden_mean.f32", self.d)

    def lr(self) -> np.ndarray:
        return self._per_step("lr.f32", 1)[:, 0]

    def _per_step(self, name: str, width: int) -> np.ndarray:
        n = len(self.scalar_steps)
        return np.fromfile(self.root / name, np.float32, count=n * width).reshape(n, width)

    def probe(self) -> np.ndarray:
        p = self.root / "probe.f32"
        if not p.exists():
            return np.zeros((0, 3), np.float32)
        pr = np.fromfile(p, np.float32, count=_count(p, 12) * 3).reshape(-1, 3)
        last = self.scalar_steps[-1] if len(self.scalar_steps) else -1
        return pr[pr[:, 0] <= last]
