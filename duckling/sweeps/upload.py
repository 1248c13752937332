"""A run trained in node-local scratch and kept in a storage location (``--storage``).

The run folder lives in scratch on the node that trains it (``$DUCKLING_SCRATCH``, default the
system's temporary folder). ``Mirror`` copies it to ``STORAGE/<run>/``: new closed recording blocks
as they appear (``*.blk`` files never change once made), every checkpoint as the Trainer saves it
(with the recording and run files as they stand then, so the storage always holds a checkpoint and
a recording that reaches it), and the rest when the run finishes. Files the run deleted (an older
checkpoint, a raw chunk compacted into a block) are deleted from the storage after the new ones
are in place.

A run counts as complete in the storage only when ``STORAGE/<run>/upload.json`` says so, and that
file is written last, after every file was read back from the storage and matched its size and
sha256: a half-uploaded folder is never taken for a finished run. A run whose node died is started
on another node from the storage: its folder is copied into that node's scratch and resumes from
its last uploaded checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from duckling.errors import DucklingError
from duckling.files import LOCK
from duckling.storage import Storage, file_sha256

UPLOAD = "upload.json"
BLOCKS_EVERY_S = 10.0  # closed blocks are uploaded at most this often between checkpoints
SKIP = re.compile(r"(\.tmp$|^\.lock$|\.tmp/)")


def scratch_root() -> Path:
    """This node's scratch folder for runs: $DUCKLING_SCRATCH, else <tmp>/duckling-scratch."""
    root = Path(os.environ.get("DUCKLING_SCRATCH") or Path(tempfile.gettempdir()) / "duckling-scratch")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _local_files(run_dir: Path) -> dict[str, os.stat_result]:
    out = {}
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir).as_posix()
        if p.name == LOCK or SKIP.search(rel) or p.is_symlink():
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # deleted while we looked (a raw chunk compacted, an old checkpoint)
            continue
        if stat.S_ISREG(st.st_mode):
            out[rel] = st
    return out


class Mirror:
    """Keeps ``storage/<name>/`` equal to the local run folder ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: Path, storage: Storage, name: str):
        self.run_dir, self.storage, self.name = Path(run_dir), storage, name
        self.sent: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last uploaded
        self.remote = set(storage.files(name))
        if UPLOAD in self.remote:  # a run being trained is not complete, whatever an earlier upload said
            storage.remove(f"{name}/{UPLOAD}")
            self.remote.discard(UPLOAD)

    def _rel(self, rel: str) -> str:
        return f"{self.name}/{rel}"

    def push(self, only=None) -> tuple[int, int]:
        """Upload files that are new or changed (``only``: a predicate on the relative path); return
        (how many, how many vanished before they could be read: the recording's writer turned a raw
        chunk into a block meanwhile)."""
        n = gone = 0
        files = _local_files(self.run_dir)
        # each checkpoint's trainer_state.json last: a checkpoint counts only when it is there (stored_state)
        for rel in sorted(files, key=lambda r: (r.endswith("trainer_state.json"), r)):
            st = files[rel]
            if only is not None and not only(rel):
                continue
            key = (st.st_size, st.st_mtime_ns)
            if self.sent.get(rel) == key:
                continue
            try:
                self.storage.put_file(self.run_dir / rel, self._rel(rel))
            except FileNotFoundError:
                gone += 1
                continue
            self.sent[rel], n = key, n + 1
            self.remote.add(rel)
        return n, gone

    def prune(self) -> None:
        """Delete from the storage what the run deleted here (after the new files are in place)."""
        here = set(_local_files(self.run_dir))
        for rel in sorted(self.remote - here - {UPLOAD}):
            self.storage.remove(self._rel(rel))
            self.remote.discard(rel)
            self.sent.pop(rel, None)

    def blocks(self) -> int:
        return self.push(only=lambda rel: rel.endswith(".blk"))[0]

    def checkpoint(self) -> None:
        """Everything as it stands, then the deletions: the storage never loses steps in between."""
        for _ in range(20):
            if not self.push()[1]:
                break
        self.prune()

    def finish(self, extra: dict) -> dict:
        """Upload the rest, verify every file in the storage (size and sha256 read back), then write
        upload.json (complete). Raises when the storage does not hold what the run made."""
        self.checkpoint()
        local = _local_files(self.run_dir)
        stored = self.storage.files(self.name)
        files, bad = {}, []
        for rel in sorted(local):
            digest = file_sha256(self.run_dir / rel)
            files[rel] = {"size": local[rel].st_size, "sha256": digest}
            if stored.get(rel) != local[rel].st_size:
                bad.append(f"{rel} (size {stored.get(rel)} in the storage, {local[rel].st_size} here)")
            elif self.storage.sha256(self._rel(rel)) != digest:
                bad.append(f"{rel} (checksum differs)")
        if bad:
            raise UploadError(f"The upload of run {self.name} to {self.storage.url(self.name)} does not match the "
                              f"run: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}.")
        record = {"complete": True, "files": files, "uploaded": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        self.storage.write_bytes(self._rel(UPLOAD), json.dumps(record, indent=1) + "\n")
        return record


class UploadError(Exception):
    """The storage does not hold what the run made (a retry uploads again)."""


def uploader(mirror: Mirror):
    """A TrainerCallback: closed blocks every BLOCKS_EVERY_S, each checkpoint as soon as it is saved."""
    from transformers import TrainerCallback

    class Uploader(TrainerCallback):
        last = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            if time.monotonic() - self.last >= BLOCKS_EVERY_S:
                mirror.blocks()
                self.last = time.monotonic()

        def on_save(self, args, state, control, **kw):
            mirror.checkpoint()
            self.last = time.monotonic()

    return Uploader()


# ---------------------------------------------------------------- the state of a run in the storage
def stored_state(storage: Storage, name: str) -> str:
    """``complete`` (upload.json complete and every file it lists present with its size),
    ``resumable`` (a complete checkpoint), ``fresh`` (nothing) or ``restart`` (files, no checkpoint)."""
    files = storage.files(name)
    if UPLOAD in files:
        try:
            rec = json.loads(storage.read_bytes(f"{name}/{UPLOAD}"))
        except (ValueError, OSError):
            rec = {}
        if rec.get("complete") and all(files.get(k) == v["size"] for k, v in rec.get("files", {}).items()):
            return "complete"
    if any(re.fullmatch(r"checkpoint-\d+/trainer_state.json", k) for k in files):
        return "resumable"
    return "fresh" if not files else "restart"


def upload_record(storage: Storage, name: str) -> dict:
    return json.loads(storage.read_bytes(f"{name}/{UPLOAD}"))


def fetch_for_resume(storage: Storage, name: str, run_dir: Path) -> None:
    """Make the scratch folder equal to the storage's copy (the run resumes from its last checkpoint).
    A checkpoint the storage holds only in part (its trainer_state.json is written last) is dropped."""
    storage.download(name, run_dir)
    for ck in run_dir.glob("checkpoint-*"):
        if not (ck / "trainer_state.json").is_file():
            shutil.rmtree(ck)
    (run_dir / UPLOAD).unlink(missing_ok=True)


def check_storage_writable(storage: Storage, token: str) -> None:
    """Write, read back and delete a small file (the probe does this on every node)."""
    rel = f".probe/{token}"
    try:
        storage.write_bytes(rel, token)
        ok = storage.read_bytes(rel) == token.encode()
        storage.remove(rel)
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        raise DucklingError(f"cannot write to {storage.url()} ({type(e).__name__}: {e})") from None
    if not ok:
        raise DucklingError(f"{storage.url()} did not return what was written to it")
