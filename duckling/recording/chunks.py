"""Which file holds each chunk of a stream (streams.py), checked against the recording's manifest
(manifest.py) before anything is opened.

Chunk c of stream S is ``S.<c:05d>.blk`` (a committed block) or ``S.<c:05d>.raw`` (raw records). With a
manifest (today's recordings), the rule is:

- a block the manifest lists, present with the listed size and header checksum: the chunk (a raw chunk
  beside it is stale: a kill came between the block's commit and the raw chunk's deletion);
- else a raw chunk: the chunk (a block beside it that the manifest does not list is a commit that a
  kill cut before the manifest was written; one the manifest lists but is gone is a truncation cut
  likewise); the raw records are the truth;
- else a listed block that is gone (missing, renamed), a block the manifest does not list (copied from
  another recording, renamed), a listed block of another size or header (copied from another run,
  replaced), a gap in the chunk numbers, a file that is not a regular file (a FIFO, a folder, a
  link out of the recording): a problem naming the stream and the steps the chunk covers.

Without a manifest (recordings written before it existed) a block wins over a raw chunk, and only
gaps, non-regular files and the blocks' own checksums can be checked: not whether a block belongs
to this recording, nor whether the last chunks of a stream were deleted.

A block whose header is corrupt is not a problem at open: the chunk is "bad", its steps come from the
manifest (or, for the scalars, from its position), and only a read of those steps fails.
"""
from __future__ import annotations

import os
import re
import stat

import numpy as np

from duckling.recording.codec import CorruptBlock
from duckling.recording.manifest import entry_steps

CHUNK = re.compile(r"(\d{5})\.(blk|raw)")


