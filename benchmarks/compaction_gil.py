"""Does format-2 background compaction keep up beside a Python-bound training thread? (the GPU case)

    python -P benchmarks/compaction_gil.py [--seconds 10]

On CUDA the training thread is bound by Python (kernel launches, the Trainer loop) and holds the GIL
most of the time, while the recording's writer appends raw steps and a background thread compacts
every 64 steps into a block. This script stands in for that without a GPU: the main thread runs a
pure-Python loop while a RecordingWriter (format 2, background compaction, a real-size 8192 x 128 bf16
W changing a little every step) appends steps as fast as it can. It prints
  writer_steps_per_s_alone:       the writer's throughput with nothing else running
  writer_steps_per_s_beside_python: the same while the main thread holds the GIL
  python_loop_slowdown:           main-loop speed with the writer / without it
``--defer`` leaves compaction to close (as on CPU), so that only the raw appends compete.
A writer that cannot keep up beside Python makes the recorder's queue fill and the training thread
wait: on an H200 every-step recording ran at 70.5 steps/s against 139.9 without it.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import shutil
import tempfile
import threading
import time

import numpy as np

V, D = 8192, 128


def python_step() -> int:  # ~0.5 ms of pure-Python work: a stand-in for one launch-bound step
    x = 0
    for i in range(20000):
        x += i * i
    return x


def run(seconds: float, with_python: bool, with_writer: bool, defer: bool = False) -> tuple[float, float]:
    from duckling.recording.reader import FIELDS
    from duckling.recording.writer import RecordingWriter, f32_to_bf16_bits

    work = tempfile.mkdtemp(prefix="duckling-gil-")
    count, stop = [0], threading.Event()

    def writer():
        w = RecordingWriter(os.path.join(work, "rec"), shape=(V, D), n_live=6144, dtype="bf16", every=1, defer=defer)
        rng = np.random.default_rng(0)
        bits = f32_to_bf16_bits(rng.standard_normal((V, D)).astype(np.float32) * 0.02)
        rows = rng.standard_normal((len(FIELDS), V)).astype(np.float32)
        hm = np.zeros(D, np.float32)
        while not stop.is_set():
            bits[rng.integers(0, V, 200)] += 1  # a few hundred values move by one bf16 unit per step
            w.append_step(count[0], {"wte": rows}, hm, 1e-4, {"wte": {"u16": bits}})
            count[0] += 1
        w.close()

    th = threading.Thread(target=writer, daemon=True) if with_writer else None
    if th:
        th.start()
    time.sleep(1.0)  # past the first block
    c0, t0, n = count[0], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        if with_python:
            python_step()
            n += 1
        else:
            time.sleep(0.05)
    dt = time.perf_counter() - t0
    writer_rate, loop_rate = (count[0] - c0) / dt, n / dt
    stop.set()
    if th:
        th.join(timeout=600)
    shutil.rmtree(work, ignore_errors=True)
    return writer_rate, loop_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--defer", action="store_true",
                    help="no compaction during the run (raw appends only, as on CPU): the writer thread alone")
    a = ap.parse_args()
    alone, _ = run(a.seconds, with_python=False, with_writer=True, defer=a.defer)
    beside, loop_with = run(a.seconds, with_python=True, with_writer=True, defer=a.defer)
    _, loop_alone = run(a.seconds, with_python=True, with_writer=False)
    print(f"writer_steps_per_s_alone: {alone:.1f}")
    print(f"writer_steps_per_s_beside_python: {beside:.1f}")
    print(f"python_loop_slowdown: {loop_with / loop_alone:.3f}")


if __name__ == "__main__":
    main()
