"""Runs read straight from a storage URI (duckling.recording.remote), on fsspec's in-process memory://
filesystem: the same numbers as the local folder, bit for bit; an open and one snapshot fetch a few small
files and one block, not the recording; a changed or missing block names its steps; ``duckling report``
and ``duckling compare`` on a storage URI. Synthetic recordings (RecordingWriter), no training."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from duckling.errors import DucklingError
from duckling.recording.reader import Recording
from duckling.recording.writer import RecordingWriter
from duckling.storage import Storage

pytest.importorskip("fsspec")

V, N_LIVE, D, T, BLOCK = 64, 48, 8, 21, 4  # 22 snapshots in blocks of 4: six W blocks


def record(run, seed=0, T=T):
    """A run folder as a trained run leaves it, small: config.json, token_mapping.json, a Trainer state,
    and a bf16 recording of a decaying, drifting W (scalars and a snapshot every step)."""
    run.mkdir(parents=True)
    cfg = {"train": {"learning_rate": 1e-2, "weight_decay": 0.1, "max_steps": T, "warmup_steps": 0,
                     "lr_scheduler_type": "linear", "adam_epsilon": 1e-8}}
    (run / "config.json").write_text(json.dumps(cfg))
    tokens = [{"text": f"t{i}", "count": (N_LIVE - i) * 2 if i < N_LIVE else 0} for i in range(V)]
    (run / "token_mapping.json").write_text(json.dumps({"tokens": tokens}))
    (run / "final").mkdir()
    log = [{"step": T, "loss": 7.5 + seed}, {"step": T, "eval_loss": 7.7 + seed}]
    (run / "final" / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.02, (V, D))
    w = RecordingWriter(run, shape=(V, D), n_live=N_LIVE, dtype="bf16", every=1, block_steps=BLOCK)
    for t in range(T + 1):
        lr = np.nan if t == 0 else 1e-2 * (T - t + 1) / T
        old = W.copy()
        if t:
            W = W * (1 - lr * 0.1) + rng.normal(0, 1e-3, (V, D)) + 1e-3 * (np.arange(V) >= N_LIVE)[:, None]
        rows = np.stack([np.linalg.norm(W, axis=1), np.linalg.norm(W - old, axis=1),
                         np.full(V, np.nan) if t == 0 else rng.random(V) + 0.1, rng.random(V) * 1e-3])
        w.append_step(t, {"wte": rows}, hidden_mean=None if t == 0 else rng.normal(0, 1, D), lr=lr,
                      snapshot={"wte": W.astype(np.float32)})
        if t % 5 == 0:
            w.append_probe(t, 0.25 * 0.9 ** t, 0.01 * 0.9 ** t)
    w.close()
    return run


def upload(run, uri):
    st = Storage(uri)
    for p in run.rglob("*"):
        if p.is_file():
            st.put_file(p, p.relative_to(run).as_posix())
    return st


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """(local run folder, its memory:// copy's URI); a fresh cache folder for the fetched blocks."""
    monkeypatch.setenv("DUCKLING_CACHE", str(tmp_path / "cache"))
    run = record(tmp_path / "run")
    uri = f"memory://duckling-{uuid.uuid4().hex[:8]}/run"
    upload(run, uri)
    yield run, uri
    Storage(uri.rsplit("/", 1)[0]).remove_tree("")


@pytest.fixture
def no_png(monkeypatch):
    """Figures are built but not rendered (rendering is what costs seconds; what is under test here is where
    the numbers are read from, the figures have their own tests), and reports are computed in this process."""
    import os

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: open(path, "wb").close())
    monkeypatch.setattr(os, "cpu_count", lambda: 1)


class Fetched:
    """Bytes read from the storage (every read goes through Storage.read_bytes / read_range)."""

    def __init__(self, monkeypatch):
        self.n, self.calls = 0, []
        real_bytes, real_range = Storage.read_bytes, Storage.read_range

        def read_bytes(st, rel):
            data = real_bytes(st, rel)
            self.n += len(data)
            self.calls.append(rel)
            return data

        def read_range(st, rel, start, length):
            data = real_range(st, rel, start, length)
            self.n += len(data)
            self.calls.append(f"{rel}[{start}:{start + length}]")
            return data

        monkeypatch.setattr(Storage, "read_bytes", read_bytes)
        monkeypatch.setattr(Storage, "read_range", read_range)


