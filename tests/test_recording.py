"""Recording: the writer/reader contract (synthetic data), the golden recordings of every layout
duckling has written (tests/data/golden), and the recorder's guarantees (tiny runs)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from duckling import Recording
from duckling.config import RecordConfig
from duckling.errors import DucklingError
from duckling.recording.budget import check_budget, recording_bytes
from duckling.recording.layout import FIELDS, META_KEYS, bf16_bits_to_f32, f32_to_bf16_bits
from duckling.recording.writer import RecordingWriter

V, D, N_LIVE = 64, 8, 48
GOLDEN = Path(__file__).parent / "data" / "golden"


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).bfloat16().float().numpy()


def _write_synthetic(run_dir, dtype="bf16", n_steps=11, every=2, block=3, seed=0):
    """Random W_0..W_{n_steps-1} and rows; returns what was written (blocks of ``block`` records)."""
    rng = np.random.default_rng(seed)
    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, dtype=dtype, every=every, block_steps=block)
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


@pytest.mark.parametrize("dtype", ["bf16", "float32", "mixed"])
def test_roundtrip_every_dtype(tmp_path, dtype):
    Ws, rows = _write_synthetic(tmp_path, dtype)
    rec = Recording(tmp_path)
    assert list(rec.steps) == [0, 2, 4, 6, 8, 10] and len(rec) == 6  # blocks of 3: two
    assert list(rec.scalar_steps) == list(range(11))
    for s in rec.steps:
        ref = Ws[s].copy()
        if dtype == "bf16":
            ref = _bf16(ref)
        elif dtype == "mixed":  # live rows bf16, dead rows exact
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
    assert rec.meta["status"] == "complete" and rec.dtype == dtype
    assert set(META_KEYS) <= set(rec.meta) and "precision" not in rec.meta  # one name: dtype
    assert rec.bytes_on_disk == sum(p.stat().st_size for p in rec.root.rglob("*") if p.is_file())  # every file


# --- golden recordings (tests/data/make_golden.py says how they were made) ---------------------
def expect_golden(rec: Recording) -> None:
    """``rec`` reads exactly what tests/data/golden/expected.npz says, bit for bit (NaN lr included)."""
    e = np.load(GOLDEN / "expected.npz")
    bits = lambda x: np.ascontiguousarray(x).view(np.uint32)  # noqa: E731
    assert rec.steps.tolist() == e["steps"].tolist() and rec.scalar_steps.tolist() == e["scalar_steps"].tolist()
    assert rec.matrices == ["wte", "lm_head"] and rec.dtype == "mixed" and rec.shape == (40, 4)
    for m in rec.matrices:
        want = e[f"snapshot_{m}"]
        for i, s in enumerate(rec.steps):
            assert np.array_equal(bits(rec.snapshot(int(s), m)), bits(want[i])), (m, s)
        ids = [0, 31, 32, 39]  # across the live (bf16) and dead (float32) rows
        assert np.array_equal(bits(rec.trajectory(ids, matrix=m)), bits(want[:, ids]))
        for fi, f in enumerate(FIELDS):
            assert np.array_equal(bits(np.asarray(rec.rows(f, m))), bits(e[f"rows_{m}"][:, fi]))
    for got, key in ((rec.hidden_mean, "hidden_mean"), (rec.lr, "lr"), (rec.probe, "probe")):
        assert np.array_equal(bits(got), bits(e[key])), key
    assert np.isnan(rec.lr[0])


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_golden_recordings_read_as_written(name):
    """Format 1 (read only) and today's layout as the previous release wrote it (meta key "precision")."""
    rec = Recording(GOLDEN / name)
    expect_golden(rec)
    assert rec.meta["format_version"] == int(name[1])


@pytest.mark.parametrize("name", ["v2_first", "v2_groups16"])
def test_early_format_2_layouts_ask_for_compact(tmp_path, name):
    with pytest.raises(DucklingError, match=r"early format-2 layout.*duckling compact"):
        Recording(GOLDEN / name)
    shutil.copytree(GOLDEN / name, tmp_path / "run")
    with pytest.raises(DucklingError, match=r"cannot resume.*duckling compact"):  # nor appended to
        RecordingWriter(tmp_path / "run", shape=(40, 4), n_live=32, dtype="mixed", every=2,
                        matrices=("wte", "lm_head"), resume_step=12)


