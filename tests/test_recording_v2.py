"""Recording format 2: lossless against format 1, every byte checked, crash-safe compaction, compact()."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import duckling.recording.reader
from duckling.recording.compact import compact
from duckling.config import RecordConfig
from duckling.errors import DucklingError
from duckling.recording.reader import FIELDS, Recording, check_budget, recording_bytes
from duckling.recording.streams import Stream
from duckling.recording.writer import RecordingWriter

V, D, N_LIVE, B = 64, 8, 48, 4


def write(run_dir, fmt=2, precision="bf16", steps=range(15), every=2, close="complete", seed=0, background=True,
          block=B):
    """A smooth random walk W (most bf16 values unchanged per step, like training); returns W per step."""
    rng = np.random.default_rng(seed)
    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, precision=precision, every=every,
                        chunk_steps=B, format_version=fmt, block_steps=block, background=background,
                        resume_step=None if steps[0] == 0 else steps[0] - 1)
    W, out = rng.standard_normal((V, D)).astype(np.float32), {}
    for s in range(steps[-1] + 1):
        W = W + 1e-3 * rng.standard_normal((V, D)).astype(np.float32)
        rows = rng.standard_normal((len(FIELDS), V)).astype(np.float32)
        out[s] = W
        if s < steps[0]:
            continue
        snap = {"wte": W} if s % every == 0 else None
        w.append_step(s, {"wte": rows}, hidden_mean=np.full(D, s, np.float32), lr=0.1 * s, snapshot=snap)
        if s % 3 == 0:
            w.append_probe(s, 0.01 * s, 0.001 * s)
    if close:
        w.close(close)
    else:  # "killed" once the background compaction of the full chunks is done (deterministic files)
        w.wait_compaction()
    return out


def same(a: Recording, b: Recording) -> None:
    """Bit-identical content (NaN payloads included)."""
    bits = lambda x: np.ascontiguousarray(x).view(np.uint32)  # noqa: E731
    assert a.steps.tolist() == b.steps.tolist() and a.scalar_steps.tolist() == b.scalar_steps.tolist()
    for s in a.steps:
        assert np.array_equal(bits(a.snapshot(int(s))), bits(b.snapshot(int(s)))), s
    assert np.array_equal(bits(a.trajectory([0, N_LIVE, V - 1])), bits(b.trajectory([0, N_LIVE, V - 1])))
    for r in (a, b):  # trajectories (rows across the live and dead parts) agree with the snapshots
        ids = [N_LIVE, 0, V - 1]
        want = np.stack([r.snapshot(int(s))[ids] for s in r.steps])
        assert np.array_equal(bits(r.trajectory(ids)), bits(want))
        assert np.array_equal(bits(r.trajectory(ids, steps=r.steps[::2])), bits(want[::2]))
    for f in FIELDS:
        assert np.array_equal(bits(np.asarray(a.rows(f))), bits(np.asarray(b.rows(f))))
    for x, y in ((a.hidden_mean, b.hidden_mean), (a.lr, b.lr), (a.probe, b.probe)):
        assert np.array_equal(bits(x), bits(y))


@pytest.mark.parametrize("precision", ["bf16", "float32", "mixed"])
def test_v2_is_bit_identical_to_v1(tmp_path, precision):
    write(tmp_path / "v1", fmt=1, precision=precision)
    write(tmp_path / "v2", fmt=2, precision=precision)
    v1, v2 = Recording(tmp_path / "v1"), Recording(tmp_path / "v2")
    same(v1, v2)
    assert v2.meta["format_version"] == 2 and v1.compression_ratio == pytest.approx(1.0, abs=0.05)
    assert abs(v2.raw_bytes - v1.raw_bytes) < 160 and v2.bytes_on_disk < v1.bytes_on_disk  # meta.json differs
    assert not list(v2.root.glob("*.raw"))  # a finished recording is fully compacted
    assert v2.rows("norm")[3:5].shape == (2, V) and v2.rows("norm", steps=[2])[0, 1] == v1.rows("norm")[2, 1]


@pytest.mark.parametrize("precision", ["bf16", "mixed"])
def test_preloaded_snapshots_are_the_same_bits_and_decode_each_block_once(tmp_path, monkeypatch, precision):
    import duckling.recording.streams as streams

    write(tmp_path / "v1", fmt=1, precision=precision)
    write(tmp_path / "v2", fmt=2, precision=precision)
    v1, v2 = Recording(tmp_path / "v1"), Recording(tmp_path / "v2")
    calls = []
    real = streams.decode_groups
    monkeypatch.setattr(streams, "decode_groups", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    keep = v2.steps[::2]  # steps 0, 4 (block 0) and 8, 12 (block 1): blocks of 4 snapshots, every 2 steps
    v2.preload(keep)
    n_decodes = len(calls)
    assert n_decodes == len(v2._lay.parts) * 2  # each block holding a kept step decoded once per part
    for s in keep:
        assert np.array_equal(v2.snapshot(int(s)).view(np.uint32), v1.snapshot(int(s)).view(np.uint32))
    assert len(calls) == n_decodes  # served from memory
    assert np.array_equal(v2.snapshot(2).view(np.uint32), v1.snapshot(2).view(np.uint32))  # not kept: read
    v2.preload([])
    assert v2._v2.kept == {}
    v1.preload(keep)  # format 1: nothing to keep
    with pytest.raises(DucklingError, match="not recorded"):
        v2.preload([3])


def test_unclosed_recording_reads_its_raw_tail(tmp_path):
    write(tmp_path / "v1", fmt=1)
    write(tmp_path / "v2", close=None)  # killed: the last partial block is still raw
    v2 = Recording(tmp_path / "v2")
    assert list(v2.root.glob("scalars.*.raw")) and list(v2.root.glob("scalars.*.blk"))
    same(Recording(tmp_path / "v1"), v2)


def _flip(path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, tail, steps", [("wte.u16.00000.blk", False, "0..6"), ("wte.u16.00001.raw", True, "8..12"),
                                               ("scalars.00001.blk", False, "4..7"), ("scalars.00003.raw", True, "12..12")])
def test_a_flipped_byte_is_detected_and_named(tmp_path, name, tail, steps):
    write(tmp_path, steps=range(13), close=None if tail else "complete")  # snapshots 0,2,..,12
    _flip(tmp_path / "recording" / name, 40)
    rec = Recording(tmp_path)
    with pytest.raises(DucklingError, match=f"steps {steps}\\b"):
        if name.startswith("wte"):
            rec.trajectory(np.arange(V))
        else:
            [np.asarray(rec.rows(f)) for f in FIELDS] + [rec.hidden_mean, rec.lr]
    if name.startswith("wte"):  # the other blocks stay readable
        assert rec.snapshot(10 if steps == "0..6" else 2).shape == (V, D)
    else:
        assert rec.rows("norm")[:4].shape == (4, V)


def test_corrupt_block_header_names_the_chunk(tmp_path):
    write(tmp_path)
    _flip(tmp_path / "recording" / "probe.00000.blk", 10**9 % 30 + 30)  # inside the JSON header
    data = (tmp_path / "recording" / "probe.00000.blk").read_bytes()
    (tmp_path / "recording" / "probe.00000.blk").write_bytes(data[:20] + b"\x00" + data[21:])
    with pytest.raises(DucklingError, match="corrupt"):
        Recording(tmp_path)


STAGES = ["encode", "fsync", "replace", "unlink"]


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_during_compaction_loses_nothing(tmp_path, monkeypatch, stage, background):
    ref = tmp_path / "ref"
    write(ref)

    class Kill(BaseException):
        pass

    def boom(*a, **k):
        raise Kill

    target = {"encode": ("duckling.recording.streams.encode_block", None), "fsync": ("os.fsync", None),
              "replace": ("os.replace", None), "unlink": ("pathlib.Path.unlink", None)}[stage][0]
    w = RecordingWriter(tmp_path / "cut", shape=(V, D), n_live=N_LIVE, every=2, block_steps=B,
                        background=background)
    ref_rec = Recording(ref)
    for s in range(8):
        snap = {"wte": ref_rec.snapshot(s)} if s % 2 == 0 else None
        if s == 7:
            w.wait_compaction()  # background: steps 0..6's snapshot block is done; the kill hits step 7's
            monkeypatch.setattr(target, boom)
        rows = {"wte": np.stack([ref_rec.rows(f)[s] for f in FIELDS])}
        try:
            w.append_step(s, rows, ref_rec.hidden_mean[s], float(ref_rec.lr[s]), snap)
        except Kill:
            break
    w.wait_compaction()  # background: the kill hit the compaction thread (step 7 was committed before)
    assert isinstance(w._compactor.error, Kill) if background else w._compactor is None
    monkeypatch.undo()
    w._unlock()  # the process died: its lock goes with it
    cut = Recording(tmp_path / "cut")  # the kill came after step 7 was committed: nothing is lost
    assert cut.scalar_steps.tolist() == list(range(8)) and cut.steps.tolist() == [0, 2, 4, 6]
    assert np.array_equal(cut.rows("norm"), ref_rec.rows("norm")[:8])
    w2 = RecordingWriter(tmp_path / "cut", shape=(V, D), n_live=N_LIVE, every=2, block_steps=B, resume_step=7)
    w2.close()
    assert not list((tmp_path / "cut" / "recording").glob("*.tmp"))
    assert Recording(tmp_path / "cut").scalar_steps.tolist() == list(range(8))


def test_background_compaction_runs_off_the_writers_thread_and_close_finishes_it(tmp_path, monkeypatch):
    """append_step returns while a block is being compacted; a reader meanwhile sees every step (raw
    chunk, or block once it is durable); close() waits for it; a failure there surfaces on the next call."""
    import threading
    import duckling.recording.streams as S
    gate, seen = threading.Event(), []
    real = S.encode_block

    def slow(*a, **k):
        seen.append(threading.current_thread().name)
        assert gate.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(S, "encode_block", slow)
    w = RecordingWriter(tmp_path / "bg", shape=(V, D), n_live=N_LIVE, every=1, block_steps=B)
    W = np.zeros((V, D), np.float32)
    for s in range(B + 2):  # chunk 0 fills at step B-1: its compaction waits on the gate
        w.append_step(s, {"wte": np.full((4, V), s, np.float32)}, snapshot={"wte": W + s})
    for _ in range(1000):  # the thread picks the job up on its own schedule
        if seen:
            break
        threading.Event().wait(0.01)
    assert seen and set(seen) == {"duckling-compact"}  # not the caller's thread
    rec = Recording(tmp_path / "bg")  # mid-compaction: nothing is missing
    assert rec.steps.tolist() == list(range(B + 2)) and rec.snapshot(1)[0, 0] == 1
    assert (tmp_path / "bg" / "recording" / "wte.u16.00000.raw").exists()
    gate.set()
    w.close()
    rec = Recording(tmp_path / "bg")
    assert not list(rec.root.glob("*.raw")) and rec.steps.tolist() == list(range(B + 2))
    assert rec.rows("norm")[B + 1, 0] == B + 1 and rec.snapshot(B)[3, 3] == B

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "encode_block", full)
    w = RecordingWriter(tmp_path / "bg", shape=(V, D), n_live=N_LIVE, every=1, block_steps=B, resume_step=B + 1)
    for s in range(B + 2, 2 * B):
        w.append_step(s, {"wte": np.full((4, V), s, np.float32)}, snapshot={"wte": W + s})
    w.wait_compaction()
    with pytest.raises(DucklingError, match="compacting .* failed.*steps 0..%d are kept" % (2 * B - 1)):
        w.append_step(2 * B, {"wte": np.zeros((4, V), np.float32)}, snapshot={"wte": W})
    w.close()
    monkeypatch.undo()
    assert Recording(tmp_path / "bg").steps.tolist() == list(range(2 * B))  # all there, raw and checksummed


def _files(root) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "recording").iterdir())
            if p.name not in ("meta.json", "writer.lock")}


@pytest.mark.parametrize("cut_at, resume_at", [(13, 9), (12, 7), (14, 3)])
def test_resume_across_a_block_boundary_is_byte_identical(tmp_path, cut_at, resume_at):
    write(tmp_path / "full", steps=range(21))
    write(tmp_path / "cut", steps=range(cut_at + 1), close="interrupted")  # tail compacted at close
    write(tmp_path / "cut", steps=range(resume_at + 1, 21))  # resume_step=resume_at: truncate, append
    assert _files(tmp_path / "full") == _files(tmp_path / "cut")
    same(Recording(tmp_path / "full"), Recording(tmp_path / "cut"))


def test_resume_keeps_the_recordings_block_length(tmp_path):
    """A run resumed with another configured block length (an old config) continues the files' layout."""
    write(tmp_path / "full", steps=range(21))
    write(tmp_path / "cut", steps=range(14), close="interrupted")
    write(tmp_path / "cut", steps=range(10, 21), block=64)  # the recording's own block_steps wins
    assert json.loads((tmp_path / "cut" / "recording" / "meta.json").read_text())["block_steps"] == B
    assert _files(tmp_path / "full") == _files(tmp_path / "cut")


