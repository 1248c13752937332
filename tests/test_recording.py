"""Recording: the writer/reader contract (synthetic data) and the recorder's guarantees (tiny runs)."""
from __future__ import annotations

import errno
import json
import os
import re

import numpy as np
import pytest
import torch

from duckling import Recording
from duckling.config import RecordConfig
from duckling.errors import DucklingError
from duckling.recording import (FIELDS, RecordingWriter, bf16_bits_to_f32, check_budget,
                                f32_to_bf16_bits, recording_bytes)

V, D, N_LIVE = 64, 8, 48


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).bfloat16().float().numpy()


def _write_synthetic(run_dir, precision="bf16", n_steps=11, every=2, chunk=3, seed=0):
    """Random W_0..W_{n_steps-1} and rows; returns what was written."""
    rng = np.random.default_rng(seed)
    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, precision=precision, every=every,
                        chunk_steps=chunk)
    Ws, rows = [], []
    for s in range(n_steps):
        Ws.append(rng.standard_normal((V, D)).astype(np.float32))
        rows.append(rng.standard_normal((len(FIELDS), V)).astype(np.float32))
        snap = s % every == 0 or s == n_steps - 1
        w.append_step(s, {"wte": rows[-1]}, hidden_mean=np.full(D, s, np.float32), lr=0.5 * s,
                      snapshot={"wte": Ws[-1]} if snap else None)
    w.close()
    return Ws, rows


def test_bf16_bits_match_torch_rounding():
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 1e-3
    x[:3] = [np.inf, -0.0, 1.0 + 2 ** -8]  # 1 + half an ulp rounds to even (1.0)
    ref = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16_bits(x), ref)
    assert np.array_equal(bf16_bits_to_f32(ref), _bf16(x))


@pytest.mark.parametrize("precision", ["bf16", "float32", "mixed"])
def test_roundtrip_every_precision(tmp_path, precision):
    Ws, rows = _write_synthetic(tmp_path, precision)
    rec = Recording(tmp_path)
    assert list(rec.steps) == [0, 2, 4, 6, 8, 10] and len(rec) == 6  # chunks of 3: two files
    assert list(rec.scalar_steps) == list(range(11))
    for s in rec.steps:
        ref = Ws[s].copy()
        if precision == "bf16":
            ref = _bf16(ref)
        elif precision == "mixed":  # live rows bf16, dead rows exact
            ref[:N_LIVE] = _bf16(ref[:N_LIVE])
        got = rec.snapshot(int(s))
        assert got.dtype == np.float32 and got.shape == (V, D)
        assert np.array_equal(got, ref)
    ids = [1, N_LIVE + 2, V - 1]  # straddles the live/dead split
    traj = rec.trajectory(ids, steps=[2, 8])
    assert traj.shape == (2, 3, D)
    assert np.array_equal(traj[1], rec.snapshot(8)[ids])
    for i, f in enumerate(FIELDS):
        assert np.array_equal(rec.rows(f), np.stack([r[i] for r in rows]))
    assert np.array_equal(rec.rows("norm", steps=[3, 5]), np.stack([rows[3][0], rows[5][0]]))
    assert np.allclose(rec.lr, 0.5 * np.arange(11)) and rec.hidden_mean.shape == (11, D)
    assert list(rec.dead_ids) == list(range(N_LIVE, V)) and len(rec.live_ids) == N_LIVE
    assert rec.meta["status"] == "complete" and rec.bytes_on_disk > 0


def test_reader_errors_are_clear(tmp_path):
    _write_synthetic(tmp_path)
    rec = Recording(tmp_path)
    with pytest.raises(DucklingError, match="not recorded"):
        rec.snapshot(3)  # stride 2
    with pytest.raises(DucklingError, match="lm_head"):
        rec.trajectory([0], matrix="lm_head")
    with pytest.raises(DucklingError, match="unknown row field"):
        rec.rows("velocity")
    with pytest.raises(DucklingError, match="no recording"):
        Recording(tmp_path / "nowhere")


