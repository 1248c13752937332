"""Block codec of recording format v2: lossless, checksummed, numpy + zstandard only.

A block holds ``n`` consecutive records of one stream, a (n, K) array of 2- or 4-byte values (bf16 bits,
float32 bits). Encoding, chosen on measurements of a real run (docs/recording.md, "Why this codec"):

1. integer difference along time, modulo 2**16 / 2**32 (record 0 is kept as is): one bf16 ulp of
   change is +-1, and most values do not change at all from one step to the next;
2. zigzag (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) so that small negative differences have zero high bytes;
3. time innermost, split into column groups (64 rows of W each), each group split into byte planes;
4. each group is one zstd frame (level 3) with zstd's content checksum.

A block file is ``MAGIC, u32 header length, u32 crc32(header), header (JSON), frames``. The header
lists the block's steps and every frame's column range and compressed length. Decoding is the exact
inverse (a cumulative sum along time), so what comes out is bit-identical to what went in.
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
# Encoding and decoding run per frame on these threads (zstd and numpy release the GIL): 2 on this
# project's 2-core CPU, up to 8 where a GPU machine has cores to spare beside the training thread.
_POOL = ThreadPoolExecutor(max(2, min(8, (os.cpu_count() or 2) - 1)), thread_name_prefix="duckling-codec")


class CorruptBlock(Exception):
    """A block or raw record failed its checksum or structure check (the reader names the steps)."""


def _delta_zigzag(x: np.ndarray) -> np.ndarray:
    """(n, K) uint -> zigzag(x[t] - x[t-1]) with x[-1] = 0, same dtype (a new array)."""
    w = x.dtype.itemsize
    d = np.empty(x.shape, x.dtype)
    d[0] = x[0]
    np.subtract(x[1:], x[:-1], out=d[1:])
    s = d.view(_SINT[w])
    sign = s >> (8 * w - 1)  # 0 or -1
    np.left_shift(s, 1, out=s)
    np.bitwise_xor(s, sign, out=s)
    return d


def _undo_zigzag(z: np.ndarray) -> np.ndarray:
    """In place: zigzag -> two's complement difference (same uint dtype)."""
    low = z & 1
    z >>= 1
    np.negative(low, out=low)
    z ^= low
    return z


def _encode_group(x: np.ndarray, level: int) -> bytes:
    """One column group (n, width) -> one zstd frame of its byte planes, time innermost. Each group is
    small enough to stay in cache, so the whole pipeline runs per group, on the pool's threads."""
    n, width = x.shape
    planes = np.ascontiguousarray(_delta_zigzag(x).T).view(np.uint8).reshape(width, n, x.dtype.itemsize)
    comp = zstd.ZstdCompressor(level=level, write_checksum=True)  # one per call: not shareable by threads
    return comp.compress(np.ascontiguousarray(np.moveaxis(planes, -1, 0)))  # (w, width, n)


def encode_block(records: np.ndarray, steps, widths, level: int = LEVEL) -> bytes:
    """records: (n, K) array of 2- or 4-byte items; widths: column group sizes summing to K."""
    n, k = records.shape
    w = records.dtype.itemsize
    if sum(widths) != k or w not in _UINT:
        raise ValueError(f"bad block: {records.shape} {records.dtype}, groups {widths}")
    x = records.view(_UINT[w])
    bounds = np.cumsum([0, *widths])
    frames = list(_POOL.map(lambda g: _encode_group(x[:, bounds[g]:bounds[g + 1]], level), range(len(widths))))
    table = [[int(bounds[g]), int(bounds[g + 1]), len(f)] for g, f in enumerate(frames)]
    header = json.dumps({"n": n, "k": k, "itemsize": w, "steps": [int(s) for s in steps],
                         "frames": table}).encode()
    return b"".join([MAGIC, struct.pack("<II", len(header), zlib.crc32(header)), header, *frames])


def read_header(buf: bytes, file_size: int) -> tuple[dict, list[int]]:
    """Parse and check a block's header; returns (header, byte offset of every frame)."""
    if len(buf) < 16 or buf[:8] != MAGIC:
        raise CorruptBlock("not a duckling block (bad magic)")
    hlen, crc = struct.unpack("<II", buf[8:16])
    raw = buf[16:16 + hlen]
    if len(raw) != hlen or zlib.crc32(raw) != crc:
        raise CorruptBlock("header checksum mismatch")
    try:
        h = json.loads(raw)
        n, k, w, steps, table = int(h["n"]), int(h["k"]), int(h["itemsize"]), h["steps"], h["frames"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptBlock(f"unreadable header ({e})") from None
    offsets, pos, a = [], 16 + hlen, 0
    for lo, hi, length in table:
        if lo != a or hi <= lo or length <= 0:
            raise CorruptBlock("frame table is not a partition of the columns")
        offsets.append(pos)
        pos, a = pos + length, hi
    if a != k or w not in _UINT or len(steps) != n or n < 1 or pos != file_size:
        raise CorruptBlock(f"header does not match the file ({file_size} bytes)")
    return h, offsets


def decode_frame(frame: bytes, n: int, width: int, w: int, at: int | None = None) -> np.ndarray:
    """One frame -> (n, width) values (a transposed view), or only record ``at`` as (width,)."""
    try:
        raw = zstd.ZstdDecompressor().decompress(frame, max_output_size=n * width * w)
    except zstd.ZstdError as e:
        raise CorruptBlock(f"zstd: {e}") from None
    if len(raw) != n * width * w:
        raise CorruptBlock("frame holds the wrong number of bytes")
    planes = np.frombuffer(raw, np.uint8).reshape(w, width, n)
    if at is not None:
        planes = planes[:, :, :at + 1]  # only the differences up to record ``at`` are needed
    z = planes[0].astype(_UINT[w])
    for i in range(1, w):
        z |= planes[i].astype(_UINT[w]) << (8 * i)
    z = _undo_zigzag(z)
    if at is not None:  # the sum wraps modulo 2**(8w), exactly like the difference did
        return z.sum(axis=1, dtype=_UINT[w])
    np.cumsum(z, axis=1, dtype=_UINT[w], out=z)
    return z.T


def decode_groups(buf: bytes, header: dict, offsets: list[int], groups, at: int | None = None) -> dict:
    """Decode the frames ``groups`` (indices into header["frames"]) in parallel: {g: array}."""
    n, w, table = header["n"], header["itemsize"], header["frames"]
    todo = {g: buf[offsets[g]:offsets[g] + table[g][2]] for g in groups}
    futs = {g: _POOL.submit(decode_frame, f, n, table[g][1] - table[g][0], w, at) for g, f in todo.items()}
    return {g: f.result() for g, f in futs.items()}


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
