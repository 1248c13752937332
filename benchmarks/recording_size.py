"""Recording format v2: size, speed of training with it, and read speed, on a real training run.

    python -P benchmarks/recording_size.py --quick      # 300 steps
    python -P benchmarks/recording_size.py              # 2,000 steps
    python -P benchmarks/recording_size.py --steps 10000
    python -P benchmarks/recording_size.py --steps 2000 --dir DIR --keep      # keeps DIR/run
    python -P benchmarks/recording_size.py --steps 2000 --dir DIR --reuse     # reads only, no training

Two worker processes train the default configuration (CPU: no compile) on the same real text: one
without a recording, one with every-step bf16 recording in format 2. They take turns, one block of
``--block`` steps each (64 = one compaction per block), the first of each round alternating, so
machine noise hits both alike (like benchmarks/train_speed.py). At the end of each recorded block
the worker waits until the writer process has written every step of it (and, compacting as blocks
fill, made their blocks) before it stops the clock, so a block's time includes all the recording
work it started (none of it leaks into the other worker's turn). ``--compaction`` picks when the
writer process compacts (default: the recorder's choice for the device).
The first round is warm-up and is dropped. Then it prints
  snapshot_compression_ratio:  raw bf16 bytes of the W snapshots / their v2 bytes on disk
  recording_compression_ratio: format-1 bytes of the whole recording / format-2 bytes on disk
  compressed_recording_overhead_ratio: steps/s recorded / steps/s plain (total time of the timed
      blocks; the median of the per-round ratios follows)
  snapshot_read_ms:            median time to read one random snapshot with a fresh ``Recording``
                               (nothing decoded yet; files in the page cache)
  trajectory_read_ratio:       time to read 16 dead rows over every step, v2 / v1 (a v1 copy is
                               written from the v2 recording; both warm in the page cache; medians
                               of 11 interleaved reads each, with a fresh ``Recording``)
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
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _worker(kind: str, conn, cfg_dict: dict, block: int, dataset: str, run_dir: str | None,
            defer: bool | None) -> None:
    from transformers import TrainerCallback

    from duckling.config import DucklingConfig
    from duckling.training.recorder import WRecorder
    from duckling.training.train import train

    recorders, begin = [], WRecorder.on_train_begin

    def registered(self, *a, **k):  # so that the gate can wait for the writer process
        recorders.append(self)
        return begin(self, *a, **k)

    WRecorder.on_train_begin = registered
    WRecorder.defer = defer

    class Gate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            conn.recv()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % block == 0:
                for r in recorders:  # every step of the block written (and compacted, as blocks fill)
                    r.sink.drain()
                conn.send(time.perf_counter() - self.t0)
                conn.recv()
                self.t0 = time.perf_counter()

    train(DucklingConfig.from_dict(cfg_dict), dataset=dataset, run_dir=run_dir,
          tokenizer=REPO / "token_mapping.json", callbacks=[Gate()], progress=False)
    conn.close()


def interleaved(cfg, dataset: Path, run_dir: Path, block: int, n: int, defer: bool | None = None) -> dict:
    """Train plain and recorded in alternating blocks; block times in seconds per kind."""
    ctx = mp.get_context("spawn")
    kinds = {"plain": None, "recorded": str(run_dir)}
    workers = {}
    for k, rd in kinds.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(k, child, cfg.to_dict(), block, str(dataset), rd, defer))
        proc.start()
        workers[k] = (proc, parent)
    times = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(n // block):
        for k in (order if r % 2 == 0 else order[::-1]):
            workers[k][1].send("go")
            times[k].append(workers[k][1].recv())
    for proc, conn in workers.values():
        conn.send("go")  # the rest of the steps, then the end of training (the recording is closed)
    for proc, conn in workers.values():
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"a training worker failed (exit code {proc.exitcode})")
    return {k: np.array(v[1:]) for k, v in times.items()}  # round 0 is warm-up


def stats(run) -> dict:
    """benchmarks/recording_stats.py's size figures of a finished run (one definition of them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recording_stats", Path(__file__).with_name("recording_stats.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.stats(run)


