"""Today's layout: every byte checked, crash-safe compaction and resume, compact()'s upgrade of every
older layout (the golden recordings of tests/data/golden), interrupted anywhere and finished by a rerun."""
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

import duckling.recording.budget
import duckling.recording.compact as C
from duckling.config import RecordConfig
from duckling.errors import DucklingError
from duckling.recording.budget import check_budget, recording_bytes
from duckling.recording.compact import compact
from duckling.recording.layout import FIELDS, META_KEYS, read_meta
from duckling.recording.reader import Recording
from duckling.recording.streams import Stream
from duckling.recording.writer import RecordingWriter

from test_recording import GOLDEN, expect_golden

V, D, N_LIVE, B = 64, 8, 48, 4


def die(w: RecordingWriter) -> None:
    """What a kill of the writer's process leaves: its files as they are, its lock gone with it."""
    for fd in w._fds.values():
        os.close(fd)
    w._fds = {}
    w._lock.close()


def write(run_dir, dtype="bf16", steps=range(15), every=2, close="complete", seed=0, block=B):
    """A smooth random walk W (most bf16 values unchanged per step, like training); returns W per step.
    close=None: the writer "dies" once the compaction of its full chunks is done (deterministic files)."""
    rng = np.random.default_rng(seed)
    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, dtype=dtype, every=every, block_steps=block,
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
    else:
        die(w)
    return out


def stored(W: np.ndarray, dtype: str) -> np.ndarray:
    """What a snapshot of W reads back as: bf16 rounding where the dtype stores bf16."""
    b = W.view(np.uint32)
    bf = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return {"bf16": bf, "float32": W, "mixed": np.concatenate([bf[:N_LIVE], W[N_LIVE:]])}[dtype]


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


@pytest.mark.parametrize("dtype", ["bf16", "float32", "mixed"])
def test_reads_are_exact_across_blocks_and_parts(tmp_path, dtype):
    W = write(tmp_path, dtype=dtype)
    rec = Recording(tmp_path)
    assert rec.steps.tolist() == list(range(0, 15, 2)) and not list(rec.root.glob("*.raw"))  # all compacted
    want = np.stack([stored(W[int(s)], dtype) for s in rec.steps])
    bits = lambda x: np.ascontiguousarray(x).view(np.uint32)  # noqa: E731
    for i, s in enumerate(rec.steps):
        assert np.array_equal(bits(rec.snapshot(int(s))), bits(want[i]))
    ids = [N_LIVE, 0, V - 1, 5]
    assert np.array_equal(bits(rec.trajectory(ids)), bits(want[:, ids]))
    assert np.array_equal(bits(rec.trajectory(ids, steps=[2, 12])), bits(want[[1, 6]][:, ids]))
    assert rec.compression_ratio > 1 and rec.probe[:, 0].tolist() == [0, 3, 6, 9, 12]
    assert rec.rows("norm")[3:5].shape == (2, V) and rec.rows("norm", steps=[2])[0, 1] == rec.rows("norm")[2, 1]


