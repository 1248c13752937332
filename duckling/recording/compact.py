"""``compact(run_dir)``: convert a format-1 recording to format 2 in place, safely.

The v2 files are written next to the v1 files (their names never collide), read back and compared
bit for bit with the v1 files, and only then is meta.json replaced atomically (the commit point);
the v1 files are deleted last. A kill before the commit leaves the v1 recording (v2 leftovers are
ignored by the reader and removed by the next ``compact``); a kill after it leaves the v2 recording
(v1 leftovers are removed by the next ``compact``).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time

import numpy as np

from duckling.errors import DucklingError
from duckling.recording.layout import BLOCK_STEPS, FORMAT_V2, layout_keys, make_streams
from duckling.recording.reader import FIELDS, Recording, _atomic_json, _rec_dir
from duckling.recording.streams import Stream


def _v1_files(root, meta) -> list:
    mats = meta.get("matrices", [])
    names = {"scalar_steps.i64", "snap_steps.i64", "hidden_mean.f32", "lr.f32", "probe.f32"}
    names |= {f"{m}.rows.f32" for m in mats}
    return [p for p in root.iterdir() if p.name in names or (p.name.split(".")[0] in mats and len(
        p.name.split(".")) == 3 and p.name.split(".")[1].isdigit())]


def _v2_files(root) -> list:
    return [p for p in root.iterdir() if p.suffix in (".blk", ".raw", ".tmp") and p.name != "meta.json.tmp"]


def _locked(root) -> bool:
    fd = os.open(root / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _write_v2(old: Recording, root, meta2: dict) -> None:
    """Every record of ``old`` into the v2 streams, a block at a time (memory: one block)."""
    parts = old._lay.parts
    snaps, scalars, probe = make_streams(root, meta2, parts)
    B, d = meta2["block_steps"], old.shape[1]

    def blocks(stream: Stream, n: int, get) -> None:
        for c in range(-(-n // B)):
            pos = np.arange(c * B, min(n, (c + 1) * B))
            data, steps = get(pos)
            stream.write_block(c, np.ascontiguousarray(data).reshape(len(pos), -1), steps)

    for m in old.matrices:
        for ext, sl, dt in parts:
            def get(pos, m=m, ext=ext, sl=sl, dt=dt):  # v1 chunks need not align with blocks
                out = np.empty((len(pos), sl.stop - sl.start, d), dt)
                for j, p in enumerate(pos):
                    ch, local = divmod(int(p), old._lay.chunk)
                    out[j] = old._chunk(m, ch, ext, sl, dt)[local]
                return out, old.steps[pos]
            blocks(snaps[(m, ext)], len(old.steps), get)
    n = len(old.scalar_steps)
    rows = {(m, f): old.rows(f, matrix=m) for m in old.matrices for f in FIELDS}
    hidden, lr = old.hidden_mean, old.lr

    def get_scalars(pos):
        cols = [np.asarray(rows[(m, f)][pos[0]:pos[-1] + 1]) for m in old.matrices for f in FIELDS]
        return np.concatenate(cols + [hidden[pos], lr[pos, None]], axis=1).astype(np.float32), pos
    blocks(scalars, n, get_scalars)
    pr = old.probe
    blocks(probe, len(pr), lambda pos: (pr[pos, 1:], pr[pos, 0].astype(np.int64)))


def _verify(old: Recording, root, meta2: dict) -> None:
    from duckling.recording.layout import V2Reader
    new = V2Reader(root, meta2, old._lay.parts)
    sc, st = new.reload()
    if not (np.array_equal(sc, old.scalar_steps) and np.array_equal(st, old.steps)):
        raise DucklingError(f"compaction of {root} produced different steps; the v1 recording is kept.")
    for m in old.matrices:
        for i, s in enumerate(old.steps):
            if not np.array_equal(new.snapshot(i, m).view(np.uint32), old.snapshot(int(s), m).view(np.uint32)):
                raise DucklingError(f"compaction of {root}: snapshot {s} of {m} differs; the v1 recording is kept.")
    for mi, m in enumerate(old.matrices):
        for fi, f in enumerate(FIELDS):
            if not np.array_equal(np.asarray(new.rows(fi, mi)).view(np.uint32),
                                  np.asarray(old.rows(f, matrix=m)).view(np.uint32)):
                raise DucklingError(f"compaction of {root}: {m} {f} differs; the v1 recording is kept.")
    a = len(old.matrices) * len(FIELDS) * old.shape[0]
    same = [np.array_equal(new.per_step(slice(a, a + old.shape[1])).view(np.uint32), old.hidden_mean.view(np.uint32)),
            np.array_equal(new.per_step(slice(a + old.shape[1], a + old.shape[1] + 1))[:, 0].view(np.uint32),
                           old.lr.view(np.uint32)),
            np.array_equal(new.probe().view(np.uint32), old.probe.view(np.uint32))]
    if not all(same):
        raise DucklingError(f"compaction of {root}: hidden_mean, lr or probe differ; the v1 recording is kept.")


def compact(run_dir, block_steps: int = BLOCK_STEPS) -> dict:
    """Convert RUN_DIR's format-1 recording to format 2 in place; returns what it did.

    Refuses (DucklingError) a folder without a recording, a recording that is already format 2
    (after removing any v1 leftovers of an interrupted compaction), one that a live process is
    writing, and a disk without room for the v2 copy next to the v1 files."""
    t0 = time.perf_counter()
    root = _rec_dir(run_dir)
    if not (root / "meta.json").exists():
        raise DucklingError(f"{run_dir} is not a recorded run (no {root}/meta.json). Pass a run folder.")
    meta = json.loads((root / "meta.json").read_text())
    if _locked(root):
        raise DucklingError(f"{root} is being written by a live run; compact it after the run ends.")
    if meta.get("format_version") == FORMAT_V2:
        leftovers = _v1_files(root, meta)
        for p in leftovers:
            p.unlink()
        raise DucklingError(f"{root} is already format 2 (compressed)" + (
            f"; removed {len(leftovers)} format-1 file(s) left by an interrupted compaction." if leftovers
            else "; nothing to do."))
    old = Recording(root)  # checks the v1 metadata and structure
    for p in _v2_files(root):  # leftovers of an interrupted compaction
        p.unlink()
    before = old.bytes_on_disk
    if shutil.disk_usage(root).free < before:  # v2 is never larger than v1 (+1%), v1 stays until the end
        raise DucklingError(f"compacting {root} needs up to {before / 1e9:.2f} GB free next to it (the v1 "
                            f"files are kept until the v2 copy is verified); free disk space first.")
    meta2 = dict(meta, format_version=FORMAT_V2, **layout_keys(block_steps))
    try:
        _write_v2(old, root, meta2)
        _verify(old, root, meta2)
    except BaseException:
        for p in _v2_files(root):
            p.unlink()
        raise
    _atomic_json(root / "meta.json", meta2)  # the commit point
    for p in _v1_files(root, meta):
        p.unlink()
    new = Recording(root)
    return {"run": str(root.parent), "steps": len(new.scalar_steps), "snapshots": len(new.steps),
            "bytes_before": before, "bytes_after": new.bytes_on_disk,
            "compression_ratio": round(before / max(new.bytes_on_disk, 1), 2),
            "seconds": round(time.perf_counter() - t0, 1)}
