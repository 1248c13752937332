"""Recording format v2: size, speed of training with it, and read speed, on a real training run.

    python -P benchmarks/recording_size.py --quick      # 300 steps (~2 x 40 s of training)
    python -P benchmarks/recording_size.py              # 2,000 steps (~2 x 4-5 min on a 2-core CPU)
    python -P benchmarks/recording_size.py --steps 10000

Trains the default configuration (CPU: no compile) twice for the same number of steps: once without
a recording (in memory), once with every-step bf16 recording in format 2. Then prints
  snapshot_compression_ratio:  raw bf16 bytes of the W snapshots / their v2 bytes on disk
  recording_compression_ratio: format-1 bytes of the whole recording / format-2 bytes
  compressed_recording_overhead_ratio: steps/s recorded / steps/s plain (steps 10..N of each run)
  snapshot_read_ms:            median time to read one random snapshot (a fresh reader each time)
  trajectory_read_ratio:       time to read 16 dead rows over every step, v2 / v1 (a v1 copy is
                               written from the v2 recording; both warm in the page cache)
and the snapshot ratio per 64-step block at a few places. Run it under the CPU lock:
``flock /tmp/duckling-cpu.lock python -P benchmarks/recording_size.py``.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from duckling.config import DucklingConfig
from duckling.recording import FIELDS, Recording
from duckling.writer import RecordingWriter

REPO = Path(__file__).resolve().parents[1]


class StepClock(TrainerCallback):
    def __init__(self):
        self.t = []

    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())


def steps_per_s(clock: StepClock, skip: int = 10) -> float:
    t = clock.t[skip:]
    return (len(t) - 1) / (t[-1] - t[0])


def write_v1_copy(rec: Recording, out: Path) -> Recording:
    """The same steps in format 1 (bit-identical content), for the read-speed comparison."""
    V, d = rec.shape
    w = RecordingWriter(out, shape=(V, d), n_live=rec.n_live, precision=rec.precision, every=rec.every,
                        chunk_steps=256, matrices=tuple(rec.matrices), format_version=1)
    rows = {m: np.stack([np.asarray(rec.rows(f, matrix=m)) for f in FIELDS], 1) for m in rec.matrices}
    hm, lr, snaps = rec.hidden_mean, rec.lr, set(int(s) for s in rec.steps)
    for i, s in enumerate(rec.scalar_steps):
        snap = {m: rec.snapshot(int(s), m) for m in rec.matrices} if int(s) in snaps else None
        w.append_step(int(s), {m: rows[m][i] for m in rec.matrices}, hm[i], float(lr[i]), snap)
    for s, mass, top in rec.probe:
        w.append_probe(int(s), mass, top)
    w.close()
    return Recording(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="300 steps")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--data", default="/work/shared/data/tinystories/train",
                    help="text for the dataset (default: the shared TinyStories slice, else 'sample')")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    a = ap.parse_args()
    n = 300 if a.quick else a.steps
    from duckling.data import build_dataset
    from duckling.train import train

    work = Path(a.dir or tempfile.mkdtemp(prefix="duckling-recsize-"))
    data = a.data if Path(a.data).exists() else "sample"
    build_dataset(data, REPO / "token_mapping.json", work / "ds", progress=False)
    cfg = DucklingConfig().override({"train.max_steps": n, "train.compile": False,
                                     "train.save_steps": n + 1, "record.dtype": "bf16", "record.every": 1})
    clocks = {}
    for name, run_dir in (("plain", None), ("recorded", work / "run")):
        clocks[name] = StepClock()
        if run_dir is not None and run_dir.exists():
            shutil.rmtree(run_dir)
        train(cfg, dataset=work / "ds", run_dir=run_dir, tokenizer=REPO / "token_mapping.json",
              callbacks=[clocks[name]], progress=False)
    rec = Recording(work / "run")
    V, d = rec.shape
    blk = [p for p in rec.root.iterdir() if p.name.startswith("wte.u16.")]
    snap_raw = len(rec.steps) * V * d * 2
    snap_disk = sum(p.stat().st_size for p in blk)
    per_block = {}
    for c in sorted({0, len(blk) // 2, len(blk) - 2} - {-1}):
        p = rec.root / f"wte.u16.{c:05d}.blk"
        if p.exists() and c >= 0:
            per_block[f"steps {c * 64}-{c * 64 + 63}"] = round(64 * V * d * 2 / p.stat().st_size, 2)
    rng = np.random.default_rng(0)
    times = []
    for s in rng.choice(rec.steps, size=min(21, len(rec.steps)), replace=False):
        fresh = Recording(work / "run")
        t0 = time.perf_counter()
        fresh.snapshot(int(s))
        times.append(time.perf_counter() - t0)
    v1 = write_v1_copy(rec, work / "v1")
    ids = rng.choice(rec.dead_ids, size=16, replace=False)

    def traj_time(r: Recording) -> float:
        best = []
        for _ in range(3):
            fresh = Recording(r.root)
            t0 = time.perf_counter()
            fresh.trajectory(ids)
            best.append(time.perf_counter() - t0)
        return float(np.median(best))

    assert np.array_equal(v1.trajectory(ids), rec.trajectory(ids))  # same bits either way
    t1, t2 = traj_time(v1), traj_time(rec)
    figures = {
        "steps": n, "snapshot_compression_ratio": round(snap_raw / snap_disk, 2),
        "recording_compression_ratio": round(v1.bytes_on_disk / rec.bytes_on_disk, 2),
        "compressed_recording_overhead_ratio": round(steps_per_s(clocks["recorded"]) / steps_per_s(clocks["plain"]), 3),
        "plain_steps_per_s": round(steps_per_s(clocks["plain"]), 2),
        "recorded_steps_per_s": round(steps_per_s(clocks["recorded"]), 2),
        "snapshot_read_ms": round(float(np.median(times)) * 1e3, 1),
        "trajectory_read_ratio": round(t2 / t1, 2), "trajectory_v1_ms": round(t1 * 1e3, 1),
        "trajectory_v2_ms": round(t2 * 1e3, 1),
        "v1_bytes": v1.bytes_on_disk, "v2_bytes": rec.bytes_on_disk,
        "v2_snapshots_per_gb": round(len(rec.steps) / (rec.bytes_on_disk / 1e9)),
        "snapshot_ratio_per_block": per_block,
    }
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(json.dumps(figures))
    if a.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