@pytest.mark.parametrize("dtype", ["bf16", "mixed"])
def test_preloaded_snapshots_are_the_same_bits_and_decode_each_block_once(tmp_path, monkeypatch, dtype):
    import duckling.recording.streams as streams

    write(tmp_path, dtype=dtype)
    rec, plain = Recording(tmp_path), Recording(tmp_path)
    calls = []
    real = streams.decode_groups
    monkeypatch.setattr(streams, "decode_groups", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    keep = rec.steps[::2]  # steps 0, 4 (block 0) and 8, 12 (block 1): blocks of 4 snapshots, every 2 steps
    rec.preload(keep)
    n_decodes = len(calls)
    assert n_decodes == len(rec._src.parts) * 2  # each block holding a kept step decoded once per part
    monkeypatch.undo()
    for s in keep:
        assert np.array_equal(rec.snapshot(int(s)).view(np.uint32), plain.snapshot(int(s)).view(np.uint32))
    monkeypatch.setattr(streams, "decode_groups", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    for s in keep:
        rec.snapshot(int(s))
    assert len(calls) == n_decodes  # served from memory
    monkeypatch.undo()
    assert np.array_equal(rec.snapshot(2).view(np.uint32), plain.snapshot(2).view(np.uint32))  # not kept: read
    rec.preload([])
    assert rec._src.kept == {}
    with pytest.raises(DucklingError, match="not recorded"):
        rec.preload([3])


def test_unclosed_recording_reads_its_raw_tail(tmp_path):
    write(tmp_path / "closed")
    write(tmp_path / "killed", close=None)  # the last partial block is still raw
    killed = Recording(tmp_path / "killed")
    assert list(killed.root.glob("scalars.*.raw")) and list(killed.root.glob("scalars.*.blk"))
    same(Recording(tmp_path / "closed"), killed)


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


def test_corrupt_block_header_names_the_steps_and_the_rest_stays_readable(tmp_path):
    write(tmp_path)
    data = (tmp_path / "recording" / "probe.00000.blk").read_bytes()
    (tmp_path / "recording" / "probe.00000.blk").write_bytes(data[:20] + b"\x00" + data[21:])  # inside the JSON header
    rec = Recording(tmp_path)  # opens: the manifest knows the block's steps
    with pytest.raises(DucklingError, match=r"corrupt.*steps 0\.\.9\b"):
        rec.probe
    assert rec.snapshot(14).shape == (V, D) and rec.rows("norm").shape == (15, V)


STAGES = ["encode", "fsync", "replace", "unlink"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_during_compaction_loses_nothing(tmp_path, monkeypatch, stage):
    ref = tmp_path / "ref"
    write(ref)

    class Kill(BaseException):
        pass

    def boom(*a, **k):
        raise Kill

    target = {"encode": "duckling.recording.streams.encode_block", "fsync": "os.fsync",
              "replace": "os.replace", "unlink": "pathlib.Path.unlink"}[stage]
    w = RecordingWriter(tmp_path / "cut", shape=(V, D), n_live=N_LIVE, every=2, block_steps=B)
    ref_rec = Recording(ref)
    for s in range(8):
        snap = {"wte": ref_rec.snapshot(s)} if s % 2 == 0 else None
        if s == 7:  # steps 0..6's snapshot block is done; the kill hits the scalars block that step 7 fills
            monkeypatch.setattr(target, boom)
        rows = {"wte": np.stack([ref_rec.rows(f)[s] for f in FIELDS])}
        try:
            w.append_step(s, rows, ref_rec.hidden_mean[s], float(ref_rec.lr[s]), snap)
        except Kill:
            assert s == 7  # the compaction after step 7 was committed
    monkeypatch.undo()
    die(w)
    cut = Recording(tmp_path / "cut")  # the kill came after step 7 was committed: nothing is lost
    assert cut.scalar_steps.tolist() == list(range(8)) and cut.steps.tolist() == [0, 2, 4, 6]
    assert np.array_equal(cut.rows("norm"), ref_rec.rows("norm")[:8])
    w2 = RecordingWriter(tmp_path / "cut", shape=(V, D), n_live=N_LIVE, every=2, block_steps=B, resume_step=7)
    w2.close()
    assert not list((tmp_path / "cut" / "recording").glob("*.tmp"))
    assert Recording(tmp_path / "cut").scalar_steps.tolist() == list(range(8))


@pytest.mark.parametrize("defer", [False, True])
def test_one_compaction_path_as_blocks_fill_or_at_close(tmp_path, monkeypatch, defer):
    """Blocks are made in one place (Stream.compact, in the writer's own thread and process): as they
    fill, or, with defer, all at close; the files are the same either way."""
    import threading
    import duckling.recording.streams as S
    where, real = [], S.Stream.compact
    monkeypatch.setattr(S.Stream, "compact", lambda self, c, n, encoded=None: where.append(
        (threading.current_thread().name, c, n)) or real(self, c, n, encoded))
    w = RecordingWriter(tmp_path / "run", shape=(V, D), n_live=N_LIVE, every=1, block_steps=B, defer=defer)
    for s in range(2 * B + 1):
        w.append_step(s, {"wte": np.full((4, V), s, np.float32)}, snapshot={"wte": np.full((V, D), s, np.float32)})
    assert len(where) == (0 if defer else 4)  # 2 full chunks of 2 streams (snapshots, scalars)
    w.close()
    assert {name for name, _, _ in where} == {threading.current_thread().name} and len(where) == 6  # + the 2 tails
    rec = Recording(tmp_path / "run")
    assert not list(rec.root.glob("*.raw")) and rec.steps.tolist() == list(range(2 * B + 1))


def test_a_failed_compaction_is_raised_and_keeps_every_step(tmp_path, monkeypatch):
    """A full disk while a block is written: the writer's next call says so, every step stays (raw,
    checksummed), no .tmp is left, and the recording reads."""
    import duckling.recording.streams as S

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = RecordingWriter(tmp_path / "bg", shape=(V, D), n_live=N_LIVE, every=1, block_steps=B)
    monkeypatch.setattr(S.os, "fsync", full)
    W = np.zeros((V, D), np.float32)
    with pytest.raises(DucklingError, match="compacting .* failed.*steps 0..%d are kept" % (B - 1)):
        for s in range(B):
            w.append_step(s, {"wte": np.full((4, V), s, np.float32)}, snapshot={"wte": W + s})
    w.close("failed")
    monkeypatch.undo()
    assert not list((tmp_path / "bg" / "recording").glob("*.tmp"))
    rec = Recording(tmp_path / "bg")
    assert rec.steps.tolist() == list(range(B)) and rec.snapshot(B - 1)[3, 3] == B - 1  # all there, raw


def _files(root) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "recording").iterdir())
            if p.name != "meta.json"}


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
                        ({"dtype": "float32"}, "does not match"), ({"dtype": "fp8"}, "dtype"), ({"every": 0}, "every"),
                        ({"dead_group_rows": 2}, "groups its columns"), ({"n_live": N_LIVE - 8}, "n_dead"),
                        ({"n_live": N_LIVE - 8, "n_dead": V - N_LIVE + 8}, "groups its columns"), ({"fields": ["norm"]}, "fields"),
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