def test_hand_edited_metadata_is_refused(tmp_path):
    write(tmp_path)
    meta_path = tmp_path / "recording" / "meta.json"
    good = json.loads(meta_path.read_text())
    for edit, match in [({"matrices": ["../../outside"]}, "matrices"), ({"matrices": ["wte", "wte"]}, "matrices"),
                        ({"shape": [V, D + 1]}, "shape"), ({"shape": [V, -8]}, "shape"),
                        ({"block_steps": 3}, "edited"), ({"n_live": V + 1}, "n_live"),
                        ({"precision": "float32"}, "does not match"), ({"every": 0}, "every"),
                        ({"dead_group_rows": 2}, "groups its columns"), ({"n_live": N_LIVE - 8}, "groups its columns"),
                        ({"segment_steps": 0}, "segment_steps"), ({"group_rows": 64}, "groups its columns")]:
        meta_path.write_text(json.dumps({**good, **edit}))
        with pytest.raises(DucklingError, match=match):
            rec = Recording(tmp_path)
            rec.snapshot(0)
    meta_path.write_text("{not json")
    with pytest.raises(DucklingError, match="JSON"):
        Recording(tmp_path)


def test_non_contiguous_steps_are_refused(tmp_path):
    """A raw record re-stamped with another step (and a matching checksum) is still refused."""
    from duckling.recording.codec import pack_trailer
    write(tmp_path, close=None)
    st = Stream(tmp_path / "recording", "scalars", 4 * V + D + 1, np.float32, [4 * V + D + 1], B)
    data = bytearray(st.raw_path(3).read_bytes())
    payload = memoryview(bytes(data[:st.payload]))
    data[st.payload:st.rec_bytes] = pack_trailer(99, payload)
    st.raw_path(3).write_bytes(bytes(data))
    with pytest.raises(DucklingError, match="not steps 0..N"):
        Recording(tmp_path)


