"""Issue 25, the recording's edges: a recording knows its parts (manifest.json), a missing, renamed,
foreign or non-regular block file is an error naming its steps, a corrupt header fails only its own
steps, ``duckling verify`` checks a whole recording, an interrupted compaction is finished (by
``duckling compact`` and by the writer's next open), and a full disk, a read-only folder or a bad
meta.json end in a clear error with nothing half-written. Every case is a real tiny recording."""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from duckling import cli
from duckling.errors import DucklingError
from duckling.recording.compact import compact
from duckling.recording.layout import FIELDS
from duckling.recording.manifest import file_digest
from duckling.recording.reader import Recording
from duckling.recording.repair import stream_ends, verify
from duckling.recording.writer import RecordingWriter

from test_recording import GOLDEN, expect_golden

V, D, N_LIVE, B, STEPS = 64, 8, 48, 4, 15  # snapshots 0, 2, .., 14: wte.u16 blocks of steps 0..6 and 8..14


def write(run, seed: int = 0, defer: bool = False, close: bool = True, steps: int = STEPS) -> RecordingWriter:
    rng = np.random.default_rng(seed)
    w = RecordingWriter(run, shape=(V, D), n_live=N_LIVE, dtype="bf16", every=2, block_steps=B, defer=defer)
    W = rng.standard_normal((V, D)).astype(np.float32)
    for s in range(steps):
        W = W + 1e-3 * rng.standard_normal((V, D)).astype(np.float32)
        w.append_step(s, {"wte": rng.standard_normal((len(FIELDS), V)).astype(np.float32)},
                      hidden_mean=np.full(D, s, np.float32), lr=0.1 * s, snapshot={"wte": W} if s % 2 == 0 else None)
        if s % 3 == 0:
            w.append_probe(s, 0.01 * s, 0.001 * s)
    if close:
        w.close()
    return w


def same(a: Recording, b: Recording) -> None:
    bits = lambda x: np.ascontiguousarray(x).view(np.uint32)  # noqa: E731
    assert a.steps.tolist() == b.steps.tolist() and a.scalar_steps.tolist() == b.scalar_steps.tolist()
    assert np.array_equal(bits(a.trajectory(np.arange(V))), bits(b.trajectory(np.arange(V))))
    for f in FIELDS:
        assert np.array_equal(bits(np.asarray(a.rows(f))), bits(np.asarray(b.rows(f))))
    for x, y in ((a.hidden_mean, b.hidden_mean), (a.lr, b.lr), (a.probe, b.probe)):
        assert np.array_equal(bits(x), bits(y))


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    write(run)
    return run


@pytest.fixture
def run(ref, tmp_path) -> Path:
    shutil.copytree(ref, tmp_path / "run")
    return tmp_path / "run"


def meta_of(run) -> dict:
    return json.loads((run / "recording" / "meta.json").read_text())


def cli_verify(run, capsys) -> tuple[int, str]:
    code = cli.main(["verify", str(run)])
    out = capsys.readouterr()
    return code, out.out + out.err


# --- the manifest -----------------------------------------------------------------------------------
def test_manifest_lists_every_block_with_its_steps_size_and_hash(run, capsys):
    root = run / "recording"
    man = json.loads((root / "manifest.json").read_text())
    assert man["hash"] == "sha256" and meta_of(run)["manifest"] == "manifest.json"
    listed = {f"{s}.{e['chunk']:05d}.blk": e for s, es in man["streams"].items() for e in es}
    assert set(listed) == {p.name for p in root.glob("*.blk")}
    for name, e in listed.items():
        assert e["bytes"] == (root / name).stat().st_size and e["sha256"] == file_digest(root / name)
    assert (listed["wte.u16.00001.blk"]["first"], listed["wte.u16.00001.blk"]["last"]) == (8, 14)
    assert listed["probe.00000.blk"]["count"] == 4 and listed["scalars.00003.blk"]["last"] == 14
    code, out = cli_verify(run, capsys)
    assert code == 0 and "whole: 15 steps, 8 snapshots" in out and len(out.strip().splitlines()) == 1
    assert Recording(run).verify() == []


