"""A recording's parts, checked and finished: ``verify`` (``Recording.verify``, ``duckling verify RUN``),
``finish_compaction`` (what a kill or a full disk left: ``duckling compact RUN`` and the writer's open for
appending), ``adopt_manifest`` (a manifest for a recording written before manifests) and
``stream_ends`` (the last step every stream reaches: a resume checks them against its checkpoint).
"""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from duckling.errors import DucklingError
from duckling.files import holder
from duckling.recording.chunks import covers, header_crc_of, incomplete, listing
from duckling.recording.codec import CorruptBlock, read_header
from duckling.recording.layout import check_meta, make_streams, older_layout, read_meta, rec_dir
from duckling.recording.manifest import HASH, NOT_CHECKABLE, digest, file_digest, make_entry
from duckling.recording.reader import Blocks, Recording


def _streams(root: Path, meta: dict) -> list:
    snaps, scalars, probe = make_streams(root, meta)
    return [*snaps.values(), scalars, probe]


def _write_error(e: OSError, root: Path, what: str) -> DucklingError:
    """A failed write during a compaction as a DucklingError naming its true cause."""
    run = root.parent
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"the disk is full. Nothing is lost (the raw records stay, no .tmp is left): free disk space, then run `duckling compact {run}` again"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = (f"the folder is not writable ({e.strerror}). Nothing was changed; run it where the folder can be written "
               f"(or on a writable copy of {run})")
    else:
        fix = f"{e.strerror or e}. Nothing is lost (the raw records stay); fix the cause, then run `duckling compact {run}` again"
    return DucklingError(f"{what} in {root} failed: {fix}.")


def adopt_manifest(root: Path, streams: list) -> int:
    """List every block on disk in a new manifest.json (a recording written before manifests, or one whose
    commit was cut before its first listing); returns the number listed. Checks each header, not the frames."""
    man = streams[0].manifest
    n = 0
    for st in streams:
        for c, have in sorted(listing(st)[0].items()):
            if "blk" not in have:
                continue
            blob = st.blk_path(c).read_bytes()
            try:
                h, _ = read_header(blob, len(blob))
            except CorruptBlock as e:
                raise DucklingError(f"{st.blk_path(c)} is corrupt ({e}): it cannot be listed in a new manifest.json "
                                    f"({covers(st, c)}). Restore it from a copy of the run first.") from None
            man.streams.setdefault(st.name, {})[c] = _entry(c, h["steps"], blob)
            n += 1
    man.save()
    return n


def _entry(c, steps, blob: bytes) -> dict:
    return make_entry(c, steps, len(blob), header_crc_of(blob), digest(blob))


def finish_compaction(root, *, upto: int | None = None, tails: bool = False, adopt: bool = False) -> list[str]:
    """Finish what a kill or a full disk left in today's layout (the caller holds the run's lock): delete
    ``*.tmp`` and the redundant file of a chunk that is both a block and a raw chunk, list the blocks in a
    manifest if there is none yet (``adopt``: also where meta.json says there was one), and compact every full raw chunk (``tails``: the last partial ones too).
    ``upto``: a resume from step ``upto`` follows, which drops every later record; what a cut truncation
    left after it is dropped here too. Returns what was done, one phrase each; raises a DucklingError
    naming the cause (a full disk, a read-only folder, a corrupt raw record, a missing block)."""
    root = Path(root)
    meta = read_meta(root)
    check_meta(root, meta)
    streams = _streams(root, meta)
    man, done = streams[0].manifest, []
    try:
        for st in streams:
            done += [f"removed {name}" for name in st.tidy()]
        if not man.present and (adopt or not man.expected) and any("blk" in h for st in streams for h in listing(st)[0].values()):
            done.append(f"listed {adopt_manifest(root, streams)} blocks in a new manifest.json")
        if upto is not None:
            _drop_after(streams, upto, done)
        for st in streams:
            chunks, steps = st.scan()
            for c, (kind, n) in enumerate(chunks):
                last = int(steps[min(len(steps), (c + 1) * st.block) - 1]) if n else None
                if kind == "raw" and n and (n == st.block or (tails and c == len(chunks) - 1)) \
                        and (upto is None or last <= upto):  # (a resume drops later records)
                    try:
                        st.compact(c, n)
                    except CorruptBlock as e:
                        raise DucklingError(f"chunk {c} of stream {st.name} in {root} ({covers(st, c)}) holds a corrupt "
                                            f"raw record ({e}), so it is left raw; the steps before it read. Restore "
                                            f"the file from a copy of the run, or resume from an earlier checkpoint.") from None
                    done.append(f"compacted {st.name} chunk {c}")
    except OSError as e:
        raise _write_error(e, root, "finishing the interrupted compaction") from e
    return done


