"""Helpers shared by the dead-token analyses (``metrics``, ``measures``): evaluation points, AUROC,
row norms and cosines, the recording checks, per-row scalar statistics and token names."""
from __future__ import annotations

import numpy as np

from duckling.errors import DucklingError

MAX_POINTS = 256  # snapshot steps evaluated per curve by default
QPOINTS = 512  # steps at which per-row quantile bands are computed (means use every step)
CHUNK = 512  # scalar steps gathered per read (512 x 8192 float32 = 16 MB)
QUANTILES = (10, 50, 90)  # bands drawn around medians


# ---------------------------------------------------------------- helpers
def thin(steps, n: int | None = MAX_POINTS) -> np.ndarray:
    """At most ``n`` evenly spaced entries of ``steps``, always keeping the first and the last."""
    steps = np.asarray(steps)
    if n is None or len(steps) <= n:
        return steps
    return steps[np.unique(np.linspace(0, len(steps) - 1, n).round().astype(int))]


def auroc(score, is_pos) -> float:
    """Area under the ROC curve of ``score`` (higher = positive), from average ranks (ties count 1/2)."""
    score, is_pos = np.asarray(score), np.asarray(is_pos, bool)
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score)
    s = score[order]
    first = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]  # start of each group of tied scores
    counts = np.diff(np.r_[first, len(s)])
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank per tie group
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _norms(X) -> np.ndarray:
    """Row norms of a 2-D array (einsum: several times faster than np.linalg.norm here)."""
    return np.sqrt(np.einsum("ij,ij->i", X, X))


def _unit(x):
    n = _norms(x)[:, None] if x.ndim == 2 else np.linalg.norm(x)
    return x / np.where(n > 0, n, 1.0)


def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _untied(rec) -> bool:
    return "lm_head" in rec.meta.get("matrices", ["wte"])


def _check(rec, matrix: str) -> None:
    mats = rec.meta.get("matrices", ["wte"])
    if matrix not in mats:
        raise DucklingError(f"this recording holds matrices {mats}, not {matrix!r}; pass one of those "
                            "(\"lm_head\" exists only in runs trained with untied embeddings).")


def _scalar_index(rec, steps) -> np.ndarray:
    """Positions of snapshot steps in ``rec.scalar_steps`` (scalars are kept every step)."""
    idx = np.asarray(steps) - int(rec.scalar_steps[0])
    if idx.min() < 0 or idx.max() >= len(rec.scalar_steps):
        raise DucklingError("snapshot steps fall outside the recorded per-step scalars; the "
                            "recording is inconsistent, re-record the run.")
    return idx


def _stats(steps, X, q_rows=None) -> dict:
    """Per-step mean over the columns of X (S, n) and QUANTILES at ``q_rows`` (default every row)."""
    q_rows = np.arange(len(X)) if q_rows is None else q_rows
    with np.errstate(all="ignore"):  # step 0 holds NaN for grad_norm / adam_v
        q = np.percentile(X[q_rows], QUANTILES, axis=1).T.astype(np.float32)
        return {"steps": np.asarray(steps), "mean": X.mean(1), "q_steps": np.asarray(steps)[q_rows], "q": q}


def _row_stats(rec, field: str, matrix: str) -> dict:
    """{"dead", "live"}: ``_stats`` of one per-row scalar, means every step, quantiles at QPOINTS steps.

    Reads the (T, V) field a chunk of steps at a time, plus the quantile steps once."""
    rows = rec.rows(field, matrix=matrix)  # (T, V) memmap view
    T, groups = len(rows), {"dead": rec.dead_ids, "live": rec.live_ids}
    qi = thin(np.arange(T), QPOINTS)
    mean = {k: np.empty(T, np.float32) for k in groups}
    for a in range(0, T, CHUNK):
        x = np.asarray(rows[a:a + CHUNK], np.float32)  # (c, V)
        for k, ids in groups.items():
            mean[k][a:a + len(x)] = x[:, ids].mean(1)
    xq = np.asarray(rows[qi], np.float32)  # (Tq, V)
    out = {}
    for k, ids in groups.items():
        out[k] = _stats(rec.scalar_steps[qi], xq[:, ids])
        out[k].update(steps=np.asarray(rec.scalar_steps), mean=mean[k])
    return out


def token_labels(rec, ids) -> list[str]:
    """Printable text of compact ids for plot labels (``#id`` when the run has no token mapping)."""
    texts = getattr(rec, "token_text", None)  # (V,) list, or None
    return [repr(texts[int(i)])[1:-1] if texts is not None else f"#{int(i)}" for i in ids]


def named_ids(rec, ids, k: int = 4) -> np.ndarray:
    """``k`` ids spread over ``ids`` whose text is a readable word (for labelled curves)."""
    ids = np.asarray(ids)
    labels = token_labels(rec, ids)
    good = [i for i, t in zip(ids, labels) if t.strip().isalpha()] or list(ids)
    return np.asarray(good)[np.linspace(0, len(good) - 1, min(k, len(good))).round().astype(int)]


def _names(rec, ids, k: int = 3) -> dict:
    """Positions within ``ids`` and texts of ``k`` named rows, for labelled per-row curves."""
    ids = np.asarray(ids)
    sel = named_ids(rec, ids, k)
    return {"named_pos": np.array([int(np.flatnonzero(ids == i)[0]) for i in sel]),
            "named_labels": token_labels(rec, sel)}
