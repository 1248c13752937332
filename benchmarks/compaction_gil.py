"""Does the recording keep up beside a Python-bound training thread? (the GPU case)

    python -P benchmarks/compaction_gil.py [--seconds 10] [--defer] [--procs N]

On CUDA the training thread is bound by Python (kernel launches, the Trainer loop) and holds the GIL
most of the time. The recording therefore runs in a writer process (duckling/recording/process.py):
the training process only copies each step into a slot of a shared ring and sends one message; the
writer process appends the raw records and compacts every 64 steps into a block (background
compaction: in the writer process, or encoded on ``--procs`` worker processes). This script stands in
for that without a GPU: a pure-Python loop (~0.5 ms a step) hands, after each step, a step of a
real-size 8192 x 128 bf16 W (changing a little every step) to the writer process whenever a slot of
the ring is free (alone, as fast as the writer takes them). It prints
  writer_steps_per_s_alone:         the recording's throughput with nothing else running
  writer_steps_per_s_beside_python: the same while the main thread holds the GIL
  python_loop_slowdown:             main-loop speed with the recording / without it
``--defer`` leaves compaction to close, so that only the raw appends run during the loop.
(With the writer as a thread of the training process, the GIL cost it 147 -> 0 steps/s with
background compaction, 245 -> 23 with raw appends only; on an H200 every-step recording ran at
70.5 steps/s against 139.9 without it.)
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import shutil
import tempfile
import time

import numpy as np

V, D = 8192, 128


def python_step() -> int:  # ~0.5 ms of pure-Python work: a stand-in for one launch-bound step
    x = 0
    for i in range(20000):
        x += i * i
    return x


def run(seconds: float, with_python: bool, with_writer: bool, defer: bool = False,
        procs: int = 0) -> tuple[float, float]:
    """(writer steps/s, Python loop steps/s). As in the recorder, the training thread itself hands the
    steps over: after each Python step it copies a step into a free slot of the writer process's
    shared ring (the device-to-host copy's stand-in) and sends one message, or goes on if every slot
    is in flight (alone, it waits for one); the writer process appends and compacts (``procs``
    worker processes encode, else a thread of the writer process)."""
    from duckling.recording.layout import FIELDS, f32_to_bf16_bits
    from duckling.recording.process import WriterProcess, step_fields

    work = tempfile.mkdtemp(prefix="duckling-gil-")
    wp = views = None
    if with_writer:
        wp = WriterProcess(os.path.join(work, "rec"), dict(shape=(V, D), n_live=6144, dtype="bf16", every=1),
                           step_fields(("wte",), (V, D), "bf16", 6144, probe=False), 8, procs=procs, defer=defer)
        views = [wp.ring.arrays(i) for i in range(wp.ring.n)]
    rng = np.random.default_rng(0)
    bits = f32_to_bf16_bits(rng.standard_normal((V, D)).astype(np.float32) * 0.02)
    scalars = np.concatenate([rng.standard_normal(len(FIELDS) * V), np.zeros(D)]).astype(np.float32)
    count = [0]

    def offer(block: bool) -> None:
        wp.check()
        if wp.free or block:
            slot = wp.acquire()
            bits[rng.integers(0, V, 200)] += 1  # a few hundred values move by one bf16 unit per step
            views[slot]["scalars"][:] = scalars
            views[slot]["snap/wte/u16"][:] = bits
            wp.hand(slot, count[0], 1e-4, True, False)
            count[0] += 1

    end = time.perf_counter() + 1.0  # past the start (and, alone, the first block)
    while time.perf_counter() < end:
        if with_writer:
            offer(block=not with_python)
        if with_python:
            python_step()
    c0, t0, n = count[0], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        if with_python:
            python_step()
            n += 1
        if with_writer:
            offer(block=not with_python)
    dt = time.perf_counter() - t0
    writer_rate, loop_rate = (count[0] - c0) / dt, n / dt
    if wp is not None:
        del views
        wp.close("complete")
    shutil.rmtree(work, ignore_errors=True)
    return writer_rate, loop_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--defer", action="store_true",
                    help="no compaction during the run (raw appends only): compaction at close")
    ap.add_argument("--procs", type=int, default=0,
                    help="encoding worker processes of the writer process (record.writer_procs; default 0)")
    a = ap.parse_args()
    alone, _ = run(a.seconds, with_python=False, with_writer=True, defer=a.defer, procs=a.procs)
    beside, loop_with = run(a.seconds, with_python=True, with_writer=True, defer=a.defer, procs=a.procs)
    _, loop_alone = run(a.seconds, with_python=True, with_writer=False)
    print(f"writer_steps_per_s_alone: {alone:.1f}")
    print(f"writer_steps_per_s_beside_python: {beside:.1f}")
    print(f"python_loop_slowdown: {loop_with / loop_alone:.3f}")


if __name__ == "__main__":
    main()
