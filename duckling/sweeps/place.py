"""The sweep folder as the driver sees it: a local folder (``--out DIR``, runs written in place, as on
one machine or a cluster with a shared disk) or a storage location (``--storage URI``: runs train in
each node's scratch and are uploaded there, duckling.sweeps.upload). Both hold the same files:
``sweep.json``, ``spec.toml`` and one folder per run."""
from __future__ import annotations

import json
from pathlib import Path

from duckling.errors import DucklingError
from duckling.files import LOCK
from duckling.storage import Storage
from duckling.sweeps import upload

MANIFEST = "sweep.json"
SPEC_COPY = "spec.toml"


class Place:
    def __init__(self, out=None, storage=None):
        if (out is None) == (storage is None):
            raise DucklingError("Give the sweep one place: --out DIR (this machine, or a disk every node shares) "
                                "or --storage URI (runs train in node-local scratch and are uploaded there).")
        self.uploads = storage is not None  # runs go through scratch and upload.json
        self.storage = Storage(storage if storage is not None else Path(out).expanduser().resolve())
        self.local: Path | None = self.storage.local  # None for a remote URI

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else self.storage.uri

    # ------------------------------------------------------------ the manifest
    def has_manifest(self) -> bool:
        return self.storage.exists(MANIFEST)

    def read_manifest(self) -> dict:
        if not self.has_manifest():
            flag = "--out" if self.local is not None else "--storage"
            raise DucklingError(f"{self} is not a sweep folder (no {MANIFEST}). Run `duckling sweep SPEC {flag} {self}`.")
        return json.loads(self.storage.read_bytes(MANIFEST))

    def write_manifest(self, manifest: dict) -> None:
        from duckling.files import _finite

        self.storage.write_bytes(MANIFEST, json.dumps(_finite(manifest), indent=1, default=str, allow_nan=False) + "\n")

    def write_spec(self, text: str | None) -> None:
        if text is not None and not self.storage.exists(SPEC_COPY):
            self.storage.write_bytes(SPEC_COPY, text)

    def foreign(self) -> bool:
        """Files (other than a driver's lock or a probe) but no manifest: not a sweep folder."""
        if self.has_manifest():
            return False
        names = {n.split("/")[0] for n in self.storage.files()}
        return bool(names - {LOCK, ".probe"})

    # ------------------------------------------------------------ runs
    def state(self, name: str) -> str:
        if self.uploads:
            return upload.stored_state(self.storage, name)
        from duckling.sweeps.task import run_state

        return run_state(self.local / name)

    def finished_step(self, name: str) -> int:
        if self.uploads:
            return int(upload.upload_record(self.storage, name).get("global_step", 0))
        return int(json.loads((self.local / name / "run_info.json").read_text()).get("global_step", 0))

    def run_path(self, name: str) -> str:
        return str(self.local / name) if self.local is not None else self.storage.url(name)