def test_budget_is_constant_memory_and_counts_extra_bytes(tmp_path):
    cfg = RecordConfig(budget_gb=1e6)
    huge = recording_bytes(cfg, 10**9)  # a list of 1e9 steps would not fit in memory
    assert huge > 10**9 * 2 * 8192 * 128
    small = check_budget(tmp_path, RecordConfig(), 100)
    assert check_budget(tmp_path, RecordConfig(), 100, extra_bytes=12345) == small + 12345


@pytest.mark.parametrize("precision", ["bf16", "mixed"])
def test_budget_bounds_an_incompressible_recording(tmp_path, monkeypatch, precision):
    """Random bits do not compress: the blocks are their records plus frame and header bytes, which
    the budget counts (the bound must hold for any data, not only training's)."""
    rng = np.random.default_rng(0)
    cfg = RecordConfig(dtype=precision, every=1, probe_every=3)
    w = RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, precision=precision, every=1, block_steps=B)
    for s in range(11):
        W = rng.integers(0, 2**32, (V, D), dtype=np.uint64).astype(np.uint32).view(np.float32)
        W[~np.isfinite(W)] = 1.0
        rows = rng.integers(0, 2**32, (len(FIELDS), V), dtype=np.uint64).astype(np.uint32).view(np.float32)
        w.append_step(s, {"wte": rows}, hidden_mean=rng.standard_normal(D).astype(np.float32), lr=0.1,
                      snapshot={"wte": W})
        if s % 3 == 0:
            w.append_probe(s, 0.01 * s, 0.001 * s)
    w.close("complete")
    rec = Recording(tmp_path)
    assert rec.compression_ratio < 1.01  # really incompressible
    size = rec.bytes_on_disk - (tmp_path / "recording" / "meta.json").stat().st_size
    bound = lambda: recording_bytes(cfg, 10, shape=(V, D), n_live=N_LIVE, block_steps=B, scratch=False)  # noqa: E731
    assert size <= bound()
    monkeypatch.setattr(duckling.recording.reader, "_block_overhead", lambda *a: 0)
    assert size > bound()  # the records alone do not bound the blocks: the framing term is needed


