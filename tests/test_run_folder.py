"""A run folder's life (issue 9): kill -9 mid-append, two writers, a full disk, Ctrl-C, a refused run.

Every run is a 1-layer, 64-token Duckling trained in fp32 (bit-exact resumes) for a few steps.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faults import full_disk_after
import torch
from transformers import TrainerCallback

from corpus import make_stories, write_corpus
from duckling.cli import main
from duckling.config import N_LIVE, DucklingConfig
from duckling.errors import DucklingError, RunInterrupted
from duckling.recording.reader import Recording
from duckling.training.run_folder import LOCK
from duckling.training.recorder import WRecorder
from duckling.training.train import train

T = 64
REPO = Path(__file__).resolve().parents[1]
TINY = {"model.n_layer": 1, "model.n_positions": T, "train.compute_dtype": "fp32", "train.compile": False,
        "train.logging_steps": 3, "train.save_steps": 3, "train.max_steps": 6, "record.probe_every": 2}
# --set wins over shorthand flags whatever the order: the tests give max_steps and save_steps as flags
CLI_TINY = [a for k, v in TINY.items() if k not in ("train.max_steps", "train.save_steps")
            for a in ("--set", f"{k}={str(v).lower()}")]


def tiny(**kw) -> DucklingConfig:
    return DucklingConfig().override({**TINY, **kw})


def live_rows(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_LIVE, size=(n, T), dtype=np.uint16)  # (n, T)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok):
    """A built 64-token dataset folder and the mapping beside it (for the CLI and subprocesses)."""
    from duckling.data.build import build_dataset

    root = tmp_path_factory.mktemp("run_folder")
    mapping = tok.save(root / "token_mapping.json")
    build_dataset(write_corpus(root / "c.txt", make_stories(120)), tok, root / "ds", seq_len=T, progress=False,
                  num_proc=1)
    return root / "ds", mapping


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _wait(pred, proc, timeout=240.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_tmp(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*.tmp*")]


# ---------------------------------------------------------------- (1) kill -9 mid-append
@pytest.mark.slow
def test_sigkill_mid_append_keeps_a_readable_contiguous_recording(dataset, tok, tmp_path):
    ds, mapping = dataset
    run = tmp_path / "run"
    steps = 400
    cmd = [sys.executable, "-m", "duckling.cli", "train", "--run", str(run), "--dataset", str(ds), "--mapping",
           str(mapping), "--max-steps", str(steps), "--save-steps", "3", *CLI_TINY]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait(lambda: (run / "checkpoint-6" / "trainer_state.json").is_file(), proc, what="checkpoint-6")
        # ...and a little more: the recorder appends after every step, so the kill lands mid-run, mostly mid-append
        size = lambda: sum(p.stat().st_size for p in (run / "recording").iterdir() if p.is_file())  # noqa: E731
        grown = size() + 3 * 131072
        _wait(lambda: size() > grown, proc, what="more steps")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rec = Recording(run)  # readable after kill -9
    n = len(rec.scalar_steps)
    assert n >= 7 and rec.scalar_steps.tolist() == list(range(n))  # contiguous from step 0
    assert rec.steps.tolist() == list(range(len(rec.steps))) and len(rec.steps) >= 7
    assert rec.snapshot(int(rec.steps[-1])).shape == (tok.vocab_size, 128)
    assert n < steps + 1, "the run finished before it was killed"
    # --resume continues from the last checkpoint with no gap (the recording is cut back to it first)
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "running"  # what a kill -9 leaves: nobody could write anything else
    cfg = tiny(**{"train.max_steps": steps, "data.dataset_dir": str(ds), "data.mapping_path": str(mapping)})
    ckpt_step = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    seen = []

    class First(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(state.global_step)
            if len(seen) == 3:  # enough to see where it continued; stop cleanly
                control.should_training_stop = True

    res = train(cfg, run_dir=run, resume=True, tokenizer=mapping,
                callbacks=[First()], progress=False)
    assert seen[0] == ckpt_step + 1
    rec = Recording(run)
    assert rec.scalar_steps.tolist() == list(range(res.global_step + 1))
    assert rec.steps.tolist() == list(range(res.global_step + 1))


# ---------------------------------------------------------------- (2) one writer per run folder
@pytest.mark.slow
def test_second_writer_is_refused_and_named(dataset, tmp_path, capsys):
    ds, mapping = dataset
    run = tmp_path / "run"
    argv = ["train", "--run", str(run), "--dataset", str(ds), "--mapping", str(mapping), "--no-record",
            "--max-steps", "100000", *CLI_TINY, "--save-steps", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "duckling.cli", *argv], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = run / LOCK
        _wait(lambda: lock.is_file() and "process" in lock.read_text() and (run / "run_info.json").is_file(),
              proc, what="the run's lock")
        before = _files(run)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"process {proc.pid}" in err and "one writer" in err and "Traceback" not in err
        assert main(["train", "--run", str(run), "--resume", "--dataset", str(ds), "--mapping", str(mapping)]) == 2
        err = capsys.readouterr().err
        assert f"process {proc.pid}" in err and "Traceback" not in err
        assert _files(run) == before  # neither refusal touched the folder
    finally:
        proc.kill()
        proc.wait()
    # the killed holder's lock never blocks: the folder is free (nothing to resume without a checkpoint)
    capsys.readouterr()
    assert main(["train", "--run", str(run), "--resume", "--dataset", str(ds), "--mapping", str(mapping),
                 "--no-record", "--max-steps", "100000", *CLI_TINY, "--save-steps", "100000"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "being written" not in err


# ---------------------------------------------------------------- (3) a full disk, injected
@pytest.mark.parametrize("fail_after,save_steps", [(4, 3), (2, 100)], ids=["with-checkpoint", "no-checkpoint"])
def test_full_disk_leaves_failed_status_no_tmp_and_fitting_advice(fail_after, save_steps, tok, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(WRecorder, "writer_setup", functools.partial(full_disk_after, fail_after))
    run = tmp_path / "run"
    cfg = tiny(**{"train.save_steps": save_steps})
    with pytest.raises(DucklingError) as e:
        train(cfg, dataset=live_rows(), run_dir=run, tokenizer=tok, progress=False)
    msg = str(e.value)
    assert "disk is full" in msg and str(run.resolve()) in msg
    assert json.loads((run / "run_info.json").read_text())["status"] == "failed"
    assert json.loads((run / "recording" / "meta.json").read_text())["status"] == "failed"
    assert _no_tmp(run) == []
    monkeypatch.setattr(WRecorder, "writer_setup", None)
    rec = Recording(run)
    assert rec.scalar_steps.tolist() == list(range(fail_after + 1))  # every completed step is kept
    if save_steps < fail_after:
        assert "checkpoint-3" in msg and "--resume" in msg
        # the advice works: once the disk has room, --resume finishes the run
        res = train(cfg, dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
        assert res.global_step == 6 and Recording(run).scalar_steps.tolist() == list(range(7))
        assert json.loads((run / "run_info.json").read_text())["status"] == "complete"
    else:
        assert "no checkpoint" in msg and "new folder" in msg and "--resume" not in msg.replace("resume=True", "")


def test_full_disk_before_the_first_step_leaves_no_folder(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(WRecorder, "writer_setup", functools.partial(full_disk_after, -1))  # step 0 cannot be written
    run = tmp_path / "run"
    with pytest.raises(DucklingError, match="disk is full") as e:
        train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, progress=False)
    assert not run.exists() and "same command" in str(e.value)
    monkeypatch.setattr(WRecorder, "writer_setup", None)
    assert train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, progress=False).global_step == 6


# ---------------------------------------------------------------- (4) Ctrl-C
class CtrlC(TrainerCallback):
    """SIGINT to ourselves while step ``k`` runs (as a user's Ctrl-C would arrive)."""

    def __init__(self, k: int):
        self.k = k

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.k - 1:
            os.kill(os.getpid(), signal.SIGINT)


class Steps(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(state.global_step)


def test_ctrl_c_checkpoints_at_the_step_and_resume_is_byte_identical(tok, tmp_path):
    k = 4
    ref = tmp_path / "ref"
    train(tiny(), dataset=live_rows(), run_dir=ref, tokenizer=tok, progress=False)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the shell started us in the background
    with pytest.raises(RunInterrupted, match=f"checkpoint-{k}.*--resume"):
        train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, callbacks=[CtrlC(k)], progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert (run / f"checkpoint-{k}" / "trainer_state.json").is_file()
    assert json.loads((run / "run_info.json").read_text())["status"] == "interrupted"
    assert Recording(run).scalar_steps.tolist() == list(range(k + 1))
    steps = Steps()
    res = train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, callbacks=[steps],
                progress=False)
    assert steps.seen == list(range(k + 1, 7)) and res.global_step == 6  # exactly from k + 1, nothing redone
    a, b = _files(ref / "recording"), _files(run / "recording")
    assert a.keys() == b.keys()
    for name in a:
        if name != "meta.json":
            assert a[name] == b[name], name
    ma, mb = json.loads(a["meta.json"]), json.loads(b["meta.json"])
    assert ma == mb, {k_: (ma.get(k_), mb.get(k_)) for k_ in set(ma) | set(mb) if ma.get(k_) != mb.get(k_)}
    assert (ref / "final" / "model.safetensors").read_bytes() == (run / "final" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- (5) a refused run, then its retry
def test_budget_refusal_leaves_no_folder_and_its_retry_works(dataset, tmp_path, capsys, monkeypatch):
    ds, mapping = dataset
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--run", "runs/a", "--dataset", str(ds), "--mapping", str(mapping), "--max-steps", "30",
            *CLI_TINY, "--save-steps", "100", "--budget-gb", "0.08"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # not even runs/
    m = re.search(r"--record-every (\d+)", err)
    assert m and re.search(r"\d+ bytes", err), err
    assert main([*argv, "--record-every", m.group(1)]) == 0  # the retry the message suggests, as written
    rec = Recording(tmp_path / "runs" / "a")
    assert rec.scalar_steps.tolist() == list(range(31)) and rec.every == int(m.group(1))
    assert rec.bytes_on_disk < 0.08e9


def test_last_checkpoint_is_the_newest_complete_one_by_step(tmp_path):
    from duckling.files import checkpoints
    from duckling.training.run_folder import last_checkpoint

    assert last_checkpoint(tmp_path) is None and checkpoints(tmp_path) == []
    for n, done in ((9, True), (10, True), (11, False)):  # 10 after 9 (not by name); 11 is half-written
        (tmp_path / f"checkpoint-{n}").mkdir()
        if done:
            (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_run_lock_removes_the_folder_it_made_only_when_the_run_left_nothing(tmp_path):
    from duckling.files import FolderBusy, folder_lock
    from duckling.training.run_folder import run_lock

    with run_lock(tmp_path / "a", create=True):
        assert (tmp_path / "a" / LOCK).is_file()
    assert not (tmp_path / "a").exists()  # refused before any file: no trace
    with run_lock(tmp_path / "b", create=True):
        (tmp_path / "b" / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [LOCK, "config.json"]
    # a folder someone else holds is refused with the holder named, and left as it is
    code = ("import sys, time; from duckling.files import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"process {holder.pid}"):
            with run_lock(tmp_path / "b", create=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "b" / "config.json").is_file()
    with folder_lock(tmp_path / "b"):  # a killed holder's lock never blocks
        pass


# ---------------------------------------------------------------- (6) a resume is the same run (issue 25)
def _state(run: Path) -> dict:
    """Every file of the run folder but the lock, with its bytes: a refused resume changes nothing."""
    return {k: v for k, v in _files(run).items() if k != LOCK}


def _strict_json(path: Path):
    def no_constant(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=no_constant)


def test_a_resume_without_threads_uses_the_runs_thread_count(tok, tmp_path):
    """--threads unset: a resume computes as the run did, whatever thread count this process holds now
    (an earlier call in the same process may have changed it); only a different --threads is refused."""
    run, held = tmp_path / "run", torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RunInterrupted):
            train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, callbacks=[CtrlC(2)], progress=False)
        assert _strict_json(run / "run_info.json")["threads"] == 2
        torch.set_num_threads(1)
        train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
        assert _strict_json(run / "run_info.json")["status"] == "complete" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(held)


def test_a_resume_that_would_not_be_the_same_run_is_refused_and_changes_nothing(tok, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, callbacks=[CtrlC(4)], progress=False)
    before = _state(run)
    info = _strict_json(run / "run_info.json")
    assert info["dataset_fingerprint"]["rows"] == 32 and info["eval_dataset_fingerprint"] is None

    def refused(match: str, cfg=None, rows=None, **kw):
        with pytest.raises(DucklingError, match=match):
            train(cfg or tiny(), dataset=live_rows() if rows is None else rows, run_dir=run, tokenizer=tok,
                  resume=True, progress=False, **kw)
        assert _state(run) == before

    # the training rows changed (a dataset rebuilt from other text), an eval set appears
    refused(r"training dataset is not the one the run started on", rows=live_rows(seed=1))
    refused(r"with an evaluation dataset: the run was started without one",
            eval_dataset=live_rows(4, seed=2))
    # another CPU thread count: measured to change the weights (see the module's note in training/resume.py)
    refused(rf"CPU threads: run has {info['threads']}, now {info['threads'] + 1}",
            cfg=tiny(**{"train.threads": info["threads"] + 1}))
    # a damaged checkpoint: named, with the checkpoint before it
    for name, garbage in (("model.safetensors", None), ("optimizer.pt", b"\x80\x04garbage"),
                          ("trainer_state.json", b"{")):
        path = run / "checkpoint-4" / name
        good = path.read_bytes()
        path.write_bytes(garbage if garbage is not None else good[: len(good) // 3])
        before = _state(run)
        refused(rf"checkpoint-4/{re.escape(name)} is damaged .*resume again from checkpoint-3")
        path.write_bytes(good)
    before = _state(run)
    # a stream that stops short of the checkpoint: the W stream lost its block
    rec = run / "recording"
    kept = {p: p.read_bytes() for p in rec.iterdir() if p.name.startswith("wte.")}
    for p in kept:
        p.unlink()
    with pytest.raises(DucklingError, match=r"wte\.u16.*steps 0\.\.4"):
        train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    for p, data in kept.items():
        p.write_bytes(data)
    assert _state(run) == before
    # W stops at step 3 (cut consistently, manifest included): refused, naming checkpoint-3 as the newest
    # checkpoint the recording covers; the advice, followed, works and leaves no gap
    from duckling.recording.layout import make_streams, read_meta

    snaps, _, _ = make_streams(rec, read_meta(rec))
    next(iter(snaps.values())).truncate(4)
    with pytest.raises(DucklingError, match=r"wte\.u16 ends at step 3, lacks steps 4\b.*resume from checkpoint-3"):
        train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    (run / "checkpoint-4").rename(tmp_path / "checkpoint-4")
    res = train(tiny(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    assert res.global_step == 6 and Recording(run).steps.tolist() == list(range(7))
    assert Recording(run).scalar_steps.tolist() == list(range(7))
    assert _strict_json(run / "run_info.json")["status"] == "complete"


def test_resume_finishes_a_compaction_a_kill_interrupted_and_writes_valid_json(tok, tmp_path, capsys, dataset):
    """A kill -9 during the close-time compaction leaves raw chunks, a half-written block (.tmp) and
    the status 'recording' (meta.json) and 'running' (run_info.json); --resume finishes the compaction,
    then marks the run complete. Nothing it writes holds NaN."""
    from duckling.recording.layout import make_streams, read_meta

    ds, mapping = dataset
    run = tmp_path / "run"
    argv = ["train", "--run", str(run), "--dataset", str(ds), "--mapping", str(mapping), "--max-steps", "6",
            "--save-steps", "3", *CLI_TINY]
    assert main(argv) == 0
    first = _strict_json(run / "run_info.json")
    ref = Recording(run)
    want = {s: ref.snapshot(s).copy() for s in ref.steps.tolist()}
    # what the kill leaves: every stream's block back to its raw chunk (the raw records stay until their
    # block is verified), a block half written, both statuses as they were while running
    root = run / "recording"
    meta = read_meta(root)
    snaps, scalars, probe = make_streams(root, meta)
    for st in [*snaps.values(), scalars, probe]:
        st.truncate(len(st.scan()[1]))
    assert {p.suffix for p in root.iterdir() if p.suffix in (".raw", ".blk")} == {".raw"}
    (root / "wte.u16.00000.blk.tmp").write_bytes(b"DUCKBLK2 half a block")
    (root / "meta.json").write_text(json.dumps({**meta, "status": "recording"}))
    info = {**first, "status": "running"}
    del info["finished"], info["steps_per_s"]
    (run / "run_info.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["train", "--run", str(run), "--resume", "--dataset", str(ds)]) == 0
    assert "nan" not in capsys.readouterr().out.lower()
    assert not any(p.suffix in (".raw", ".tmp") for p in root.iterdir()), sorted(p.name for p in root.iterdir())
    assert _strict_json(root / "meta.json")["status"] == "complete"
    after = _strict_json(run / "run_info.json")
    assert after["status"] == "complete" and "steps_per_s" not in after  # none measured: the run trained nothing
    rec = Recording(run)
    assert rec.steps.tolist() == sorted(want) and all(np.array_equal(rec.snapshot(s), w) for s, w in want.items())
    # a finished run resumed again keeps the speed it measured when it trained (no NaN, no null)
    assert main(argv[:3] + ["--resume", "--dataset", str(ds)]) == 0
    assert _strict_json(run / "run_info.json").get("steps_per_s") is None
    json.loads((run / "run_info.json").read_text())


# ---------------------------------------------------------------- (7) a real full disk (issue 25)
@pytest.fixture
def small_disk(tmp_path):
    """A real 128 MB tmpfs: where the test runs as root and may mount (skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root (mount -t tmpfs)")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` as another program would, leaving about ``leave`` bytes free."""
    with open(disk / "filler", "ab") as f:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    f.write(b"\0" * chunk)
                    f.flush()
            except OSError:
                pass
    if leave:
        os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - leave))


class FillAt(TrainerCallback):
    def __init__(self, disk: Path, step: int, leave: int, after_save: bool = False):
        self.disk, self.step, self.leave, self.after_save = disk, step, leave, after_save

    def on_step_end(self, args, state, control, **kw):
        if not self.after_save and state.global_step == self.step:
            _fill(self.disk, self.leave)

    def on_save(self, args, state, control, **kw):
        if self.after_save and state.global_step == self.step:
            _fill(self.disk, self.leave)


def _one_paragraph(msg: str) -> None:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg


def test_a_real_full_disk_at_checkpoint_time_fails_the_run_cleanly(small_disk, tok):
    """The disk fills (another program) before checkpoint-3 is written: safetensors / torch.save report it
    in their own exception types; the run ends in one paragraph, status failed, no partial checkpoint, no
    .tmp; once there is room the advice (resume) works."""
    run = small_disk / "run"
    cfg = tiny(**{"record.every": 1000})  # snapshots at 0 and 6 only: step 3's record fits, its checkpoint not
    with pytest.raises(DucklingError) as e:
        train(cfg, dataset=live_rows(), run_dir=run, tokenizer=tok, callbacks=[FillAt(small_disk, 2, 1 << 20)],
              progress=False)
    msg = str(e.value)
    _one_paragraph(msg)
    assert "disk is full" in msg and "free disk space" in msg and "start again in a new folder" in msg, msg
    assert _strict_json(run / "run_info.json")["status"] == "failed"
    assert _no_tmp(run) == [] and not (run / "checkpoint-3").exists()
    assert Recording(run).scalar_steps.tolist()[:3] == [0, 1, 2]


def test_a_real_full_disk_while_run_info_is_written_still_says_what_happened(small_disk, tok):
    """Ctrl-C at step 4; right after checkpoint-4 is saved the disk is completely full, so the recording's
    close and run_info.json's atomic rewrite (its .tmp) both fail: run_info.json is rewritten in place
    (status failed, valid JSON), no run_info.json.tmp survives, and checkpoint-4 is still the resume point."""
    run = small_disk / "run"
    cfg = tiny(**{"record.every": 1000})  # (within the small disk's budget)
    with pytest.raises(DucklingError) as e:
        train(cfg, dataset=live_rows(), run_dir=run, tokenizer=tok,
              callbacks=[CtrlC(4), FillAt(small_disk, 4, 0, after_save=True)], progress=False)
    msg = str(e.value)
    _one_paragraph(msg)
    assert "disk is full" in msg and "checkpoint-4" in msg and "--resume" in msg, msg
    info = _strict_json(run / "run_info.json")
    assert info["status"] == "failed" and info["global_step"] == 4
    assert _strict_json(run / "recording" / "meta.json")["status"] in ("failed", "interrupted")
    assert _no_tmp(run) == []
    (small_disk / "filler").unlink()  # room again: the advice works
    res = train(cfg, dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    assert res.global_step == 6 and _strict_json(run / "run_info.json")["status"] == "complete"
