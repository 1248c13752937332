"""Question 2 of the dead-token study, a CONSISTENCY CHECK (not a prediction): does the optimizer's update
rule, fed the per-row gradient norms and second moments this very run recorded, give the dead rows' measured
per-step updates? It checks that the recorded fields and the rule agree; the report gives the per-step ratio's
median and 5-95% over steps (``measures.step_ratio_stats``), since a ratio summed over the run hides them.

The recording keeps, every step and for every row i, only norms: ||g_i|| (the clipped gradient the
optimizer saw), the row mean of Adam's second moment v̄_i = mean_j v_ij (NaN without Adam state),
the row norm ||w_i|| and the measured update size ||w_i,N - w_i,N-1||. From these, each update rule
gives the size of update N of row i, with the first moment rebuilt from the gradient norms:

- adamw:  lr_N ||m̂_i|| / (sqrt(v̄_i / (1 - b2^N)) + eps), m̂ = m / (1 - b1^N). Dividing by the row-mean
  second moment instead of coordinate by coordinate is exact when v is the same on every
  coordinate of the row, and for a constant gradient whatever its coordinates (then it gives
  lr sqrt(d), the "lr per coordinate" of Adam's sign-like regime).
- coupled_adam: the same with v̄ averaged over the whole vocabulary (the optimizer averages
  exp_avg_sq over the rows before dividing; the recorded adam_v is the uncoupled state).
- sgd (heavy ball, buffer b <- mu b + g): lr_N ||b_i||; ||g|| / (1 - mu) in a steady state.

||m|| (or ||b||) is not recorded; two values bracket it. ``coherent``: every step's gradient of a
row points the same way, ||m_N|| = b1 ||m_N-1|| + (1 - b1) ||g_N|| (the triangle inequality's upper
bound). ``incoherent``: successive gradients are uncorrelated, ||m_N||^2 = b1^2 ||m_N-1||^2 +
(1 - b1)^2 ||g_N||^2 (its expected value). The decoupled weight decay adds lr_N wd ||w_i,N-1||, taken
as orthogonal to the gradient part (added in quadrature). ``ratio`` = measured / predicted per step,
over dead rows (ratio of the dead-row means; the band: 10-90% of the per-row ratios).
"""
from __future__ import annotations

import math

import numpy as np

from duckling.analysis import metrics as A
from duckling.errors import DucklingError

RULES = {
    "adamw": "lr·|m̂|/(sqrt(v̂ row mean)+eps) + lr·wd·|w|",
    "coupled_adam": "lr·|m̂|/(sqrt(v̂ vocabulary mean)+eps) + lr·wd·|w|",
    "sgd": "lr·|momentum buffer| + lr·wd·|w|",
}


def _lr(rec, train: dict) -> np.ndarray:
    lr = np.asarray(rec.lr, np.float64)
    if len(lr) < 2 or np.isnan(lr[1:]).all():
        if not train:
            raise DucklingError("the recording has no lr.f32 and the run folder no config.json; the update "
                                "rule needs the lr schedule.")
        lr = A.lr_from_config(train, len(rec.scalar_steps))
    return lr


def _width(rec) -> int:
    shape = rec.meta.get("shape")
    return int(shape[1]) if shape else int(rec.snapshot(int(rec.steps[0])).shape[1])


def lr_budget(rec) -> np.ndarray:
    """sum_{s<=N} lr_s * sqrt(d) for every scalar step N: how far a row moving lr per coordinate per step
    (Adam's constant-gradient limit) would travel along a straight line, (T,)."""
    d = _width(rec)
    lr = _lr(rec, A.run_config(rec).get("train", {}))
    return np.cumsum(np.nan_to_num(lr, nan=0.0)) * math.sqrt(d)


