"""Recording overhead: raw writer throughput, and a training step with vs without the recorder.

    python benchmarks/recording_write.py [--steps 40] [--precision bf16] [--device cpu]

Prints the ms per step of (1) RecordingWriter.append_step alone (full 8192x128 W + scalars),
(2) a plain training step of the Duckling (batch 2 x 512, AdamW, forward/backward/step) and
(3) the same step with the WRecorder hooks; blocks of (2) and (3) alternate so that load from
other processes hits both. The ratio steps/s(recording) / steps/s(plain) is the number to watch.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from duckling.config import DucklingConfig, RecordConfig
from duckling.model import build_model
from duckling.recorder import WRecorder
from duckling.recording import FIELDS, RecordingWriter


def bench_writer(tmp: str, precision: str, n: int) -> float:
    cfg = DucklingConfig()
    V, d = cfg.model.vocab_size, cfg.model.n_embd
    w = RecordingWriter(f"{tmp}/writer", shape=(V, d), precision=precision, chunk_steps=cfg.record.chunk_steps)
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
    ap.add_argument("--precision", default=RecordConfig.precision)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--async-write", action="store_true", help="writer thread even on CPU")
    a = ap.parse_args()
    cfg = DucklingConfig()
    tmp = tempfile.mkdtemp(prefix="duckling-bench-")
    print(f"writer alone ({a.precision}, 8192x128 + scalars): {bench_writer(tmp, a.precision, 100):.2f} ms/step")

    dev = torch.device(a.device)
    model = build_model(cfg.model, seed=0).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    x = torch.randint(0, 6144, (cfg.train.batch_size, cfg.model.n_positions), device=dev)  # (B, T)
    rec = WRecorder(f"{tmp}/run", RecordConfig(precision=a.precision), async_write=a.async_write or None)
    args = SimpleNamespace(learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                           lr_scheduler_type="linear", warmup_steps=0)
    state = SimpleNamespace(global_step=0, max_steps=1000)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    rec.on_train_begin(args, state, control, model=model, optimizer=opt)

    def step(record: bool) -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        if record:
            rec.on_pre_optimizer_step(args, state, control)
        opt.step()
        opt.zero_grad()
        if record:
            state.global_step += 1
            rec.on_step_end(args, state, control)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):  # warm-up
        step(False), step(True)
    times = {False: 0.0, True: 0.0}
    block = 5
    for _ in range(a.steps // block):
        for record in (False, True):
            sync()
            t0 = time.perf_counter()
            for _ in range(block):
                step(record)
            sync()
            times[record] += time.perf_counter() - t0
    rec.sink.drain()
    rec.close()
    n = a.steps // block * block
    plain, recd = times[False] / n * 1e3, times[True] / n * 1e3
    print(f"device {dev}, torch threads {torch.get_num_threads()}, {n} steps each")
    print(f"plain step: {plain:.2f} ms; with recorder ({a.precision}, every step): {recd:.2f} ms")
    print(f"steps/s ratio recording/plain: {plain / recd:.3f}")


if __name__ == "__main__":
    main()
