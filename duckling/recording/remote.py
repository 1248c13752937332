"""A recording read straight from a storage URI (duckling.storage: ``s3://``, ``gs://``, ``memory://``, any
fsspec protocol), lazily: ``Recording("s3://bucket/sweep/run")`` reads the listing of ``run/recording/``,
its ``meta.json`` and ``manifest.json``, and nothing else until a read; a snapshot then fetches the one
block that holds it (whole, so that it can be checked), a trajectory the blocks of its steps.

- Every block the manifest lists is checked against its size and SHA-256 before use; a block that
  differs (changed in the storage, cut short) is a DucklingError naming the block and the steps it holds,
  and only those steps fail. The check at open compares the listing with the manifest (a missing, extra
  or resized block names its steps) without reading any block. A raw chunk (a run still recording) is
  fetched whole; its records carry their own checksums.
- Fetched blocks are kept in this process (``MEMORY_BYTES``) and in a cache folder,
  ``$DUCKLING_CACHE/blocks`` (default ``~/.cache/duckling``; ``DUCKLING_CACHE=off``: none), named by
  their SHA-256 and checked again when read from there.
- The analyses read a few small files of the run folder beside the recording (config.json, run_info.json,
  token_mapping.json, the Trainer's trainer_state.json): ``RemoteRun.staged()`` copies those into
  ``$DUCKLING_CACHE/runs/`` and ``Recording.run_dir`` is that copy.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

from duckling.errors import DucklingError
from duckling.files import write_atomic
from duckling.recording.chunks import CHUNK
from duckling.recording.codec import CorruptBlock
from duckling.recording.layout import SUBDIR, parse_meta
from duckling.recording.manifest import NAME as MANIFEST, Manifest, digest, entry_steps
from duckling.recording.streams import Stream
from duckling.storage import Storage, StoragePath

MEMORY_BYTES = 256 << 20  # fetched block bytes kept per remote recording
HEADER_GUESS = 4096  # bytes read for a block header without a manifest entry (more when its frame table is longer)


def cache_root() -> Path | None:
    """The local cache folder ($DUCKLING_CACHE, else ~/.cache/duckling; None when DUCKLING_CACHE=off)."""
    env = os.environ.get("DUCKLING_CACHE")
    if env and env.lower() == "off":
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "duckling"


class RemoteRun:
    """One run folder in a storage: the listing of its recording and the blocks fetched from it."""

    def __init__(self, uri: str):
        st = Storage(uri)
        if st.exists("meta.json"):  # the recording folder itself
            self.rec_storage, self.run_uri = st, str(StoragePath(st.uri).parent)
        else:
            self.rec_storage, self.run_uri = Storage(f"{st.uri}/{SUBDIR}"), st.uri
        self.root = StoragePath(self.rec_storage.uri)
        self.sizes: dict[str, int] = {}
        self.fresh = False
        self._blobs: OrderedDict = OrderedDict()
        self._blob_bytes = 0
        self._staged: Path | None = None
        self.refresh()

    def refresh(self) -> None:
        """List the recording's files again ({name: size}; a run still recording grows)."""
        self.sizes = {k: v for k, v in self.rec_storage.files().items() if "/" not in k}
        self.fresh = True

    def meta(self) -> dict:
        raw = self.read_small("meta.json")
        if raw is None:
            raise DucklingError(f"no recording at {self.run_uri} (no {SUBDIR}/meta.json in the storage). Pass the URI "
                                f"of a run folder trained with recording enabled (sweep runs: STORAGE/RUN_NAME).")
        return parse_meta(self.root, raw)

    def read_small(self, name: str) -> bytes | None:
        if name not in self.sizes:
            return None
        try:
            return self.rec_storage.read_bytes(name)
        except FileNotFoundError:
            return None

    def stream_args(self, meta: dict) -> dict:
        """make_streams' arguments for this recording: remote streams and manifest."""
        man = RemoteManifest(self, self.root, expected=meta.get("manifest") == MANIFEST)
        return {"stream": functools.partial(RemoteStream, self), "manifest": man}

    # ------------------------------------------------------------ fetching
    def _keep(self, key, blob: bytes) -> bytes:
        self._blobs[key] = blob
        self._blob_bytes += len(blob)
        while self._blob_bytes > MEMORY_BYTES and len(self._blobs) > 1:
            self._blob_bytes -= len(self._blobs.popitem(last=False)[1])
        return blob

    def block(self, name: str, entry: dict | None) -> bytes:
        """The whole block file ``name``, checked against its manifest ``entry`` (size, SHA-256) when
        there is one; CorruptBlock when it differs (the caller names the steps)."""
        key = entry["sha256"] if entry is not None else (name, self.sizes.get(name))
        if key in self._blobs:
            self._blobs.move_to_end(key)
            return self._blobs[key]
        blob = _from_disk(entry) if entry is not None else None
        if blob is None:
            try:
                blob = self.rec_storage.read_bytes(name)
            except FileNotFoundError:
                raise CorruptBlock(f"{self.root / name} is gone from the storage") from None
            if entry is not None:
                if len(blob) != entry["bytes"] or digest(blob) != entry["sha256"]:
                    raise CorruptBlock(f"{self.root / name} is not the block manifest.json lists: {len(blob)} bytes "
                                       f"with another SHA-256, {entry['bytes']} bytes listed (changed in the storage "
                                       f"or cut short in transit)")
                _to_disk(entry, blob)
        return self._keep(key, blob)

    def head(self, name: str, size: int) -> bytes:
        """A block's header by ranged reads (a block no manifest entry vouches for: its header is all
        the check at open needs)."""
        head = self.rec_storage.read_range(name, 0, min(size, HEADER_GUESS))
        if len(head) >= 16 and head[:8] == b"DUCKBLK2":
            need = min(size, int.from_bytes(head[8:12], "little") + 16)
            if need > len(head):
                head += self.rec_storage.read_range(name, len(head), need - len(head))
        return head

    def raw(self, name: str) -> bytes:
        """A raw chunk, whole (FileNotFoundError when compacted meanwhile)."""
        key = (name, self.sizes.get(name))
        if key in self._blobs:
            return self._blobs[key]
        return self._keep(key, self.rec_storage.read_bytes(name))

    # ------------------------------------------------------------ the run folder's small files
    def staged(self) -> Path:
        """A local copy of the run's small files: its top-level *.json, final/trainer_state.json and the
        newest checkpoint's trainer_state.json (what the analyses read beside the recording)."""
        if self._staged is None:
            run = Storage(self.run_uri)
            files = run.files()
            ckpts = sorted((int(m[1]), n) for n in files if (m := re.fullmatch(r"checkpoint-(\d+)/trainer_state\.json", n)))
            want = [n for n in files if "/" not in n and n.endswith(".json")] + \
                   [n for n in ("final/trainer_state.json",) if n in files] + [n for _, n in ckpts[-1:]]
            base = cache_root() or Path(os.environ.get("TMPDIR", "/tmp")) / "duckling-cache"
            name = StoragePath(self.run_uri).name or "run"
            folder = base / "runs" / hashlib.sha1(self.run_uri.encode()).hexdigest()[:16] / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for n in want:
                run.get_file(n, folder / n)
            self._staged = folder
        return self._staged


