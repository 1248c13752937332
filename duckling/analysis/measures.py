"""The measures issue 23 added to the report: the mean embedding's shift, the update-rule check as a
per-step distribution, embedding norm and held-out loss by token-frequency bucket, and the post-hoc
reading of the blind indicators. (The centred collapse measures live in ``metrics.collapse``.)

- ``mean_shift``: ||mean row_N - mean row_0|| over all, live and dead rows, and the cosine of each shift
  with minus the mean final hidden state (averaged over updates 1..N, as ``metrics.drift``): Stollenwerk
  & Stollenwerk (2025) tie the anisotropy of embeddings to the shift of the mean embedding.
- ``step_ratio_stats``: the update-rule ratio of every step (measured / predicted), as median and 5-95%
  of the steps. It is a consistency check of the recorded fields, not a prediction: the rule is fed the
  gradients the run itself recorded.
- ``token_counts`` / ``frequency_buckets`` / ``norm_by_frequency`` / ``loss_by_frequency``: live tokens in
  deciles of their training-data frequency (equal numbers of tokens per decile, rarest first, ties by
  id) and dead tokens as frequency 0, after Kunstner et al. 2024 (heavy-tailed class imbalance: gradient
  descent is slow on rare classes where Adam is not) and Pinto et al. 2024 (weight decay hurts rare
  tokens most). The loss needs the final model and a held-out set: it loads RUN/final with
  transformers directly (never duckling.training) and evaluates a few rows; without either it returns
  a note saying why it skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from duckling.analysis import metrics as A
from duckling.errors import DucklingError

N_BUCKETS = 10  # live-token frequency deciles
# held-out rows evaluated for the loss by frequency. The rare deciles need them: on the study's validation slice,
# 16 rows hold 1 target of the rarest live decile (a loss from one token), 256 rows about 200 (~20 s on a CPU).
LOSS_ROWS = 256
LOSS_BATCH = 4


# ---------------------------------------------------------------- mean embedding shift
def running_hidden_mean(rec) -> np.ndarray:
    """(T, d) mean final hidden state averaged over updates 1..N (row 0 is zeros: no update yet)."""
    hm = np.nan_to_num(np.asarray(rec.hidden_mean, np.float64), nan=0.0)
    return np.cumsum(hm, 0) / np.maximum(np.arange(len(hm)), 1)[:, None]


def mean_shift(rec, matrix: str = "wte", steps=None) -> dict:
    """Per evaluated step and group ("all", "live", "dead"): ``mean_norm_G`` = ||mean row||, ``shift_G`` =
    ||mean row_N - mean row_0|| and ``cos_hidden_G`` = cosine(mean row_N - mean row_0, -hbar_N)."""
    A._check(rec, matrix)
    steps = A.thin(rec.steps) if steps is None else np.asarray(steps)
    groups = {"all": None, "live": np.asarray(rec.live_ids), "dead": np.asarray(rec.dead_ids)}
    hbar = running_hidden_mean(rec)[A._scalar_index(rec, steps)]  # (S, d)
    means = {}
    for j, n in enumerate(steps):
        W = rec.snapshot(int(n), matrix=matrix)
        for g, ids in groups.items():
            means.setdefault(g, np.empty((len(steps), W.shape[1])))[j] = (W if ids is None else W[ids]).mean(
                0, dtype=np.float64)
    out = {"steps": steps}
    for g, M in means.items():
        D = M - M[0]
        out[f"mean_norm_{g}"], out[f"shift_{g}"] = np.linalg.norm(M, axis=1), np.linalg.norm(D, axis=1)
        out[f"cos_hidden_{g}"] = np.array([A._cos(D[j], -hbar[j]) for j in range(len(steps))])
    return out


# ---------------------------------------------------------------- update rule: per-step distribution
def step_ratio_stats(ratio) -> dict:
    """Median and 5% / 95% over steps of a per-step ratio (steps where it is finite and > 0)."""
    r = np.asarray(ratio, np.float64)
    r = r[np.isfinite(r) & (r > 0)]
    if not len(r):
        return {"median": None, "p05": None, "p95": None, "n_steps": 0}
    p05, med, p95 = np.percentile(r, [5, 50, 95])
    return {"median": float(med), "p05": float(p05), "p95": float(p95), "n_steps": int(len(r))}


# ---------------------------------------------------------------- blind indicators, post hoc
def post_hoc(auroc: float | None, key: str) -> tuple[float | None, str | None]:
    """The post-hoc best reading of label-free indicator ``key`` (chosen AFTER seeing the labels):
    (max(A, 1 - A), its direction). Reported beside the fixed direction, labelled post hoc."""
    if auroc is None or not np.isfinite(auroc):
        return None, None
    return (auroc, A.LABEL_FREE[key]) if auroc >= 0.5 else (1.0 - auroc, A.OPPOSITE[key])


# ---------------------------------------------------------------- frequency buckets
def _run_info(run_dir) -> dict:
    path = Path(run_dir) / "run_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def dataset_tokens(path, n_rows: int | None = None, mapping_hash: str | None = None) -> np.ndarray:
    """(n, T) token ids of the first ``n_rows`` rows (all by default) of a built dataset folder."""
    from duckling.data.build import load_dataset_dir

    ds = load_dataset_dir(path, mapping_hash, fmt=None)
    table = ds.data if n_rows is None else ds.data.slice(0, n_rows)
    col = table.column("input_ids").combine_chunks()
    n = len(col)
    return np.asarray(col.flatten().to_numpy(), np.int64).reshape(n, -1) if n else np.zeros((0, 0), np.int64)


def token_counts(rec, dataset=None) -> tuple[np.ndarray | None, str]:
    """Occurrences of every compact id in the run's training data, (V,), and where they come from.

    The training dataset named in run_info.json (or ``dataset``), counted token by token; if it is
    gone, the counts stored in the run's token_mapping.json (the corpus the vocabulary was built from,
    which may differ from the training data: the source says so); else (None, why)."""
    V = int(rec.meta.get("shape", [len(rec.live_ids) + len(rec.dead_ids)])[0])
    info = _run_info(rec.run_dir)
    path = dataset or info.get("dataset")
    if path and Path(path).is_dir():
        ids = dataset_tokens(path, mapping_hash=info.get("mapping_hash"))
        return np.bincount(ids.ravel(), minlength=V)[:V], f"training dataset {Path(path).name} ({ids.size:,} tokens)"
    mapping = Path(rec.run_dir) / "token_mapping.json"
    if mapping.is_file():
        tokens = json.loads(mapping.read_text(encoding="utf-8"))["tokens"][:V]
        if all("count" in t for t in tokens):
            return (np.array([int(t["count"]) for t in tokens], np.int64),
                    "token_mapping.json counts (the corpus the vocabulary was built from; the training "
                    f"dataset {Path(path).name if path else '(not named in run_info.json)'} is not on this machine)")
    return None, ("no token counts: the training dataset named in run_info.json is not on this machine and "
                  "the run folder has no token_mapping.json with counts")


def frequency_buckets(counts, live_ids, dead_ids, n: int = N_BUCKETS) -> dict:
    """``bucket`` (V,): 0 for dead tokens (frequency 0 by construction), 1..n for live tokens in deciles of
    their count (1 = rarest; equal numbers of tokens, ties broken by id); per bucket its ``labels``,
    ``n_tokens`` and ``count_min`` / ``count_max``."""
    counts, live, dead = np.asarray(counts), np.asarray(live_ids), np.asarray(dead_ids)
    bucket = np.full(len(counts), -1, np.int64)
    bucket[dead] = 0
    order = live[np.lexsort((live, counts[live]))]  # ascending count, ties by id
    for b, part in enumerate(np.array_split(order, n), 1):
        bucket[part] = b
    groups = [dead] + [np.flatnonzero(bucket == b) for b in range(1, n + 1)]
    return {"bucket": bucket, "labels": ["dead"] + [f"D{b}" for b in range(1, n + 1)],
            "n_tokens": [int(len(g)) for g in groups],
            "count_min": [int(counts[g].min()) if len(g) else None for g in groups],
            "count_max": [int(counts[g].max()) if len(g) else None for g in groups]}


def _bucket_mean(values, bucket, n_buckets) -> np.ndarray:
    ok = bucket >= 0
    s = np.bincount(bucket[ok], weights=np.asarray(values, np.float64)[ok], minlength=n_buckets)
    c = np.bincount(bucket[ok], minlength=n_buckets)
    with np.errstate(all="ignore"):
        return s / c


def norm_by_frequency(rec, buckets: dict, matrix: str = "wte") -> dict:
    """Mean row norm per frequency bucket at the first and the last recorded step (exact float32 scalars)."""
    A._check(rec, matrix)
    rows = rec.rows("norm", matrix=matrix)
    k = len(buckets["labels"])
    return {"init": _bucket_mean(np.asarray(rows[0]), buckets["bucket"], k),
            "final": _bucket_mean(np.asarray(rows[len(rows) - 1]), buckets["bucket"], k),
            "step": int(rec.scalar_steps[-1])}


def eval_dataset_path(run_dir, given=None) -> tuple[str | None, str]:
    """The held-out dataset for the loss by frequency: ``given``, else run_info.json's "eval_dataset",
    else the eval_dataset of the sweep the run belongs to (../sweep.json); (None, why) if none."""
    run_dir = Path(run_dir)
    if given:
        return str(given), "given"
    if _run_info(run_dir).get("eval_dataset"):
        return str(_run_info(run_dir)["eval_dataset"]), "run_info.json"
    sweep = run_dir.parent / "sweep.json"
    if sweep.is_file():
        ev = json.loads(sweep.read_text()).get("identity", {}).get("eval_dataset")
        if isinstance(ev, str):
            return ev, "the sweep's spec (sweep.json)"
    return None, "no held-out dataset is known for this run (it was trained without --eval-dataset)"


def loss_by_frequency(run_dir, buckets: dict, eval_dataset=None, n_rows: int = LOSS_ROWS) -> dict:
    """Held-out cross-entropy per target-token frequency bucket, from the final model (RUN/final) on the
    first ``n_rows`` rows of the held-out set: ``loss`` and ``n_targets`` per bucket, ``overall``,
    ``rows``; or {"note": why it was skipped} when the model or the held-out set is missing."""
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        return {"note": f"skipped: no final model in {final.name}/ (the run did not finish, or its final/ was "
                        "removed); the loss by frequency needs the trained model"}
    path, why = eval_dataset_path(run_dir, eval_dataset)
    if path is None:
        return {"note": f"skipped: {why}; in Python, report(run_dir, eval_dataset=FOLDER) measures it"}
    if not Path(path).is_dir():
        return {"note": f"skipped: the held-out dataset {Path(path).name} ({why}) is not on this machine"}
    try:
        rows = dataset_tokens(path, n_rows, _run_info(run_dir).get("mapping_hash"))
    except DucklingError as e:
        return {"note": f"skipped: {e}"}
    import torch
    from transformers import AutoModelForCausalLM

    from duckling.hf import quiet_hf, silence_unactionable_warnings

    silence_unactionable_warnings()  # rows are packed, never padded: no attention_mask warning
    with quiet_hf():  # no weights-loading bar in the report's output
        model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    bucket, k = buckets["bucket"], len(buckets["labels"])
    loss_sum, n_tgt = np.zeros(k), np.zeros(k, np.int64)
    with torch.no_grad():
        for a in range(0, len(rows), LOSS_BATCH):
            x = torch.from_numpy(rows[a:a + LOSS_BATCH])
            logits = model(input_ids=x).logits[:, :-1].float()
            tgt = x[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   reduction="none").numpy()
            b = bucket[tgt.reshape(-1).numpy()]
            loss_sum += np.bincount(b, weights=ce, minlength=k)[:k]
            n_tgt += np.bincount(b, minlength=k)[:k]
    with np.errstate(all="ignore"):
        loss = loss_sum / n_tgt
    return {"loss": loss, "n_targets": n_tgt, "overall": float(loss_sum.sum() / max(n_tgt.sum(), 1)),
            "rows": int(len(rows)), "dataset": Path(path).name, "source": why}
