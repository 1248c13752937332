"""``Recording``, the lazy reader of ``RUN/recording`` (docs/recording.md); numpy and zstd only, so a
recording reads without torch. Snapshot N is W after N optimizer updates (0 = init).

One reader: today's layout (``Blocks`` below), or format 1 through ``v1.V1Source`` (read only). An
early format-2 layout is refused with the command that upgrades it (``duckling compact RUN``).
``duckling.recording.writer.RecordingWriter`` appends steps crash-safely.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from duckling.errors import DucklingError
from duckling.storage import local_path
from duckling.recording.layout import (FIELDS, FORMAT, LAYOUT_KEYS, check_meta, make_streams, older_layout, put_values, read_meta,
                                       rec_dir, snapshot_parts)
from duckling.recording.chunks import incomplete
from duckling.recording.manifest import NAME as MANIFEST
from duckling.recording.v1 import V1Source


def _strictly_increasing(steps: np.ndarray) -> bool:
    return bool(len(steps) < 2 or (np.diff(steps) > 0).all())


class Blocks:
    """Counts and reads of today's layout: streams of checksummed blocks and a raw tail (streams.py);
    positions are indices into the streams."""

    def __init__(self, root, meta: dict, remote=None):
        self.root, self.meta = root, meta
        self.V, self.d = meta["shape"]
        self.parts = snapshot_parts(meta["dtype"], self.V, meta["n_live"])
        self.snaps, self.scalars, self.probe_stream = make_streams(root, meta, **(remote.stream_args(meta) if remote else {}))
        self.kept: dict = {}  # (matrix, position, ext) -> stored values of a preloaded snapshot

    @property
    def streams(self) -> list:
        return [*self.snaps.values(), self.scalars, self.probe_stream]

    def check(self) -> tuple[dict, list[str]]:
        """({stream name: its record steps}, problems): every stream's files against the manifest
        (chunks.py), read again once when a live writer committed a block meanwhile."""
        for attempt in (0, 1):
            self.scalars.manifest.load()
            found, problems = {}, []
            for st in self.streams:
                _, found[st.name], mine = st.check()
                problems += mine
            if not problems:
                break
        return found, list(dict.fromkeys(problems))  # (a missing manifest is named by every stream)

    def reload(self) -> tuple[np.ndarray, np.ndarray]:
        """(scalar steps, snapshot steps) of complete steps; raises on an inconsistent structure."""
        found, problems = self.check()
        if problems:
            raise incomplete(self.root, problems)
        sc = found["scalars"]
        if not np.array_equal(sc, np.arange(len(sc))):
            raise DucklingError(f"the per-step scalars in {self.root} are not steps 0..N in order "
                                f"(found {sc[:5].tolist()}...): the recording is damaged or edited.")
        last = len(sc) - 1
        said = self.meta.get("last_step")
        if self.meta.get("status") != "recording" and type(said) is int and said > last:
            raise DucklingError(f"{self.root}/meta.json says the recording ends at step {said} (status "
                                f"{self.meta.get('status')!r}), but its per-step scalars stop at step {last}: steps "
                                f"{last + 1}..{said} are missing (files deleted or renamed). Restore them from a copy "
                                f"of the run; `duckling verify {self.root.parent}` lists every problem.")
        snap = None
        for (m, ext), s in self.snaps.items():
            st = found[s.name]
            if not _strictly_increasing(st):
                raise DucklingError(f"snapshot steps of {m}.{ext} in {self.root} are not strictly "
                                    f"increasing: the recording is damaged or edited.")
            st = st[st <= last]
            if last >= 0 and (len(st) == 0 or st[0] != 0):  # snapshot 0 is written before scalars 0
                raise DucklingError(f"{self.root} has no snapshot 0 of {m}.{ext} although its step 0 is "
                                    f"complete: meta.json (dtype, matrices) does not match the files.")
            if snap is not None and not np.array_equal(st[:len(snap)], snap[:len(st)]):
                raise DucklingError(f"the snapshot streams in {self.root} disagree on their steps: "
                                    f"the recording is damaged or edited.")
            snap = st if snap is None or len(st) < len(snap) else snap
        pr = found["probe"]
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

    # per-step scalars: [rows of each matrix (4 fields x V) | hidden mean (d) | lr]
    def rows(self, field_index: int, m_index: int) -> "LazyRows":
        a = (m_index * 4 + field_index) * self.V
        return LazyRows(self, slice(a, a + self.V))

    def _per_step(self, cols: slice) -> np.ndarray:
        n = len(self.scalar_steps)
        return self.scalars.read(np.arange(n), cols, self.scalar_steps) if n else \
            np.zeros((0, cols.stop - cols.start), np.float32)

    def hidden_mean(self) -> np.ndarray:
        a = len(self.meta["matrices"]) * len(FIELDS) * self.V
        return self._per_step(slice(a, a + self.d))

    def lr(self) -> np.ndarray:
        a = len(self.meta["matrices"]) * len(FIELDS) * self.V + self.d
        return self._per_step(slice(a, a + 1))[:, 0]

    def probe(self) -> np.ndarray:
        n = len(self.probe_steps)
        if not n:
            return np.zeros((0, 3), np.float32)
        vals = self.probe_stream.read(np.arange(n), slice(None), self.probe_steps)
        return np.column_stack([self.probe_steps.astype(np.float32), vals])


class LazyRows:
    """(n_steps, V) float32 per-row scalars, decoded block by block on indexing (``x[a:b]``,
    ``x[idx]``, ``x[i, cols]``, ``np.asarray(x)``), like format 1's memmap view."""

    def __init__(self, reader: Blocks, cols: slice):
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