# --- missing, renamed, foreign, non-regular -------------------------------------------------------------
def _foreign(root):
    other = root.parent.parent / "other"
    write(other, seed=7)  # another run over the same steps
    shutil.copy(other / "recording" / "wte.u16.00001.blk", root / "wte.u16.00001.blk")


DAMAGE = {
    "W block deleted": (lambda r: (r / "wte.u16.00000.blk").unlink(), r"wte\.u16 \(steps 0\.\.6\).*missing"),
    "last scalars block deleted": (lambda r: (r / "scalars.00003.blk").unlink(), r"scalars \(steps 12\.\.14\).*missing"),
    "last probe block deleted": (lambda r: (r / "probe.00001.blk").unlink(), r"probe \(steps 12\.\.12\).*missing"),
    "W block renamed": (lambda r: (r / "wte.u16.00001.blk").rename(r / "wte.u16.00002.blk"),
                        r"wte\.u16 \(steps 8\.\.14\), listed in manifest.json, is missing.*not listed"),
    "foreign W block": (_foreign, r"not the block manifest.json lists for chunk 1 of stream wte\.u16 \(steps 8\.\.14\)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_missing_renamed_or_foreign_block_is_an_error_naming_its_steps(run, capsys, case):
    damage, message = DAMAGE[case]
    damage(run / "recording")
    assert meta_of(run)["status"] == "complete" and meta_of(run)["last_step"] == 14
    with pytest.raises(DucklingError, match=message):
        Recording(run)
    with pytest.raises(DucklingError, match=message):
        stream_ends(run)  # what a resume checks
    code, out = cli_verify(run, capsys)
    assert code == 1 and "not whole" in out
    assert cli.main(["report", str(run)]) == 2  # the report refuses it too, naming the cause
    assert "not whole" in capsys.readouterr().err


def _fifo(root):
    (root / "wte.u16.00001.blk").unlink()
    os.mkfifo(root / "wte.u16.00001.blk")


def _folder(root):
    (root / "scalars.00001.blk").unlink()
    (root / "scalars.00001.blk").mkdir()


def _link_out(root):
    out = root.parent.parent / "elsewhere.blk"
    shutil.move(root / "scalars.00001.blk", out)
    (root / "scalars.00001.blk").symlink_to(out)


@pytest.mark.parametrize("damage, what, steps", [(_fifo, "a FIFO", "stream wte.u16 (steps 8..14)"),
                                                 (_folder, "a folder", "stream scalars (steps 4..7)"),
                                                 (_link_out, "a symbolic link to", "stream scalars (steps 4..7)")])
def test_a_block_path_that_is_not_a_regular_file_is_refused_without_hanging(run, capsys, damage, what, steps):
    damage(run / "recording")
    got = {}

    def open_it():
        try:
            Recording(run)
        except DucklingError as e:
            got["error"] = str(e)
    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "Recording() hangs on the file"
    assert what in got["error"] and steps in got["error"]
    code, out = cli_verify(run, capsys)
    assert code == 1 and what in out


# --- a corrupt header fails only its steps --------------------------------------------------------------
def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the JSON header: its crc32 no longer matches
    path.write_bytes(bytes(data))


def test_one_corrupt_block_header_fails_only_its_steps(run, capsys):
    root = run / "recording"
    _corrupt_header(root / "wte.u16.00000.blk")
    rec = Recording(run)  # opens: the manifest knows the block's steps
    assert rec.steps.tolist() == list(range(0, 15, 2))
    with pytest.raises(DucklingError, match=r"wte\.u16 chunk 0, covering steps 0\.\.6 \(.*header checksum"):
        rec.snapshot(2)
    with pytest.raises(DucklingError, match=r"steps 0\.\.6"):
        rec.trajectory([0, 1])  # a read over every step names the bad block's steps
    assert rec.snapshot(10).shape == (V, D) and np.asarray(rec.rows("norm")).shape == (STEPS, V)  # the rest reads
    code, out = cli_verify(run, capsys)
    assert code == 1 and "steps 0..6" in out and "disk" not in out  # a checksum failure is never a disk problem


def test_a_corrupt_scalars_header_without_a_manifest_still_opens(tmp_path):
    """Recordings written before manifests: the scalars' steps are their positions, so one bad header
    still leaves the recording open, naming the steps."""
    shutil.copytree(GOLDEN / "v2", tmp_path / "run")
    _corrupt_header(tmp_path / "run" / "recording" / "scalars.00001.blk")
    rec = Recording(tmp_path / "run")
    with pytest.raises(DucklingError, match=r"steps 4\.\.7"):
        rec.rows("norm")[5]
    assert rec.rows("norm")[:4].shape == (4, 40) and rec.snapshot(12, "lm_head").shape == (40, 4)


def test_flipped_frame_byte_is_listed_by_verify_and_never_blamed_on_the_disk(run, capsys):
    path = run / "recording" / "scalars.00001.blk"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    code, out = cli_verify(run, capsys)
    assert code == 1 and "scalars, steps 4..7" in out and "sha256" in out and "disk" not in out
    with pytest.raises(DucklingError, match=r"steps 4\.\.7") as e:
        Recording(run).lr  # the last frame of the block: the hidden mean and lr columns
    assert "disk" not in str(e.value)


# --- recordings without a manifest ---------------------------------------------------------------------
def test_a_recording_without_a_manifest_reads_as_before_and_compact_adds_one(tmp_path, capsys):
    shutil.copytree(GOLDEN / "v2", tmp_path / "run")
    expect_golden(Recording(tmp_path / "run"))
    code, out = cli_verify(tmp_path / "run", capsys)
    assert code == 0 and "no manifest.json" in out and "cannot be checked" in out
    assert cli.main(["compact", str(tmp_path / "run")]) == 0
    assert "listed 14 blocks in a new manifest.json" in capsys.readouterr().out
    expect_golden(Recording(tmp_path / "run"))  # bit-identical
    code, out = cli_verify(tmp_path / "run", capsys)
    assert code == 0 and "every block matches manifest.json" in out


def test_meta_says_more_steps_than_the_files_hold_without_a_manifest(run):
    root = run / "recording"
    (root / "manifest.json").unlink()
    meta = meta_of(run)
    del meta["manifest"]
    (root / "meta.json").write_text(json.dumps(meta))
    (root / "scalars.00003.blk").unlink()
    with pytest.raises(DucklingError, match=r"ends at step 14 .*scalars stop at step 11: steps 12\.\.14 are missing"):
        Recording(run)


# --- interrupted compaction ----------------------------------------------------------------------------
PRELUDE = ("import numpy as np\nfrom duckling.recording.layout import FIELDS\nfrom duckling.recording.writer import "
           f"RecordingWriter\nV, D, N_LIVE, B, STEPS = {V}, {D}, {N_LIVE}, {B}, {STEPS}\n")
KILL = """
import os, signal, sys
real, n = os.replace, [0]
def replace(src, dst, *a, **k):
    if str(src).endswith(".blk.tmp"):
        n[0] += 1
        if n[0] == 3:  # the third block of the close-time compaction: its .blk.tmp is written, not renamed
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
{write}
write({run!r}, defer=True)
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A recording whose close-time compaction was killed (SIGKILL): raw chunks, a .blk.tmp, status recording."""
    run = tmp_path_factory.mktemp("killed") / "run"
    code = KILL.format(write=PRELUDE + inspect.getsource(write), run=str(run))  # (no torch import: a fast start)
    p = subprocess.run([sys.executable, "-c", code])
    assert p.returncode == -signal.SIGKILL
    root = run / "recording"
    assert list(root.glob("*.raw")) and list(root.glob("*.blk.tmp")) and meta_of(run)["status"] == "recording"
    return run


def test_compact_finishes_a_killed_close_time_compaction(killed, ref, tmp_path, capsys):
    shutil.copytree(killed, tmp_path / "run")
    run, root = tmp_path / "run", tmp_path / "run" / "recording"
    same(Recording(run), Recording(ref))  # nothing lost: the raw chunks read
    code, out = cli_verify(run, capsys)
    assert code == 1 and "interrupted" in out
    assert cli.main(["compact", str(run)]) == 0
    out = capsys.readouterr().out
    assert "finished an interrupted compaction" in out and "nothing to do" not in out
    assert not list(root.glob("*.raw")) and not list(root.glob("*.tmp"))
    assert meta_of(run)["status"] == "interrupted" and meta_of(run)["last_step"] == STEPS - 1
    same(Recording(run), Recording(ref))
    assert verify(run)[0] == []
    assert compact(run)["recovered"] is None  # and then there is nothing left to do


def test_the_writers_next_open_finishes_a_killed_compaction(killed, ref, tmp_path):
    shutil.copytree(killed, tmp_path / "run")
    w = RecordingWriter(tmp_path / "run", shape=(V, D), n_live=N_LIVE, dtype="bf16", every=2, block_steps=B,
                        resume_step=STEPS - 1)
    assert not list((tmp_path / "run" / "recording").glob("*.tmp"))
    w.close()
    root = tmp_path / "run" / "recording"
    assert not list(root.glob("*.raw")) and meta_of(tmp_path / "run")["status"] == "complete"
    same(Recording(tmp_path / "run"), Recording(ref))
    assert verify(tmp_path / "run")[0] == []


def test_a_corrupt_raw_record_stops_compact_with_the_true_cause(killed, tmp_path):
    shutil.copytree(killed, tmp_path / "run")
    raw = tmp_path / "run" / "recording" / "scalars.00001.raw"
    data = bytearray(raw.read_bytes())
    data[100] ^= 0x01
    raw.write_bytes(bytes(data))
    with pytest.raises(DucklingError, match=r"scalars .*steps 4\.\.7.*corrupt raw record") as e:
        compact(tmp_path / "run")
    assert "disk" not in str(e.value) and raw.exists()  # a checksum failure: never "free disk space"
    assert not list((tmp_path / "run" / "recording").glob("*.tmp"))


def test_a_first_commit_cut_before_its_manifest_reads_and_resumes(tmp_path, ref):
    """A kill between the first block's rename and the manifest's first write: the block is not
    listed (no manifest yet), its raw chunk is still there and is the truth."""
    w = write(tmp_path / "run", close=False, steps=3)  # raw chunks only
    root = tmp_path / "run" / "recording"
    w.close("interrupted", compact=False)
    src = Recording(ref)._src.scalars
    shutil.copy(src.blk_path(0), root / "scalars.00000.blk")  # the block a compaction would have made
    assert not (root / "manifest.json").exists() and (root / "scalars.00000.raw").exists()
    assert Recording(tmp_path / "run").scalar_steps.tolist() == [0, 1, 2]
    assert stream_ends(tmp_path / "run")["scalars"] == 2
    write_rest = RecordingWriter(tmp_path / "run", shape=(V, D), n_live=N_LIVE, dtype="bf16", every=2, block_steps=B,
                                 resume_step=2)
    write_rest.close()
    assert verify(tmp_path / "run")[0] == [] and not (root / "scalars.00000.raw").exists()


# --- a full disk, a read-only folder (a real tmpfs: root only) -------------------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    return filler


def test_a_full_disk_during_compaction_loses_nothing_and_leaves_no_tmp(killed, ref, tmp_path):
    with tmpfs(tmp_path / "mnt", "2m") as mnt:
        shutil.copytree(killed, mnt / "run")
        root = mnt / "run" / "recording"
        for p in root.glob("*.tmp"):
            p.unlink()  # the kill's leftover: what remains to see is this failure's
        raws = sorted(p.name for p in root.glob("*.raw"))
        filler = _fill(mnt)
        with pytest.raises(DucklingError, match="disk is full") as e:
            compact(mnt / "run")
        assert "duckling compact" in str(e.value)
        assert not list(root.glob("*.tmp")) and not list(mnt.glob("**/*.tmp"))
        assert meta_of(mnt / "run")["status"] == "recording"  # unchanged: nothing was finished
        assert set(raws) >= {p.name for p in root.glob("*.raw")}
        same(Recording(mnt / "run"), Recording(ref))  # every step still reads
        filler.unlink()
        compact(mnt / "run")
        assert not list(root.glob("*.raw")) and verify(mnt / "run")[0] == []
        same(Recording(mnt / "run"), Recording(ref))


def test_a_full_disk_while_upgrading_leaves_the_old_recording_and_no_copy(tmp_path, monkeypatch):
    import duckling.recording.compact as C
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        shutil.copytree(GOLDEN / "v1", mnt / "run")
        (mnt / "filler").write_bytes(b"\0" * (shutil.disk_usage(mnt).free - (24 << 10)))  # 24 kB left: less than the copy needs
        monkeypatch.setattr(C.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
        with pytest.raises(DucklingError, match="disk filled up") as e:
            compact(mnt / "run")
        assert "untouched" in str(e.value)
        assert sorted(p.name for p in (mnt / "run").iterdir()) == [".lock", "recording"]
        expect_golden(Recording(mnt / "run"))


def test_compact_in_a_read_only_folder_is_a_clear_error(killed, tmp_path):
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        shutil.copytree(killed, mnt / "run")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        with pytest.raises(DucklingError, match="Read-only file system"):
            compact(mnt / "run")
        assert cli.main(["compact", str(mnt / "run")]) == 2


# --- meta.json of a bad shape ------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("shape", "64x8"), ("shape", [64]), ("shape", [64, "8"]), ("matrices", "wte"),
                                        ("n_live", None), ("block_steps", 0), ("format_version", True),
                                        ("every", "DEL"), ("fields", "DEL"), (None, "a list")])
def test_a_malformed_meta_json_is_a_clear_error_everywhere(run, capsys, key, value):
    meta = meta_of(run)
    if key is None:
        meta = [meta]
    elif value == "DEL":
        del meta[key]
    else:
        meta[key] = value
    (run / "recording" / "meta.json").write_text(json.dumps(meta))
    for call in (lambda: Recording(run), lambda: compact(run), lambda: stream_ends(run)):
        with pytest.raises(DucklingError, match="meta.json"):
            call()
    code, out = cli_verify(run, capsys)
    assert code == 1 and "meta.json" in out


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_meta_json_that_is_not_a_file_is_refused_without_hanging(run, kind):
    meta = run / "recording" / "meta.json"
    meta.unlink()
    os.mkfifo(meta) if kind == "fifo" else meta.mkdir()
    got = {}
    t = threading.Thread(target=lambda: got.update(problems=verify(run)[0]), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive() and "not a regular file" in got["problems"][0]
    with pytest.raises(DucklingError, match="meta.json is not a regular file"):
        Recording(run)


# --- what a resume checks ------------------------------------------------------------------------------
def test_stream_ends_gives_the_last_step_of_every_stream(run, tmp_path):
    assert stream_ends(run) == {"wte.u16": 14, "scalars": 14, "probe": 12}
    w = write(tmp_path / "open", close=False, steps=10)  # a live recording: raw tails
    try:
        assert stream_ends(tmp_path / "open") == {"wte.u16": 8, "scalars": 9, "probe": 9}
    finally:
        w.close()