def update_prediction(rec, matrix: str = "wte", optimizer: str | None = None) -> dict:
    """Per step: measured mean dead-row update size against the update rule's prediction.

    Returns steps (T,), ``measured``, ``coherent``, ``incoherent``, ``decay`` (the weight-decay part),
    ``full_speed`` (lr sqrt(d)): means over dead rows, (T,); ``ratio`` / ``ratio_incoherent``:
    measured / predicted, (T,); ``ratio_band``: 10/50/90% of per-row measured / coherent, (T, 3);
    ``v_check``: median over dead rows of the second moment rebuilt from the gradient norms over the
    recorded one (1 when the fields line up; NaN without Adam state); ``optimizer``, ``rule``."""
    A._check(rec, matrix)
    train = A.run_config(rec).get("train", {})
    opt = optimizer or train.get("optimizer", "adamw")
    if opt not in RULES:
        raise DucklingError(f"no update rule for optimizer {opt!r}; choose one of {sorted(RULES)}.")
    wd = rec.meta.get("weight_decay", train.get("weight_decay"))
    if wd is None:
        raise DucklingError("no weight decay known for this recording: keep config.json in the run folder.")
    b1, b2 = train.get("adam_beta1", 0.9), train.get("adam_beta2", 0.999)
    eps, mu = train.get("adam_epsilon", 1e-8), train.get("sgd_momentum", 0.9)
    lr = _lr(rec, train)
    dead = np.asarray(rec.dead_ids)
    d = _width(rec)
    fields = {f: rec.rows(f, matrix=matrix) for f in ("norm", "update_norm", "grad_norm", "adam_v")}
    T, n = len(rec.scalar_steps), len(dead)
    out = {k: np.full(T, np.nan) for k in ("measured", "coherent", "incoherent", "decay", "v_check")}
    band = np.full((T, 3), np.nan)
    mc, mi, vr = np.zeros(n), np.zeros(n), np.zeros(n)  # ||m|| coherent / incoherent, v rebuilt (dead rows)
    a1, a2 = (mu, 1.0) if opt == "sgd" else (b1, 1 - b1)  # state <- a1 state + a2 ||g||
    prev_norm = None
    for a in range(0, T, A.CHUNK):
        chunk = {f: np.asarray(v[a:a + A.CHUNK], np.float64) for f, v in fields.items()}
        vmean = chunk["adam_v"].mean(1) if opt == "coupled_adam" else None  # vocabulary mean, per step
        for k in range(len(chunk["norm"])):
            t = a + k
            wn = chunk["norm"][k, dead]
            if t == 0 or prev_norm is None:
                prev_norm = wn
                continue
            g = np.nan_to_num(chunk["grad_norm"][k, dead], nan=0.0)
            mc = a1 * mc + a2 * g  # from 0: torch's SGD buffer starts as the first gradient, Adam's m as (1-b1) g
            mi = np.sqrt((a1 * mi) ** 2 + (a2 * g) ** 2)
            vr = b2 * vr + (1 - b2) * g * g / d
            if opt == "sgd":
                step_c, step_i = lr[t] * mc, lr[t] * mi
            else:
                v = np.full(n, vmean[k]) if opt == "coupled_adam" else chunk["adam_v"][k, dead]
                den = np.sqrt(np.maximum(v, 0) / (1 - b2 ** t)) + eps
                step_c, step_i = lr[t] * mc / (1 - b1 ** t) / den, lr[t] * mi / (1 - b1 ** t) / den
                with np.errstate(all="ignore"):
                    out["v_check"][t] = np.median(vr / chunk["adam_v"][k, dead])
            dec = lr[t] * wd * prev_norm
            pc, pi = np.hypot(step_c, dec), np.hypot(step_i, dec)
            meas = chunk["update_norm"][k, dead]
            out["measured"][t], out["coherent"][t], out["incoherent"][t] = meas.mean(), pc.mean(), pi.mean()
            out["decay"][t] = dec.mean()
            with np.errstate(all="ignore"):
                band[t] = np.percentile(meas / pc, A.QUANTILES)
            prev_norm = wn
    with np.errstate(all="ignore"):
        ratio, ratio_i = out["measured"] / out["coherent"], out["measured"] / out["incoherent"]
    return {"steps": np.asarray(rec.scalar_steps), **out, "full_speed": lr * math.sqrt(d), "ratio": ratio,
            "ratio_incoherent": ratio_i, "ratio_band": band, "optimizer": opt, "rule": RULES[opt],
            "weight_decay": wd, "matrix": matrix, "untied": "lm_head" in rec.meta.get("matrices", ["wte"])}


def path_ratio(res, key: str = "coherent") -> float:
    """sum over steps of the measured mean dead update / sum of the predicted one (steps with both)."""
    m, p = res["measured"], res[key]
    ok = np.isfinite(m) & np.isfinite(p)
    return float(m[ok].sum() / p[ok].sum()) if ok.any() and p[ok].sum() > 0 else float("nan")