def _what(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a broken link")):
        if test(mode):
            return name
    return "not a regular file"


def _irregular(entry: os.DirEntry, root_real: str) -> str | None:
    """Why a chunk's directory entry is not a regular file of this recording (None: it is). Only
    lstat/stat: nothing is opened, so a FIFO never blocks."""
    try:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.dirname(target) != root_real:
                return f"a symbolic link to {target}, outside the recording"
        mode = os.stat(entry.path).st_mode if entry.is_symlink() else entry.stat(follow_symlinks=False).st_mode
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None if stat.S_ISREG(mode) else _what(mode)


def listing(stream) -> tuple[dict[int, set], list[str]]:
    """({chunk: {"blk", "raw"} present as regular files}, problems: chunk files that are not)."""
    found, problems, prefix = {}, [], stream.name + "."
    root_real = os.path.realpath(stream.root)
    with os.scandir(stream.root) as it:
        for ent in it:
            m = CHUNK.fullmatch(ent.name[len(prefix):]) if ent.name.startswith(prefix) else None
            if m is None:
                continue
            c, kind = int(m[1]), m[2]
            why = _irregular(ent, root_real)
            if why:
                found.setdefault(c, set()).add("irregular")
                problems.append(f"{ent.path} is {why}, not a {'block' if kind == 'blk' else 'raw chunk'} "
                                f"file: chunk {c} of stream {stream.name} ({covers(stream, c)}) cannot be read")
            else:
                found.setdefault(c, set()).add(kind)
    return found, problems


def covers(stream, c: int, entry: dict | None = None) -> str:
    """What chunk c of ``stream`` covers, for a message: its steps when known, else its records."""
    e = entry or (stream.manifest.entry(stream.name, c) if stream.manifest is not None else None)
    if e is not None:
        return f"steps {e['first']}..{e['last']}"
    lo, hi = c * stream.block, (c + 1) * stream.block - 1
    return f"steps {lo}..{hi}" if stream.positional else f"its records {lo}..{hi}"


def _strict(stream) -> bool:
    m = stream.manifest
    return m is not None and (m.present or m.expected)


def resolve(stream) -> tuple[list, np.ndarray, list[str]]:
    """([(kind, n records)] per chunk, every record's step, problems); sets ``stream.kinds`` (chunk ->
    "blk" | "raw" | "bad") and ``stream.bad`` (chunk -> why). A torn last raw record is ignored."""
    for _ in range(5):  # a live writer may commit a block meanwhile: then look again
        try:
            return _resolve(stream)
        except FileNotFoundError:
            if stream.manifest is not None:
                stream.manifest.load()
    return _resolve(stream)


def _resolve(stream):
    found, problems = stream.list_chunks()  # access.py: the folder's entries, or the storage's listing
    strict = _strict(stream)
    listed = stream.manifest.chunks(stream.name) if strict else {}
    # (a block beside its raw chunk is a first commit cut before the manifest was written: not a loss)
    if strict and not stream.manifest.present and any("blk" in k and "raw" not in k for k in found.values()):
        problems.append(f"{stream.manifest.path} is missing, although meta.json says this recording keeps one, so its "
                        f"blocks cannot be checked (`duckling compact {stream.root.parent}` lists the blocks on disk in "
                        f"a new one, after checking every frame; whether they all belong to this run stays unchecked)")
        listed, strict = {}, False
    # the chunks a stream holds: listed ones, raw ones (the tail), and without a manifest every block;
    # a block the manifest does not list after them is named on its own, not as a gap before it
    held = [*listed, *(c for c, have in found.items() if have & {"raw", "irregular"} or not strict)]
    n = max(held, default=-1) + 1
    chunks, steps, kinds, bad = [], [], {}, {}
    for c in [*range(n), *sorted(c for c in found if c >= n)]:
        have, e = found.get(c, set()), listed.get(c)
        path = stream.blk_path(c)
        if "irregular" in have:
            continue  # named by listing()
        if "blk" in have and (e is not None or not strict):
            try:
                h, _ = stream.opening_header(c, e)
            except CorruptBlock as err:
                known = entry_steps(e) if e is not None else (
                    list(range(c * stream.block, (c + 1) * stream.block)) if stream.positional and c < n - 1 else None)
                if known is None:
                    problems.append(f"{path} is corrupt ({err}) and, without a manifest, the steps it holds are "
                                    f"unknown: stream {stream.name} cannot be read past {covers(stream, c)}")
                    break
                kinds[c], bad[c] = "bad", f"{path}: {err}"
                chunks.append(("bad", len(known)))
                steps.append(np.asarray(known, np.int64))
                continue
            if e is not None and (stream.file_size(c, "blk") != e["bytes"] or h["crc32"] != e["header_crc32"]):
                problems.append(f"{path} is not the block manifest.json lists for chunk {c} of stream {stream.name} "
                                f"({covers(stream, c, e)}): its size or header differs (copied from another run, or "
                                f"replaced)")
                continue
            kinds[c] = "blk"
            chunks.append(("blk", h["n"]))
            steps.append(np.asarray(h["steps"], np.int64))
        elif "raw" in have:
            size = stream.file_size(c, "raw")
            k = min(size // stream.rec_bytes, stream.block)
            kinds[c] = "raw"
            chunks.append(("raw", k))
            steps.append(stream._raw_trailers(c, k)["step"].astype(np.int64))
        elif "blk" in have:
            try:
                h, _ = stream._header(c)
                what = f"steps {h['steps'][0]}..{h['steps'][-1]}"
            except CorruptBlock:
                what = f"a corrupt header, {covers(stream, c)}"
            problems.append(f"{path} ({what}) is not listed in manifest.json: a block copied from another recording "
                            f"or renamed; stream {stream.name} has no chunk {c} of its own")
        elif e is not None:
            problems.append(f"chunk {c} of stream {stream.name} ({covers(stream, c, e)}), listed in manifest.json, "
                            f"is missing: {path.name} was deleted or renamed")
        else:
            problems.append(f"chunk {c} of stream {stream.name} ({covers(stream, c)}) is missing: no {path.name} "
                            f"or raw chunk, although later chunks exist")
    for i, (kind, k) in enumerate(chunks[:-1]):
        if k != stream.block and not problems:
            problems.append(f"chunk {i} of {stream.root / stream.name} holds {k} records, not {stream.block}, "
                            f"but is not the last chunk")
    stream.kinds, stream.bad = kinds, bad
    return chunks, (np.concatenate(steps) if steps else np.zeros(0, np.int64)), problems


def header_crc_of(blob: bytes) -> int:
    """The crc32 a block's bytes carry for their header (what the manifest records)."""
    return int.from_bytes(blob[12:16], "little")


def incomplete(root, problems: list[str]):
    """The DucklingError for a recording whose files do not match what it says it holds."""
    from duckling.errors import DucklingError

    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    run = root.parent if hasattr(root, "uri") else os.path.dirname(os.path.abspath(root))  # a StoragePath: a URI
    return DucklingError(f"the recording in {root} is not whole: {'; '.join(problems[:3])}{more}. Read as it is, it "
                         f"could give fewer or other steps than were recorded, so it is not read. Restore the files from a copy of "
                         f"the run (or re-record it); `duckling verify {run}` lists every problem.")
