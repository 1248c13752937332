"""Training rows: packed token rows as zero-copy numpy views, their collation, and the check
that no dead id can ever reach a training batch."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from duckling.config import DucklingConfig
from duckling.data.build import load_dataset_dir
from duckling.errors import DucklingError


class PackedRows(torch.utils.data.Dataset):
    """Equal-length token rows as numpy views (zero-copy over a memory-mapped Arrow table).

    ``chunks`` is a list of (n_i, T) integer arrays; a batch of indices is gathered without going
    through python lists.
    """

    def __init__(self, chunks: list[np.ndarray]):
        self.chunks = [c for c in chunks if len(c)]
        if not self.chunks:
            raise DucklingError("The dataset has no rows. Build it with `duckling build` first.")
        lengths = {c.shape[1] for c in self.chunks}
        if len(lengths) != 1:
            raise DucklingError(f"Dataset rows must all have the same length, got {sorted(lengths)}. "
                                "Pack the corpus with `duckling build` (every row is seq_len tokens).")
        self.seq_len = lengths.pop()
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])  # (n_chunks + 1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.chunks[c][i - self.starts[c]]

    def __getitems__(self, idx: list[int]) -> list[np.ndarray]:
        return [self[i] for i in idx]

    def max_id(self) -> int:
        return max(int(c.max()) for c in self.chunks)  # vectorised scan, ~1 GB/s from page cache

    def min_id(self) -> int:
        return min(int(c.min()) for c in self.chunks)


def collate(rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """(B, T) int64 input ids; labels are the same tensor (the model shifts them)."""
    x = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T)
    return {"input_ids": x, "labels": x}


def _arrow_rows(ds) -> list[np.ndarray]:
    """The ``input_ids`` column of a ``datasets.Dataset`` as (n, T) numpy views, one per Arrow chunk."""
    import pyarrow as pa

    if "input_ids" not in ds.column_names:
        raise DucklingError(f"The dataset has no 'input_ids' column (columns: {ds.column_names}).")
    if getattr(ds, "_indices", None) is not None:  # a .select()/.shuffle() view: materialise it
        ds = ds.flatten_indices()
    out = []
    for chunk in ds.data.column("input_ids").chunks:
        if isinstance(chunk, pa.FixedSizeListArray):
            width = chunk.type.list_size
        else:
            lens = np.diff(chunk.offsets.to_numpy())
            width = int(lens[0]) if len(lens) else 0
            if len(lens) and (lens != width).any():
                raise DucklingError("Dataset rows must all have the same length; pack the corpus with "
                                    "`duckling build`.")
        out.append(chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, width))
    return out


def as_rows(dataset, tokenizer=None) -> PackedRows:
    """A tokenized dataset folder, a ``datasets.Dataset``, a (N, T) array, or ``PackedRows``."""
    if isinstance(dataset, PackedRows):
        return dataset
    if isinstance(dataset, (str, Path)):
        return _load_dataset_dir(Path(dataset), tokenizer)
    if isinstance(dataset, torch.Tensor):
        dataset = dataset.numpy()
    if isinstance(dataset, np.ndarray):
        if dataset.ndim == 0 or not np.issubdtype(dataset.dtype, np.integer):
            raise DucklingError(f"A dataset array must hold integer token ids in rows (N, T), not {dataset.dtype} "
                                f"of shape {dataset.shape}.")
        return PackedRows([dataset.reshape(-1, dataset.shape[-1])])
    return PackedRows(_arrow_rows(dataset))


def _load_dataset_dir(path: Path, tokenizer):
    """Load ``tokenized_dataset/`` through data.py, which refuses one built with another mapping; a
    truncated or damaged Arrow file is a clear error, not a crash inside the model."""
    import pyarrow as pa

    try:
        ds = load_dataset_dir(path, tokenizer, fmt=None)
        return PackedRows(_arrow_rows(ds))
    except DucklingError:
        raise
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise DucklingError(f"The dataset {path.resolve()} cannot be read ({type(e).__name__}: {e}); its files are "
                            "truncated or damaged. Rebuild it with `duckling build --force --out "
                            f"{path}`.") from e


def check_rows(rows: PackedRows, cfg: DucklingConfig, n_live: int, what: str = "training dataset") -> None:
    """Every id must be a valid live id and rows must fit the context: a dead id must never be trained
    on, and an out-of-range id would otherwise be an IndexError deep inside the model."""
    lo, top = rows.min_id(), rows.max_id()
    if lo < 0 or top >= cfg.model.vocab_size:
        raise DucklingError(
            f"The {what} contains id {lo if lo < 0 else top}, outside the vocabulary 0..{cfg.model.vocab_size - 1}. "
            "It was not built by `duckling build` with this mapping, or it is corrupt: rebuild it with "
            "`duckling build --force`.")
    if top >= n_live:
        raise DucklingError(
            f"The {what} contains id {top}, but ids >= {n_live} are dead and must never occur in "
            "training data. It was built with another mapping or is corrupt: rebuild it with "
            "`duckling build --force`.")
    if rows.seq_len > cfg.model.n_positions:
        raise DucklingError(f"The {what}'s rows have {rows.seq_len} tokens but the model's context is "
                            f"{cfg.model.n_positions}: rebuild it with `duckling build --seq-len "
                            f"{cfg.model.n_positions}` or raise model.n_positions.")


# ---------------------------------------------------------------- identity of a dataset's rows
FINGERPRINT_SAMPLE = 4096  # rows hashed in full for the fingerprint (evenly spaced, the last one included)


def rows_fingerprint(rows: PackedRows) -> dict:
    """What a resume compares to know the rows are the ones the run started on: the row count, the
    row length (together its size in tokens) and a sha256 of up to FINGERPRINT_SAMPLE evenly spaced rows (the first
    and last included). A dataset rebuilt from other text changes nearly every row, so the sample
    catches it in milliseconds whatever the dataset's size."""
    n = len(rows)
    picks = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLE)).round().astype(np.int64))
    h = hashlib.sha256(f"{n}x{rows.seq_len}".encode())
    for i in picks:
        h.update(np.ascontiguousarray(rows[int(i)], dtype=np.int64).tobytes())  # dtype-independent ids
    return {"rows": n, "seq_len": int(rows.seq_len), "sha256": h.hexdigest()}


def _digests(rows: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(np.ascontiguousarray(r, dtype=np.int64).tobytes(), digest_size=16).digest() for r in rows]


def _keys(rows: np.ndarray) -> np.ndarray:
    """(n,) uint64: the first 4 ids of each row (16 bits each), a cheap screen before the full hash."""
    k = min(4, rows.shape[1])
    out = np.zeros(len(rows), np.uint64)
    for j in range(k):
        out = (out << np.uint64(16)) | (rows[:, j].astype(np.uint64) & np.uint64(0xFFFF))
    return out


def overlapping_rows(train: PackedRows, held_out: PackedRows) -> int:
    """How many rows of ``held_out`` also occur in ``train`` (equal token ids, by a 128-bit row hash).

    The training rows are screened by a key of their first 4 ids (vectorised) and hashed only when the
    key occurs among the held-out rows, so a large training set costs one numpy pass."""
    if train.seq_len != held_out.seq_len:
        return 0
    held = [d for c in held_out.chunks for d in _digests(c)]
    held_keys = np.unique(np.concatenate([_keys(c) for c in held_out.chunks]))
    seen: set[bytes] = set()
    for c in train.chunks:
        cand = c[np.isin(_keys(c), held_keys)]
        seen.update(_digests(cand))
    return sum(d in seen for d in held)
