"""Streams of a recording: fixed-size records in chunks of ``block`` records.

Chunk c of stream S holds records c*block .. (c+1)*block - 1, either compacted in ``S.<c:05d>.blk``
(codec.py) or still raw in ``S.<c:05d>.raw`` (append-only records, each followed by a 16-byte
trailer: step, crc32, magic). When both exist (a kill between writing a block and deleting its raw
chunk), the block wins and the raw chunk is stale. Only the last chunk may be partial or raw.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from duckling.recording.codec import (TRAILER, CorruptBlock, check_record, decode_blocks, decode_groups, decode_runs, encode_block,
                    pack_trailer, read_header)
from duckling.errors import DucklingError
from duckling.files import write_atomic
from duckling.recording.access import LocalFiles
from duckling.recording.chunks import covers, header_crc_of, incomplete, resolve
from duckling.recording.manifest import Manifest, digest

CACHE_BYTES = 160 << 20  # decoded frames kept per stream (one 64-step bf16 block of W fits)


@functools.lru_cache(maxsize=8)
def _whole_plan(widths: tuple) -> tuple[bool, list]:
    """Stream._plan of a whole-record read: every group to its own columns (made once per layout)."""
    b = np.cumsum((0, *widths)).tolist()
    return True, [(g, slice(b[g], b[g + 1]), slice(None)) for g in range(len(widths))]


class Stream(LocalFiles):
    """One stream; its files are read through access.LocalFiles (remote.RemoteFiles for a storage URI)."""

    def __init__(self, root: Path, name: str, width: int, dtype, widths: list[int], block: int,
                 segment: int | None = None, manifest: Manifest | None = None, positional: bool = False):
        self.root = root if hasattr(root, "uri") else Path(root)  # (a storage.StoragePath: remote.py)
        self.name, self.width, self.dtype = name, int(width), np.dtype(dtype)
        self.manifest = manifest  # the recording's manifest.json (shared by its streams), updated on commit
        self.positional = positional  # record i is step i (the scalars): a bad block's steps are known
        self.kinds: dict[int, str] = {}  # chunk -> "blk" | "raw" | "bad" (chunks.resolve, at scan)
        self.bad: dict[int, str] = {}  # chunk -> why its block is unreadable
        self.widths, self.block, self.segment = list(widths), int(block), segment
        self._widths_key = tuple(self.widths)  # the whole-record plan's key (_whole_plan)
        self.bounds = np.cumsum([0] + self.widths)  # column group edges
        self.payload = self.width * self.dtype.itemsize
        self.rec_bytes = self.payload + TRAILER.itemsize
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0  # sum of the cached arrays' nbytes (kept, not recomputed per insert)
        self._headers: dict = {}
        self._last_single = None  # block of the last one-record read
        self._all_cols = None  # np.arange(width), made once

    def raw_path(self, c: int) -> Path:
        return self.root / f"{self.name}.{c:05d}.raw"

    def blk_path(self, c: int) -> Path:
        return self.root / f"{self.name}.{c:05d}.blk"

    # --- structure ------------------------------------------------------------------------------
    def _header(self, c: int) -> tuple[dict, list[int]]:
        p = self.blk_path(c)
        size, key = self._stat_key(c)
        if self._headers.get(c, (None,))[0] != key:
            head = self._head(c, size)
            h, offsets = read_header(head, size)  # CorruptBlock: the caller names the steps
            h["crc32"] = header_crc_of(head)  # what the manifest lists (chunks.py compares)
            if h["k"] != self.width or h["itemsize"] != self.dtype.itemsize or h["n"] > self.block:
                raise DucklingError(f"{p} holds blocks of shape ({h['n']}, {h['k']}) x {h['itemsize']} "
                                    f"bytes; meta.json implies at most ({self.block}, {self.width}) x "
                                    f"{self.dtype.itemsize}. The metadata or the block was edited.")
            table = h["frames"]
            if len(table) != len(self.widths) or not (np.array_equal(table[:, 0], self.bounds[:-1])
                                                      and np.array_equal(table[:, 1], self.bounds[1:])):
                raise DucklingError(f"{p} groups its columns differently from what meta.json implies "
                                    f"(group_rows, dead_group_rows, n_live): the metadata or the block was "
                                    f"edited. Restore the run's original meta.json.")
            self._headers[c] = (key, h, offsets)
        return self._headers[c][1], self._headers[c][2]

    def check(self) -> tuple[list[tuple[str, int]], np.ndarray, list[str]]:
        """([(kind, n records)] per chunk, every record's step, problems): chunks.resolve, which also
        checks the files against the manifest; a torn last raw record is ignored."""
        return resolve(self)

    def scan(self) -> tuple[list[tuple[str, int]], np.ndarray]:
        """``check`` without problems, else a DucklingError naming them (the stream, the steps)."""
        chunks, steps, problems = self.check()
        if problems:
            raise incomplete(self.root, problems)
        return chunks, steps

    def _raw_trailers(self, c: int, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, TRAILER)
        mm = self._raw_view(c, n)
        return np.ascontiguousarray(mm[:, self.payload:]).view(TRAILER)[:, 0]

    # --- reading --------------------------------------------------------------------------------
    def read(self, positions: np.ndarray, cols: slice | np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Records at ``positions`` (indices into the stream), columns ``cols``: (len, n_cols) dtype.

        ``steps`` is the stream's step array (for error messages). Verifies every byte it uses."""
        positions = np.asarray(positions, np.int64)
        if isinstance(cols, slice) and cols != slice(None):
            if self._all_cols is None:
                self._all_cols = np.arange(self.width)
            cols = self._all_cols[cols]
        elif not isinstance(cols, slice):
            cols = np.asarray(cols, np.int64)
        out = np.empty((len(positions), self._n_cols(cols)), self.dtype)  # cols: indices, or slice(None)
        chunk_of = positions // self.block
        chunks, counts = np.unique(chunk_of, return_counts=True)
        plan = None
        if len(chunks) > 1:  # one column plan for every block of the read
            plan = self._plan(cols)
            self._prefetch(chunks, counts, plan)
        for c in chunks:
            sel = np.nonzero(chunk_of == c)[0]
            local = positions[sel] - c * self.block
            kind = self.kinds.get(int(c))
            try:
                if kind == "bad":
                    raise CorruptBlock(self.bad[int(c)])
                if kind == "blk" or (kind is None and self._has_blk(int(c))):  # into place when the block's rows of out are a slice
                    dest = out[sel[0]:sel[-1] + 1] if sel[-1] - sel[0] + 1 == len(sel) else None
                    got = self._read_blk(int(c), local, cols, plan, dest)
                    if got is not dest:
                        out[sel] = got
                else:
                    try:
                        out[sel] = self._read_raw(int(c), local, cols)
                    except FileNotFoundError:  # compacted by a live writer meanwhile
                        out[sel] = self._read_blk(int(c), local, cols)
            except CorruptBlock as e:
                lo, hi = c * self.block, min((c + 1) * self.block, len(steps)) - 1
                raise DucklingError(
                    f"corrupt recording data in {self.root / self.name} chunk {int(c)}, covering steps "
                    f"{steps[lo]}..{steps[hi]} ({e}). Those steps are unreadable; other steps still read. "
                    f"Restore the file from a copy, or re-record the run.") from None
        return out

    def _read_one(self, c: int, i: int) -> np.ndarray:
        """Record i of block c, every column: each run of groups decoded from the anchor and the one
        time range holding it, straight into place; (1, width)."""
        h, offsets = self._header(c)
        if i >= h["n"]:
            raise CorruptBlock(f"block holds {h['n']} records, position {i} asked")
        res = np.empty((1, self.width), self.dtype)
        with self._open(c) as buf:
            for gs, arr in decode_runs(buf, h, offsets, range(len(self.widths)), [i]):
                res[0, self.bounds[gs[0]]:self.bounds[gs[0]] + arr.size] = arr.reshape(-1).view(self.dtype)
        return res

    def _prefetch(self, chunks, counts, plan) -> None:
        """Several blocks read whole (a trajectory): decode their groups of the read's columns
        together, one zstd call per ~4 MB across blocks instead of per block, into the cache. Only
        when it fits half the cache; a failure is left to the per-block read, which names it."""
        groups = [g for g, _, _ in plan[1]]
        todo = []
        for c, count in zip(chunks, counts):
            if self.kinds.get(int(c), "blk") == "blk" and self._has_blk(int(c)):
                try:
                    h, offsets = self._header(int(c))
                except (CorruptBlock, OSError):
                    return  # left to the per-block read, which names the steps
                if count == h["n"] and any((int(c), g) not in self._cache for g in groups):
                    todo.append((int(c), h, offsets))
        size = sum(h["n"] for _, h, _ in todo) * sum(self.widths[g] for g in groups) * self.dtype.itemsize
        if len(todo) < 2 or size > CACHE_BYTES // 2:
            return
        try:
            with ExitStack() as stack:
                bufs = [stack.enter_context(self._open(c)) for c, _, _ in todo]
                got = decode_blocks([(b, h, o, groups) for b, (_, h, o) in zip(bufs, todo)])
        except (CorruptBlock, OSError, ValueError):
            return
        for (c, _, _), per_group in zip(todo, got):
            for g, arr in per_group.items():
                self._remember((c, g), arr)

    def _read_raw(self, c: int, local: np.ndarray, cols: np.ndarray) -> np.ndarray:
        mm = self._raw_view(c)
        res = np.empty((len(local), self._n_cols(cols)), self.dtype)
        for j, i in enumerate(local):
            rec = np.asarray(mm[i * self.rec_bytes:(i + 1) * self.rec_bytes])
            check_record(rec)
            res[j] = rec[:self.payload].view(self.dtype)[cols]
        return res

    def _n_cols(self, cols) -> int:
        return self.width if isinstance(cols, slice) else len(cols)

    def _plan(self, cols) -> tuple[bool, list]:
        """(every column in order?, [(group, columns of the result, columns of the group)]) for a
        read of ``cols`` (indices, or slice(None): every column); slices wherever a whole group lands
        in consecutive columns."""
        if isinstance(cols, slice) or (len(cols) == self.width and cols[0] == 0 and cols[-1] == self.width - 1):
            return _whole_plan(self._widths_key)  # one per layout, shared by every stream and reader
        g_of = np.searchsorted(self.bounds, cols, side="right") - 1
        order = np.argsort(g_of, kind="stable")  # columns of each group: order[edge[g]:edge_hi[g]]
        groups = np.unique(g_of)
        edge, edge_hi = np.searchsorted(g_of[order], groups), np.searchsorted(g_of[order], groups, side="right")
        places = []
        for g, a, b in zip(groups.tolist(), edge, edge_hi):
            mine = order[a:b]
            inner = cols[mine] - self.bounds[g]
            if len(inner) == self.widths[g] and (inner == np.arange(len(inner))).all() and (np.diff(mine) == 1).all():
                mine, inner = slice(int(mine[0]), int(mine[-1]) + 1), slice(None)  # a whole group
            places.append((g, mine, inner))
        return False, places

    def _read_blk(self, c: int, local: np.ndarray, cols: np.ndarray, plan=None, res=None) -> np.ndarray:
        """Records ``local`` of block c, columns ``cols``: into ``res`` (when given and the read is
        not a single whole record) or a new array, which is returned."""
        h, offsets = self._header(c)
        if local.max() >= h["n"]:
            raise CorruptBlock(f"block holds {h['n']} records, position {int(local.max())} asked")
        whole, places = plan or self._plan(cols)
        groups = [g for g, _, _ in places]
        # one record of a block not in the cache: decode only up to it, unless the previous one-record
        # read was in this block too (a walk over steps): then decode the block once and keep it
        single = len(local) == 1 and any((c, g) not in self._cache for g in groups) and self._last_single != c
        self._last_single = c if len(local) == 1 else None
        if single and whole:
            return self._read_one(c, int(local[0]))
        todo = [g for g in groups if single or (c, g) not in self._cache]
        got = self._decode(c, h, offsets, todo, local if single else None)
        have = {g: got[g] if g in got else self._cache[(c, g)] for g in groups}  # before any eviction
        if res is None:
            res = np.empty((len(local), self._n_cols(cols)), self.dtype)
        every_record = len(local) == h["n"] and (local == np.arange(h["n"])).all()
        for g, mine, inner in places:
            if single:  # one record of a block not in the cache: sum the differences up to it only
                res[0, mine] = got[g][0].view(self.dtype)[inner]
                continue
            arr = have[g]
            if g in got:
                self._remember((c, g), arr)
            elif (c, g) in self._cache:
                self._cache.move_to_end((c, g))
            if every_record:
                res[:, mine] = arr[:, inner].view(self.dtype)
            elif isinstance(inner, slice):
                res[:, mine] = arr[local][:, inner].view(self.dtype)
            else:
                res[:, mine] = arr[local[:, None], inner[None, :]].view(self.dtype)
        return res

    def _decode(self, c: int, h: dict, offsets, groups, records=None) -> dict:
        """decode_groups on block c's file."""
        if not groups:
            return {}
        with self._open(c) as buf:
            return decode_groups(buf, h, offsets, groups, records)

    def _remember(self, key, arr: np.ndarray) -> None:
        old = self._cache.pop(key, None)
        self._cache_bytes -= 0 if old is None else old.nbytes
        self._cache[key] = arr
        self._cache_bytes += arr.nbytes
        while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
            self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes

    # --- writing --------------------------------------------------------------------------------
    def raw_records(self, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, width) payloads and steps of raw chunk c, every record checked."""
        data = np.empty((n, self.rec_bytes), np.uint8)
        with open(self.raw_path(c), "rb") as f:  # one copy: the payloads are used where they lie
            got = f.readinto(memoryview(data.reshape(-1)))
        if got != data.nbytes:
            raise CorruptBlock(f"raw chunk {c} holds {got} bytes, {n} records ({data.nbytes} bytes) expected")
        for i in range(n):
            check_record(data[i])
        steps = np.ascontiguousarray(data[:, self.payload:]).view(TRAILER)[:, 0]["step"]
        return data[:, :self.payload].view(self.dtype), steps

    def encode(self, c: int, records: np.ndarray, steps) -> bytes:
        """Block c's bytes: encoded, decoded back and compared with ``records`` bit for bit (pure:
        the recording's writer process may run it on a worker process)."""
        blob = encode_block(records, steps, self.widths, segment=self.segment)
        h, offsets = read_header(blob, len(blob))
        got = decode_groups(blob, h, offsets, range(len(self.widths)))  # on the codec threads
        u = records.view(np.uint16 if records.dtype.itemsize == 2 else np.uint32)
        if not all(np.array_equal(got[g], u[:, lo:hi]) for g, (lo, hi, *_) in enumerate(h["frames"])):
            raise CorruptBlock(f"{self.blk_path(c)}: the encoded block does not decode to its records")
        return blob

    def write_block(self, c: int, records: np.ndarray, steps, blob: bytes | None = None) -> int:
        """Encode block c (``encode``, unless ``blob`` is what ``encode`` made of these records), then
        write it atomically (tmp, fsync, rename); returns its size."""
        blob = self.encode(c, records, steps) if blob is None else blob
        write_atomic(self.blk_path(c), blob)  # S.<c>.blk.tmp, fsync, rename; no .tmp survives a failure
        self._headers.pop(c, None)
        self.kinds.pop(c, None)
        if self.manifest is not None:  # committed: listed before the raw chunk goes (chunks.py's rule)
            self.manifest.add(self.name, c, steps, len(blob), header_crc_of(blob), digest(blob))
        for key in [k for k in self._cache if k[0] == c]:
            self._cache_bytes -= self._cache.pop(key).nbytes
        return len(blob)

    def compact(self, c: int, n: int, encoded: tuple | None = None) -> None:
        """Raw chunk c (n records) -> block c, then the raw chunk is deleted. ``encoded``: (blob, steps)
        that ``encode`` made of the chunk's records elsewhere (a worker process): only committed here."""
        if encoded is None:
            records, steps = self.raw_records(c, n)
            self.write_block(c, records, steps)
        else:
            self.write_block(c, None, encoded[1], blob=encoded[0])
        self.raw_path(c).unlink()

    def decode_all(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Every record of block c: ((n, width) dtype, steps)."""
        h, offsets = self._header(c)
        got = self._decode(c, h, offsets, range(len(h["frames"])))
        data = np.concatenate([got[g] for g in range(len(h["frames"]))], axis=1)
        return data.view(self.dtype), np.asarray(h["steps"], np.int64)

    def tidy(self) -> list[str]:
        """Remove what a kill can leave behind: *.tmp, and of a block and a raw chunk of the same chunk
        the one that is not the chunk (chunks.py: a stale raw chunk; with a manifest, a block whose
        commit was cut before it was listed); returns the names removed."""
        gone = []
        for p in self.root.glob(f"{self.name}.*.tmp"):
            if p.is_file() or p.is_symlink():
                p.unlink()
                gone.append(p.name)
        m = self.manifest
        strict = m is not None and (m.present or m.expected)
        for c in sorted(c for c, have in self.list_chunks()[0].items() if have == {"blk", "raw"}):
            p = self.raw_path(c) if not strict or m.entry(self.name, c) is not None else self.blk_path(c)
            p.unlink()
            gone.append(p.name)
        return gone

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` records: later chunks deleted (last first), the boundary chunk
        made raw with exactly the kept records (a block is decoded back into a raw chunk)."""
        self.tidy()
        chunks, _ = self.scan()
        for c in range(len(chunks) - 1, -1, -1):
            n_keep = min(max(keep - c * self.block, 0), self.block)
            kind, n = chunks[c]
            if n_keep == 0:
                for p in (self.blk_path(c), self.raw_path(c)):
                    p.unlink(missing_ok=True)
            elif kind == "raw":
                os.truncate(self.raw_path(c), n_keep * self.rec_bytes)
            elif n_keep < self.block:  # partial block: back to raw so that appends can continue
                try:
                    data, steps = self.decode_all(c)
                except CorruptBlock as e:
                    raise DucklingError(f"cannot cut stream {self.name} at its record {keep}: its block {c} "
                                        f"({covers(self, c)}) is corrupt ({e}). Restore the file from a copy "
                                        f"of the run, or resume from an earlier checkpoint.") from None
                parts = []
                for i in range(n_keep):
                    payload = memoryview(np.ascontiguousarray(data[i])).cast("B")
                    parts += [payload, pack_trailer(int(steps[i]), payload)]
                write_atomic(self.raw_path(c), b"".join(parts))  # durable before the block goes; no .tmp left
                self.blk_path(c).unlink()
        if self.manifest is not None:  # after the files: a cut truncation leaves raw chunks or listed gaps
            self.manifest.drop(self.name, [c for c in range(len(chunks)) if c * self.block + self.block > keep])
        self._headers.clear()
        self.kinds.clear()
        self._cache.clear()
        self._cache_bytes = 0
