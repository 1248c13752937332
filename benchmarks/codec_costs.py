"""Where recording format 2's codec spends its time, and what compiled alternatives would give, on
the W blocks of a real run, in memory (nothing is written).

    python -P benchmarks/codec_costs.py RUN [--blocks 2 15 30]

RUN is a finished every-step bf16 run in format 2 (``benchmarks/recording_size.py --keep`` leaves one).
Per block, medians over the chosen blocks (``*_ratio_all_blocks``: raw / encoded bytes of all of them
together), in milliseconds, on the codec's thread pool (2 threads on a
2-core machine) unless a line says one thread:
  encode_ms             the format's encoder (``duckling.recording.codec.encode_block``)
  encode_numpy_1t_ms    its numpy part alone, on one thread: difference, zigzag, transposes to byte planes
  encode_zstd_ms        its zstd part alone, on the planes prepared beforehand
  compaction_ms         what the writer does per block besides file I/O: encode, decode it all back,
                        compare bit for bit
  snapshot_ms           decode one random record of every row
  snapshot_zstd_ms      zstd alone on the frames that record needs (anchor + its time range)
  trajectory_ms         decode every record of 16 random dead rows (one block)
  trajectory_zstd_ms    zstd alone on their frames
  trajectory_copy_ms    the same values copied out of the raw block held in memory (format 1 reads
                        them from the page cache: its real figure is in ``recording_size.py``)
  blosc2 ...            a maintained compiled pipeline (python-blosc2: shuffle + bytedelta + zstd 3, or
                        bitshuffle + zstd 3, in C on 2 threads) on each time range minus the anchor,
                        laid out columns x time: ratio of the whole block (format: ``ratio``), encode,
                        and decode of one time range of every column (the bulk of a snapshot, against
                        ``range_zstd_ms``, the format's zstd on the same range); round trips checked
  numpy_...             the format's decoding before its compiled loop (duckling/recording/kernels.py): the same
                        frames through whole-array numpy passes, on one thread, for the trajectory
                        (against ``trajectory_1t_ms``) and for one record of 256 live rows
                        (``snapshot_live256_1t_ms``); results checked equal
Run it under the CPU lock: ``flock /tmp/duckling-cpu.lock python -P benchmarks/codec_costs.py RUN``.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import importlib.util
import json
import time

import numpy as np
import zstandard as zstd

from duckling.recording import codec


def timed(f, repeat: int = 5) -> float:
    """Median wall time of f() in ms."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def planes_of(x: np.ndarray, widths, ranges) -> list[tuple[np.ndarray, int]]:
    """The encoder's numpy part: per unit and time range, the (groups, planes, width, time) array."""
    bounds, out = np.cumsum([0, *widths]), []
    for g0, k, gw in codec._units(widths):
        u = x[:, bounds[g0]:bounds[g0 + k]]
        t8 = np.ascontiguousarray(codec._zigzag_diffs(u, ranges).T).view(np.uint8).reshape(u.shape[1], len(u), 2)
        for a, b in ranges:
            out.append((np.ascontiguousarray(t8[:, a:b].reshape(k, gw, b - a, 2).transpose(0, 3, 1, 2)), k))
    return out


def compress_planes(job) -> None:
    planes, k = job
    size = planes[0].nbytes
    segs = np.stack([np.arange(k, dtype=np.uint64) * size, np.full(k, size, np.uint64)], 1)
    zstd.ZstdCompressor(level=codec.LEVEL, write_checksum=True).multi_compress_to_buffer(
        zstd.BufferWithSegments(planes, segs.tobytes()), threads=0)


def zstd_only(blob, h, offsets, groups, rs: list[int]) -> None:
    """Decompress frames ``rs`` of ``groups`` as the reader batches them, nothing else."""
    widths = (h["frames"][:, 1] - h["frames"][:, 0]).tolist()
    gs = sorted(groups)
    brk = np.array([i == 0 or widths[g] != widths[gs[i - 1]] for i, g in enumerate(gs)])
    per = np.array([widths[g] * h["n"] * 2 for g in gs])  # batches as the reader cuts them
    jobs = [gs[a:b] for a, b in codec._batches(brk, per)]
    codec._map(lambda gs: codec._decompress([(blob, offsets[g]) for g in gs], rs,
                                            [widths[gs[0]] * (b - a) * 2 for a, b in (h["ranges"][r] for r in rs)]),
               jobs)


