"""Dead-token analyses over a recording: one call per question of research.md (1-8).

Every function takes a ``Recording`` (``duckling.recording.reader``) and returns a dict of numpy arrays.
They read lazily: per-row scalars are gathered a chunk of steps at a time, snapshots one step at a
time, and snapshot-based curves are evaluated at most at ``MAX_POINTS`` evenly spaced steps (a
7-inch figure at 100 dpi, plots.FIGSIZE and DPI, has 700 pixels; pass ``steps=rec.steps`` for every recorded step).
Shapes: T = scalar steps, S = evaluated snapshot steps, V = vocab, d = hidden size.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from duckling.analysis.common import (  # noqa: F401  (re-exported: A.thin, A.auroc, A.MAX_POINTS, ...)
    MAX_POINTS, QPOINTS, CHUNK, QUANTILES, thin, auroc, _norms, _unit, _cos, _untied, _check, _scalar_index,
    _stats, _row_stats, token_labels, named_ids, _names)
from duckling.errors import DucklingError


# ---------------------------------------------------------------- 1. norms vs null model
def lr_from_config(train: dict, n_steps: int) -> np.ndarray:
    """lr used by update N (index N, NaN at 0), rebuilt from TrainConfig as HF's scheduler computes it.

    The scheduler steps after the optimizer, so update N uses lambda(N - 1)."""
    base, warm, total = train["learning_rate"], train.get("warmup_steps", 0), train["max_steps"]
    s = np.arange(n_steps, dtype=np.float64) - 1  # scheduler step seen by update N
    kind = train.get("lr_scheduler_type", "linear")
    progress = np.clip((s - warm) / max(1, total - warm), 0, 1)
    if kind == "linear":
        lam = np.maximum(0.0, (total - s) / max(1, total - warm))
    elif kind == "cosine":
        lam = 0.5 * (1 + np.cos(math.pi * progress))
    elif kind in ("constant", "constant_with_warmup"):
        lam = np.ones_like(s)
    else:
        raise DucklingError(f"cannot rebuild the lr schedule {kind!r} from config.json; record the run "
                            "again (lr.f32 holds the actual lr) or use linear, cosine or constant.")
    if kind != "constant":
        lam = np.where(s < warm, s / max(1, warm), lam)
    lr = base * lam
    lr[0] = np.nan
    return lr


def run_config(rec) -> dict:
    """The run's config.json (TrainConfig etc.), or {} when the recording stands alone."""
    path = Path(getattr(rec, "run_dir", "")) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def decay_factor(lr, weight_decay: float) -> np.ndarray:
    """prod_{s<=N} (1 - lr_s * wd): AdamW's decoupled shrink factor after N updates, (T,)."""
    f = 1.0 - np.nan_to_num(np.asarray(lr, np.float64), nan=0.0) * weight_decay
    f[0] = 1.0
    return np.cumprod(f)


def norms(rec, matrix: str = "wte", weight_decay: float | None = None) -> dict:
    """Analysis 1: dead-row norms every step against pure decay ||w_0|| * prod(1 - lr_t * wd).

    The lr is the recorded per-step lr (rebuilt from config.json if missing); ``weight_decay``
    defaults to the run's TrainConfig. Live rows are summarised for contrast. ``dead``/``live``
    are ``_stats`` dicts (mean every step, 10/50/90% bands at up to QPOINTS steps)."""
    _check(rec, matrix)
    train = run_config(rec).get("train", {})
    wd = weight_decay if weight_decay is not None else rec.meta.get("weight_decay", train.get("weight_decay"))
    if wd is None:
        raise DucklingError("no weight decay known for this recording: pass weight_decay= or keep "
                            "config.json in the run folder.")
    lr = np.asarray(rec.lr, np.float64)
    if len(lr) < 2 or np.isnan(lr[1:]).all():
        if not train:
            raise DucklingError("the recording has no lr.f32 and the run folder no config.json; the "
                                "null model needs the lr schedule.")
        lr = lr_from_config(train, len(rec.scalar_steps))
    decay = decay_factor(lr, wd)  # (T,)
    rows = rec.rows("norm", matrix=matrix)  # (T, V) memmap view
    dead = np.concatenate([np.asarray(rows[a:a + CHUNK][:, rec.dead_ids], np.float32)
                           for a in range(0, len(rows), CHUNK)])  # (T, n_dead), exact float32
    null_mean = dead[0].mean(dtype=np.float64) * decay  # (T,) = mean over rows of each row's null
    steps = np.asarray(rec.scalar_steps)
    return {"steps": steps, "lr": lr, "weight_decay": wd, "decay": decay, "per_dead": dead,
            "dead": _stats(steps, dead, thin(np.arange(len(dead)), QPOINTS)),
            "live": _row_stats(rec, "norm", matrix)["live"], "null_mean": null_mean,
            "ratio": dead.mean(1, dtype=np.float64) / null_mean, **_names(rec, rec.dead_ids)}