def test_torn_tail_is_ignored_and_truncated_on_resume(tmp_path):
    Ws, _ = _write_synthetic(tmp_path, n_steps=9)  # snapshots 0,2,4,6,8
    root = tmp_path / "recording"
    with open(root / "wte.00002.u16", "ab") as f:  # a crash mid-way through snapshot 10
        f.write(b"\1" * 100)
    with open(root / "scalar_steps.i64", "ab") as f:  # ...and a half-written step index
        f.write(b"\2" * 5)
    rec = Recording(tmp_path)
    assert rec.steps[-1] == 8 and rec.scalar_steps[-1] == 8
    # resume at step 4 drops steps 5..8 and the torn bytes; appending 5 continues without a gap
    w = RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, every=2, chunk_steps=3, resume_step=4)
    w.append_step(5, {"wte": np.zeros((4, V), np.float32)})
    w.append_step(6, {"wte": np.zeros((4, V), np.float32)}, snapshot={"wte": Ws[0]})
    w.close()
    rec = Recording(tmp_path)
    assert list(rec.steps) == [0, 2, 4, 6] and list(rec.scalar_steps) == list(range(7))
    assert np.array_equal(rec.snapshot(4), _bf16(Ws[4])) and np.array_equal(rec.snapshot(6), _bf16(Ws[0]))
    assert not (root / "wte.00002.u16").exists()


def test_writer_refuses_overwrite_gap_and_mismatch(tmp_path):
    _write_synthetic(tmp_path, n_steps=5)
    with pytest.raises(DucklingError, match="already holds a recording"):
        RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE)
    with pytest.raises(DucklingError, match="ends at step 4"):
        RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, every=2, chunk_steps=3, resume_step=7)
    with pytest.raises(DucklingError, match="precision"):
        RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, precision="float32", every=2,
                        chunk_steps=3, resume_step=2)
    w = RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, every=2, chunk_steps=3, resume_step=4)
    with pytest.raises(DucklingError, match="gap"):
        w.append_step(6, {"wte": np.zeros((4, V), np.float32)})


def test_budget_refuses_with_bytes_and_stride(tmp_path):
    cfg = RecordConfig(budget_gb=3.0)
    need = recording_bytes(cfg, 10_000)  # W bf16 every step (21 GB) + per-row scalars (1.3 GB)
    assert 22e9 < need < 23e9
    with pytest.raises(DucklingError, match=r"--record-every (\d+)\b") as e:
        check_budget(tmp_path, cfg, 10_000)
    assert str(need) in str(e.value)
    k = int(re.search(r"--record-every (\d+)", str(e.value)).group(1))
    assert check_budget(tmp_path, RecordConfig(budget_gb=3.0, every=k), 10_000) <= 3e9
    with pytest.raises(DucklingError):  # the suggestion is the smallest stride that fits
        check_budget(tmp_path, RecordConfig(budget_gb=3.0, every=k - 1), 10_000)
    with pytest.raises(DucklingError, match="fewer steps"):
        check_budget(tmp_path, RecordConfig(budget_gb=0.01), 10_000)
    assert recording_bytes(RecordConfig(precision="float32"), 100) > recording_bytes(cfg, 100)


def test_full_disk_stops_cleanly_and_keeps_prefix(tmp_path, monkeypatch):
    w = RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, chunk_steps=3)
    W = np.ones((V, D), np.float32)
    for s in range(4):
        w.append_step(s, {"wte": np.zeros((4, V), np.float32)}, snapshot={"wte": W})
    real_write = os.write
    calls = {"n": 0}

    def full(fd, data):  # the disk fills up part-way through step 4
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DucklingError, match="disk is full.*steps 0..3 are kept"):
        w.append_step(4, {"wte": np.zeros((4, V), np.float32)}, snapshot={"wte": W})
    monkeypatch.undo()
    w.close(status="failed")
    rec = Recording(tmp_path)
    assert list(rec.steps) == [0, 1, 2, 3] and np.array_equal(rec.snapshot(3), W)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_run_dir_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(DucklingError, match="writable"):
            RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE)
    finally:
        tmp_path.chmod(0o755)
