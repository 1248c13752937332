"""``compact(run_dir)`` (``duckling compact RUN``): upgrade an older recording to today's layout, in place
and safely (docs/recording.md, "Older recordings").

Format 1 and the early format-2 layouts (meta.json without group_rows / dead_group_rows /
segment_steps) are rewritten to today's layout in ``RUN/recording.new``, a block at a time; the copy is
read back and compared bit for bit with the old recording, marked verified, and only then swapped with
``RUN/recording`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames,
``recording`` -> ``recording.old`` and ``recording.new`` -> ``recording``). The old files go last.
At every moment ``RUN/recording`` is a complete recording, old or new (on the two-rename fallback,
except between its two renames), and a rerun of compact finishes or undoes what an interruption left.
A recording already in today's layout only has its meta.json brought up to date (the previous
release's "precision" key is renamed "dtype"). compact holds the run folder's lock throughout.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from duckling.errors import DucklingError
from duckling.files import folder_lock, fsync_path, write_json
from duckling.recording.layout import (BLOCK_STEPS, FIELDS, FORMAT, LAYOUT_KEYS, PROBE_COLUMNS, check_meta,
                                       layout_keys, make_streams, older_layout, read_meta, rec_dir,
                                       snapshot_parts)
from duckling.recording.manifest import NAME as MANIFEST
from duckling.recording.reader import Recording
from duckling.recording.repair import finish_compaction, verify

STAGE, OLD, VERIFIED = "recording.new", "recording.old", ".verified"
LEGACY_GROUP_ROWS = 64  # the first format-2 layout: 64 rows per frame, dead rows alike, no segments
EARLY_REQUIRED = ("format_version", "matrices", "shape", "dtype", "every", "n_live", "block_steps")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap(root: Path, stage: Path) -> None:
    """``stage`` (verified) becomes ``root``; the old recording ends up in ``stage`` or ``RUN/recording.old``."""
    run = root.parent
    if not _exchange(root, stage):
        os.rename(root, run / OLD)
        fsync_path(run)
        os.rename(stage, root)
    fsync_path(run)


def _recover(root: Path) -> str | None:
    """Finish or undo an upgrade that an interruption left; returns what was done (None: nothing)."""
    run = root.parent
    stage, old = run / STAGE, run / OLD
    done = None
    if not root.exists() and old.exists():  # between the fallback's two renames
        os.rename(stage if (stage / VERIFIED).exists() else old, root)
        fsync_path(run)
        done = "finished an interrupted upgrade"  # (or, unverified, undid it: the old one is back)
    if not root.exists():
        return done
    current = older_layout(read_meta(root)) is None
    for leftover in (stage, old):
        if leftover.exists():  # today's recording: the old one, swapped out; else an unfinished copy
            shutil.rmtree(leftover)
            done = done or ("finished an interrupted upgrade" if current else "removed an unfinished upgrade copy")
    (root / VERIFIED).unlink(missing_ok=True)
    return done


def _blocks(n: int, B: int):
    for c in range(-(-n // B)):
        yield c, np.arange(c * B, min(n, (c + 1) * B))


def _stored(values: np.ndarray, ext: str) -> np.ndarray:
    """float32 values read back -> the bits a part stores (exact: bf16 values are widened bits)."""
    return (values.view(np.uint32) >> 16).astype(np.uint16) if ext == "u16" else values


def _scalars(rec: Recording, pos: np.ndarray, hidden, lr) -> np.ndarray:
    a, b = int(pos[0]), int(pos[-1]) + 1
    cols = [np.asarray(rec.rows(f, matrix=m)[a:b]) for m in rec.matrices for f in FIELDS]
    return np.ascontiguousarray(np.concatenate(cols + [hidden[a:b], lr[a:b, None]], axis=1), np.float32)


def _write(old: Recording, stage: Path, meta: dict) -> None:
    """Every record of ``old`` into today's streams in ``stage``, a block at a time (memory: one block)."""
    snaps, scalars, probe = make_streams(stage, meta)
    B, (V, _) = meta["block_steps"], old.shape
    parts, ids = snapshot_parts(meta["dtype"], V, meta["n_live"]), np.arange(V)
    for m in old.matrices:
        for c, pos in _blocks(len(old.steps), B):
            W = old.trajectory(ids, old.steps[pos], matrix=m)
            for ext, sl, _ in parts:
                rec = np.ascontiguousarray(_stored(W[:, sl], ext)).reshape(len(pos), -1)
                snaps[(m, ext)].write_block(c, rec, old.steps[pos])
    hidden, lr = old.hidden_mean, old.lr
    for c, pos in _blocks(len(old.scalar_steps), B):
        scalars.write_block(c, _scalars(old, pos, hidden, lr), old.scalar_steps[pos])
    pr = old.probe
    for c, pos in _blocks(len(pr), B):
        probe.write_block(c, np.ascontiguousarray(pr[pos, 1:]), pr[pos, 0].astype(np.int64))