def _disk_path(entry: dict) -> Path | None:
    root = cache_root()
    return None if root is None else root / "blocks" / entry["sha256"][:2] / entry["sha256"]


def _from_disk(entry: dict) -> bytes | None:
    """A cached block, only when its size and SHA-256 are the entry's (else it is dropped)."""
    path = _disk_path(entry)
    try:
        blob = path.read_bytes() if path is not None else None
    except OSError:
        return None
    if blob is not None and (len(blob) != entry["bytes"] or digest(blob) != entry["sha256"]):
        path.unlink(missing_ok=True)
        return None
    return blob


def _to_disk(entry: dict, blob: bytes) -> None:
    path = _disk_path(entry)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, blob)
    except OSError:  # a full or read-only cache folder only costs the next fetch
        pass


class RemoteManifest(Manifest):
    """manifest.json read from the storage; each reload lists the recording's files again first."""

    def __init__(self, run: RemoteRun, root, expected: bool = False):
        self.run = run
        super().__init__(root, expected)

    def load(self) -> "Manifest":
        if self.run.fresh and self.present:  # listed and read just now (at open): not again
            self.run.fresh = False
            return self
        if not self.run.fresh:
            self.run.refresh()
        return super().load()

    def _read(self) -> bytes | None:
        return self.run.read_small(MANIFEST)


