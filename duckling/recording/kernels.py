"""The decoder's loop over values: turning a frame's bytes back into values (byte planes ->
integers, undo the zigzag, running sums along time, transposed to records x columns). ``codec.py``
does the rest with numpy and zstandard.

Two implementations of one function, ``decode_range``, with bit-identical results (tested on real
blocks, tests/test_extras.py):
- with numba installed (``pip install 'duckling[fast]'``), one compiled pass that stays in the CPU
  cache, ~3x faster than numpy on a batch of dead rows (4.1 ms instead of 11.3 for 256 one-row
  groups), which leaves decoding bound by zstd (``benchmarks/codec_costs.py``). Compiled on first use
  and cached on disk (numba ``cache=True``: next to this file, or in the user's cache folder where
  that is read-only; with neither writable, compiled once per process); ``nogil``: the codec's
  threads run it in parallel.
- without numba, ``decode_range_numpy``: the same maths as ~10 whole-array numpy passes, so a
  recording is readable with numpy and zstandard alone.

Values are 2- or 4-byte unsigned integers (bf16 or float32 bits); every sum is stored in an array of
that width, which is exactly the arithmetic modulo 2**16 or 2**32 that the differences were taken in.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the [fast] extra is not installed: the numpy decode below
    numba = None


def decode_range_numpy(raw, w, gw, m, rel, start, out, o0) -> None:
    """``decode_range`` in numpy passes over whole arrays (the same arguments, the same bits)."""
    t = out.dtype
    upto = int(rel[-1]) + 1
    planes = raw.reshape(len(raw), w, gw, m)[..., :upto]  # (items, byte plane, column, time)
    z = planes[:, 0].astype(t)
    for i in range(1, w):  # little-endian: plane i is byte i
        z |= planes[:, i].astype(t) << t.type(8 * i)
    low = z & t.type(1)  # undo the zigzag: (z >> 1) ^ -(z & 1), in the same unsigned width
    z >>= t.type(1)
    np.negative(low, out=low)
    z ^= low
    if len(rel) == 1:  # one record: the sum of its differences (sums wrap like the running sums)
        z = z.sum(axis=2, dtype=t, keepdims=True)
    else:
        np.cumsum(z, axis=2, dtype=t, out=z)
        if len(rel) != upto:  # not every record of the range: keep the asked ones
            z = z[:, :, rel]
    z += start[:, :, None].astype(t, copy=False)
    out[:, o0:o0 + len(rel)] = z.transpose(0, 2, 1)


def _decode_range(raw, w, gw, m, rel, start, out, o0):  # pragma: no cover - compiled
    """One time range of gw-column groups, m records long, back to values.

    raw: (items, w * gw * m) uint8, per item the range's frame (byte planes, column, time), with w =
    out's itemsize (2 or 4); rel: sorted record offsets within the range to produce; start: (items,
    gw) the value each running sum starts from (record 0 for a range starting at 1 or later, else
    zeros). Writes out[i, o0 + j, c] = start[i, c] + the first rel[j] + 1 differences of column c."""
    upto = rel[len(rel) - 1] + 1
    plane = gw * m
    d = np.empty(plane, out.dtype)
    acc = np.empty(gw, out.dtype)
    for i in range(raw.shape[0]):
        r = raw[i]
        # undo the zigzag of the whole frame in one flat loop (which the compiler vectorizes)
        if w == 2:
            for j in range(plane):
                h = np.uint16(r[j]) | (np.uint16(r[j + plane]) << np.uint16(8))
                d[j] = (h >> np.uint16(1)) ^ (np.uint16(0) - (h & np.uint16(1)))
        else:
            for j in range(plane):
                z = np.uint32(r[j]) | (np.uint32(r[j + plane]) << np.uint32(8)) \
                    | (np.uint32(r[j + 2 * plane]) << np.uint32(16)) | (np.uint32(r[j + 3 * plane]) << np.uint32(24))
                d[j] = (z >> np.uint32(1)) ^ (np.uint32(0) - (z & np.uint32(1)))
        for c in range(gw):
            acc[c] = start[i, c]
        k = 0
        for t in range(upto):  # running sums, every column at each record (contiguous writes)
            for c in range(gw):
                acc[c] += d[c * m + t]
            if t == rel[k]:
                for c in range(gw):
                    out[i, o0 + k, c] = acc[c]
                k += 1


def _compiled(f):
    """f compiled by numba, its machine code cached on disk; where no cache folder is writable (a
    read-only install and home), compiled once per process instead."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(f)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(f)


decode_range_numba = _compiled(_decode_range) if numba is not None else None
COMPILED = decode_range_numba is not None  # False: the numpy decode (numba is not installed)
decode_range = decode_range_numba if COMPILED else decode_range_numpy  # what codec.py calls