def _verify(old: Recording, new: Recording) -> None:
    """Bit for bit: steps, every snapshot, every per-step scalar, the probe."""
    def differ(what: str) -> DucklingError:
        return DucklingError(f"upgrading {old.root}: the new copy's {what} differ from the old recording's; "
                             f"the old recording is kept, unchanged. Please report this.")
    bits = lambda x: np.ascontiguousarray(x).view(np.uint32)  # noqa: E731
    if not (np.array_equal(new.steps, old.steps) and np.array_equal(new.scalar_steps, old.scalar_steps)):
        raise differ("steps")
    ids, B = np.arange(old.shape[0]), new.meta["block_steps"]
    for m in old.matrices:
        for _, pos in _blocks(len(old.steps), B):
            s = old.steps[pos]
            if not np.array_equal(bits(new.trajectory(ids, s, m)), bits(old.trajectory(ids, s, m))):
                raise differ(f"{m} snapshots at steps {s[0]}..{s[-1]}")
    h_old, h_new, lr_old, lr_new = old.hidden_mean, new.hidden_mean, old.lr, new.lr
    for _, pos in _blocks(len(old.scalar_steps), B):
        if not np.array_equal(bits(_scalars(new, pos, h_new, lr_new)), bits(_scalars(old, pos, h_old, lr_old))):
            raise differ(f"per-step scalars at steps {pos[0]}..{pos[-1]}")
    if not np.array_equal(bits(new.probe), bits(old.probe)):
        raise differ("probe")


def _today(meta: dict) -> dict:
    """Today's meta.json for an older recording: its keys, the layout's keys, "dtype" (never "precision")."""
    block = meta["block_steps"] if meta["format_version"] == FORMAT else BLOCK_STEPS
    out = {k: v for k, v in meta.items() if k not in ("precision", "chunk_steps", *LAYOUT_KEYS)}
    V, n_live = meta["shape"][0], meta["n_live"]
    out.update(format_version=FORMAT, n_dead=V - n_live, fields=list(FIELDS), probe_columns=list(PROBE_COLUMNS),
               **layout_keys(block), manifest=MANIFEST, status=meta.get("status", "complete"))
    return out


def _upgrade_error(e: OSError, root: Path) -> DucklingError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = "the disk filled up while the new copy was written; free disk space"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        cause = f"the run folder is not writable ({e.strerror}); run it where the folder can be written, or on a writable copy"
    else:
        cause = f"{e.strerror or e}; fix the cause"
    return DucklingError(f"upgrading {root} failed: {cause}, then run `duckling compact {root.parent}` again. The old "
                         f"recording is untouched and the unfinished copy was removed.")


