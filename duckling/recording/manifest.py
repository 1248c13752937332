"""``RUN/recording/manifest.json``: every closed block of a recording, with its steps, size and hash
(docs/recording.md, "Manifest"). numpy-free, bottom of the recording package (streams.py uses it).

The file is rewritten whole and atomically (``files.write_json``) each time a block is committed, by
the code that commits it (``streams.Stream.write_block``, after the block's rename and before its raw
chunk is deleted), so at every moment it lists every block on disk except, after a kill, the one
whose commit was cut: that chunk's raw records are still there, and they are what a reader reads.
Within a process the updates are serialised by a lock; a recording has one committing process.

    {"manifest_version": 1, "hash": "sha256",
     "streams": {"wte.u16": [{"chunk": 0, "first": 0, "last": 126, "count": 64, "bytes": 123456,
                               "header_crc32": 305419896, "sha256": "9f86d0..."}, ...], ...}}

"first"/"last"/"count" are the block's first and last steps and its number of records; a block whose
steps are not evenly spaced also lists them all ("steps"). "header_crc32" is the crc32 that the
block's header carries (bytes 12..16 of the file): the reader compares it and the size at open
(cheap), ``verify`` the hash of every byte. SHA-256 (hashlib; hardware-accelerated on x86-64 and ARMv8)
costs ~2 ms per MB on this project's CPU, on the compaction thread, of the bytes already in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

from duckling.errors import DucklingError
from duckling.files import write_json

NAME = "manifest.json"
VERSION = 1
HASH = "sha256"
NOT_CHECKABLE = ("no manifest.json (written before manifests): whether each block belongs to this recording (a block "
                 "copied from another run over the same steps reads as its own) and whether a stream's last chunks "
                 "were deleted cannot be checked; `duckling compact {run}` adds one")
ENTRY_KEYS = ("chunk", "first", "last", "count", "bytes", "header_crc32", HASH)


def digest(data) -> str:
    """The content hash of a block's bytes (bytes or a buffer)."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path) -> str:
    """The content hash of a file, read 4 MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for part in iter(lambda: f.read(4 << 20), b""):
            h.update(part)
    return h.hexdigest()


def entry_steps(e: dict) -> list[int]:
    """Every step of a manifest entry (evenly spaced unless it lists them)."""
    if "steps" in e:
        return [int(s) for s in e["steps"]]
    n, a, b = e["count"], e["first"], e["last"]
    return [a] if n == 1 else [a + i * (b - a) // (n - 1) for i in range(n)]


def make_entry(c: int, steps, size: int, header_crc: int, sha: str) -> dict:
    steps = [int(s) for s in steps]
    e = {"chunk": int(c), "first": steps[0], "last": steps[-1], "count": len(steps), "bytes": int(size),
         "header_crc32": int(header_crc), HASH: sha}
    if entry_steps(e) != steps:
        e["steps"] = steps
    return e


def _bad(path, what: str) -> DucklingError:
    return DucklingError(f"{path} is not a valid recording manifest ({what}). It was edited or damaged: "
                         f"restore it from a copy of the run; `duckling compact RUN` rebuilds one from the "
                         f"block files (the blocks' origin then cannot be checked against the original).")


class Manifest:
    """The blocks of one recording that its manifest lists: ``entry(stream, chunk)``; ``add``/``drop``
    update the file (thread-safe within a process). ``present``: the file exists; ``expected``: the
    recording keeps one (meta.json's "manifest" key, written by today's writer and by compact)."""

    def __init__(self, root, expected: bool = False):
        self.root = root if hasattr(root, "uri") else Path(root)  # (a storage.StoragePath: remote.py)
        self.path = self.root / NAME
        self.expected = expected
        self._lock = threading.Lock()
        self.streams: dict[str, dict[int, dict]] = {}
        self.present = False
        self.load()

    def load(self) -> "Manifest":
        """(Re-)read the file; a missing one is an empty manifest (``present`` False)."""
        raw = self._read()
        if raw is None:
            self.streams, self.present = {}, False
            return self
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(self.path, f"not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("manifest_version") != VERSION or doc.get("hash") != HASH \
                or not isinstance(doc.get("streams"), dict):
            raise _bad(self.path, f"expected manifest_version {VERSION}, hash {HASH!r} and a streams object")
        out = {}
        for name, entries in doc["streams"].items():
            if not isinstance(entries, list):
                raise _bad(self.path, f"stream {name!r} is not a list")
            for e in entries:
                if not (isinstance(e, dict) and all(k in e for k in ENTRY_KEYS)
                        and all(type(e[k]) is int for k in ENTRY_KEYS if k != HASH) and e["count"] >= 1
                        and isinstance(e[HASH], str)):
                    raise _bad(self.path, f"an entry of stream {name!r} lacks one of {ENTRY_KEYS} or is malformed")
                out.setdefault(name, {})[e["chunk"]] = e
        self.streams, self.present = out, True
        return self

    def _read(self) -> bytes | None:
        """The file's bytes (None: there is none); remote.RemoteManifest reads them from a storage."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise _bad(self.path, "not a regular file")
        return self.path.read_bytes()

    def entry(self, stream: str, c: int) -> dict | None:
        return self.streams.get(stream, {}).get(c)

    def chunks(self, stream: str) -> dict[int, dict]:
        return self.streams.get(stream, {})

    def add(self, stream: str, c: int, steps, size: int, header_crc: int, sha: str) -> None:
        """Record block c of ``stream`` (just renamed into place) and rewrite the file."""
        with self._lock:
            self.streams.setdefault(stream, {})[int(c)] = make_entry(c, steps, size, header_crc, sha)
            self._save()

    def drop(self, stream: str, chunks) -> None:
        """Forget blocks ``chunks`` of ``stream`` (deleted, or made raw again by a truncation)."""
        with self._lock:
            mine = self.streams.get(stream, {})
            if any(int(c) in mine for c in chunks):
                for c in chunks:
                    mine.pop(int(c), None)
                self._save()

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        write_json(self.path, {"manifest_version": VERSION, "hash": HASH, "streams": {
            name: [e for _, e in sorted(entries.items())] for name, entries in sorted(self.streams.items()) if entries}},
            indent=None)
        self.present = True