# --- compact() --------------------------------------------------------------------------------
def test_compact_converts_in_place_and_refuses_bad_input(tmp_path):
    write(tmp_path / "run", fmt=1, precision="mixed")
    write(tmp_path / "ref", fmt=1, precision="mixed")
    out = compact(tmp_path / "run")
    assert out["steps"] == 15 and out["snapshots"] == 8 and out["bytes_after"] < out["bytes_before"]
    same(Recording(tmp_path / "ref"), Recording(tmp_path / "run"))
    assert not list((tmp_path / "run" / "recording").glob("*.u16"))
    with pytest.raises(DucklingError, match="already format 2"):
        compact(tmp_path / "run")
    with pytest.raises(DucklingError, match="not a recorded run"):
        compact(tmp_path / "nothing")
    w = RecordingWriter(tmp_path / "live", shape=(V, D), n_live=N_LIVE, format_version=1)
    with pytest.raises(DucklingError, match="live run"):
        compact(tmp_path / "live")
    w.close()


@pytest.mark.parametrize("stage", ["write", "verify", "commit", "cleanup"])
def test_an_interrupted_compact_leaves_a_readable_recording(tmp_path, monkeypatch, stage):
    import duckling.recording.compact as C
    write(tmp_path / "run", fmt=1)
    write(tmp_path / "ref", fmt=1)

    def boom(*a, **k):
        raise KeyboardInterrupt

    target = {"write": "duckling.recording.streams.encode_block", "verify": "duckling.recording.compact._verify",
              "commit": "duckling.recording.compact._atomic_json", "cleanup": "duckling.recording.compact._v1_files"}[stage]
    monkeypatch.setattr(target, boom)
    with pytest.raises(KeyboardInterrupt):
        C.compact(tmp_path / "run")
    monkeypatch.undo()
    same(Recording(tmp_path / "ref"), Recording(tmp_path / "run"))  # v1 (or v2 after the commit)
    if stage == "cleanup":
        with pytest.raises(DucklingError, match="removed"):
            C.compact(tmp_path / "run")
    else:
        C.compact(tmp_path / "run")
    assert Recording(tmp_path / "run").meta["format_version"] == 2
    same(Recording(tmp_path / "ref"), Recording(tmp_path / "run"))