# ---------------------------------------------------------------- 2. displacement
def displacement(rec, matrix: str = "wte", steps=None) -> dict:
    """Analysis 2: ||w_N - w_0|| per row (snapshots: ``per_dead`` and dead/live stats) and the
    per-step update norms (exact scalars, every step). ``dead_path_mean`` is the mean dead row's
    cumulative update length: displacement / path = 1 means a straight-line move."""
    _check(rec, matrix)
    steps = thin(rec.steps) if steps is None else np.asarray(steps)
    dead, live = rec.dead_ids, rec.live_ids
    w0 = rec.snapshot(int(rec.steps[0]), matrix=matrix)  # (V, d)
    dist = np.empty((len(steps), len(w0)), np.float32)  # (S, V)
    for j, n in enumerate(steps):
        dist[j] = _norms(rec.snapshot(int(n), matrix=matrix) - w0)
    upd = _row_stats(rec, "update_norm", matrix)
    return {"steps": steps, "per_dead": dist[:, dead], "dead": _stats(steps, dist[:, dead]),
            "live": _stats(steps, dist[:, live]), "update": upd,
            "dead_path_mean": np.cumsum(np.nan_to_num(upd["dead"]["mean"], nan=0.0)), **_names(rec, dead)}


# ---------------------------------------------------------------- 3. drift direction
def drift(rec, matrix: str = "wte", steps=None) -> dict:
    """Analysis 3: direction of the mean dead-row displacement D_N = mean_i (w_iN - w_i0).

    ``cos_hidden``: cosine(D_N, -hbar_N), hbar_N = mean final hidden state averaged over updates
    1..N (the whole window so far: D_N integrates all of them). ``cos_live``: cosine(D_N, minus the
    mean live row at N; in a real tied run this is ~ -1: the mean live row has itself drifted
    along -hbar, the common push every row gets through the softmax denominator). ``proj``: each
    dead row's displacement projected on the unit D of the last step, (S, n_dead)."""
    _check(rec, matrix)
    steps = thin(rec.steps) if steps is None else np.asarray(steps)
    dead, live = rec.dead_ids, rec.live_ids
    w0 = rec.snapshot(int(rec.steps[0]), matrix=matrix)[dead]  # (n_dead, d)
    u = _unit(rec.snapshot(int(steps[-1]), matrix=matrix)[dead].mean(0) - w0.mean(0))  # (d,)
    hm = np.nan_to_num(np.asarray(rec.hidden_mean, np.float64), nan=0.0)  # (T, d), row 0 is NaN
    hbar = np.cumsum(hm, 0) / np.maximum(np.arange(len(hm)), 1)[:, None]  # running mean over 1..N
    idx = _scalar_index(rec, steps)
    D = np.empty((len(steps), w0.shape[1]), np.float32)
    cos_h, cos_l = np.empty(len(steps)), np.empty(len(steps))
    proj = np.empty((len(steps), len(dead)), np.float32)
    for j, n in enumerate(steps):
        W = rec.snapshot(int(n), matrix=matrix)
        disp = W[dead] - w0  # (n_dead, d)
        D[j] = disp.mean(0)
        cos_h[j], cos_l[j] = _cos(D[j], -hbar[idx[j]]), _cos(D[j], -W[live].mean(0))
        proj[j] = disp @ u
    return {"steps": steps, "mean_displacement": D, "direction": u, "cos_hidden": cos_h,
            "cos_live": cos_l, "proj": proj, "proj_stats": _stats(steps, proj), **_names(rec, dead)}