def blosc2_variants(x: np.ndarray, ranges) -> dict:
    import blosc2

    out = {}
    for name, filters in (("shuffle_bytedelta", ["SHUFFLE", "BYTEDELTA"]), ("bitshuffle", ["BITSHUFFLE"])):
        cp = dict(codec=blosc2.Codec.ZSTD, clevel=3, typesize=2, nthreads=2,
                  filters=[getattr(blosc2.Filter, f) for f in filters], filters_meta=[0] * len(filters))
        anchor = x[0]

        def enc():
            parts = [blosc2.compress2(anchor.tobytes(), **cp)]
            for a, b in ranges[1:]:
                parts.append(blosc2.compress2(np.ascontiguousarray((x[a:b] - anchor).T), **cp))
            return parts
        parts = enc()
        a, b = ranges[1]
        back = np.frombuffer(blosc2.decompress2(parts[1]), np.uint16).reshape(-1, b - a)
        assert np.array_equal(back + anchor[:, None], x[a:b].T), "blosc2 round trip"
        out[name] = {"bytes": sum(map(len, parts)), "encode_ms": timed(enc, 3),
                     "range_decode_ms": timed(lambda: blosc2.decompress2(parts[1]))}
    return out


def numpy_decode(items, h, gw: int, records: np.ndarray) -> np.ndarray:
    """codec._decode_batch as it was before the compiled loop (duckling/recording/kernels.py): the same frames,
    turned into values by whole-array numpy passes (byte planes, zigzag, running sums, transpose)."""
    w, t, ranges = h["itemsize"], np.uint16 if h["itemsize"] == 2 else np.uint32, h["ranges"]

    def values(raw, m, upto):  # (items, frame) -> zigzag-undone differences, (items, gw, upto)
        planes = raw.reshape(len(raw), w, gw, m)[..., :upto]
        z = planes[:, 0].astype(t)
        for i in range(1, w):
            z |= planes[:, i].astype(t) << (8 * i)
        low = z & 1
        z >>= 1
        np.negative(low, out=low)
        z ^= low
        return z
    need = [r for r, (a, b) in enumerate(ranges) if ((records >= a) & (records < b)).any()]
    if ranges[need[-1]][0] >= 1 and 0 not in need:
        need.insert(0, 0)
    sizes = [gw * (ranges[r][1] - ranges[r][0]) * w for r in need]
    raw = codec._decompress(items, need, sizes)
    out = np.empty((len(items), len(records), gw), t)
    base, pos = None, 0
    for r, size in zip(need, sizes):
        a, b = ranges[r]
        frame, pos = raw[:, pos:pos + size], pos + size
        if a == 0 and b == 1 and len(ranges) > 1:
            base = values(frame, 1, 1)[:, :, 0]
        sel = np.nonzero((records >= a) & (records < b))[0]
        if not len(sel):
            continue
        rel = records[sel] - a
        if len(sel) == 1:
            z = values(frame, b - a, int(rel[0]) + 1).sum(axis=2, dtype=t, keepdims=True)
        else:
            z = values(frame, b - a, int(rel[-1]) + 1)
            np.cumsum(z, axis=2, dtype=t, out=z)
            z = z[:, :, rel] if len(rel) != rel[-1] + 1 else z
        if a >= 1:
            z += base[:, :, None]
        out[:, sel[0]:sel[-1] + 1] = z.transpose(0, 2, 1)
    return out


