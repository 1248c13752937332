"""Block layouts of recording format 2 compared on the W blocks of a real run: size, encoding time, a
random snapshot's decode time and a 16-dead-row trajectory's decode time, per layout.

    python -P benchmarks/codec_layouts.py RUN [--blocks 2 15 30]
    python -P benchmarks/codec_layouts.py RUN --scalars [--blocks ...]   # the per-row scalars instead

RUN is a finished run folder recorded in bf16 every step (``benchmarks/recording_size.py --keep``
leaves one). Each chosen block of W is decoded once, then re-encoded in every layout with
``duckling.recording.codec`` (the format's own encoder and decoder, in memory; nothing is written):
  rows G / dead G: rows of W per zstd frame for the live / the dead rows
  segment:         records per time range after the anchor (none: one range over the whole block)
Per layout it prints the ratio (raw bf16 bytes / encoded bytes, all chosen blocks together), the
encoding time per block, the median time to decode one random record of every row (a snapshot) and
the time to decode every record of 16 random dead rows (a trajectory, best of 3), both per block,
all on the codec's thread pool (medians over the blocks). The first layout is the format's first one (docs/recording.md), the last the
current default. Run it under the CPU lock: ``flock /tmp/duckling-cpu.lock python -P ...``.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import json
import time

import numpy as np

LAYOUTS = [  # (rows G, dead rows G, segment)
    (16, 16, None), (16, 1, None), (16, 16, 32), (16, 4, 32), (16, 1, 16), (16, 1, 32)]


def scalar_variants(rec, blocks: list[int]) -> dict:
    """The per-row float32 scalars (4 fields x V per step) of the chosen blocks in other encodings:
    the format's (difference along time, zigzag, byte planes, zstd 3) against no difference, xor with
    the previous step, zstd 9 and 19, and bit planes instead of byte planes: ratio to raw float32."""
    import zstandard as zstd

    from duckling.recording import codec

    st, V = rec._src.scalars, rec.shape[0]

    def planes(a: np.ndarray, bits: bool = False) -> np.ndarray:  # (n, K) uint32 -> time innermost
        t = np.ascontiguousarray(a.T)
        if bits:
            b = np.unpackbits(t.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
            return np.packbits(np.ascontiguousarray(b.T), axis=1, bitorder="little")
        return np.ascontiguousarray(t.view(np.uint8).reshape(a.shape[1], a.shape[0], 4).transpose(2, 0, 1))

    sizes: dict = {}
    raw = 0
    for b in blocks:
        x = st.decode_all(b)[0].view(np.uint32)[:, :4 * V * len(rec.matrices)]
        raw += x.nbytes
        for f in range(x.shape[1] // V):
            g = x[:, f * V:(f + 1) * V]
            diff = codec._zigzag_diffs(g, [(0, len(g))])
            xor = g.copy()
            xor[1:] = g[1:] ^ g[:-1]
            for name, data, level in (("difference (the format)", planes(diff), 3), ("no difference", planes(g), 3),
                                      ("xor", planes(xor), 3), ("difference, zstd 9", planes(diff), 9),
                                      ("difference, zstd 19", planes(diff), 19),
                                      ("difference, bit planes", planes(diff, bits=True), 3)):
                comp = zstd.ZstdCompressor(level=level, write_checksum=True)
                sizes[name] = sizes.get(name, 0) + len(comp.compress(data))
    return {name: round(raw / size, 2) for name, size in sizes.items()}


def main() -> None:
    from duckling.recording import codec
    from duckling.errors import DucklingError
    from duckling.recording.layout import _row_widths
    from duckling.recording.reader import Recording

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 15, 30], help="W block numbers (64 steps each)")
    ap.add_argument("--scalars", action="store_true",
                    help="compare encodings of the per-row float32 scalars of the same blocks instead")
    a = ap.parse_args()
    try:
        rec = Recording(a.run)
    except DucklingError as e:
        raise SystemExit(str(e)) from None
    version = rec.meta["format_version"]
    if version != 2 or rec.dtype != "bf16" or rec.every != 1:
        raise SystemExit(f"{a.run}: needs an every-step bf16 recording in format 2 (this one: format "
                         f"{version}, {rec.dtype}, every {rec.every})")
    stream = rec._src.snaps[("wte", "u16")]
    full = len(rec.steps) // stream.block  # full blocks: 0 .. full - 1
    blocks = [b for b in a.blocks if 0 <= b < full]
    if not blocks:
        raise SystemExit(f"--blocks {a.blocks}: {a.run} has full blocks 0..{full - 1} only")
    if a.scalars:
        ratios = scalar_variants(rec, blocks)
        for name, r in ratios.items():
            print(f"{name}: {r}")
        print(json.dumps({"run": str(a.run), "blocks": [f"steps {b * 64}-{b * 64 + 63}" for b in blocks],
                          "scalar_ratios": ratios}))
        return
    data = [stream.decode_all(b)[0].view(np.uint16) for b in blocks]
    V, d = rec.shape
    rng = np.random.default_rng(0)
    dead_rows = rng.choice(np.arange(rec.n_live, V), 16, replace=False)
    out = []
    for g, g_dead, seg in LAYOUTS:
        ws = _row_widths(slice(0, V), rec.n_live, d, g, g_dead)
        bounds = np.cumsum([0, *ws])
        size, t_enc, t_snap, t_traj = 0, [], [], []
        for x in data:
            t0 = time.perf_counter()
            blob = codec.encode_block(x, range(len(x)), ws, segment=seg)
            t_enc.append(time.perf_counter() - t0)
            size += len(blob)
            h, offsets = codec.read_header(blob, len(blob))
            for k in rng.integers(0, len(x), 5):
                t0 = time.perf_counter()
                got = codec.decode_groups(blob, h, offsets, range(len(ws)), [int(k)])
                t_snap.append(time.perf_counter() - t0)
            assert np.array_equal(np.concatenate([got[i] for i in range(len(ws))], axis=1)[0], x[k])
            groups = sorted({int(np.searchsorted(bounds, r * d, side="right") - 1) for r in dead_rows})
            best = []
            for _ in range(3):  # the best of 3: a few milliseconds, easily disturbed
                t0 = time.perf_counter()
                codec.decode_groups(blob, h, offsets, groups)
                best.append(time.perf_counter() - t0)
            t_traj.append(min(best))
        row = {"rows_G": g, "dead_rows_G": g_dead, "segment": seg or "none",
               "ratio": round(sum(x.nbytes for x in data) / size, 2),
               "encode_ms_per_block": round(float(np.median(t_enc)) * 1e3),
               "snapshot_decode_ms": round(float(np.median(t_snap)) * 1e3, 1),
               "trajectory16_decode_ms": round(float(np.median(t_traj)) * 1e3, 2)}
        out.append(row)
        print("  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    print(json.dumps({"run": str(a.run), "blocks": [f"steps {b * 64}-{b * 64 + 63}" for b in blocks], "layouts": out}))


if __name__ == "__main__":
    main()
