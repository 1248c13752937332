"""How a stream (streams.py) touches its files: ``LocalFiles``, the os calls of a recording folder on
this machine (a stat, a pread, a memory map). ``remote.RemoteFiles`` is the same set of methods over a
storage URI (duckling.storage), so the reader's logic is one for both.

The methods, per chunk c of the stream: ``_stat_key(c)`` (the block's size and what invalidates its
cached header), ``_head(c, size)`` (its header bytes), ``_open(c)`` (a context manager whose
``[a:b]`` are those bytes of the block), ``_has_blk(c)``, ``file_size(c, kind)``, ``_raw_view(c, n)``
(a raw chunk as uint8 records), ``list_chunks()`` (chunks.listing: what files the stream has) and
``opening_header(c, entry)`` (the header the check at open compares with the manifest entry).
"""
from __future__ import annotations

import os

import numpy as np

from duckling.recording.chunks import listing
from duckling.recording.codec import CorruptBlock


class BlockFile:
    """A block file whose slices are read with pread (``f[a:b]``: those bytes only). Cheaper than a
    memory map for the few scattered frames of a trajectory: no mapping to set up and tear down, no
    page faults; a context manager that closes it."""

    def __init__(self, path):
        self.path, self.fd = path, os.open(path, os.O_RDONLY)

    def __getitem__(self, s: slice) -> bytes:
        data = os.pread(self.fd, s.stop - s.start, s.start)
        if len(data) != s.stop - s.start:
            raise CorruptBlock(f"{self.path} is shorter than its header says (truncated?)")
        return data

    def __enter__(self) -> "BlockFile":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class LocalFiles:
    """A stream's files in a folder of this machine (mixed into streams.Stream)."""

    def _stat_key(self, c: int) -> tuple[int, tuple]:
        st = os.stat(self.blk_path(c))
        return st.st_size, (c, st.st_size, st.st_mtime_ns)

    def _head(self, c: int, size: int) -> bytes:
        with open(self.blk_path(c), "rb") as f:
            head = f.read(1 << 16)
            if len(head) >= 16 and head[:8] == b"DUCKBLK2":  # a long frame table: read it whole
                head += f.read(max(0, int.from_bytes(head[8:12], "little") + 16 - len(head)))
        return head

    def _open(self, c: int) -> BlockFile:
        """Block c's file, read only where a read's frames lie."""
        return BlockFile(self.blk_path(c))

    def _has_blk(self, c: int) -> bool:
        return self.blk_path(c).exists()

    def file_size(self, c: int, kind: str) -> int:
        return os.stat(self.blk_path(c) if kind == "blk" else self.raw_path(c)).st_size

    def _raw_view(self, c: int, n: int | None = None) -> np.ndarray:
        """Raw chunk c as uint8 (its first ``n`` records, shaped (n, rec_bytes), when n is given)."""
        if n is None:
            return np.memmap(self.raw_path(c), np.uint8, "r")
        return np.memmap(self.raw_path(c), np.uint8, "r", shape=(n, self.rec_bytes))

    def list_chunks(self) -> tuple[dict[int, set], list[str]]:
        return listing(self)

    def opening_header(self, c: int, entry: dict | None) -> tuple[dict, object]:
        return self._header(c)
