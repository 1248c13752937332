"""Where runs land when the machines that train them do not share a disk: a storage location, given
as a folder every node mounts or as an fsspec URI (``file:///shared/sweeps``, ``s3://bucket/prefix``,
``gs://...``), read and written through ``fsspec``. fsspec only does the transfers: this module adds
the few things a run folder needs on top of them.

    from duckling.storage import Storage, local_path
    st = Storage("s3://bucket/sweeps/wd")
    st.put_file("/scratch/run/recording/W.00000.blk", "run/recording/W.00000.blk")
    st.files("run")                       # {relative path: size} under run/
    st.read_range("run/recording/W.00000.blk", 0, 4096)   # bytes, without fetching the file
    local_path("file:///shared/sweeps/wd")  # Path("/shared/sweeps/wd"): a local folder reads as today

Paths given to a Storage are relative to its root, with "/" separators. A write of a whole file is
atomic where the storage allows it: on a local (or mounted) folder a temporary file beside it and a
rename, as ``files.write_atomic``; object stores replace an object whole by themselves.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from duckling.errors import DucklingError
from duckling.files import write_atomic

CHUNK = 1 << 22  # bytes read at a time when hashing


def is_uri(text) -> bool:
    return isinstance(text, str) and "://" in text


def local_path(path_or_uri) -> Path | None:
    """The local folder of a plain path or a ``file://`` URI (None for a remote URI)."""
    if isinstance(path_or_uri, Path) or not is_uri(str(path_or_uri)):
        return Path(path_or_uri).expanduser()
    protocol, _, rest = str(path_or_uri).partition("://")
    if protocol in ("file", "local"):
        return Path(rest if rest.startswith("/") else "/" + rest)
    return None


def as_local(path_or_uri) -> Path:
    """A local folder: a plain path or a ``file://`` URI as a Path, for what truly needs one (a training
    run's output, a lock). A remote URI is refused with what to do. (``Recording``, ``report`` and
    ``compare`` read remote runs too: duckling.recording.remote.)"""
    p = local_path(path_or_uri)
    if p is None:
        raise DucklingError(f"{path_or_uri} is a remote storage URI, but a folder on this machine is needed here "
                            "(something is written or locked in it): give a folder path or a file:// URI. (Runs in "
                            "a storage are read from there: `duckling report URI --out DIR`, `duckling compare URI "
                            "--out DIR`, Recording(URI).)")
    return p


class StoragePath:
    """A file or folder of a remote storage, named by its URI: ``/``, ``parent`` and ``name`` as a Path
    has them, for names and messages only (no os call can take it by mistake: it has no __fspath__)."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")

    def __truediv__(self, name) -> "StoragePath":
        return StoragePath(f"{self.uri}/{str(name).strip('/')}")

    @property
    def parent(self) -> "StoragePath":
        head, sep, _ = self.uri.rpartition("/")
        return StoragePath(head) if sep and not head.endswith(":/") else self

    @property
    def name(self) -> str:
        return self.uri.rpartition("/")[2]

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoragePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoragePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise DucklingError("--storage needs fsspec, which is not installed: pip install fsspec (and the "
                            "package for your store: s3fs for s3://, gcsfs for gs://).") from None
    return fsspec


class Storage:
    """A storage root (see the module docstring)."""

    def __init__(self, uri):
        uri = str(uri)
        self.uri = uri.rstrip("/") or uri
        local = local_path(uri)
        if local is not None:
            self.local = local.resolve()
            self.root = str(self.local)
            self.fs = None
        else:
            fsspec = _fsspec()
            try:
                self.fs, self.root = fsspec.core.url_to_fs(uri)
            except (ImportError, ValueError) as e:
                raise DucklingError(f"Cannot open the storage {uri}: {e}. Install the fsspec package for its "
                                    "protocol (s3fs for s3://, gcsfs for gs://) or give a folder every node "
                                    "mounts.") from None
            self.local = None
            self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):  # sent to Ray tasks by its URI (an fsspec filesystem is rebuilt on the node)
        return (Storage, (self.uri,))

    # ------------------------------------------------------------ names
    def path(self, rel: str = "") -> str:
        rel = str(rel).strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """The full address of ``rel``, for messages."""
        rel = str(rel).strip("/")
        return f"{self.uri}/{rel}" if rel else self.uri

    # ------------------------------------------------------------ reading
    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel)) if self.fs is None else self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.fs is None:
            return Path(self.path(rel)).read_bytes()
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``rel`` from ``start`` (a ranged GET on an object store)."""
        if self.fs is None:
            with open(self.path(rel), "rb") as f:
                f.seek(start)
                return f.read(length)
        return self.fs.cat_file(self.path(rel), start=start, end=start + length)

    def files(self, rel: str = "") -> dict[str, int]:
        """{path relative to ``rel``: size} of every file under ``rel`` (empty when it does not exist)."""
        base = self.path(rel)
        if self.fs is None:
            root = Path(base)
            if not root.is_dir():
                return {}
            found = {}
            for folder, _, names in os.walk(root):  # skips a folder removed while it lists (a rotated checkpoint)
                for name in names:
                    p = Path(folder) / name
                    try:
                        found[p.relative_to(root).as_posix()] = p.stat().st_size
                    except FileNotFoundError:  # removed since it was listed: not there any more
                        continue
            return dict(sorted(found.items()))
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        return {k[len(base):].lstrip("/"): int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def sha256(self, rel: str) -> str:
        """Hash of the stored bytes (read back from the storage, not from a local copy)."""
        h = hashlib.sha256()
        opener = open(self.path(rel), "rb") if self.fs is None else self.fs.open(self.path(rel), "rb")
        with opener as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # ------------------------------------------------------------ writing
    def write_bytes(self, rel: str, data: bytes | str) -> None:
        if self.fs is None:
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path(rel), data)
        else:
            self.fs.pipe_file(self.path(rel), data.encode() if isinstance(data, str) else data)

    def put_file(self, local, rel: str) -> None:
        """Copy a local file to ``rel`` (whole, or not at all where the storage allows it)."""
        dest = self.path(rel)
        if self.fs is None:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{dest}.tmp"
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            self.fs.put_file(str(local), dest)

    def get_file(self, rel: str, local) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if self.fs is None:
            shutil.copyfile(self.path(rel), local)
        else:
            self.fs.get_file(self.path(rel), str(local))

    def download(self, rel: str, folder) -> Path:
        """Copy every file under ``rel`` into ``folder`` (made, or emptied first)."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in self.files(rel):
            self.get_file(f"{rel}/{name}" if rel else name, folder / name)
        return folder

    def remove(self, rel: str) -> None:
        """Delete a file (missing is fine)."""
        if self.fs is None:
            Path(self.path(rel)).unlink(missing_ok=True)
            parent = Path(self.path(rel)).parent
            while parent != Path(self.root) and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        elif self.fs.exists(self.path(rel)):
            self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        if self.fs is None:
            shutil.rmtree(self.path(rel), ignore_errors=True)
        elif self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