def block_costs(x: np.ndarray, widths, seg: int, dead_groups: list[int], rng) -> dict:
    ranges = codec.time_ranges(len(x), seg)
    blob = codec.encode_block(x, range(len(x)), widths, segment=seg)
    h, offsets = codec.read_header(blob, len(blob))
    bounds = np.cumsum([0, *widths])
    allg = range(len(widths))
    prepared = planes_of(x, widths, ranges)

    def compaction():
        b = codec.encode_block(x, range(len(x)), widths, segment=seg)
        hh, oo = codec.read_header(b, len(b))
        got = codec.decode_groups(b, hh, oo, allg)
        assert all(np.array_equal(got[g], x[:, bounds[g]:bounds[g + 1]]) for g in allg)
    k = int(rng.integers(1, len(x)))
    r_of_k = next(r for r, (a, b) in enumerate(ranges) if a <= k < b)
    cols = np.concatenate([np.arange(bounds[g], bounds[g + 1]) for g in dead_groups])
    row = {"ratio": x.nbytes / len(blob),
           "encode_ms": timed(lambda: codec.encode_block(x, range(len(x)), widths, segment=seg), 3),
           "encode_numpy_1t_ms": timed(lambda: planes_of(x, widths, ranges), 3),
           "encode_zstd_ms": timed(lambda: codec._map(compress_planes, prepared), 3),
           "compaction_ms": timed(compaction, 3),
           "snapshot_ms": timed(lambda: codec.decode_runs(blob, h, offsets, allg, [k])),
           "snapshot_zstd_ms": timed(lambda: zstd_only(blob, h, offsets, allg, sorted({0, r_of_k}))),
           "trajectory_ms": timed(lambda: codec.decode_groups(blob, h, offsets, dead_groups)),
           "trajectory_zstd_ms": timed(lambda: zstd_only(blob, h, offsets, dead_groups, list(range(len(ranges))))),
           "trajectory_copy_ms": timed(lambda: x[:, cols].copy()),
           "trajectory_1t_ms": timed(lambda: codec._decode_batch([(blob, offsets[g]) for g in dead_groups], h,
                                                                 widths[dead_groups[0]], np.arange(len(x)))),
           "range_zstd_ms": timed(lambda: zstd_only(blob, h, offsets, allg, [1]))}
    for name, v in blosc2_variants(x, ranges).items():
        row.update({f"blosc2_{name}_ratio": x.nbytes / v["bytes"], f"blosc2_{name}_encode_ms": v["encode_ms"],
                    f"blosc2_{name}_range_decode_ms": v["range_decode_ms"]})
    items = [(blob, offsets[g]) for g in dead_groups]
    ref = codec._decode_batch(items, h, widths[dead_groups[0]], np.arange(len(x)))
    assert np.array_equal(numpy_decode(items, h, widths[dead_groups[0]], np.arange(len(x))), ref)
    row["numpy_trajectory_1t_ms"] = timed(lambda: numpy_decode(items, h, widths[dead_groups[0]], np.arange(len(x))))
    live = [(blob, offsets[g]) for g in range(16)]  # 16 live groups (256 rows): one record, as a snapshot
    row["snapshot_live256_1t_ms"] = timed(lambda: codec._decode_batch(live, h, widths[0], np.array([k])))
    row["numpy_snapshot_live256_1t_ms"] = timed(lambda: numpy_decode(live, h, widths[0], np.array([k])))
    return row


def main() -> None:
    from duckling.errors import DucklingError
    from duckling.recording.reader import Recording

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 15, 30], help="W block numbers (64 steps each)")
    a = ap.parse_args()
    if importlib.util.find_spec("blosc2") is None:
        raise SystemExit("codec_costs.py needs python-blosc2 for its comparison: pip install blosc2")
    try:
        rec = Recording(a.run)
    except DucklingError as e:
        raise SystemExit(str(e)) from None
    if rec.meta["format_version"] != 2 or rec.dtype != "bf16" or rec.every != 1:
        raise SystemExit(f"{a.run}: needs an every-step bf16 recording in format 2")
    stream = rec._src.snaps[("wte", "u16")]
    full = len(rec.steps) // stream.block
    blocks = [b for b in a.blocks if 0 <= b < full]
    if not blocks or stream.segment is None:
        raise SystemExit(f"--blocks {a.blocks}: {a.run} needs full blocks (it has 0..{full - 1}) in the "
                         f"current layout (time ranges)")
    rng = np.random.default_rng(0)
    d = rec.shape[1]
    dead_rows = rng.choice(np.arange(rec.n_live, rec.shape[0]), 16, replace=False)
    dead_groups = sorted({int(np.searchsorted(stream.bounds, r * d, side="right") - 1) for r in dead_rows})
    rows = [block_costs(stream.decode_all(b)[0].view(np.uint16), stream.widths, stream.segment, dead_groups, rng)
            for b in blocks]
    med = {key: round(float(np.median([r[key] for r in rows])), 2) for key in rows[0]}
    for key in [k for k in rows[0] if k.endswith("ratio")]:  # all chosen blocks together: raw / encoded
        med[key.replace("ratio", "ratio_all_blocks")] = round(len(rows) / sum(1 / r[key] for r in rows), 2)
    for key, v in med.items():
        print(f"{key}: {v}")
    print(json.dumps({"run": str(a.run), "blocks": [f"steps {b * 64}-{b * 64 + 63}" for b in blocks],
                      "threads": codec._POOL._max_workers, "median_per_block": med,
                      "per_block": [{k: round(v, 2) for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()
