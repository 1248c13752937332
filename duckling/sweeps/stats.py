"""Means over seeds with a 95% Student-t interval, and differences of means with theirs (no scipy).

    from duckling.sweeps.stats import mean_ci, diff_ci
    mean_ci([8.49, 8.51, 8.50, 8.52, 8.48])       # {"n": 5, "mean": 8.5, "lo": ..., "hi": ..., "half": ...}
    diff_ci(a, b, seeds_a=[0, 1, 2], seeds_b=[0, 1, 2])   # paired t on the per-seed differences

The interval of a mean over n seeds is mean ± t(0.975, n - 1) · sd / √n (sd with n - 1): the Student t
interval, exact for normal per-seed values, and with 5 seeds a fair description of what another 5 seeds
would give. One seed has no interval (NaN). A difference of two configurations run on the same seeds is
a paired t interval on the per-seed differences (seed s of both shares the initial weights and the data
order); on different seeds it is Welch's interval (unequal variances, Welch-Satterthwaite degrees of
freedom). The t quantile comes from the regularized incomplete beta function (a continued fraction).
"""
from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
METHOD = "95% Student-t interval over seeds (mean ± t·sd/√n)"


# ---------------------------------------------------------------- the t distribution
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on ``t_cdf`` to 1e-12."""
    if not 0.5 <= p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- intervals
def _clean(values) -> np.ndarray:
    v = np.asarray([np.nan if x is None else x for x in np.ravel(values)], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_ci(values, level: float = LEVEL) -> dict:
    """Mean of the finite values with its Student-t interval: {n, mean, sd, half, lo, hi}.
    ``half`` = t((1 + level) / 2, n - 1) · sd / √n; NaN with fewer than 2 values (no interval)."""
    v = _clean(values)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "half": math.nan, "lo": math.nan, "hi": math.nan}
    sd = float(v.std(ddof=1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def welch(a, b, level: float = LEVEL) -> dict:
    """mean(a) - mean(b) with Welch's interval: {n_a, n_b, diff, df, half, lo, hi, method}."""
    a, b = _clean(a), _clean(b)
    out = {"n_a": len(a), "n_b": len(b), "diff": float(a.mean() - b.mean()) if len(a) and len(b) else math.nan,
           "df": math.nan, "half": math.nan, "lo": math.nan, "hi": math.nan, "method": "Welch t"}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical constants: no spread to scale an interval by
        return {**out, "df": float(len(a) + len(b) - 2), "half": 0.0, "lo": out["diff"], "hi": out["diff"]}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * se
    return {**out, "df": float(df), "half": half, "lo": out["diff"] - half, "hi": out["diff"] + half}


def paired(a, b, level: float = LEVEL) -> dict:
    """mean(a - b) over matched pairs (the same seed) with the t interval of the differences."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    c = mean_ci(d, level)
    return {"n_a": c["n"], "n_b": c["n"], "diff": c["mean"], "df": float(c["n"] - 1) if c["n"] > 1 else math.nan,
            "half": c["half"], "lo": c["lo"], "hi": c["hi"], "method": "paired t"}


def diff_ci(a, b, seeds_a=None, seeds_b=None, level: float = LEVEL) -> dict:
    """Difference of means a - b with its interval: paired t when both name the same seeds (each
    seed once; pairs where either value is missing are dropped), else Welch's interval."""
    if seeds_a is not None and seeds_b is not None and sorted(seeds_a) == sorted(seeds_b) \
            and len(set(seeds_a)) == len(seeds_a):
        pa = dict(zip(seeds_a, np.asarray(a, np.float64)))
        pb = dict(zip(seeds_b, np.asarray(b, np.float64)))
        keep = [s for s in seeds_a if np.isfinite(pa[s]) and np.isfinite(pb[s])]
        return paired([pa[s] for s in keep], [pb[s] for s in keep], level)
    return welch(a, b, level)


def excludes_zero(d: dict) -> bool:
    """Whether an interval (mean_ci / diff_ci) lies wholly on one side of zero."""
    return bool(d["lo"] > 0 or d["hi"] < 0)


def fmt_ci(d: dict, digits: int = 4) -> str:
    """"m [lo, hi]" (or "m" with no interval; "" with no value)."""
    m = d.get("mean", d.get("diff"))
    if m is None or not np.isfinite(m):
        return ""
    if not np.isfinite(d["half"]):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} [{d['lo']:.{digits}g}, {d['hi']:.{digits}g}]"