def test_sigkill_of_a_writer_loses_no_committed_step(tmp_path):
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); import numpy as np, os, signal;"
            f"from duckling.recording.writer import RecordingWriter;"
            f"w = RecordingWriter({str(tmp_path)!r}, shape=({V}, {D}), n_live={N_LIVE}, block_steps={B});"
            f"[w.append_step(s, {{'wte': np.full((4, {V}), s, np.float32)}}, snapshot={{'wte': np.full(({V}, {D}), s, np.float32)}}) for s in range(10)];"
            f"os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code])
    assert p.returncode == -signal.SIGKILL
    rec = Recording(tmp_path)
    assert rec.steps.tolist() == list(range(10)) and rec.snapshot(9)[0, 0] == 9


def test_real_run_compacted_equals_a_native_v2_run(tmp_path, monkeypatch):
    from test_recording import run, tiny
    v1 = run(tiny("mixed", max_steps=5, format=1), tmp_path / "v1").run_dir  # record.format = 1
    v2 = run(tiny("mixed", max_steps=5), tmp_path / "v2").run_dir
    assert Recording(v1).meta["format_version"] == 1
    shutil.copytree(v1 / "recording", tmp_path / "ref" / "recording")
    compact(v1)
    same(Recording(tmp_path / "ref"), Recording(v1))
    same(Recording(v1), Recording(v2))