def _finish(root: Path, meta: dict) -> str | None:
    """Today's layout: finish an interrupted compaction (every raw chunk compacted, a manifest added to
    a recording without one after every frame is checked), rename "precision", make the status true."""
    changed = "precision" in (root / "meta.json").read_text()
    if not (root / MANIFEST).exists():  # written before manifests (or the file was lost): every frame checked first
        problems, _ = verify(root)
        bad = [p for p in problems if f"{MANIFEST} is missing" not in p and "interrupted" not in p and "finishes" not in p]
        if bad:
            raise DucklingError(f"{root} cannot be given a manifest: {'; '.join(bad[:3])}. Restore the files from a "
                                f"copy of the run first.")
        changed = changed or meta.get("manifest") != MANIFEST
        meta["manifest"] = MANIFEST
    done = finish_compaction(root, tails=True, adopt=True)
    (root / "writer.lock").unlink(missing_ok=True)  # the previous release's lock file
    if meta.get("status") == "recording":  # compact holds the run's lock: nobody is writing it
        meta["status"], meta["last_step"] = "interrupted", int(len(Recording(root).scalar_steps) - 1)
        done.append("status 'recording' (no process writes it) set to 'interrupted'")
        changed = True
    if changed:
        try:
            write_json(root / "meta.json", meta)
        except OSError as e:
            raise _upgrade_error(e, root) from e
    n = sum(x.startswith("compacted") for x in done)
    return None if not done else (f"finished an interrupted compaction ({n} chunks)" if n else "") + \
        ("; " if n and len(done) > n else "") + "; ".join(x for x in done if not x.startswith("compacted"))


def _reader_of(root: Path, meta: dict) -> Recording:
    """A reader of an older layout: format 1 as is; an early format-2 layout with the keys it implies."""
    if meta["format_version"] == 1:
        return Recording(root, _meta=meta)
    check_meta(root, meta, EARLY_REQUIRED)
    g = meta.get("group_rows", LEGACY_GROUP_ROWS)
    return Recording(root, _meta={**meta, "group_rows": g, "dead_group_rows": meta.get("dead_group_rows", g),
                                  "segment_steps": meta.get("segment_steps")})


def compact(run_dir) -> dict:
    """Upgrade RUN_DIR's recording to today's layout in place (see the module docstring); returns what
    it did: {"run", "upgraded_from" (None: already today's layout), "steps", "snapshots", "bytes_before",
    "bytes_after", "compression_ratio", "seconds", "recovered" (what an earlier interruption left, undone
    or finished)}. Refuses (DucklingError) a folder without a recording, one that a live process holds,
    and a disk without room for the new copy beside the old files."""
    t0 = time.perf_counter()
    root = rec_dir(run_dir)
    run = root.parent
    if not root.exists() and not (run / OLD).exists():
        raise DucklingError(f"{run_dir} is not a recorded run (no {root}/meta.json). Pass a run folder.")
    with folder_lock(run):
        recovered = _recover(root)
        meta = read_meta(root)
        kind = older_layout(meta)
        if kind is None:  # today's layout: what an interruption left finished, meta.json brought up to date
            check_meta(root, meta)
            before = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
            finished = _finish(root, meta)
            if finished:
                recovered = "; ".join(x for x in (recovered, finished) if x)
            rec = Recording(root)
            return {"run": str(run), "upgraded_from": None, "steps": len(rec.scalar_steps),
                    "snapshots": len(rec.steps), "bytes_before": before, "bytes_after": rec.bytes_on_disk,
                    "compression_ratio": round(rec.compression_ratio, 2),
                    "seconds": round(time.perf_counter() - t0, 1), "recovered": recovered}
        old = _reader_of(root, meta)
        before = old.bytes_on_disk
        if shutil.disk_usage(run).free < 1.25 * before + (1 << 20):  # 1-row dead frames: up to ~20% more
            raise DucklingError(f"upgrading {root} needs up to {before / 1e9:.2f} GB free beside it (the old "
                                f"files are kept until the new copy is verified); free disk space first.")
        stage, meta2 = run / STAGE, _today(meta)
        try:
            stage.mkdir()
            write_json(stage / "meta.json", meta2)
            _write(old, stage, meta2)
            _verify(old, Recording(stage))
            fsync_path(stage)
            (stage / VERIFIED).touch()
            fsync_path(stage)
        except OSError as e:  # a full disk, a read-only folder: the old recording is untouched, the copy goes
            shutil.rmtree(stage, ignore_errors=True)
            raise _upgrade_error(e, root) from e
        _swap(root, stage)  # the commit point
        _recover(root)  # the old files go
        new = Recording(root)
        return {"run": str(run), "upgraded_from": kind, "steps": len(new.scalar_steps), "snapshots": len(new.steps),
                "bytes_before": before, "bytes_after": new.bytes_on_disk,
                "compression_ratio": round(before / max(new.bytes_on_disk, 1), 2),
                "seconds": round(time.perf_counter() - t0, 1), "recovered": recovered}