def test_remote_reads_are_lazy_and_bit_for_bit(remote, monkeypatch):
    run, uri = remote
    local = Recording(run)
    sizes = {p.name: p.stat().st_size for p in (run / "recording").iterdir()}
    blocks = {n: s for n, s in sizes.items() if n.startswith("wte.") and n.endswith(".blk")}
    assert len(blocks) >= 5  # several W blocks, else laziness is not tested
    got = Fetched(monkeypatch)
    rec = Recording(uri)
    small = sizes["meta.json"] + sizes["manifest.json"]
    assert got.n == small and sorted(got.calls) == ["manifest.json", "meta.json"], got.calls
    snap = rec.snapshot(9)  # in W block 2 (steps 8..11)
    assert np.array_equal(snap.view(np.uint32), local.snapshot(9).view(np.uint32))
    assert got.n - small == blocks["wte.u16.00002.blk"] and got.calls[-1] == "wte.u16.00002.blk"
    assert got.n < sum(sizes.values())
    n = got.n
    rec.snapshot(10)  # same block: kept in the process
    assert got.n == n
    np.testing.assert_array_equal(rec.steps, local.steps)
    np.testing.assert_array_equal(rec.scalar_steps, local.scalar_steps)
    for s in local.steps:
        assert np.array_equal(rec.snapshot(int(s)).view(np.uint32), local.snapshot(int(s)).view(np.uint32)), s
    ids = [0, 5, N_LIVE, V - 1]
    assert np.array_equal(rec.trajectory(ids), local.trajectory(ids))
    for field in ("norm", "update_norm", "grad_norm", "adam_v"):
        assert np.array_equal(np.asarray(rec.rows(field)), np.asarray(local.rows(field)), equal_nan=True), field
    assert np.array_equal(rec.lr, local.lr, equal_nan=True) and np.array_equal(rec.probe, local.probe)
    assert np.array_equal(rec.hidden_mean, local.hidden_mean, equal_nan=True)
    assert rec.bytes_on_disk == local.bytes_on_disk and rec.raw_bytes == local.raw_bytes
    assert rec.token_text == local.token_text and uri in repr(rec)
    # a second reader in this process: the fetched blocks come from the cache folder, checked again
    n = got.n
    again = Recording(uri)
    assert np.array_equal(again.snapshot(21), local.snapshot(21)) and got.n - n == small


def test_a_changed_block_fails_only_its_steps_and_a_missing_one_names_them(remote):
    run, uri = remote
    st = Storage(uri)
    name = "recording/wte.u16.00002.blk"
    blob = bytearray(st.read_bytes(name))
    blob[-5] ^= 0xFF  # a flipped byte in a frame: same size, same header, another hash
    st.write_bytes(name, bytes(blob))
    rec = Recording(uri)  # the open compares the listing with the manifest: it cannot see the byte
    with pytest.raises(DucklingError, match=r"steps 8\.\.11.*wte\.u16\.00002\.blk is not the block manifest\.json"):
        rec.snapshot(9)
    assert np.array_equal(rec.snapshot(12), Recording(run).snapshot(12))  # other steps still read
    st.write_bytes("recording/wte.u16.00009.blk", st.read_bytes("recording/wte.u16.00001.blk"))  # an extra block
    with pytest.raises(DucklingError, match=r"wte\.u16\.00009\.blk \(steps 4\.\.7\) is not listed in manifest\.json"):
        Recording(uri)  # (its steps read from its header: a ranged read)
    st.remove("recording/wte.u16.00009.blk")
    st.remove(name)
    with pytest.raises(DucklingError, match=r"chunk 2 of stream wte\.u16 \(steps 8\.\.11\).*is missing"):
        Recording(uri)