# ---------------------------------------------------------------- 4. collapse
def mean_pairwise_cosine(X) -> float:
    """Mean cosine over all pairs i != j of rows of X, in O(n d): (||sum u_i||^2 - n) / (n (n - 1))."""
    U = _unit(np.asarray(X))
    n, s = len(U), U.sum(0, dtype=np.float64)
    return float((s @ s - n) / (n * (n - 1)))


def collapse(rec, matrix: str = "wte", steps=None, n_pcs: int = 3) -> dict:
    """Analysis 4: mean pairwise cosine among dead rows (live rows as control), the mean cosine to
    the mean dead row (Magikarp's measure), and the centred measures: the fraction of dead-row variance
    on the top PCs after centring, ``pc1_noise`` (the largest share isotropic noise gives, Marchenko-Pastur
    edge), ``dead_spread`` / ``live_spread`` (mean ||x_i - mean||^2 of each group) and ``dead_cos_from_mean``:
    the pairwise cosine that the common displacement alone gives rows spread as measured around their
    mean, (||m||^2 - s / (n - 1)) / (||m||^2 + s) (exact for rows of equal norm). A cosine near it means
    the uncentred cosine only re-measures the mean's shift."""
    _check(rec, matrix)
    steps = thin(rec.steps) if steps is None else np.asarray(steps)
    dead, live = rec.dead_ids, rec.live_ids
    keys = ("dead_cos", "live_cos", "dead_cos_to_mean", "dead_spread", "live_spread", "dead_cos_from_mean")
    out = {k: np.empty(len(steps)) for k in keys}
    pcs = np.empty((len(steps), n_pcs))
    n = len(dead)
    for j, step in enumerate(steps):
        W = rec.snapshot(int(step), matrix=matrix)
        X = W[dead]  # (n_dead, d)
        out["dead_cos"][j], out["live_cos"][j] = mean_pairwise_cosine(X), mean_pairwise_cosine(W[live])
        m = X.mean(0, dtype=np.float64)
        out["dead_cos_to_mean"][j] = float((_unit(X) @ _unit(m)).mean())
        Xc = X - m.astype(X.dtype)
        ev = np.linalg.eigvalsh((Xc.T @ Xc).astype(np.float64))[::-1]  # (d,) descending
        pcs[j] = ev[:n_pcs] / ev.sum()
        s, m2 = ev.sum() / n, float(m @ m)  # spread, ||mean||^2
        out["dead_spread"][j], out["dead_cos_from_mean"][j] = s, (m2 - s / (n - 1)) / (m2 + s)
        L = W[live] - W[live].mean(0, dtype=np.float64).astype(W.dtype)
        out["live_spread"][j] = float(np.einsum("ij,ij->", L, L, dtype=np.float64)) / len(live)
    d = W.shape[1]
    return {"steps": steps, **out, "pc_var": pcs, "n_dead": n, "d": d, "pc1_noise": (1 + (d / n) ** 0.5) ** 2 / d}


# ---------------------------------------------------------------- 5. trajectory maps
def trajectory_map(rec, matrix: str = "wte", steps=None, n_fit_steps: int = 8, n_live: int = 512,
                   n_named: int = 4, seed: int = 0) -> dict:
    """Analysis 5: a 2-D PCA fitted on all dead rows plus ``n_live`` sampled live rows at
    ``n_fit_steps`` steps spread over the recording; then tracks named rows and the group means."""
    _check(rec, matrix)
    steps = thin(rec.steps) if steps is None else np.asarray(steps)
    rng = np.random.default_rng(seed)
    dead = np.asarray(rec.dead_ids)
    live = np.asarray(rec.live_ids)
    sample = np.sort(rng.choice(live, min(n_live, len(live)), replace=False))
    cloud = np.concatenate([dead, sample])
    fit = np.concatenate([rec.snapshot(int(n), matrix=matrix)[cloud] for n in thin(rec.steps, n_fit_steps)])
    mu = fit.mean(0)
    _, vecs = np.linalg.eigh(np.cov(fit - mu, rowvar=False))
    axes = vecs[:, ::-1][:, :2]  # (d, 2) top two principal axes
    named = np.concatenate([named_ids(rec, dead, n_named), named_ids(rec, live, n_named)])
    track = np.empty((len(steps), len(named), 2), np.float32)
    dmean, lmean = np.empty((len(steps), 2)), np.empty((len(steps), 2))
    for j, n in enumerate(steps):
        W = rec.snapshot(int(n), matrix=matrix)
        track[j] = (W[named] - mu) @ axes
        dmean[j], lmean[j] = (W[dead].mean(0) - mu) @ axes, (W[live].mean(0) - mu) @ axes
    first = (rec.snapshot(int(steps[0]), matrix=matrix)[cloud] - mu) @ axes
    last = (rec.snapshot(int(steps[-1]), matrix=matrix)[cloud] - mu) @ axes
    var = np.var(fit @ axes, axis=0).sum() / np.var(fit, axis=0).sum()
    return {"steps": steps, "named": named, "named_labels": token_labels(rec, named),
            "named_dead": np.isin(named, dead), "track": track,
            "dead_mean": dmean, "live_mean": lmean, "cloud_is_dead": np.isin(cloud, dead),
            "cloud_first": first, "cloud_last": last, "explained": float(var)}