@pytest.mark.parametrize("key", [k for k in META_KEYS if k != "format_version"])
def test_every_meta_key_is_required(tmp_path, key):
    shutil.copytree(GOLDEN / "v2", tmp_path / "run")
    meta_path = tmp_path / "run" / "recording" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("precision" if key == "dtype" else key)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DucklingError) as e:  # one clear message naming the key and the file
        Recording(tmp_path / "run")
    assert key in str(e.value) and str(meta_path.parent) in str(e.value)


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


def test_format_1_torn_tail_is_ignored_and_resume_asks_for_compact(tmp_path):
    """Format 1 is read only (tests/test_recording_v2.py has today's torn tails and resumes)."""
    shutil.copytree(GOLDEN / "v1", tmp_path / "run")
    root = tmp_path / "run" / "recording"
    with open(root / "wte.00002.u16", "ab") as f:  # a crash mid-way through snapshot 14
        f.write(b"\1" * 100)
    with open(root / "scalar_steps.i64", "ab") as f:  # ...and a half-written step index
        f.write(b"\2" * 5)
    expect_golden(Recording(tmp_path / "run"))
    with pytest.raises(DucklingError, match=r"format 1.*duckling compact"):
        RecordingWriter(tmp_path / "run", shape=(40, 4), n_live=32, dtype="mixed", every=2,
                        matrices=("wte", "lm_head"), resume_step=4)


def test_writer_refuses_overwrite_gap_and_mismatch(tmp_path):
    _write_synthetic(tmp_path, n_steps=5)
    with pytest.raises(DucklingError, match="already holds a recording"):
        RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE)
    kw = dict(shape=(V, D), n_live=N_LIVE, every=2, block_steps=3)
    with pytest.raises(DucklingError, match="ends at step 4"):
        RecordingWriter(tmp_path, resume_step=7, **kw)
    with pytest.raises(DucklingError, match="dtype"):
        RecordingWriter(tmp_path, dtype="float32", resume_step=2, **kw)
    w = RecordingWriter(tmp_path, resume_step=4, **kw)
    with pytest.raises(DucklingError, match="already open"):  # one writer at a time, in this process too
        RecordingWriter(tmp_path, resume_step=4, **kw)
    with pytest.raises(DucklingError, match="gap"):
        w.append_step(6, {"wte": np.zeros((4, V), np.float32)})
    w.close()
    RecordingWriter(tmp_path, resume_step=4, **kw).close()  # closed: open again


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
    assert recording_bytes(RecordConfig(dtype="float32"), 100) > recording_bytes(cfg, 100)


def test_run_bytes_count_the_models_own_parameters():
    """One parameter count, taken from the model (the sweep's hand-written formula was 1,024 off)."""
    from duckling.config import DucklingConfig
    from duckling.recording.budget import model_files_bytes
    from duckling.sweeps.spec import run_bytes
    from duckling.training.model import build_model, count_parameters, n_params

    for tied in (True, False):
        cfg = DucklingConfig().override({"model.tie_word_embeddings": tied, "model.n_layer": 1})
        n = count_parameters(build_model(cfg.model))
        assert n_params(cfg.model) == n
        rec = recording_bytes(cfg.record, cfg.train.max_steps, n_matrices=1 if tied else 2)
        assert run_bytes(cfg) == rec + model_files_bytes(cfg, n)


def test_full_disk_stops_cleanly_and_keeps_prefix(tmp_path, monkeypatch):
    w = RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, block_steps=3)
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


# --- the recorder in real (tiny) training runs --------------------------------------------------
from transformers import TrainerCallback  # noqa: E402

from duckling.config import N_LIVE as LIVE, DataConfig, DucklingConfig, ModelConfig, TrainConfig  # noqa: E402
from duckling.training.train import train  # noqa: E402

