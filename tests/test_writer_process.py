"""The recording's writer process (duckling/recording/process.py, issue 20): a kill -9 of the training
process loses no handed step and a resume is byte-identical; a killed or failing writer stops training
with a DucklingError and status failed, never a hang; two recordings at once; the run lock covers the
writer until it exits; no process outlives its run (psutil); the process path writes the same bytes
as the RecordingWriter itself, with or without encoding workers."""
from __future__ import annotations

import errno
import faulthandler
import functools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from duckling.errors import DucklingError
from duckling.files import FolderBusy, folder_lock
from duckling.recording.layout import FIELDS, f32_to_bf16_bits
from duckling.recording.process import WriterProcess, auto_procs, step_fields
from duckling.recording.reader import Recording
from duckling.recording.writer import RecordingWriter

V, D, N_LIVE, B = 64, 8, 48, 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_hang():
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the run instead of blocking CI
    yield
    faulthandler.cancel_dump_traceback_later()


def steps_data(n: int, seed: int = 0):
    """n steps of (rows (4, V), hidden (D,), lr, W (V, D) float32 or None, probe or None)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, D)).astype(np.float32)
    for s in range(n):
        W = W + 1e-3 * rng.standard_normal((V, D)).astype(np.float32)
        yield (s, rng.standard_normal((len(FIELDS), V)).astype(np.float32), np.full(D, s, np.float32),
               0.1 * s, W.copy() if s % 2 == 0 else None, (0.01 * s, 0.001 * s) if s % 3 == 0 else None)


def start(run_dir, procs: int = 0, slots: int = 3, defer: bool = False, setup=None) -> WriterProcess:
    kw = dict(shape=(V, D), n_live=N_LIVE, dtype="bf16", every=2, block_steps=B)
    return WriterProcess(run_dir, kw, step_fields(("wte",), (V, D), "bf16", N_LIVE, probe=True), slots,
                         procs=procs, defer=defer, setup=setup)


def hand(wp: WriterProcess, s, rows, hidden, lr, W, probe) -> None:
    """What the recorder does: fill a free slot, hand it over."""
    slot = wp.acquire()
    a = wp.ring.arrays(slot)
    a["scalars"][:] = np.concatenate([rows.reshape(-1), hidden])
    if W is not None:
        a["snap/wte/u16"][:] = f32_to_bf16_bits(W)
    if probe is not None:
        a["probe"][:] = probe
    del a
    wp.hand(slot, s, lr, W is not None, probe is not None)


def direct(run_dir, n: int) -> None:
    """The same steps through a RecordingWriter in this process (the reference bytes)."""
    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, dtype="bf16", every=2, block_steps=B)
    for s, rows, hidden, lr, W, probe in steps_data(n):
        w.append_step(s, {"wte": rows}, hidden, lr, {"wte": W} if W is not None else None)
        if probe is not None:
            w.append_probe(s, *probe)
    w.close()


def data_files(run_dir) -> dict[str, bytes]:
    root = Path(run_dir) / "recording"
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.suffix in (".blk", ".raw")}


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before():
    """The processes this process already had when the test began (a Ray or a notebook kernel that an
    earlier test in the same pytest worker left behind) are not the test's."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))
    yield


def writer_children() -> list[psutil.Process]:
    """This process's live children started during the test, but multiprocessing's resource tracker."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in _BEFORE and p.status() != psutil.STATUS_ZOMBIE \
                    and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def gone(pids, timeout=60.0) -> list[int]:
    """The pids among ``pids`` still alive after ``timeout`` s."""
    end = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < end:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


# --- the process path writes the same bytes ---------------------------------------------------------
@pytest.mark.parametrize("procs", [0, 1], ids=["in-writer", "worker"])
def test_two_recordings_at_once_same_bytes_as_the_writer_itself(tmp_path, procs):
    """Two writer processes at once (one encoding on a worker process), steps handed alternately
    through 3-slot rings: both recordings equal the in-process RecordingWriter's byte for byte, and
    every child process is gone once they are closed."""
    n = 4 * B + 3  # full blocks, then partial tails (compacted at close)
    direct(tmp_path / "ref", n)
    a, b = start(tmp_path / "a", procs=procs), start(tmp_path / "b", procs=0, defer=True)
    for step in steps_data(n):
        hand(a, *step)
        hand(b, *step)
    kids = [p.pid for p in writer_children()]
    assert len(kids) == 2 + procs  # the encoding worker starts with the first full block
    a.close("complete")
    b.close("complete")
    ref = data_files(tmp_path / "ref")
    assert data_files(tmp_path / "a") == ref and data_files(tmp_path / "b") == ref
    assert all(name.endswith(".blk") for name in ref)
    rec = Recording(tmp_path / "a")
    assert rec.meta["status"] == "complete" and rec.scalar_steps.tolist() == list(range(n))
    assert gone(kids, 30) == []


def test_the_run_lock_covers_the_writer_and_a_second_writer_is_refused(tmp_path):
    wp = start(tmp_path / "run")
    try:
        other = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from duckling.files import folder_lock, FolderBusy
            try:
                with folder_lock({str(tmp_path / 'run')!r}): print("got it")
            except FolderBusy as e: print("busy", e)""")], capture_output=True, text=True, cwd=REPO)
        assert other.stdout.startswith("busy") and str(os.getpid()) in other.stdout
    finally:
        wp.close("complete")
    with folder_lock(tmp_path / "run"):  # released once the writer has exited
        pass


