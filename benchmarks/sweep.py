"""Sweep engine speed: N runs as one Ray sweep against the same runs one after another, the cost of
running a training inside a Ray task, and (on a GPU) how well fractional GPUs pack runs.

    python benchmarks/sweep.py [--quick] [--runs N] [--steps S] [--json PATH]

Measured on the shared 2-core EPYC (4 runs x 200 steps, the default; about 3 minutes):
sweep_vs_sequential_ratio 1.323, sweep_overhead_ratio 0.997, ray_start_s 5.8. --quick (2 runs x 30
steps) is dominated by each Ray worker's start (importing torch and transformers, ~5 s): 0.81 / 0.91.

Every run is the default Duckling (2 layers, batch 2 x 512 tokens, recording W every step in bf16)
on random live ids (speed does not depend on the text), with a different seed per run.

  sweep_vs_sequential_ratio  wall time of the N runs trained one after another in this process at
                             full threads (train.threads = 0: torch's default, every core) / wall
                             time of the same N runs as a sweep with 1 CPU (1 thread) per run.
                             Both include each run's set-up, checkpoints and final save; the sweep's
                             time includes starting its Ray workers (importing torch there) but not
                             ray.init, which is printed separately (ray_start_s). Target >= 1.25.
  sweep_overhead_ratio       steps/s of a one-run sweep (1 task with every CPU) / steps/s of the same
                             train() call in this process; steps/s is train()'s own timer (after
                             warm-up, excluding checkpoints). Target >= 0.95.
  gpu_packing_ratio          (CUDA only) aggregate steps/s of K runs sharing one GPU (gpus = 1/K)
                             / steps/s of one run alone on it, both as sweeps. Target >= 5.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py must not shadow the stdlib

import argparse
import json
import shutil
import tempfile
import time

import numpy as np

N_ROWS = 2048


def _spec(rows, steps: int, seeds: list, cpus: float, gpus: float = 0.0, device: str = "cpu") -> dict:
    base = {"train.max_steps": steps, "train.save_steps": steps, "train.device": device, "train.logging_steps": 10}
    return {"dataset": rows, "base": base, "grid": {"seeds": seeds}, "resources": {"cpus": cpus, "gpus": gpus}}


def _sequential(rows, steps: int, seeds: list, root: str, mapping) -> tuple[float, list]:
    """Wall time of the runs one after another at full threads, and their steps/s."""
    from duckling.config import DucklingConfig
    from duckling.training.train import train

    t0, speeds = time.perf_counter(), []
    for s in seeds:
        cfg = DucklingConfig().override({"train.max_steps": steps, "train.save_steps": steps, "train.seed": s,
                                         "train.device": "cpu", "train.logging_steps": 10, "train.threads": 0})
        r = train(cfg, dataset=rows, run_dir=os.path.join(root, f"seq{s}"), tokenizer=mapping, progress=False)
        speeds.append(r.steps_per_s)
    return time.perf_counter() - t0, speeds


def _sweep(spec: dict, out: str) -> tuple[float, object]:
    from duckling.sweeps.engine import sweep

    t0 = time.perf_counter()
    df = sweep(spec, out, progress=False, max_retries=0)
    wall = time.perf_counter() - t0
    if not (df["status"] == "complete").all():
        raise SystemExit(f"a benchmark run failed: {df['error'].dropna().tolist()[:1]}")
    return wall, df


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (about a minute on 2 cores)")
    ap.add_argument("--runs", type=int, default=None, help="runs in the sweep-vs-sequential comparison")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    ap.add_argument("--gpu-runs", type=int, default=8, help="runs packed on one GPU (CUDA only)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    n_runs = args.runs or (cores if args.quick else 2 * cores)
    steps = args.steps or (30 if args.quick else 200)

    import ray
    import torch

    from duckling.config import N_LIVE, DucklingConfig
    from duckling.sweeps.engine import start_ray

    mapping = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "token_mapping.json")
    mapping = os.path.abspath(mapping) if os.path.isfile(mapping) else None
    T = DucklingConfig().model.n_positions
    rows = np.random.default_rng(0).integers(0, N_LIVE, size=(N_ROWS, T), dtype=np.uint16)  # (N, T)
    root = tempfile.mkdtemp(prefix="duckling-sweep-bench-")
    res: dict = {"cores": cores, "runs": n_runs, "steps": steps}
    try:
        t0 = time.perf_counter()
        start_ray()
        res["ray_start_s"] = time.perf_counter() - t0
        seeds = list(range(n_runs))

        seq_wall, seq_speeds = _sequential(rows, steps, seeds, root, mapping)
        sw_wall, sw_df = _sweep({**_spec(rows, steps, seeds, cpus=1), "mapping": mapping}, os.path.join(root, "sweep"))
        res.update(sequential_s=seq_wall, sweep_s=sw_wall, sweep_vs_sequential_ratio=seq_wall / sw_wall,
                   sequential_steps_per_s=float(np.mean(seq_speeds)),
                   sweep_run_steps_per_s=float(sw_df["steps_per_s"].mean()))

        one_wall, one_df = _sweep({**_spec(rows, steps, [100], cpus=cores), "mapping": mapping},
                                  os.path.join(root, "one"))
        _, direct = _sequential(rows, steps, [100], root, mapping)
        res.update(one_run_sweep_steps_per_s=float(one_df["steps_per_s"][0]), direct_steps_per_s=direct[0],
                   sweep_overhead_ratio=float(one_df["steps_per_s"][0]) / direct[0])

        if torch.cuda.is_available():
            k = args.gpu_runs
            gsteps = steps * 4
            alone_wall, _ = _sweep({**_spec(rows, gsteps, [200], cpus=1, gpus=1, device="cuda"), "mapping": mapping},
                                   os.path.join(root, "gpu1"))
            cpus = max(1, min(4, cores // k))
            packed_wall, _ = _sweep({**_spec(rows, gsteps, list(range(300, 300 + k)), cpus=cpus, gpus=1 / k,
                                             device="cuda"), "mapping": mapping}, os.path.join(root, "gpuk"))
            res.update(gpu_runs=k, gpu_alone_steps_per_s=gsteps / alone_wall,
                       gpu_packed_steps_per_s=k * gsteps / packed_wall,
                       gpu_packing_ratio=(k * gsteps / packed_wall) / (gsteps / alone_wall))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    print(f"{n_runs} runs x {steps} steps (default Duckling, recording every step) on {cores} CPU cores")
    print(f"ray_start_s: {res['ray_start_s']:.1f}   (ray.init of a local instance; excluded below)")
    print(f"sequential: {res['sequential_s']:.1f} s ({res['sequential_steps_per_s']:.2f} steps/s per run, "
          f"full threads); sweep: {res['sweep_s']:.1f} s ({res['sweep_run_steps_per_s']:.2f} steps/s per run, "
          "1 thread each)")
    print(f"sweep_vs_sequential_ratio: {res['sweep_vs_sequential_ratio']:.3f}   (target >= 1.25)")
    print(f"one-run sweep {res['one_run_sweep_steps_per_s']:.2f} steps/s vs train() {res['direct_steps_per_s']:.2f}")
    print(f"sweep_overhead_ratio: {res['sweep_overhead_ratio']:.3f}   (target >= 0.95)")
    if "gpu_packing_ratio" in res:
        print(f"{res['gpu_runs']} runs on one GPU: {res['gpu_packed_steps_per_s']:.1f} steps/s together vs "
              f"{res['gpu_alone_steps_per_s']:.1f} alone")
        print(f"gpu_packing_ratio: {res['gpu_packing_ratio']:.3f}   (target >= 5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
