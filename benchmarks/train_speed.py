"""Training speed: Duckling's Trainer set-up against a plain loop, a naive Trainer, and with recording.

    python benchmarks/train_speed.py [--quick] [--device cpu|cuda|mps] [--compile] [--json PATH]

Each configuration runs in its own worker process (so allocator or compile state cannot leak
between them) and pauses every ``block`` steps; the parent lets the workers run one block each in
turn, rotating the order every round, so machine noise hits all configurations alike. The first
block (warm-up: first steps, lazy init, compilation) is discarded. A ratio of steps/s is taken
between the fastest blocks (on a shared machine other load only ever adds time); the median and
range of the per-round ratios follow in parentheses.

Configurations (default DucklingConfig: batch 2 x 512, 2 layers, dropout 0.1, precision auto,
compile auto = CUDA graphs on CUDA, eager elsewhere):
  duckling   duckling.training.train.train(cfg, run_dir=None): no recording
  plain      a hand-written loop doing the same math: same model and seed, batch, fused AdamW,
             linear decay, grad clipping, autocast, compile mode, CPU allocator setting, and the
             same graph-friendly model (duckling.training.trainer.graph_friendly)
  recording  duckling.training.train.train(cfg, run_dir=TMP) recording W at every step in bf16
  naive      transformers.Trainer with only the mission's hyperparameters (batch 2, lr 1e-4,
             wd 0.01, seed 42, bf16 as configured) on a datasets.Dataset of python lists with the
             default collator; save_strategy="no" and report_to="none" so no checkpoint or
             tracker lands inside a timed block
  eager / compiled   (--compile) duckling with the other compile setting
"""
from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0], and a sibling named like a stdlib module
# (benchmarks/tokenize.py) would shadow it: import from the repo instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import dataclasses
import json
import platform
import multiprocessing as mp
import statistics
import tempfile
import time

import numpy as np

N_ROWS = 4096  # random live ids; speed does not depend on the text
_CACHE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tiktoken-cache")
if os.path.isdir(_CACHE):  # the token mapping needs GPT-2's BPE files; offline, use the shared copy
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(_CACHE))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _gate_callback(conn, block: int, device: str):
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        """Pause every ``block`` steps: report the block's wall time, wait for the next 'go'."""

        def on_train_begin(self, args, state, control, **kw):
            conn.recv()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % block == 0:
                _sync(device)
                conn.send(time.perf_counter() - self.t0)
                conn.recv()
                self.t0 = time.perf_counter()

    return Gate()


def _data(seq_len: int, n_rows: int = N_ROWS) -> np.ndarray:
    from duckling.config import N_LIVE

    return np.random.default_rng(0).integers(0, N_LIVE, size=(n_rows, seq_len), dtype=np.uint16)  # (N, T)


def _worker(kind: str, conn, cfg_dict: dict, block: int, n_steps: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from duckling.config import DucklingConfig
    from duckling.training.train import pick_compile, pick_device, pick_precision, train

    cfg = DucklingConfig.from_dict(cfg_dict)
    flip = {"eager": False, "compiled": True}  # the other compile setting, for --compile
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_steps=n_steps, logging_steps=10**9, save_steps=10**9,
        compile=flip.get(kind, cfg.train.compile)))
    device = pick_device(cfg.train.device)
    # rows for every step of the run: no configuration restarts its data loop inside the timed blocks
    # (on CUDA, 250-step blocks x 9 rounds x batch 2 went past 4,096 rows, into a second epoch)
    data = _data(cfg.model.n_positions, max(N_ROWS, n_steps * cfg.train.batch_size))
    gate = _gate_callback(conn, block, device)
    if kind in ("duckling", "compiled", "eager"):
        train(cfg, dataset=data, callbacks=[gate], progress=False)
    elif kind == "recording":
        with tempfile.TemporaryDirectory(prefix="duckling-bench-") as tmp:
            train(cfg, dataset=data, run_dir=f"{tmp}/run", callbacks=[gate], progress=False)
    elif kind == "naive":
        naive_trainer(cfg, data, [gate], device).train()
    else:
        _plain(cfg, data, conn, block, device, pick_precision(cfg.train.compute_dtype, device),
               pick_compile(cfg.train.compile, device))
    conn.close()


def naive_trainer(cfg, data, callbacks, device: str):
    import datasets
    from transformers import Trainer, TrainingArguments

    from duckling.training.model import build_model
    from duckling.training.train import pick_precision

    t = cfg.train
    rows = data.tolist()
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="duckling-naive-"), per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, seed=t.seed, max_steps=t.max_steps,
        bf16=pick_precision(t.compute_dtype, device) == "bf16", use_cpu=device == "cpu",
        save_strategy="no", report_to="none", disable_tqdm=True)
    return Trainer(model=build_model(cfg.model, seed=t.seed), args=args, train_dataset=ds, callbacks=callbacks)