# ---------------------------------------------------------------- 6. detectability
# BLIND INDICATORS. Each label-free indicator's direction (higher score = "looks dead"), FIXED BEFORE ANY
# LABEL OF THE STUDY WAS SEEN, with its source (issue 23): what a user without the dead labels would
# compute. Its AUROC is reported in this direction only: < 0.5 means the direction is wrong for the run.
# The report may show the post-hoc best direction beside it, labelled post hoc; it never replaces it.
#   key: (fixed direction, opposite direction, where the fixed direction comes from)
BLIND_DIRECTIONS = {
    "norm": ("small row norm => dead", "large row norm => dead",
             "literature: Land & Bartolo 2024 (Magikarp), small embedding norm marks under-trained tokens"),
    "cos_all_mean": ("high cosine to the mean row => dead", "low cosine to the mean row => dead",
                     "literature: Gao et al. 2019 (representation degeneration), rows that get only the softmax "
                     "denominator's push all move along -(mean hidden state), as the mean row does"),
    "pc1": ("far out on the long tail of the PC1 projection => dead",
            "on the short side of the PC1 projection => dead",
            "prior, no labels (issue 13): unused tokens are a minority cluster out on one tail"),
}
LABEL_FREE = {k: v[0] for k, v in BLIND_DIRECTIONS.items()}
OPPOSITE = {k: v[1] for k, v in BLIND_DIRECTIONS.items()}
DIRECTION_SOURCE = {k: v[2] for k, v in BLIND_DIRECTIONS.items()}
# Indicators that use the dead labels (their reference is built from the known dead rows): an upper
# bound on what such a reference can do, not a detector.
LABEL_USING = {"cos_dead_mean": "cosine to the mean dead row (uses the dead labels)",
               "cos_dead_mean_nopc1": "Magikarp: cosine to the mean known-unused row after removing the first "
                                      "principal component (uses the dead labels)"}
SUPERVISED = tuple(LABEL_USING)  # the name older callers use


def _skew_sign(x) -> float:
    """+1 if the distribution of x has its long tail on the positive side (or is symmetric), else -1."""
    c = np.asarray(x, np.float64) - np.mean(x)
    return 1.0 if (c ** 3).mean() >= 0 else -1.0


def indicators(W, is_dead) -> dict:
    """Magikarp-style scores for every row of W (V, d), higher = "looks dead" (``LABEL_FREE`` gives each
    label-free score's direction; ``LABEL_USING`` names the two that use the labels).

    norm: minus the row norm. cos_all_mean: cosine to the mean of all rows. pc1: projection on the
    first principal component of the centred rows, oriented (without labels) so that its long tail
    is positive: an eigenvector's sign is arbitrary, and dead tokens are expected to be the minority
    out on a tail. cos_dead_mean / cos_dead_mean_nopc1: cosine to the mean dead row, raw and after
    removing the first principal component (Land & Bartolo 2024, whose reference is the mean of
    known-unused rows); these LEAK LABELS, so their AUROC is an upper bound, not a detector."""
    W = np.asarray(W, np.float32)  # (V, d)
    U = W / np.maximum(_norms(W), 1e-30)[:, None]  # unit rows
    mean = W.mean(0, dtype=np.float64).astype(np.float32)
    Wc = W - mean  # centred
    v1 = np.linalg.eigh((Wc.T @ Wc).astype(np.float64))[1][:, -1].astype(np.float32)  # (d,) first PC
    p1 = Wc @ v1  # (V,)
    # rows with the first PC removed, Wr = Wc - p1 v1^T, without materialising Wr: ||Wr_i||^2 =
    # ||Wc_i||^2 - p1_i^2 and Wr_i . m = Wc_i . m - p1_i (v1 . m)
    m = Wc[is_dead].mean(0) - p1[is_dead].mean() * v1  # mean dead row of Wr
    nr = np.sqrt(np.maximum(np.einsum("ij,ij->i", Wc, Wc) - p1 * p1, 1e-30))
    return {"norm": -_norms(W),
            "cos_all_mean": U @ _unit(mean),
            "pc1": p1 * _skew_sign(p1),
            "cos_dead_mean": U @ _unit(W[is_dead].mean(0)),
            "cos_dead_mean_nopc1": (Wc @ m - p1 * (v1 @ m)) / (nr * max(np.linalg.norm(m), 1e-30))}