def _drop_after(streams: list, upto: int, done: list) -> None:
    """A truncation to step ``upto`` cut by a kill: manifest entries of deleted blocks, blocks deleted
    from the manifest but not yet from the disk, all after ``upto``."""
    man = streams[0].manifest
    for st in streams:
        found = listing(st)[0]
        gone = [c for c, e in man.chunks(st.name).items()
                if "blk" not in found.get(c, set()) and ("raw" in found.get(c, set()) or e["first"] > upto)]
        if gone:
            man.drop(st.name, gone)
            done.append(f"forgot {len(gone)} {st.name} blocks a cut truncation deleted")
        for c, have in found.items():
            if have == {"blk"} and man.entry(st.name, c) is None:
                try:
                    h, _ = st._header(c)
                except CorruptBlock:
                    continue
                if h["steps"][0] > upto:
                    st.blk_path(c).unlink()
                    done.append(f"removed {st.blk_path(c).name} (after step {upto})")


def stream_ends(run_dir) -> dict[str, int | None]:
    """The step of the last record of every stream of a today's-layout recording ({"scalars": N,
    "wte.u16": M, ..., "probe": P}; None: no record), after checking its files (a DucklingError names
    a missing or foreign chunk). Snapshot streams hold every ``meta["every"]``-th step (plus a run's last);
    a snapshot or probe record after the last scalars step is not committed."""
    root = rec_dir(run_dir)
    meta = read_meta(root)
    if older_layout(meta):
        raise DucklingError(f"{root} is {older_layout(meta)}: upgrade it with `duckling compact {root.parent}` first.")
    check_meta(root, meta)
    found, problems = Blocks(root, meta).check()
    if problems:
        raise incomplete(root, problems)
    return {name: (int(s[-1]) if len(s) else None) for name, s in found.items()}


def verify(run_dir) -> tuple[list[str], str]:
    """(problems, one-line summary) of a whole recording: meta.json, its files against the manifest
    (every byte hashed), every frame and raw record checksum, and meta.json's status and last step
    against the files. No problem: the recording is whole."""
    root = rec_dir(run_dir)
    try:
        meta = read_meta(root)
        if meta.get("format_version") == 1 or older_layout(meta):
            rec = Recording(root) if meta.get("format_version") == 1 else None
            kind = older_layout(meta)
            return ([f"{root} is {kind}: it has no checksums or manifest to verify{' (its files do read)' if rec else ''}; "
                     f"upgrade it with `duckling compact {root.parent}` (lossless, verified), then verify it"], "")
        check_meta(root, meta)
        blocks = Blocks(root, meta)
        found, problems = blocks.check()
    except DucklingError as e:
        return [str(e)], ""
    man, n_blk, n_raw, size = blocks.scalars.manifest, 0, 0, 0
    for st in blocks.streams:
        for c, kind in sorted(st.kinds.items()):
            if kind == "bad":
                problems.append(f"{st.bad[c]} ({st.name}, {covers(st, c)})")
            elif kind == "blk":
                n_blk += 1
                size += st.blk_path(c).stat().st_size
                e = man.entry(st.name, c)
                if e is not None and file_digest(st.blk_path(c)) != e[HASH]:
                    problems.append(f"{st.blk_path(c)} ({st.name}, {covers(st, c)}) differs from the block manifest.json "
                                    f"lists (its {HASH} hash)")
                    continue
                try:
                    st.decode_all(c)
                except CorruptBlock as err:
                    problems.append(f"{st.blk_path(c)} ({st.name}, {covers(st, c)}) fails its checksum ({err})")
            else:
                n_raw += 1
                try:
                    st.raw_records(c, len(_chunk_steps(st, c, found[st.name])))
                except CorruptBlock as err:
                    problems.append(f"{st.raw_path(c)} ({st.name}, {covers(st, c)}): {err}")
        problems += [f"{p} is left by an interrupted compaction" for p in sorted(root.glob(f"{st.name}.*.tmp"))]
    if not problems:
        try:
            blocks.reload()
        except DucklingError as e:
            problems.append(str(e))
    status = meta.get("status")
    if status == "complete" and n_raw:
        problems.append(f"meta.json says status 'complete' but {n_raw} chunks are still raw: a compaction was interrupted")
    if status == "recording" and holder(root.parent) is None:
        problems.append("meta.json says status 'recording' but no process is writing it: the run or its close-time "
                        "compaction was interrupted")
    if any("interrupted" in p for p in problems):
        problems.append(f"`duckling compact {root.parent}` finishes an interrupted compaction (or resume the run)")
    steps = len(found.get("scalars", ()))
    on_disk = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    summary = (f"{root}: whole: {steps:,} steps, {len(blocks.steps) if not problems else 0:,} snapshots; {n_blk} blocks "
               f"({on_disk}) and {n_raw} raw chunks in {len(blocks.streams)} streams, every checksum verified"
               + (f", every block matches manifest.json ({HASH})" if man.present else f"; {NOT_CHECKABLE.format(run=root.parent)}"))
    return problems, summary


def _chunk_steps(st, c: int, steps: np.ndarray) -> np.ndarray:
    return steps[c * st.block:(c + 1) * st.block]
