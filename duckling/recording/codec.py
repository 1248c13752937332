"""Block codec of recording format v2: lossless, checksummed, numpy + zstandard only.

A block holds ``n`` consecutive records of one stream, a (n, K) array of 2- or 4-byte values (bf16 bits,
float32 bits). Encoding, chosen on measurements of a real run (docs/recording.md, "Why this codec"):

1. the columns are split into groups (16 rows of W, 1 row for the dead rows, one field of the scalars);
2. time is split into ranges: with a segment length L, the anchor (record 0 alone), then records
   1..L-1, L..2L-1, ...; without one (the first v2 files, and the scalars), one range 0..n-1;
3. integer difference along time, modulo 2**16 / 2**32: the first record of a range that starts at
   t >= 1 is taken against record 0 (the anchor), every other record against the one before it
   (record 0 of a range starting at 0 is kept as is);
4. zigzag (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) so that small negative differences have zero high bytes;
5. each (group, range) is one zstd frame (level 3, with zstd's content checksum) of the byte planes
   of its values, laid out (plane, column, time): time innermost.

So any record t decodes from the anchor and the one range holding t: a random snapshot decompresses
about half of a 64-step block, and a trajectory of a few dead rows only their one-row frames.

A block file is ``MAGIC, u32 header length, u32 crc32(header), header (JSON), frames``. The header
lists the block's steps, the segment length and, per group, its column range and the compressed
length of each of its frames. Decoding is the exact inverse (cumulative sums modulo 2**bits), so what
comes out is bit-identical to what went in.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard as zstd

MAGIC = b"DUCKBLK2"
LEVEL = 3  # zstd level: 1 is no faster on this data, 6 is 2-3x slower for +4% (measured)
_UINT = {2: np.uint16, 4: np.uint32}
_SINT = {2: np.int16, 4: np.int32}
UNIT_COLS = 4096  # columns encoded together (cache-sized; the frames are cut from them)
# Encoding and decoding run on these threads (zstd and numpy release the GIL): 2 on this project's
# 2-core CPU, up to 8 where a GPU machine has cores to spare beside the training thread.
_POOL = ThreadPoolExecutor(max(2, min(8, (os.cpu_count() or 2) - 1)), thread_name_prefix="duckling-codec")


class CorruptBlock(Exception):
    """A block or raw record failed its checksum or structure check (the reader names the steps)."""


def time_ranges(n: int, segment: int | None) -> list[tuple[int, int]]:
    """The [a, b) record ranges of a block of n records, one zstd frame per group each."""
    if not segment:
        return [(0, n)]
    return [(0, 1)] + [(max(1, s), min(n, s + segment)) for s in range(0, n, segment) if min(n, s + segment) > max(1, s)]


def _zigzag_diffs(x: np.ndarray, ranges) -> np.ndarray:
    """(n, K) uint -> zigzag of the differences described in the module docstring (a new array)."""
    w = x.dtype.itemsize
    d = np.empty(x.shape, x.dtype)
    d[0] = x[0]
    np.subtract(x[1:], x[:-1], out=d[1:])
    for a, _ in ranges:
        if a >= 2:  # a range's first record is taken against the anchor, record 0
            np.subtract(x[a], x[0], out=d[a])
    s = d.view(_SINT[w])
    sign = s >> (8 * w - 1)  # 0 or -1
    np.left_shift(s, 1, out=s)
    np.bitwise_xor(s, sign, out=s)
    return d


def _encode_unit(x: np.ndarray, gw: int, ranges, level: int) -> list[list[bytes]]:
    """Columns of ng groups of gw columns each -> per group, one frame per time range."""
    n, ucols = x.shape
    w, ng = x.dtype.itemsize, ucols // gw
    t8 = np.ascontiguousarray(_zigzag_diffs(x, ranges).T).view(np.uint8).reshape(ucols, n, w)
    comp = zstd.ZstdCompressor(level=level, write_checksum=True)  # one per call: not shareable by threads
    out = [[] for _ in range(ng)]
    for a, b in ranges:  # (ng, planes, gw, time): each group's frame is one contiguous slice,
        planes = np.ascontiguousarray(t8[:, a:b].reshape(ng, gw, b - a, w).transpose(0, 3, 1, 2))
        size = planes[0].nbytes  # and all of them are compressed in one C call (few GIL switches)
        segs = np.stack([np.arange(ng, dtype=np.uint64) * size, np.full(ng, size, np.uint64)], 1)
        frames = comp.multi_compress_to_buffer(zstd.BufferWithSegments(planes, segs.tobytes()), threads=0)
        for i in range(ng):
            out[i].append(bytes(frames[i]))
    return out


def _units(widths) -> list[tuple[int, int, int]]:
    """(first group, number of groups, group width): runs of equal-width groups, ~UNIT_COLS each."""
    units, g = [], 0
    while g < len(widths):
        k = 1
        while g + k < len(widths) and widths[g + k] == widths[g] and (k + 1) * widths[g] <= UNIT_COLS:
            k += 1
        units.append((g, k, widths[g]))
        g += k
    return units


def encode_block(records: np.ndarray, steps, widths, level: int = LEVEL, segment: int | None = None) -> bytes:
    """records: (n, K) array of 2- or 4-byte items; widths: column group sizes summing to K;
    segment: records per time range after the anchor (None: one range, the original layout)."""
    n, k = records.shape
    w = records.dtype.itemsize
    if sum(widths) != k or w not in _UINT:
        raise ValueError(f"bad block: {records.shape} {records.dtype}, groups {widths}")
    x = records.view(_UINT[w])
    bounds = np.cumsum([0, *widths])
    ranges = time_ranges(n, segment)
    units = _units(widths)
    done = _POOL.map(lambda u: _encode_unit(x[:, bounds[u[0]]:bounds[u[0] + u[1]]], u[2], ranges, level), units)
    frames = [f for per_unit in done for f in per_unit]  # per group, its frames in range order
    table = [[int(bounds[g]), int(bounds[g + 1]), *map(len, fs)] for g, fs in enumerate(frames)]
    head = {"n": n, "k": k, "itemsize": w, "steps": [int(s) for s in steps], "frames": table}
    if segment:
        head["segment"] = int(segment)
    header = json.dumps(head, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<II", len(header), zlib.crc32(header)), header,
                     *(f for fs in frames for f in fs)])


def read_header(buf: bytes, file_size: int) -> tuple[dict, np.ndarray]:
    """Parse and check a block's header; returns (header, with "frames" as an (n_groups, 2 + n_frames)
    array, and per group the byte offset of each frame and the one after its last: (n_groups,
    n_frames + 1))."""
    if len(buf) < 16 or buf[:8] != MAGIC:
        raise CorruptBlock("not a duckling block (bad magic)")
    hlen, crc = struct.unpack("<II", buf[8:16])
    raw = buf[16:16 + hlen]
    if len(raw) != hlen or zlib.crc32(raw) != crc:
        raise CorruptBlock("header checksum mismatch")
    try:
        h = json.loads(raw)
        n, k, w, steps, table = int(h["n"]), int(h["k"]), int(h["itemsize"]), h["steps"], h["frames"]
        seg = h.get("segment")
        if seg is not None and (type(seg) is not int or seg < 1):
            raise ValueError(f"segment {seg!r}")
        n_frames = len(time_ranges(n, seg)) if n >= 1 else 0
        offsets, pos, a = [], 16 + hlen, 0
        for lo, hi, *lengths in table:
            if lo != a or hi <= lo or len(lengths) != n_frames or min(lengths) <= 0 \
                    or not all(type(v) is int for v in (hi, *lengths)):
                raise CorruptBlock("frame table is not a partition of the columns and time ranges")
            offs = [pos]
            for length in lengths:
                offs.append(offs[-1] + length)
            offsets.append(offs)
            pos, a = offs[-1], hi
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptBlock(f"unreadable header ({e})") from None
    if a != k or w not in _UINT or len(steps) != n or n < 1 or pos != file_size:
        raise CorruptBlock(f"header does not match the file ({file_size} bytes)")
    h["ranges"] = time_ranges(n, h.get("segment"))
    h["frames"] = np.asarray(table, np.int64).reshape(len(table), 2 + n_frames)  # arrays, not thousands
    return h, np.asarray(offsets, np.int64).reshape(len(table), n_frames + 1)  # of lists (a reader keeps them)


def _decompress(items, rs: list[int], sizes: list[int]) -> np.ndarray:
    """Frames rs (decoded sizes ``sizes``) of each (block buffer, group's frame offsets) in items, in
    one C call (zstd checks every frame's checksum): (len(items), sum(sizes)) uint8.

    The frames are handed to zstd as one contiguous copy: zstd then works without the GIL (given a
    list of separate frames it holds it, and two threads run no faster than one)."""
    offs = np.stack([o for _, o in items])  # (n_items, n_frames + 1)
    starts = offs[:, rs]
    lens = offs[:, [r + 1 for r in rs]] - starts
    lo, hi = int(starts.min()), int((starts + lens).max())
    if all(b is items[0][0] for b, _ in items) and hi - lo <= 2 * int(lens.sum()) + (1 << 16):
        data, starts = items[0][0][lo:hi], starts - lo  # frames of one block, close together: their span
    else:  # scattered frames, or several blocks': each item's span, joined
        first, last = starts.min(axis=1), (starts + lens).max(axis=1)
        data = b"".join([items[i][0][a:b] for i, (a, b) in enumerate(zip(first.tolist(), last.tolist()))])
        starts = starts - first[:, None] + np.concatenate([[0], np.cumsum(last - first)[:-1]])[:, None]
    frames = zstd.BufferWithSegments(data, np.stack([starts.ravel(), lens.ravel()], 1).astype(np.uint64).tobytes())
    try:
        out = zstd.ZstdDecompressor().multi_decompress_to_buffer(
            frames, decompressed_sizes=np.array(sizes * len(items), np.uint64).tobytes(), threads=0)
    except zstd.ZstdError as e:
        raise CorruptBlock(f"zstd: {e}") from None
    if out.size() != len(items) * sum(sizes):
        raise CorruptBlock("a frame holds the wrong number of bytes")
    return np.concatenate([np.frombuffer(out[i], np.uint8) for i in range(len(out))]).reshape(len(items), -1)


def _decode_batch(items, h, gw: int, records: np.ndarray) -> np.ndarray:
    """Records (sorted local positions) of groups gw columns wide, given as (block buffer, the
    group's frame offsets) in items, of blocks laid out like header h: (len(items), len, gw).
    zstd decompresses the frames needed (the anchor and the ranges holding the records) in one
    call; kernels.decode_range turns each range's bytes back into values (numba's compiled loop with
    the [fast] extra, else numpy passes: the same bits)."""
    from duckling.recording.kernels import decode_range  # numba (if installed) is imported on first decode

    w, t, ranges = h["itemsize"], _UINT[h["itemsize"]], h["ranges"]
    need = [r for r, (a, b) in enumerate(ranges) if ((records >= a) & (records < b)).any()]
    if ranges[need[-1]][0] >= 1 and 0 not in need:  # the anchor: later ranges start from record 0
        need.insert(0, 0)
    sizes = [gw * (ranges[r][1] - ranges[r][0]) * w for r in need]
    raw = _decompress(items, need, sizes)
    out = np.empty((len(items), len(records), gw), t)
    zeros = np.zeros((len(items), gw), t)
    base, pos = zeros, 0
    for r, size in zip(need, sizes):
        a, b = ranges[r]
        frame, pos = raw[:, pos:pos + size], pos + size
        sel = np.nonzero((records >= a) & (records < b))[0]
        if a == 0 and b == 1 and len(ranges) > 1:  # the anchor: the start of every later range
            anchor = np.empty((len(items), 1, gw), t)
            decode_range(frame, w, gw, 1, np.zeros(1, np.int64), zeros, anchor, 0)
            base = anchor[:, 0]
            if len(sel):
                out[:, sel[0]] = base
            continue
        if len(sel):  # the asked records of a range are consecutive in ``records``
            decode_range(frame, w, gw, b - a, records[sel] - a, base if a >= 1 else zeros, out, int(sel[0]))
    return out


BATCH_BYTES = 4 << 20  # decoded bytes per batch of groups (one zstd call, one thread)


def _batches(brk: np.ndarray, sizes: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) index ranges cutting items into batches: a new batch wherever ``brk`` is True (brk[0]
    is; items that cannot share one zstd call and decode loop) and every ~BATCH_BYTES of decoded bytes
    (``sizes``: per item; the items between two breaks are of one size)."""
    starts = [*np.flatnonzero(brk).tolist(), len(brk)]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        k = max(1, BATCH_BYTES // int(sizes[a]))
        out += [(s, min(b, s + k)) for s in range(a, b, k)]
    return out


def _map(f, jobs: list) -> list:
    """f over jobs, on the codec's threads when there are several."""
    return list(_POOL.map(f, jobs) if len(jobs) > 1 else map(f, jobs))


def decode_runs(buf, header: dict, offsets, groups, records=None, consecutive: bool = True) -> list:
    """Records ``records`` (local positions, sorted; None: all) of the column groups ``groups``
    (indices into header["frames"]), as [(groups of a batch, (ng, len(records), width) array)]:
    batches of equal-width groups (consecutive ones only, by default: runs of columns), ~4 MB of
    decoded frames each, decoded in parallel. ``buf`` is the block's bytes, or a ``streams.BlockFile``
    (its slices are read with pread)."""
    records = np.arange(header["n"]) if records is None else np.unique(np.asarray(records, np.int64))
    gs = np.unique(np.asarray(groups, np.int64))
    widths = header["frames"][:, 1] - header["frames"][:, 0]
    w = widths[gs]
    brk = np.ones(len(gs), bool)
    brk[1:] = (w[1:] != w[:-1]) | (consecutive & (gs[1:] != gs[:-1] + 1))
    jobs = [gs[a:b].tolist() for a, b in _batches(brk, w * (header["n"] * header["itemsize"]))]
    run = lambda g: _decode_batch([(buf, offsets[i]) for i in g], header, int(widths[g[0]]), records)  # noqa: E731
    return list(zip(jobs, _map(run, jobs)))


def decode_groups(buf, header: dict, offsets, groups, records=None) -> dict:
    """decode_runs as {group: (len(records), width) array}."""
    return {g: arr[i] for gs, arr in decode_runs(buf, header, offsets, groups, records, consecutive=False)
            for i, g in enumerate(gs)}


def decode_blocks(blocks) -> list[dict]:
    """Every record of some groups of several blocks, decoded together (one zstd call per ~4 MB of
    frames of equal layout, across blocks): blocks is a list of (buffer, header, offsets, groups);
    returns per block {group: (n, width) array}."""
    items = []  # (layout, block, group, buffer, group's frame offsets, header); equal layouts together
    for i, (buf, h, offsets, groups) in enumerate(blocks):
        groups = sorted(groups)
        widths = (h["frames"][groups, 1] - h["frames"][groups, 0]).tolist()
        head = (h["n"], h.get("segment") or 0, h["itemsize"])  # (no segment: 0, which sorts)
        items += [((*head, w), i, g, buf, offsets[g], h) for g, w in zip(groups, widths)]
    items.sort(key=lambda it: it[0])  # stable: blocks, then groups, in order within a layout
    brk = np.array([i == 0 or it[0] != items[i - 1][0] for i, it in enumerate(items)], bool)
    sizes = np.array([it[0][0] * it[0][2] * it[0][3] for it in items], np.int64)
    jobs = [items[a:b] for a, b in _batches(brk, sizes)]
    run = lambda job: _decode_batch([(b, o) for *_, b, o, _ in job], job[0][5], job[0][0][3],  # noqa: E731
                                    np.arange(job[0][0][0]))
    out: list[dict] = [{} for _ in blocks]
    for job, arr in zip(jobs, _map(run, jobs)):
        for k, (_, i, g, *_) in enumerate(job):
            out[i][g] = arr[k]
    return out


# --- raw records (the append-only tail) ------------------------------------------------------
TRAILER = np.dtype([("step", "<i8"), ("crc", "<u4"), ("magic", "<u4")])
RAW_MAGIC = 0xD0C1B2A3


def pack_trailer(step: int, payload: memoryview) -> bytes:
    """16 bytes after each raw record: the step, crc32(payload + step) and a magic number."""
    sb = struct.pack("<q", step)
    return sb + struct.pack("<II", zlib.crc32(sb, zlib.crc32(payload)), RAW_MAGIC)


def check_record(rec: np.ndarray) -> None:
    """rec: the bytes of one raw record (payload + trailer); raises CorruptBlock on a mismatch."""
    tail = rec[-16:].view(TRAILER)[0]
    crc = zlib.crc32(rec[-16:-8], zlib.crc32(rec[:-16]))
    if tail["magic"] != RAW_MAGIC or tail["crc"] != crc:
        raise CorruptBlock(f"raw record of step {int(tail['step'])} fails its checksum")