class Recording:
    """Lazy reader of ``RUN_DIR/recording``: nothing large is loaded until asked for.

    ``steps``: recorded snapshot steps; ``snapshot(N)``: W after N updates (V, d) float32;
    ``trajectory(ids, steps)``: (n_steps, n_ids, d) float32; ``rows(field)``: exact per-step
    float32 scalars (n_scalar_steps, V) for field in norm/update_norm/grad_norm/adam_v.
    """

    def __init__(self, run_dir, *, _meta: dict | None = None):
        local = local_path(run_dir)  # a folder or a file:// URI; else a storage URI (duckling.storage)
        self._remote = None
        if local is None:  # read through the storage, block by block (remote.py)
            from duckling.recording.remote import RemoteRun

            self._remote = RemoteRun(str(run_dir))
            self.root = self._remote.root
            self.meta = _meta if _meta is not None else self._remote.meta()
        else:
            self.root = rec_dir(local)
            self._run_dir = self.root.parent
            self.meta = _meta if _meta is not None else read_meta(self.root)  # _meta: compact, an older layout
        version = self.meta.get("format_version")
        if version == 1 and self._remote is not None:
            raise DucklingError(f"{self.root} is a format-1 recording, which is read from a local folder only: copy "
                                f"the run down (duckling.storage.Storage(URI).download(RUN, FOLDER)) and read it there.")
        if version == 1:
            self._src = V1Source(self.root, self.meta)
        elif version == FORMAT:
            if _meta is None and older_layout(self.meta):
                missing = [k for k in LAYOUT_KEYS[1:] if k not in self.meta]
                raise DucklingError(
                    f"{self.root} is {older_layout(self.meta)} (its meta.json has no {', '.join(missing)}), "
                    f"written by an earlier duckling. Upgrade it in place once with `duckling compact "
                    f"{self.where}` (lossless, verified before the old files go), then read it.")
            if _meta is None:
                check_meta(self.root, self.meta)
            self._src = Blocks(self.root, self.meta, self._remote)
        else:
            raise DucklingError(f"{self.root} has recording format {version!r}; this duckling reads formats "
                                f"1 and {FORMAT}. Use a matching version of duckling.")
        self.reload()

    def reload(self) -> "Recording":
        """Re-read the file sizes (a recording that is still being written grows)."""
        self.scalar_steps, self.steps = self._src.reload()
        self._index = {int(s): i for i, s in enumerate(self.steps)}
        return self

    @property
    def run_dir(self) -> Path:
        """The run folder; for a run in a storage, a local copy of its small files (remote.RemoteRun.staged),
        made on first use: what the analyses read beside the recording (config.json, token_mapping.json...)."""
        return self._run_dir if self._remote is None else self._remote.staged()

    @property
    def where(self) -> str:
        """The run folder, or its storage URI."""
        return str(self._run_dir) if self._remote is None else self._remote.run_uri

    def _sizes(self) -> dict[str, int]:
        """{name: size} of the recording folder's files."""
        if self._remote is not None:
            return dict(self._remote.sizes)
        return {p.name: p.stat().st_size for p in self.root.iterdir() if p.is_file()}

    # shape facts
    matrices = property(lambda self: list(self.meta["matrices"]))
    shape = property(lambda self: tuple(self.meta["shape"]))
    dtype = property(lambda self: self.meta["dtype"])
    every = property(lambda self: self.meta["every"])
    n_live = property(lambda self: self.meta["n_live"])
    live_ids = property(lambda self: np.arange(self.meta["n_live"]))
    dead_ids = property(lambda self: np.arange(self.meta["n_live"], self.shape[0]))

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        last = int(self.steps[-1]) if len(self) else None
        return (f"Recording({self.where!r}: {len(self)} snapshots up to step {last}, "
                f"{self.dtype}, every {self.every}, {self.bytes_on_disk / 1e6:.1f} MB)")

    @property
    def bytes_on_disk(self) -> int:
        return sum(self._sizes().values())

    @property
    def raw_bytes(self) -> int:
        """Bytes the same steps take in format 1 (uncompressed), meta.json and manifest.json included."""
        (V, d), n_m = self.shape, len(self.matrices)
        per_snap = sum((sl.stop - sl.start) * d * np.dtype(dt).itemsize
                       for _, sl, dt in snapshot_parts(self.dtype, V, self.n_live))
        per_scalar = n_m * len(FIELDS) * V * 4 + d * 4 + 4 + 8
        return (len(self.steps) * (n_m * per_snap + 8) + len(self.scalar_steps) * per_scalar
                + len(self.probe) * 12 + sum(self._sizes().get(n, 0) for n in ("meta.json", MANIFEST)))

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

    def _matrix(self, matrix: str) -> str:
        if matrix not in self.matrices:
            raise DucklingError(f"matrix {matrix!r} was not recorded; this recording has {self.matrices}.")
        return matrix

    def trajectory(self, token_ids, steps=None, matrix: str = "wte") -> np.ndarray:
        """Rows ``token_ids`` at the recorded ``steps`` (default all): (n_steps, n_ids, d) float32.
        Decodes only the column groups (format 1: the rows) that hold them."""
        self._matrix(matrix)
        ids = np.atleast_1d(np.asarray(token_ids, dtype=np.int64))
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise DucklingError(f"token ids must lie in 0..{self.shape[0] - 1}.")
        return self._src.trajectory(ids, self._positions(steps), matrix)

    def preload(self, steps, matrix: str = "wte") -> None:
        """Decode the snapshots at ``steps`` once and keep them in memory (as stored: 2 bytes per value
        in bf16), so that analyses making several passes over the same steps decode each compressed
        block once. Replaces what an earlier call kept; ``preload([])`` frees it. Format 1 reads
        snapshots straight from disk and keeps nothing."""
        self._matrix(matrix)
        pos = self._positions(steps) if len(np.atleast_1d(steps)) else np.zeros(0, np.int64)
        self._src.preload(pos, matrix)

    def snapshot(self, step: int, matrix: str = "wte") -> np.ndarray:
        """W after ``step`` optimizer updates (0 = initialisation): (V, d) float32."""
        self._matrix(matrix)
        (pos,) = self._positions([step])
        return self._src.snapshot(int(pos), matrix)

    # per-step scalars (every step, whatever the stride)
    def rows(self, field: str, matrix: str = "wte", steps=None) -> np.ndarray:
        """Exact float32 per-row ``field`` (norm | update_norm | grad_norm | adam_v):
        (n_steps, V), a lazy view; ``steps`` selects scalar steps (default all)."""
        if field not in FIELDS:
            raise DucklingError(f"unknown row field {field!r}; choose one of {FIELDS}.")
        self._matrix(matrix)
        if len(self.scalar_steps) == 0:
            return np.zeros((0, self.shape[0]), np.float32)
        view = self._src.rows(FIELDS.index(field), self.matrices.index(matrix))
        return view if steps is None else view[self._scalar_positions(steps)]

    def _scalar_positions(self, steps) -> np.ndarray:
        s = np.atleast_1d(np.asarray(steps, np.int64))
        pos = np.searchsorted(self.scalar_steps, s)
        bad = (pos >= len(self.scalar_steps)) | (self.scalar_steps[np.minimum(pos, len(self.scalar_steps) - 1)] != s)
        if bad.any():
            raise DucklingError(f"step {s[bad][0]} has no scalars; recorded scalar steps are "
                                f"{self.scalar_steps[0]}..{self.scalar_steps[-1]}.")
        return pos

    @property
    def hidden_mean(self) -> np.ndarray:
        """(n_scalar_steps, d) mean final hidden state (after ln_f) of the batch behind update N."""
        return self._src.hidden_mean()

    @property
    def lr(self) -> np.ndarray:
        """(n_scalar_steps,) learning rate used by update N (NaN at step 0)."""
        return self._src.lr()

    @property
    def probe(self) -> np.ndarray:
        """(n_probes, 3) float32: [step, total dead softmax mass, max dead prob] on the probe batch."""
        return self._src.probe()

    def verify(self) -> list[str]:
        """Every problem of the whole recording (empty: it is whole): its files against manifest.json
        (every byte hashed), every frame and raw record checksum, meta.json's status and last step
        against the files (``duckling verify RUN``; ``duckling.recording.repair.verify``)."""
        from duckling.recording.repair import verify

        if self._remote is not None:
            raise DucklingError(f"{self.where} is in a storage: verify hashes every byte of a recording on this "
                                "machine; run `duckling verify` where the storage is mounted, or on a downloaded copy "
                                "(reading a remote run already checks each block it fetches against the manifest).")
        return verify(self.root)[0]

    @functools.cached_property
    def token_text(self) -> list[str] | None:
        """Text of every compact id, from the run's token_mapping.json copy (None if absent).

        Read straight from the JSON (which stores every token's text), so no tiktoken is needed."""
        path = self.run_dir / "token_mapping.json"
        if not path.exists():
            return None
        try:
            return [t["text"] for t in json.loads(path.read_text(encoding="utf-8"))["tokens"]][: self.shape[0]]
        except (ValueError, KeyError, TypeError) as e:
            raise DucklingError(f"{path} is not a valid token mapping ({e}); copy the mapping the run "
                                "was trained with into the run folder.") from e