def write_v1_copy(rec, out: Path, chunk: int = 256):
    """The same steps in format 1 (bit-identical content), for the read-speed comparison. duckling no
    longer writes format 1 (it reads it: duckling/recording/v1.py, whose docstring lists its files), so
    its raw files are written here with numpy."""
    from duckling.recording.layout import FIELDS, snapshot_parts
    from duckling.recording.reader import Recording

    root = out / "recording"
    root.mkdir(parents=True)
    V, d = rec.shape
    n = len(rec.scalar_steps)
    for m in rec.matrices:
        np.stack([np.asarray(rec.rows(f, matrix=m)) for f in FIELDS], 1).astype(np.float32).tofile(root / f"{m}.rows.f32")
        for c in range(-(-len(rec.steps) // chunk)):  # a chunk file at a time (one decode per block)
            W = rec.trajectory(np.arange(V), rec.steps[c * chunk:(c + 1) * chunk], matrix=m)
            for ext, sl, _ in snapshot_parts(rec.dtype, V, rec.n_live):
                part = np.ascontiguousarray(W[:, sl])
                stored = (part.view(np.uint32) >> 16).astype(np.uint16) if ext == "u16" else part
                stored.tofile(root / f"{m}.{c:05d}.{ext}")
    rec.hidden_mean.astype(np.float32).tofile(root / "hidden_mean.f32")
    rec.lr.astype(np.float32).tofile(root / "lr.f32")
    rec.probe.astype(np.float32).tofile(root / "probe.f32")
    rec.steps.astype(np.int64).tofile(root / "snap_steps.i64")
    rec.scalar_steps[:n].astype(np.int64).tofile(root / "scalar_steps.i64")
    meta = {k: rec.meta[k] for k in ("matrices", "shape", "every", "n_live", "n_dead", "fields", "probe_columns")}
    (root / "meta.json").write_text(json.dumps({**meta, "format_version": 1, "precision": rec.dtype,
                                                "chunk_steps": chunk, "status": "complete"}))
    return Recording(out)


def overhead(t: dict, block: int, n: int, close_s: float) -> dict:
    """The overhead figures from the interleaved block times."""
    per_round = t["plain"] / t["recorded"]
    plain_sps, rec_sps = block * len(t["plain"]) / t["plain"].sum(), block * len(t["recorded"]) / t["recorded"].sum()
    return {
        "compressed_recording_overhead_ratio": round(rec_sps / plain_sps, 3),
        # compaction at close (the writer process's defer) happens outside the timed blocks; spread
        # over the run's steps, it gives the end-to-end figure (as blocks fill, it is inside them)
        "close_compaction_s": close_s,
        "end_to_end_overhead_ratio": round((1 / plain_sps) / (1 / rec_sps + close_s / n), 3),
        "overhead_ratio_per_round_median": round(float(statistics.median(per_round)), 3),
        "overhead_ratio_per_round_range": [round(float(per_round.min()), 3), round(float(per_round.max()), 3)],
        "timed_rounds": len(per_round), "block_steps_timed": block,
        "plain_steps_per_s": round(plain_sps, 2), "recorded_steps_per_s": round(rec_sps, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="300 steps")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--block", type=int, default=64, help="steps per timed block (default: one compaction)")
    ap.add_argument("--data", default="/work/shared/data/tinystories/train",
                    help="text for the dataset (default: the shared TinyStories slice, else 'sample')")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (the recording)")
    ap.add_argument("--compaction", choices=("auto", "background", "close"), default="auto",
                    help="when the writer process compacts: as blocks fill, at close, or auto (the recorder's "
                         "choice for the device: at close on CPU and MPS)")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the size and read figures of the run a --keep left in --dir, without training "
                         "again (the overhead figures are then not measured)")
    a = ap.parse_args()
    n = 300 if a.quick else a.steps
    from duckling.config import DucklingConfig
    from duckling.data.build import build_dataset
    from duckling.recording.reader import Recording

    if a.reuse and not (a.dir and (Path(a.dir) / "run" / "recording" / "meta.json").exists()):
        raise SystemExit(f"--reuse needs --dir with a run that --keep left there ({a.dir or 'no --dir'}: "
                         f"no run/recording)")  # checked before anything is built or written
    work = Path(a.dir or tempfile.mkdtemp(prefix="duckling-recsize-"))
    data = a.data if Path(a.data).exists() else "sample"
    if not (work / "ds").exists():
        build_dataset(data, REPO / "token_mapping.json", work / "ds", progress=False)
    cfg = DucklingConfig().override({"train.max_steps": n, "train.compile": False,
                                     "train.save_steps": n + 1, "record.dtype": "bf16", "record.every": 1})
    for p in ((work / "v1",) if a.reuse else (work / "run", work / "v1")):
        shutil.rmtree(p, ignore_errors=True)
    t_train = time.perf_counter()
    defer = {"auto": None, "background": False, "close": True}[a.compaction]
    t = None if a.reuse else interleaved(cfg, work / "ds", work / "run", a.block, n, defer)
    t_train = time.perf_counter() - t_train
    rec = Recording(work / "run")
    size = stats(work / "run")  # W's ratio overall and per block: benchmarks/recording_stats.py
    rng = np.random.default_rng(0)
    times = []
    for s in rng.choice(rec.steps, size=min(21, len(rec.steps)), replace=False):
        fresh = Recording(work / "run")
        t0 = time.perf_counter()
        fresh.snapshot(int(s))
        times.append(time.perf_counter() - t0)
    t_v1 = time.perf_counter()
    v1 = write_v1_copy(rec, work / "v1")
    t_v1 = time.perf_counter() - t_v1
    ids = rng.choice(rec.dead_ids, size=16, replace=False)

    def traj_time(r) -> float:
        fresh = Recording(r.root)
        t0 = time.perf_counter()
        fresh.trajectory(ids)
        return time.perf_counter() - t0

    assert np.array_equal(v1.trajectory(ids), rec.trajectory(ids))  # same bits either way
    rounds = [(traj_time(v1), traj_time(rec)) for _ in range(11)]  # interleaved: noise hits both alike
    t1, t2 = (float(np.median(x)) for x in zip(*rounds))
    figures = {
        "steps": len(rec.scalar_steps) - 1, "compaction": a.compaction, "snapshot_compression_ratio": size["snapshot_compression_ratio"],
        "recording_compression_ratio": round(v1.bytes_on_disk / rec.bytes_on_disk, 2)}
    if t is not None:
        figures.update(overhead(t, a.block, n, rec.meta.get("close_compaction_s") or 0))
    figures.update({
        "snapshot_read_ms": round(float(np.median(times)) * 1e3, 1),
        "trajectory_read_ratio": round(t2 / t1, 2), "trajectory_v1_ms": round(t1 * 1e3, 1),
        "trajectory_v2_ms": round(t2 * 1e3, 1),
        "v1_bytes": v1.bytes_on_disk, "v2_bytes": rec.bytes_on_disk,
        "v2_bytes_per_step": round(rec.bytes_on_disk / len(rec.scalar_steps)),
        "v2_snapshots_per_gb": round(len(rec.steps) / (rec.bytes_on_disk / 1e9)),
        "v1_snapshots_per_gb": round(len(v1.steps) / (v1.bytes_on_disk / 1e9)),
        "snapshot_ratio_per_block": size["snapshot_ratio_per_block"],
        "seconds": {"training_both": round(t_train), "v1_copy": round(t_v1)},
    })
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(json.dumps(figures))
    if a.dir is None and not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