def test_report_of_a_remote_run_into_a_local_folder(remote, tmp_path, capsys, no_png):
    from duckling.cli import main

    run, uri = remote
    assert main(["report", uri]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", uri, "--out", str(tmp_path / "rep"), "--max-points", "8"]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "here"), "--max-points", "8"]) == 0
    got = json.loads((tmp_path / "rep" / "summary.json").read_text())
    want = json.loads((tmp_path / "here" / "summary.json").read_text())
    assert "in a storage" in got.pop("loss_by_freq_note") and "no final model" in want.pop("loss_by_freq_note")
    assert got == want and got["run"] == "run" and got["final_train_loss"] == 7.5
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == sorted(want["figures"])
    assert Storage(uri).files("report") == {}  # the storage is only read


def test_compare_on_a_sweep_in_storage_matches_the_local_folder(tmp_path, monkeypatch, capsys, no_png):
    from duckling.cli import main

    monkeypatch.setenv("DUCKLING_CACHE", str(tmp_path / "cache"))
    sweep, runs = tmp_path / "sweep", []
    for seed in (0, 1):
        name = f"weight_decay=0.1__seed={seed}"
        record(sweep / name, seed=seed, T=9)
        runs.append({"name": name, "point": {"train.weight_decay": 0.1}, "seed": seed, "status": "complete",
                     "path": name, "error": None})
    (sweep / "sweep.json").write_text(json.dumps({"identity": {}, "swept": ["train.weight_decay"], "runs": runs}))
    uri = f"memory://duckling-{uuid.uuid4().hex[:8]}/sweep"
    st = upload(sweep, uri)
    assert main(["compare", uri]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["compare", uri, "--out", str(tmp_path / "table")]) == 0
    assert "2 of 2 runs complete" in capsys.readouterr().out
    assert main(["compare", str(sweep)]) == 0
    capsys.readouterr()
    remote_csv = (tmp_path / "table" / "compare.csv").read_text()
    assert remote_csv == (sweep / "compare.csv").read_text()
    assert (tmp_path / "table" / runs[0]["name"] / "report" / "summary.json").is_file()
    assert main(["compare", uri, "--out", str(tmp_path / "table")]) == 0  # the reports kept in --out are read
    assert "computing" not in capsys.readouterr().out
    st.write_bytes(f"{runs[1]['name']}/run_info.json", "{}")  # a run's files changed in the storage: recomputed
    assert main(["compare", uri, "--out", str(tmp_path / "table")]) == 0
    assert f"computing 1 missing report(s) (duckling report RUN): {runs[1]['name']}" in capsys.readouterr().out
    assert not any(n.endswith("compare.csv") or "/report/" in n for n in st.files())  # the storage is only read
    st.remove_tree("")


def test_a_run_still_recording_reads_its_raw_tail(tmp_path, monkeypatch):
    """A run being written: its last chunks are raw (fetched whole, each record's checksum checked)."""
    monkeypatch.setenv("DUCKLING_CACHE", "off")
    run = tmp_path / "live"
    run.mkdir()
    w = RecordingWriter(run, shape=(V, D), n_live=N_LIVE, dtype="bf16", every=1, block_steps=BLOCK)
    rng = np.random.default_rng(0)
    for t in range(7):
        w.append_step(t, {"wte": rng.random((4, V))}, hidden_mean=None if t == 0 else rng.random(D), lr=0.1,
                      snapshot={"wte": rng.random((V, D)).astype(np.float32)})
    assert "wte.u16.00001.raw" in {p.name for p in (run / "recording").iterdir()}
    uri = f"memory://duckling-{uuid.uuid4().hex[:8]}/live"
    upload(run, uri)
    rec, local = Recording(uri), Recording(run)
    np.testing.assert_array_equal(rec.steps, np.arange(7))
    for s in local.steps:
        assert np.array_equal(rec.snapshot(int(s)).view(np.uint32), local.snapshot(int(s)).view(np.uint32)), s
    assert np.array_equal(np.asarray(rec.rows("norm")), np.asarray(local.rows("norm")))
    w.close()
    Storage(uri.rsplit("/", 1)[0]).remove_tree("")


def test_listing_a_local_storage_while_folders_vanish(tmp_path, monkeypatch):
    """A sweep rotates checkpoints away while another process lists the storage: a folder or file removed
    between being listed and being read is left out, not an error (it broke a reader mid-listing)."""
    import os

    (tmp_path / "run" / "checkpoint-8").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-8" / "state.pt").write_bytes(b"x" * 3)
    (tmp_path / "run" / "meta.json").write_text("{}")
    (tmp_path / "run" / "gone.bin").symlink_to(tmp_path / "removed-since")  # listed, then not there
    real = os.scandir

    def vanishing(path="."):
        if str(path).endswith("checkpoint-8"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert Storage(f"file://{tmp_path}").files() == {"run/meta.json": 2}
    monkeypatch.setattr(os, "scandir", real)
    assert Storage(f"file://{tmp_path}").files("run") == {"checkpoint-8/state.pt": 3, "meta.json": 2}