# --- kill -9 of the training process -----------------------------------------------------------------
def gated(flag: str) -> None:
    """(writer setup) appends wait until the file ``flag`` exists: the writer still holds the ring's
    steps when its parent dies."""
    import duckling.recording.writer as W
    real = W.RecordingWriter.append_step

    def wait_then_append(self, *a, **k):
        while not os.path.exists(flag):
            time.sleep(0.01)
        return real(self, *a, **k)
    W.RecordingWriter.append_step = wait_then_append


PARENT = """
import os, signal, sys, functools
sys.path.insert(0, {tests!r})
from test_writer_process import start, hand, steps_data, gated
wp = start({run!r}, slots={n}, setup=functools.partial(gated, {flag!r}))
for step in steps_data({n}):
    hand(wp, *step)
print(wp.proc.pid, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_of_the_training_process_writes_every_handed_step_then_the_writer_exits(tmp_path):
    """Killed with every slot of the ring in flight (mid-block): the writer appends every handed step,
    closes the recording ("interrupted", raw chunks kept), keeps the run locked until then, and exits
    with its own children; a resume appends to the recording and the result equals the uninterrupted
    recording byte for byte."""
    n, run, flag = B + 2, tmp_path / "run", tmp_path / "go"
    code = PARENT.format(tests=str(REPO / "tests"), run=str(run), n=n, flag=str(flag))
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    writer = int(p.stdout.readline())
    kids = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert writer in kids
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(60) == -signal.SIGKILL
    with pytest.raises(FolderBusy):  # the parent is gone, its writer holds the run lock
        with folder_lock(run):
            pass
    flag.touch()  # the writer may go on
    assert gone(kids) == []
    rec = Recording(run)
    assert rec.meta["status"] == "interrupted" and rec.scalar_steps.tolist() == list(range(n))
    assert any(name.endswith(".raw") for name in data_files(run))  # not compacted after the kill
    # a resume continues it: the same bytes as one uninterrupted recording
    w = RecordingWriter(run, shape=(V, D), n_live=N_LIVE, dtype="bf16", every=2, block_steps=B, resume_step=n - 1)
    for s, rows, hidden, lr, W, probe in steps_data(n + 5):
        if s >= n:
            w.append_step(s, {"wte": rows}, hidden, lr, {"wte": W} if W is not None else None)
            if probe is not None:
                w.append_probe(s, *probe)
    w.close()
    direct(tmp_path / "ref", n + 5)
    assert data_files(run) == data_files(tmp_path / "ref")


# --- the writer fails or dies ------------------------------------------------------------------------
def full_disk_when(flag: str) -> None:
    """(writer setup) os.write fails with ENOSPC once the file ``flag`` exists."""
    import duckling.recording.writer as W

    class FailingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            if os.path.exists(flag):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, data)
    W.os = FailingOs()


def test_full_disk_in_the_writer_raises_in_the_training_process(tmp_path):
    flag = tmp_path / "full"
    wp = start(tmp_path / "run", setup=functools.partial(full_disk_when, str(flag)))
    kids = [p.pid for p in writer_children()]
    data = list(steps_data(6))
    for step in data[:3]:
        hand(wp, *step)
    wp.drain()
    flag.touch()
    with pytest.raises(DucklingError, match=r"disk is full.*steps 0..2 are kept.*--resume"):
        for step in data[3:]:
            hand(wp, *step)
        wp.drain()
    with pytest.raises(DucklingError, match="disk is full"):  # sticky
        wp.acquire()
    wp.close("failed")
    flag.unlink()
    rec = Recording(tmp_path / "run")
    assert rec.meta["status"] == "failed" and rec.scalar_steps.tolist() == [0, 1, 2]
    assert gone(kids, 30) == []


def test_killed_writer_is_an_error_not_a_hang(tmp_path):
    wp = start(tmp_path / "run", slots=2)
    data = list(steps_data(40))
    hand(wp, *data[0])
    wp.drain()
    os.kill(wp.proc.pid, signal.SIGKILL)
    with pytest.raises(DucklingError, match=r"writer process \(pid \d+\) died \(killed by signal 9\).*--resume"):
        for step in data[1:]:  # the ring fills: the training side must notice, not wait forever
            hand(wp, *step)
    with pytest.raises(DucklingError, match="died"):
        wp.close("complete")
    with folder_lock(tmp_path / "run"):  # the lock is released
        pass
    rec = Recording(tmp_path / "run")
    assert rec.scalar_steps.tolist() == [0] and rec.meta["status"] == "failed"


def kill_writer_at(step: int):
    from transformers import TrainerCallback

    class KillWriter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                for c in mp.active_children():
                    if c.name == "duckling-writer":
                        os.kill(c.pid, signal.SIGKILL)
    return KillWriter()


@pytest.mark.slow
def test_training_stops_with_status_failed_when_its_writer_is_killed(tmp_path):
    from duckling.training.train import train
    from test_recorder_graph import rows_data, tiny

    run = tmp_path / "run"
    with pytest.raises(DucklingError, match=r"writer process \(pid \d+\) died"):
        train(tiny(max_steps=40), dataset=rows_data(), run_dir=run, tokenizer=False,
              callbacks=[kill_writer_at(2)], progress=False)
    assert json.loads((run / "run_info.json").read_text())["status"] == "failed"
    assert writer_children() == []


def test_auto_procs_leaves_the_training_and_writer_cores():
    assert [auto_procs(c) for c in (1, 2, 3, 4, 8, 16)] == [0, 0, 0, 1, 4, 4]
