"""Size figures of an existing recording (no training): what a finished run's recording costs.

    python -P benchmarks/recording_stats.py RUN [--json PATH]

Prints
  snapshot_compression_ratio:  raw bytes of the W snapshots / their bytes on disk (format 2 blocks)
  scalar_compression_ratio:    raw bytes of the per-row scalars (+ hidden mean, lr) / their bytes on disk
  recording_compression_ratio: format-1 bytes of the same steps / bytes on disk (Recording.compression_ratio)
  snapshots_per_gb:            recorded snapshots per 1e9 bytes on disk (every-step runs: steps per GB)
and the snapshot ratio of single 64-step blocks at a few places in the run (later steps move less).
benchmarks/recording_size.py measures the same on a run it trains itself, with speeds; this one reads
any run, e.g. a 10K-step run made on a GPU machine (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import json
from pathlib import Path


def stats(run) -> dict:
    from duckling.recording.reader import Recording

    rec = Recording(run)
    if rec.meta.get("format_version", 1) != 2:
        raise SystemExit(f"{rec.root} is a format-1 recording (raw): nothing is compressed")
    files = [p for p in rec.root.iterdir() if p.is_file()]
    snap_files = [p for p in files if any(p.name.startswith(f"{m}.") for m in rec.matrices)]
    snap_disk = sum(p.stat().st_size for p in snap_files)
    V, d = rec.shape
    item = 2 if rec.dtype == "bf16" else 4  # mixed mode keeps float32 rows too: counted by raw_bytes
    snap_raw = len(rec.steps) * len(rec.matrices) * V * d * item
    n_sc = len(rec.scalar_steps)
    sc_files = [p for p in files if p.name.startswith("scalars.")]
    sc_disk = sum(p.stat().st_size for p in sc_files)
    sc_raw = n_sc * (len(rec.matrices) * 4 * V * 4 + d * 4 + 4)  # FIELDS x rows x f32, hidden mean, lr
    B = rec.meta.get("block_steps", 64)
    blocks = sorted(p for p in snap_files if p.name.startswith(f"{rec.matrices[0]}.") and p.suffix == ".blk")
    per_block = {}
    for c in sorted({0, len(blocks) // 5, len(blocks) // 2, len(blocks) - 2} - {-1}):
        if 0 <= c < len(blocks):
            p = blocks[c]
            per_block[f"steps {c * B}-{c * B + B - 1}"] = round(B * V * d * item / p.stat().st_size, 2)
    out = {
        "run": str(Path(run)), "steps": n_sc, "snapshots": len(rec.steps), "every": rec.every,
        "precision": rec.dtype, "matrices": list(rec.matrices),
        "snapshot_compression_ratio": round(snap_raw / max(snap_disk, 1), 2),
        "scalar_compression_ratio": round(sc_raw / max(sc_disk, 1), 2),
        "recording_compression_ratio": round(rec.compression_ratio, 2),
        "bytes_on_disk": rec.bytes_on_disk, "format1_bytes": rec.raw_bytes,
        "bytes_per_step": round(rec.bytes_on_disk / max(n_sc, 1)),
        "snapshots_per_gb": round(len(rec.steps) / (rec.bytes_on_disk / 1e9)),
        "scalars_share_of_bytes": round(sc_disk / rec.bytes_on_disk, 3),
        "snapshot_ratio_per_block": per_block,
        "close_compaction_s": rec.meta.get("close_compaction_s"),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder (or its recording/ folder)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this file")
    a = ap.parse_args()
    figures = stats(a.run)
    for k, v in figures.items():
        print(f"{k}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