T_TINY = 16


def tiny(precision="bf16", every=1, max_steps=5, tied=True, **rec_kw) -> DucklingConfig:
    """A 1-layer, d=16 Duckling (W is still 8192 rows: 6144 live, 2048 dead) on CPU."""
    return DucklingConfig(
        data=DataConfig(mapping_path="no-such-dir/token_mapping.json"),  # no tokenizer: ids 0..6143 live
        model=ModelConfig(n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=T_TINY, tie_word_embeddings=tied),
        train=TrainConfig(max_steps=max_steps, learning_rate=1e-2, save_steps=3, logging_steps=3, device="cpu",
                          compute_dtype="fp32"),
        record=RecordConfig(dtype=precision, every=every, probe_every=2, **rec_kw))


def rows_data(n=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, LIVE, size=(n, T_TINY), dtype=np.uint16)  # (n, T)


def run(cfg, run_dir=None, callbacks=()):
    return train(cfg, dataset=rows_data(), run_dir=run_dir, tokenizer=False, callbacks=callbacks, progress=False)


class Reference(TrainerCallback):
    """Deep copies of W, its gradient, Adam's exp_avg_sq and the lr, taken without the recorder."""

    def __init__(self):
        self.W, self.G, self.V, self.lr = {}, {}, {}, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.W[0] = model.transformer.wte.weight.detach().clone()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        w = model.transformer.wte.weight
        self.G[state.global_step + 1] = w.grad.detach().clone()
        self.lr[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        w = model.transformer.wte.weight
        self.W[state.global_step] = w.detach().clone()
        self.V[state.global_step] = optimizer.state[w]["exp_avg_sq"].detach().clone()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One reference run without the recorder, and recorded runs in each precision."""
    base = tmp_path_factory.mktemp("runs")
    ref = Reference()
    run(tiny(), callbacks=[ref])
    recs = {p: Recording(run(tiny(p), base / p).run_dir) for p in ("bf16", "float32", "mixed")}
    return ref, recs, base


def test_train_snapshot_n_is_w_after_n_updates(tiny_runs):
    ref, recs, _ = tiny_runs
    for p, rec in recs.items():
        assert rec.steps.tolist() == list(range(6)) and rec.meta["status"] == "complete"
        for n in rec.steps:
            w = ref.W[int(n)]  # (V, d) float32
            exp = {"float32": w, "bf16": w.bfloat16().float(),
                   "mixed": torch.cat([w[:LIVE].bfloat16().float(), w[LIVE:]])}[p]
            assert np.array_equal(rec.snapshot(int(n)), exp.numpy()), (p, n)


def test_train_exact_scalars_agree_with_float32_snapshots(tiny_runs):
    ref, recs, _ = tiny_runs
    rec = recs["float32"]
    W = rec.trajectory(np.arange(8192))  # (6, V, d)
    assert np.allclose(rec.rows("norm"), np.linalg.norm(W, axis=2), rtol=1e-6, atol=0)
    upd = rec.rows("update_norm")
    assert (upd[0] == 0).all()
    assert np.allclose(upd[1:], np.linalg.norm(np.diff(W, axis=0), axis=2), rtol=1e-5, atol=1e-12)
    dead = rec.dead_ids
    assert (upd[1:, dead] > 0).all()  # weight decay and the softmax denominator move every dead row
    g = np.stack([ref.G[n].norm(dim=1).numpy() for n in range(1, 6)])
    assert np.isnan(rec.rows("grad_norm")[0]).all()
    assert np.allclose(rec.rows("grad_norm")[1:], g, rtol=1e-6)
    v = np.stack([ref.V[n].mean(dim=1).numpy() for n in range(1, 6)])
    assert np.allclose(rec.rows("adam_v")[1:], v, rtol=1e-6)
    assert np.allclose(rec.lr[1:], [ref.lr[n] for n in range(1, 6)]) and np.isnan(rec.lr[0])
    hm = rec.hidden_mean  # (6, d): NaN before any update, finite after
    assert np.isnan(hm[0]).all() and np.isfinite(hm[1:]).all()
    pr = rec.probe  # fixed probe batch at steps 0, 2, 4
    assert pr[:, 0].tolist() == [0, 2, 4] and ((pr[:, 1] > 0) & (pr[:, 1] < 1)).all()
    assert rec.meta["weight_decay"] == 0.01 and rec.meta["learning_rate"] == 1e-2
    assert rec.meta["lr_scheduler_type"] == "linear"


def test_train_two_cpu_runs_give_identical_recordings(tiny_runs, monkeypatch):
    """Same seed, same bytes."""
    _, recs, base = tiny_runs
    again = run(tiny("bf16"), base / "bf16-again").run_dir / "recording"
    first = recs["bf16"].root
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "wte.u16.00000.blk" in names
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


@pytest.fixture(scope="module")
def stride_run(tmp_path_factory):
    cfg = tiny("mixed", every=2, max_steps=5)  # checkpoint at step 3
    return cfg, Recording(run(cfg, tmp_path_factory.mktemp("stride") / "full").run_dir)


def test_train_stride_resume_continues_without_gap(tmp_path, stride_run):
    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt

    cfg, full = stride_run
    assert full.steps.tolist() == [0, 2, 4, 5]  # stride 2, plus the last step
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", callbacks=[Crash()])
    cut = Recording(tmp_path / "cut")
    assert cut.steps.tolist() == [0, 2, 4] and cut.scalar_steps.tolist() == list(range(5))
    assert cut.meta["status"] == "interrupted"
    run_resumed = train(cfg, dataset=rows_data(), run_dir=tmp_path / "cut", resume=True, tokenizer=False, progress=False)
    assert run_resumed.global_step == 5  # resumed from checkpoint-3: the recording was cut back to 3
    cut.reload()
    assert cut.steps.tolist() == full.steps.tolist() and cut.scalar_steps.tolist() == list(range(6))
    assert np.array_equal(cut.trajectory(np.arange(8192)), full.trajectory(np.arange(8192)))
    for f in FIELDS:
        assert np.array_equal(cut.rows(f), full.rows(f), equal_nan=True)
    assert np.array_equal(cut.probe, full.probe) and np.array_equal(cut.lr, full.lr, equal_nan=True)
    assert np.array_equal(cut.hidden_mean, full.hidden_mean, equal_nan=True)


def test_train_over_budget_is_refused_before_the_first_step(tmp_path):
    with pytest.raises(DucklingError, match=r"needs .* bytes.*--record-every \d+"):
        run(tiny(budget_gb=0.04, max_steps=100), tmp_path / "run")
    assert not (tmp_path / "run" / "recording").exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_train_untied_records_both_matrices(tmp_path):
    rec = Recording(run(tiny(tied=False, max_steps=3), tmp_path / "run").run_dir)
    assert rec.matrices == ["wte", "lm_head"]
    g_in, g_out = rec.rows("grad_norm", "wte")[1:], rec.rows("grad_norm", "lm_head")[1:]  # (3, V)
    assert (g_in[:, rec.dead_ids] == 0).all()  # dead ids never occur as inputs
    assert (g_out[:, rec.dead_ids] > 0).all()  # ...but every output row gets the softmax gradient
    assert not np.array_equal(rec.snapshot(3, "wte"), rec.snapshot(3, "lm_head"))


def test_token_text_from_the_runs_mapping(tmp_path, repo_root):
    _write_synthetic(tmp_path, n_steps=1)
    assert Recording(tmp_path).token_text is None  # no mapping copied into the run folder
    vocab = pytest.importorskip("duckling.data.vocab")
    try:
        tok = vocab.CompactTokenizer.from_file(repo_root / "token_mapping.json")
    except DucklingError as e:
        pytest.skip(str(e))
    (tmp_path / "token_mapping.json").write_bytes((repo_root / "token_mapping.json").read_bytes())
    text = Recording(tmp_path).token_text
    assert len(text) == V and text[:5] == [tok.token_text(i) for i in range(5)]