class _Bytes:
    """A fetched block as streams read a BlockFile: ``[a:b]`` (checked for length), a context manager."""

    def __init__(self, blob: bytes, where):
        self.blob, self.where = blob, where

    def __getitem__(self, s: slice) -> bytes:
        data = self.blob[s.start:s.stop]
        if len(data) != s.stop - s.start:
            raise CorruptBlock(f"{self.where} is shorter than its header says (truncated?)")
        return data

    def __enter__(self) -> "_Bytes":
        return self

    def __exit__(self, *exc) -> None:
        pass


class RemoteStream(Stream):
    """A stream whose files are in a storage (the access.LocalFiles methods, over RemoteRun)."""

    def __init__(self, run: RemoteRun, root, *args, **kw):
        super().__init__(root, *args, **kw)
        self.run = run

    def _file(self, c: int, kind: str) -> str:
        return f"{self.name}.{c:05d}.{kind}"

    def _entry(self, c: int) -> dict | None:
        m = self.manifest
        return m.entry(self.name, c) if m is not None and m.present else None

    def _stat_key(self, c: int) -> tuple[int, tuple]:
        size = self.file_size(c, "blk")
        return size, (c, size, (self._entry(c) or {}).get("sha256"))

    def _head(self, c: int, size: int) -> bytes:
        e = self._entry(c)
        if e is not None:  # a read follows: the whole block, checked (its header is its start)
            return self.run.block(self._file(c, "blk"), e)
        return self.run.head(self._file(c, "blk"), size)

    def _open(self, c: int) -> _Bytes:
        return _Bytes(self.run.block(self._file(c, "blk"), self._entry(c)), self.blk_path(c))

    def _has_blk(self, c: int) -> bool:
        return self._file(c, "blk") in self.run.sizes

    def file_size(self, c: int, kind: str) -> int:
        try:
            return self.run.sizes[self._file(c, kind)]
        except KeyError:
            raise FileNotFoundError(str(self.blk_path(c) if kind == "blk" else self.raw_path(c))) from None

    def _raw_view(self, c: int, n: int | None = None) -> np.ndarray:
        data = np.frombuffer(self.run.raw(self._file(c, "raw")), np.uint8)
        return data if n is None else data[:n * self.rec_bytes].reshape(n, self.rec_bytes)

    def list_chunks(self) -> tuple[dict[int, set], list[str]]:
        """The stream's chunk files in the listing (an object store holds only regular files)."""
        found, prefix = {}, self.name + "."
        for name in self.run.sizes:
            m = CHUNK.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
            if m is not None:
                found.setdefault(int(m[1]), set()).add(m[2])
        return found, []

    def opening_header(self, c: int, entry: dict | None) -> tuple[dict, object]:
        """What the check at open needs of a listed block, from its manifest entry (nothing is read:
        the block is checked against the entry's SHA-256 when it is fetched); else its header."""
        if entry is None:
            return self._header(c)
        return {"n": entry["count"], "steps": entry_steps(entry), "crc32": entry["header_crc32"]}, None