def _plain(cfg, data, conn, block: int, device: str, precision: str, compile_mode) -> None:
    """The same math as duckling's Trainer step, written out (compiled as duckling compiles)."""
    import torch

    from duckling.training.model import build_model
    from duckling.training.trainer import fused_adamw_available, graph_friendly, tune_cpu_allocator

    if device == "cpu":
        tune_cpu_allocator()
    t = cfg.train
    torch.manual_seed(t.seed)
    model = graph_friendly(build_model(cfg.model, seed=t.seed)).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]  # the Trainer's grouping: no decay on
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]  # biases and LayerNorm weights
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                            fused=fused_adamw_available(device))
    step_model = model if compile_mode is None else torch.compile(model, mode=None if compile_mode == "default"
                                                                  else compile_mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / t.max_steps))
    gen = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(data), generator=gen)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    conn.recv()
    t0 = time.perf_counter()
    for step in range(1, t.max_steps + 1):
        idx = order[np.arange((step - 1) * t.batch_size, step * t.batch_size) % len(order)].numpy()  # wraps: a new epoch, same order
        x = torch.from_numpy(data[idx].astype(np.int64)).to(device, non_blocking=True)  # (B, T)
        with torch.autocast(device, dtype=dtype, enabled=precision == "bf16"):
            loss = step_model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % block == 0:
            _sync(device)
            conn.send(time.perf_counter() - t0)
            conn.recv()
            t0 = time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter blocks (under a minute on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="also measure duckling with the other compile setting (eager on CUDA, compiled elsewhere)")
    p.add_argument("--block", type=int, default=None, help="steps per block")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the figures, the device name and the versions to this JSON file")
    a = p.parse_args(argv)

    from duckling.config import DucklingConfig
    from duckling.training.train import pick_compile, pick_device, pick_precision

    cfg = DucklingConfig()
    if a.device:
        cfg.train.device = a.device
    device = pick_device(cfg.train.device)
    fast = device != "cpu"
    block = a.block or (6 if a.quick else 25) * (10 if fast else 1)
    rounds = a.rounds or (4 if a.quick else 12)
    compiled = pick_compile(cfg.train.compile, device)
    other = "eager" if compiled else "compiled"
    kinds = ["duckling", "plain", "recording", "naive"] + ([other] if a.compile else [])
    n_steps = block * (rounds + 1)
    print(f"device {device}, precision {pick_precision(cfg.train.compute_dtype, device)}, compile {compiled}, "
          f"{block} steps x {rounds} rounds (+1 warm-up) per configuration: {', '.join(kinds)}", flush=True)

    ctx = mp.get_context("spawn")
    workers = {}
    for k in kinds:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(k, child, cfg.to_dict(), block, n_steps, a.threads))  # not daemonic:
        # the recording worker starts its writer process
        proc.start()
        workers[k] = (proc, parent)
    times = {k: [] for k in kinds}  # seconds per block
    t_start = time.perf_counter()
    for r in range(rounds + 1):
        for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:  # rotate who goes first
            proc, conn = workers[k]
            conn.send("go")
            times[k].append(conn.recv())
    for proc, conn in workers.values():
        conn.send("go")
        proc.join(timeout=120)
        if proc.is_alive():  # not daemonic: do not wait for it at exit
            proc.terminate()
    t = {k: np.array(v[1:]) for k, v in times.items()}  # drop the warm-up round

    def ratio(num: str, den: str) -> dict:
        """steps/s(num) / steps/s(den) from each one's fastest block (other load only ever adds time),
        with the median and range of the per-round ratios."""
        r = t[den] / t[num]
        return {"best": float(t[den].min() / t[num].min()), "median": float(statistics.median(r)),
                "min": float(r.min()), "max": float(r.max())}

    def show(name: str, x: dict) -> None:
        print(f"{name}: {x['best']:.3f} (per-round median {x['median']:.3f}, range {x['min']:.3f}-{x['max']:.3f})")

    speed = {k: {"best_block": block / float(t[k].min()), "median": block / float(statistics.median(t[k]))}
             for k in kinds}
    for k in kinds:
        print(f"  {k:10s} {speed[k]['best_block']:7.2f} steps/s best block, {speed[k]['median']:7.2f} median")
    ratios = {"trainer_vs_plain_loop_ratio": ratio("duckling", "plain"),
              "recording_overhead_ratio": ratio("recording", "duckling"),
              "speedup_vs_naive_trainer": ratio("duckling", "naive")}
    if a.compile:  # steady state only: the compile itself (tens of seconds) is in the discarded warm-up
        ratios["compile_speedup"] = ratio("duckling", "eager") if compiled else ratio("compiled", "duckling")
    for name, x in ratios.items():
        show(name, x)
    print(f"recording_steps_per_s: {speed['recording']['best_block']:.1f} (single run, every-step bf16 recording)")
    print(f"(timed part {time.perf_counter() - t_start:.0f} s)")
    if a.json:
        _write_json(a.json, device, pick_precision(cfg.train.compute_dtype, device), compiled, block, rounds,
                    speed, ratios, a.threads)
    return 0


def _write_json(path: str, device: str, precision: str, compiled, block: int, rounds: int,
                speed: dict, ratios: dict, threads) -> None:
    import subprocess

    import torch
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    out = {"benchmark": "train_speed", "device": device, "device_name": name, "precision": precision,
           "compile": compiled or "off", "block_steps": block, "rounds": rounds,
           "threads_per_worker": threads or "torch default", "steps_per_s": speed, "ratios": ratios,
           "recording_steps_per_s": speed["recording"]["best_block"],
           "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
