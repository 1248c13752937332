"""Recording overhead: raw writer throughput, and a training step with vs without the recorder.

    python benchmarks/recording_write.py [--steps 40] [--precision bf16] [--device cpu]

Prints the ms per step of (1) RecordingWriter.append_step alone (full 8192x128 W + scalars, format 2:
raw records, a block compacted every 64 steps as it fills, close() included, in this process),
(2) a plain training step of the Duckling (batch 2 x 512, AdamW, forward/backward/step),
(3) the same step with the WRecorder hooks handing each step to the writer process, which compacts at
close (the CPU default) and (4) as blocks fill (duckling/recording/process.py);
short blocks of each alternate so that load from other processes hits all of them. The ratio
steps/s(recording) / steps/s(plain) is the number to watch (target >= 0.95).
Run it as ``python -P benchmarks/recording_write.py`` (benchmarks/tokenize.py shadows the stdlib).
"""
from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0], and a sibling named like a stdlib module
# (benchmarks/tokenize.py) would shadow it: import from the repo instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from duckling.config import DucklingConfig, RecordConfig
from duckling.training.model import build_model
from duckling.training.recorder import WRecorder
from duckling.recording.reader import FIELDS
from duckling.recording.writer import RecordingWriter


def bench_writer(tmp: str, precision: str, n: int) -> float:
    cfg = DucklingConfig()
    V, d = cfg.model.vocab_size, cfg.model.n_embd
    w = RecordingWriter(f"{tmp}/writer", shape=(V, d), dtype=precision)  # compaction as blocks fill
    W = torch.randn(V, d) * 0.02
    rows = np.zeros((len(FIELDS), V), np.float32)
    t0 = time.perf_counter()
    for s in range(n):
        snap = {"u16": W.bfloat16().view(torch.int16).numpy().view(np.uint16), "f32": W.numpy()}
        w.append_step(s, {"wte": rows}, lr=1e-4, snapshot={"wte": snap})
    w.close()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="measured steps per variant")
    ap.add_argument("--precision", default=RecordConfig.dtype, choices=["bf16", "float32", "mixed"])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    cfg = DucklingConfig()
    tmp = tempfile.mkdtemp(prefix="duckling-bench-")
    print(f"writer alone ({a.precision}, 8192x128 + scalars): {bench_writer(tmp, a.precision, 100):.2f} ms/step")

    dev = torch.device(a.device)
    model = build_model(cfg.model, seed=0).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    x = torch.randint(0, 6144, (cfg.train.batch_size, cfg.model.n_positions), device=dev)  # (B, T)
    args = SimpleNamespace(learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                           lr_scheduler_type="linear", warmup_steps=0)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    variants = {"plain": None}
    for name, defer in (("compact at close", True), ("compact as filled", False)):
        WRecorder.defer = defer  # read by on_train_begin
        rec = WRecorder(f"{tmp}/{name}", RecordConfig(dtype=a.precision))
        state = SimpleNamespace(global_step=0, max_steps=2000)
        rec.on_train_begin(args, state, control, model=model, optimizer=opt)
        variants[name] = (rec, state)

    def step(v, name="") -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        t0 = time.perf_counter()
        if v:
            v[0].on_optimizer_step(args, v[1], control)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if v:
            v[1].global_step += 1
            v[0].on_step_end(args, v[1], control)
        if name:
            hooks[name] += t1 - t0 + time.perf_counter() - t2

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for v in variants.values():  # warm-up
        for _ in range(3):
            step(v)
    times, hooks = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
    block = 4  # alternate short blocks so that load from other processes hits every variant alike
    for _ in range(a.steps // block):
        for name, v in variants.items():
            if v:
                v[0].sink.drain()  # a variant's queued writes and compaction are paid inside its own blocks
            sync()
            t0 = time.perf_counter()
            for _ in range(block):
                step(v, name)
            if v:
                v[0].sink.drain()
            sync()
            times[name] += time.perf_counter() - t0
    n = a.steps // block * block
    print(f"device {dev}, torch threads {torch.get_num_threads()}, {n} steps per variant, {a.precision}")
    plain = times["plain"] / n * 1e3
    for name, v in variants.items():
        ms = times[name] / n * 1e3
        print(f"{name:14s}: {ms:8.2f} ms/step   steps/s ratio vs plain: {plain / ms:.3f}   "
              f"main thread in recorder hooks: {hooks[name] / n * 1e3:.2f} ms/step")
        if v:
            v[0].close()


if __name__ == "__main__":
    main()
