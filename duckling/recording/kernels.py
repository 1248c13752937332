"""The decoder's loop over values, compiled with numba (``codec.py`` does the rest with numpy and
zstandard). Turning a frame's bytes back into values (byte planes -> integers, undo the zigzag,
running sums along time, transposed to records x columns) took ~10 whole-array numpy passes; one
compiled pass that stays in the CPU cache is ~10x faster, which leaves decoding bound by zstd
(``benchmarks/codec_costs.py``). The format's bytes are unchanged; round trips against the numpy
encoder are tested for every layout (tests/test_codec.py).

Values are 2- or 4-byte unsigned integers (bf16 or float32 bits); every sum is stored in an array of
that width, which is exactly the arithmetic modulo 2**16 or 2**32 that the differences were taken in.
Compiled on first use and cached on disk (numba ``cache=True``: next to this file, or in the user's
cache folder where that is read-only); ``nogil``: the codec's threads run it in parallel.
"""
from __future__ import annotations

import numba
import numpy as np


def _compiled(f):
    """f compiled by numba, its machine code cached on disk; where no cache folder is writable (a
    read-only install and home), compiled once per process instead."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(f)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(f)


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


decode_range = _compiled(_decode_range)