@pytest.mark.parametrize("dtype", ["bf16", "mixed"])
def test_budget_bounds_an_incompressible_recording(tmp_path, monkeypatch, dtype):
    """Random bits do not compress: the blocks are their records plus frame and header bytes, which
    the budget counts (the bound must hold for any data, not only training's)."""
    rng = np.random.default_rng(0)
    cfg = RecordConfig(dtype=dtype, every=1, probe_every=3)
    w = RecordingWriter(tmp_path, shape=(V, D), n_live=N_LIVE, dtype=dtype, every=1, block_steps=B)
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
    monkeypatch.setattr(duckling.recording.budget, "_block_overhead", lambda *a: 0)
    assert size > bound()  # the records alone do not bound the blocks: the framing term is needed


# --- compact(): older layouts upgraded in place ---------------------------------------------------
OLDER = ["v1", "v2_first", "v2_groups16"]


def today(run) -> dict:
    meta = json.loads((run / "recording" / "meta.json").read_text())
    assert set(META_KEYS) <= set(meta) and "precision" not in meta and "chunk_steps" not in meta
    assert meta["format_version"] == 2 and meta["segment_steps"] == meta["block_steps"] // 2
    return meta


@pytest.mark.parametrize("name", [*OLDER, "v2"])
def test_compact_upgrades_every_older_layout_in_place(tmp_path, name):
    shutil.copytree(GOLDEN / name, tmp_path / "run")
    out = compact(tmp_path / "run")
    assert out["upgraded_from"] == {"v1": "format 1", "v2": None}.get(name, "an early format-2 layout")
    assert (out["steps"], out["snapshots"]) == (13, 7)
    expect_golden(Recording(tmp_path / "run"))
    meta = today(tmp_path / "run")
    assert meta["status"] == "complete" and meta["block_steps"] == (64 if name == "v1" else 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no copy left beside it
    n = {"v1": (1, 1, 1)}.get(name, (2, 4, 2))  # blocks of 64 (format 1 had none) or the recording's own 4
    streams = [("wte.u16", n[0]), ("wte.f32", n[0]), ("lm_head.u16", n[0]), ("lm_head.f32", n[0]),
               ("scalars", n[1]), ("probe", n[2])]
    assert {p.name for p in (tmp_path / "run" / "recording").iterdir()} == \
        {"meta.json", "manifest.json"} | {f"{s}.{c:05d}.blk" for s, k in streams for c in range(k)}
    again = compact(tmp_path / "run")  # today's layout: nothing to do
    assert again["upgraded_from"] is None and again["recovered"] is None


def test_compact_refuses_a_missing_or_busy_recording(tmp_path):
    with pytest.raises(DucklingError, match="not a recorded run"):
        compact(tmp_path / "nothing")
    shutil.copytree(GOLDEN / "v1", tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from duckling.files import folder_lock\n"
                               f"with folder_lock({str(tmp_path / 'run')!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DucklingError, match="being written by process"):  # the run folder's one lock
            compact(tmp_path / "run")
        with pytest.raises(DucklingError, match="being written by process"):  # and the writer's
            RecordingWriter(tmp_path / "run", shape=(40, 4), n_live=32, dtype="mixed", every=2, matrices=("wte", "lm_head"), resume_step=4)
    finally:
        holder.kill()
        holder.wait()
    assert Recording(tmp_path / "run").meta["format_version"] == 1  # untouched


class Interrupt(BaseException):
    pass


def _once(real, after: int = 0):
    """``real``, except that call number ``after`` (0-based) raises Interrupt."""
    n = [0]

    def f(*a, **k):
        n[0] += 1
        if n[0] == after + 1:
            raise Interrupt
        return real(*a, **k)
    return f


STAGES_C = {"write": ("duckling.recording.streams.encode_block", 3), "verify": ("duckling.recording.compact._verify", 0),
            "swap": ("duckling.recording.compact._swap", 0), "cleanup": ("duckling.recording.compact.shutil.rmtree", 0),
            "between renames": ("duckling.recording.compact.os.rename", 1)}


@pytest.mark.parametrize("name", ["v1", "v2_first"])
@pytest.mark.parametrize("stage", list(STAGES_C))
def test_an_interrupted_compact_leaves_a_recording_and_a_rerun_finishes(tmp_path, monkeypatch, name, stage):
    """An interruption anywhere leaves RUN/recording complete (old layout before the swap, today's after),
    except between the two renames of the fallback used where folders cannot be swapped atomically;
    the next compact finishes (or undoes, then redoes) the upgrade."""
    shutil.copytree(GOLDEN / name, tmp_path / "run")
    target, after = STAGES_C[stage]
    if stage == "between renames":
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    module, _, attr = target.rpartition(".")
    obj = {"duckling.recording.compact.shutil": shutil, "duckling.recording.compact.os": os}.get(module)
    obj = obj if obj is not None else sys.modules[module]
    monkeypatch.setattr(obj, attr, _once(getattr(obj, attr), after))
    with pytest.raises(Interrupt):
        compact(tmp_path / "run")
    monkeypatch.undo()
    swapped = stage == "cleanup"
    if stage == "between renames":
        assert not (tmp_path / "run" / "recording").exists()  # the fallback's one window
    elif name == "v1" or swapped:
        expect_golden(Recording(tmp_path / "run"))  # readable as it is: format 1, or today's
    else:
        with pytest.raises(DucklingError, match="duckling compact"):  # still the early layout, complete
            Recording(tmp_path / "run")
        root = tmp_path / "run" / "recording"
        assert C._reader_of(root, read_meta(root)).steps.tolist() == list(range(0, 13, 2))  # compact reads it
    if swapped:
        today(tmp_path / "run")
    out = compact(tmp_path / "run")
    assert out["recovered"] is not None or stage in ("write", "verify", "swap")
    expect_golden(Recording(tmp_path / "run"))
    today(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (tmp_path / "run" / "recording" / ".verified").exists()


def test_a_sigkilled_compact_is_finished_by_the_next(tmp_path):
    """A real kill (SIGKILL) in the middle of writing the new copy."""
    shutil.copytree(GOLDEN / "v1", tmp_path / "run")
    code = ("import os, signal\nimport duckling.recording.streams as S\nreal, n = S.encode_block, [0]\n"
            "def enc(*a, **k):\n n[0] += 1\n if n[0] == 4: os.kill(os.getpid(), signal.SIGKILL)\n return real(*a, **k)\n"
            f"S.encode_block = enc\nfrom duckling.recording.compact import compact\ncompact({str(tmp_path / 'run')!r})")
    p = subprocess.run([sys.executable, "-c", code])
    assert p.returncode == -signal.SIGKILL and (tmp_path / "run" / "recording.new").exists()
    expect_golden(Recording(tmp_path / "run"))  # the old recording, untouched
    assert compact(tmp_path / "run")["recovered"] == "removed an unfinished upgrade copy"
    expect_golden(Recording(tmp_path / "run"))
    today(tmp_path / "run")


def test_cli_compact_says_what_it_did(tmp_path, capsys):
    from duckling import cli
    shutil.copytree(GOLDEN / "v2_first", tmp_path / "run")
    assert cli.main(["compact", str(tmp_path / "run")]) == 0
    assert "upgraded" in capsys.readouterr().out
    assert cli.main(["compact", str(tmp_path / "run")]) == 0
    assert "already in today's layout" in capsys.readouterr().out


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