def detectability(rec, matrix: str = "wte", steps=None) -> dict:
    """Analysis 6: AUROC of each indicator (dead = positive) at every evaluated step, in the fixed
    direction of ``indicators`` (never max(A, 1 - A)). ``label_free`` / ``label_using`` name the two
    groups with their directions / descriptions."""
    _check(rec, matrix)
    steps = thin(rec.steps) if steps is None else np.asarray(steps)
    V = rec.meta.get("shape", [None])[0] or len(rec.live_ids) + len(rec.dead_ids)
    is_dead = np.zeros(V, bool)
    is_dead[rec.dead_ids] = True
    out: dict[str, np.ndarray] = {}
    for j, n in enumerate(steps):
        for name, s in indicators(rec.snapshot(int(n), matrix=matrix), is_dead).items():
            out.setdefault(name, np.empty(len(steps)))[j] = auroc(s, is_dead)
    return {"steps": steps, "auroc": out, "supervised": SUPERVISED, "label_free": LABEL_FREE,
            "label_using": LABEL_USING, "matrix": matrix, "untied": _untied(rec)}


def first_separable(steps, auroc_curve, threshold: float = 0.9, opposite: bool = False) -> dict:
    """First evaluated step whose AUROC reaches ``threshold`` (or, ``opposite``, falls to 1 - threshold),
    with the evaluated step before it: separation happened somewhere in (after_step, step]."""
    a = np.asarray(auroc_curve)
    hit = np.flatnonzero(a <= 1 - threshold if opposite else a >= threshold)
    if not len(hit):
        return {"step": None, "after_step": int(steps[-1]),
                "resolution": f"not separable at any evaluated step up to {int(steps[-1])}"}
    k = int(hit[0])
    if k == 0:
        return {"step": int(steps[0]), "after_step": None, "resolution": f"already at step {int(steps[0])}"}
    return {"step": int(steps[k]), "after_step": int(steps[k - 1]),
            "resolution": f"between step {int(steps[k - 1])} and {int(steps[k])}"}


# ---------------------------------------------------------------- 7. output mass
def output_mass(rec) -> dict:
    """Analysis 7: total and maximum softmax probability on dead tokens over the fixed probe batch.

    ``uniform`` is the total dead mass of a uniform softmax (n_dead / V), roughly the value at init."""
    p = np.asarray(rec.probe, np.float64).reshape(-1, 3)  # (n_probes, 3) [step, total, max]
    n_dead = len(rec.dead_ids)
    return {"steps": p[:, 0].astype(np.int64), "total": p[:, 1], "max": p[:, 2],
            "uniform": n_dead / (n_dead + len(rec.live_ids))}


# ---------------------------------------------------------------- 8. gradient channel
def gradient_channel(rec, matrix: str = "wte") -> dict:
    """Analysis 8: per-row gradient norms and Adam second moments (mean over the row of exp_avg_sq)
    every step, dead vs live. sqrt(adam_v) near Adam's eps means updates shrink with the gradient."""
    _check(rec, matrix)
    eps = run_config(rec).get("train", {}).get("adam_epsilon")
    out = {"steps": np.asarray(rec.scalar_steps), "adam_epsilon": eps}
    for field in ("grad_norm", "adam_v"):
        out[field] = _row_stats(rec, field, matrix)  # {"dead", "live"}: stats dicts
    return out
