"""The figures of ``duckling compare``: each measure against each swept field (compare_<field>.png) and
the dead-row norm curves of every configuration (compare_norms.png).

Every mean over seeds carries its 95% Student-t interval (``duckling.sweeps.stats``; one seed: none).
The y axes are not fitted to the data alone, where noise would fill the panel (a held-out loss of
8.4910-8.4930 looked like an effect): bounded measures keep their whole range (AUROC 0-1, cosines),
ratios and magnitudes include 0 and their reference line, losses span at least half a nat, and any other
measure includes 0 when its values share a sign. Tick labels never use an offset. Legends sit below the
panels, never over the data.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from duckling.sweeps import stats
from duckling.sweeps.compare import FIG_METRICS, METRICS

DPI = 100
LOSS_SPAN = 0.5  # nats: the least y range of a loss panel
# {column: rule}: ("fixed", lo, hi) | ("zero",) include 0 | ("span", least range) | ("cos",) [0, 1] or [-1, 1]
AXES = {"train_loss": ("span", LOSS_SPAN), "eval_loss": ("span", LOSS_SPAN), "loss_rarest_decile": ("span", LOSS_SPAN),
        "loss_commonest_decile": ("span", LOSS_SPAN), "dead_centred_pc1": ("fixed", 0.0, 1.0),
        **{c: ("cos",) for c in ("dead_pairwise_cos", "dead_drift_cos", "dead_pairwise_cos_from_shift",
                                 "mean_shift_cos_hidden_all", "mean_shift_cos_hidden_live", "mean_shift_cos_hidden_dead")},
        **{c: ("fixed", 0.0, 1.0) for c, _ in METRICS.values() if "auroc" in c}}
# {column: (y, line style, what it means)}: drawn in the panel, named in the figure's legend
REFERENCE = {"dead_norm_over_null": (1.0, "--", "1 = decay alone (norm / null), the rule exactly (measured / rule)"),
             "update_measured_over_rule": (1.0, "--", "1 = decay alone (norm / null), the rule exactly (measured / rule)"),
             "update_step_ratio_median": (1.0, "--", "1 = decay alone (norm / null), the rule exactly (measured / rule)"),
             "dead_spread_over_init": (1.0, "-.", "1 = as spread as at step 0"),
             **{c: (0.5, ":", "0.5 = chance (AUROC)") for c, _ in METRICS.values() if "auroc" in c}}
# {column: (column whose mean over the panel's runs is drawn, what it means)}: a reference each run measures
REFERENCE_COL = {"dead_centred_pc1": ("dead_centred_pc1_noise", "isotropic noise (PC1 share)")}


def y_limits(col: str, lo: float, hi: float) -> tuple[float, float]:
    """The y range of a panel of ``col`` whose points and intervals span [lo, hi] (module docstring)."""
    rule = AXES.get(col, ("auto",))
    ref = REFERENCE.get(col, (None,))[0]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        lo, hi = (0.0, 1.0) if ref is None else (ref, ref)
    if rule[0] == "fixed":
        a, b = min(rule[1], lo), max(rule[2], hi)
    elif rule[0] == "cos":
        a, b = (0.0 if lo >= 0 else -1.0), 1.0
    elif rule[0] == "span":
        mid, half = (lo + hi) / 2, max(hi - lo, rule[1]) / 2
        a, b = mid - half, mid + half
    elif lo >= 0 or hi <= 0:  # "zero" and the default where the values share a sign: magnitudes, ratios
        a, b = min(lo, 0.0), max(hi, 0.0)
    else:
        span = max(hi - lo, 0.1 * max(abs(lo), abs(hi)))
        a, b = (lo + hi) / 2 - span / 2, (lo + hi) / 2 + span / 2
    if ref is not None:
        a, b = min(a, ref), max(b, ref)
    if b - a <= 0:
        a, b = a - 0.5, b + 0.5
    pad = 0.05 * (b - a)
    return a - pad, b + pad


def _positions(values) -> dict:
    """{value: x}: evenly spaced in sorted order (swept values are often log-spaced), or in the
    order given when they are not all numbers."""
    uniq = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in uniq):
        uniq = sorted(uniq)
    return {v: i for i, v in enumerate(uniq)}


def _group_label(fields, key) -> str:
    return ", ".join(f"{f.split('.')[-1]}={v}" for f, v in zip(fields, key))


def plot_metric_vs(done, field: str, swept: list, metrics=FIG_METRICS, title: str = ""):
    """Each measure against the values of one swept field: every seed a dot, the mean over seeds a
    marker with its 95% t interval as a bar; one line per combination of the other swept fields."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    metrics = [m for m in metrics if METRICS[m][0] in done and done[METRICS[m][0]].notna().any()]
    ncols = 3 if len(metrics) > 4 else 2
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = Figure(figsize=(3.6 * ncols, 2.7 * nrows + 1.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    others = [f for f in swept if f != field]
    groups = list(done.groupby(others, sort=False)) if others else [((), done)]
    xs = _positions(done[field].tolist())
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)  # else: no lines between
    n_seeds = sorted(set(done.groupby(swept)["seed"].nunique())) if swept else [len(done)]
    seeds = "/".join(map(str, n_seeds))
    fig.suptitle(f"{title + ': ' if title else ''}measures vs {field}\ndots: each seed; marker and bar: mean over "
                 f"{seeds} seed{'s' if n_seeds != [1] else ''} with its 95% Student-t interval"
                 + (" (one seed: no interval)" if 1 in n_seeds else ""), fontsize=9)
    refs: dict = {}
    for ax, metric in zip(axes, metrics):
        col, label = METRICS[metric]
        lo, hi = np.inf, -np.inf
        for gi, (key, g) in enumerate(groups):
            color = f"C{gi % 10}"
            offset = (gi - (len(groups) - 1) / 2) * 0.08  # keep the groups' dots apart
            order = sorted(dict.fromkeys(g[field]), key=lambda v: xs[v])
            cis = [stats.mean_ci(g.loc[g[field] == v, col]) for v in order]
            x = np.array([xs[v] for v in order]) + offset
            mean = np.array([c["mean"] for c in cis])
            half = np.array([c["half"] for c in cis])
            ax.scatter([xs[v] + offset for v in g[field]], g[col], s=10, color=color, alpha=0.45, lw=0)
            ax.errorbar(x, mean, yerr=np.where(np.isfinite(half), half, 0), color=color, lw=1.2, capsize=3,
                        marker="o", ms=4, ls="-" if numeric else "none")
            vals = np.concatenate([g[col].to_numpy(float), mean - np.nan_to_num(half), mean + np.nan_to_num(half)])
            if np.isfinite(vals).any():
                lo, hi = min(lo, np.nanmin(vals)), max(hi, np.nanmax(vals))
        if col in REFERENCE:
            y, ls, what = REFERENCE[col]
            ax.axhline(y, color="black", ls=ls, lw=0.8)
            refs[what] = ls
        if col in REFERENCE_COL and REFERENCE_COL[col][0] in done and done[REFERENCE_COL[col][0]].notna().any():
            ref_col, what = REFERENCE_COL[col]
            ax.axhline(float(done[ref_col].mean()), color="gray", ls=(0, (1, 2)), lw=1.0)
            refs[what] = (0, (1, 2))
        ax.set_ylim(*y_limits(col, lo, hi))
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], fontsize=8)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xlabel(field, fontsize=8)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=f"C{gi % 10}", marker="o", ms=4, lw=1.2,
                      label=_group_label(others, k if isinstance(k, tuple) else (k,)))
               for gi, (k, _) in enumerate(groups)] if others else []
    handles += [Line2D([], [], color="gray" if isinstance(ls, tuple) else "black", ls=ls, lw=0.8, label=what)
                for what, ls in refs.items()]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    return fig


def band(values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, lo, hi) over axis 0 of (seeds, T) curves: the pointwise 95% t interval (lo = hi = mean
    with one seed)."""
    v = np.asarray(values, np.float64)
    mean = v.mean(0)
    if len(v) < 2:
        return mean, mean, mean
    half = stats.t_quantile(0.975, len(v) - 1) * v.std(0, ddof=1) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def _norm_curves(run_dir: Path):
    from duckling.analysis import metrics as A
    from duckling.recording.reader import Recording

    n = A.norms(Recording(run_dir))
    return n["steps"], n["dead"]["mean"], n["null_mean"]


def plot_norm_curves(out: Path, done, swept: list):
    """Mean dead-row norm of every configuration against the step (line: mean over seeds; band: its
    95% t interval), with each configuration's weight-decay null dashed; below, their ratio."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    groups = list(done.groupby(swept, sort=False)) if swept else [((), done)]
    skipped, n_seeds = [], set()
    for gi, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        curves = []
        for name in g["name"]:
            try:
                curves.append(_norm_curves(out / name))
            except Exception:  # noqa: BLE001 - no recording (a summary-only run) or an unreadable one
                skipped.append(name)
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)  # a seed may have stopped early (time budget)
        steps = curves[0][0][:n]
        dead = np.stack([c[1][:n] for c in curves])  # (seeds, T)
        null = np.stack([c[2][:n] for c in curves])
        n_seeds.add(len(curves))
        color = f"C{gi % 10}"
        label = (_group_label(swept, key) or "all runs") + f" ({len(curves)} seed{'s' if len(curves) != 1 else ''})"
        m, lo, hi = band(dead)
        ax.plot(steps, m, color=color, lw=1.3, label=label)
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
        ax.plot(steps, null.mean(0), color=color, lw=0.9, ls="--")
        m, lo, hi = band(dead / null)
        ax2.plot(steps, m, color=color, lw=1.3)
        ax2.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    if not ax.lines:
        return None
    ax.plot([], [], color="gray", ls="--", lw=0.9, label="dashed: weight decay alone, ||w0||·Π(1-lr·wd)")
    note = f"; left out, no readable recording: {', '.join(skipped)}" if skipped else ""
    fig.suptitle("Dead-row norms of every configuration. Line: mean over seeds; band: its 95% Student-t "
                 f"interval{' (one seed: no band)' if 1 in n_seeds else ''}{note}", fontsize=9)
    ax.set_ylabel("mean dead-row L2 norm", fontsize=8)
    top = max(np.nanmax(line.get_ydata()) for line in ax.lines if len(line.get_ydata()))
    ax.set_ylim(0, top * 1.08)  # a norm: from 0, so a 1% change looks like one
    ratios = np.concatenate([line.get_ydata() for line in ax2.lines])
    lo, hi = float(np.nanmin(ratios)), float(np.nanmax(ratios))
    if hi > 10 * max(lo, 1e-12):  # one configuration far off: the rest stay visible
        ax2.set_yscale("log")
    else:
        ax2.set_ylim(0, max(hi, 1.0) * 1.08)
    ax2.axhline(1.0, color="black", ls="--", lw=0.8)
    ax2.set_ylabel("dead norm / weight-decay null (1 = decay alone)", fontsize=8)
    ax2.set_xlabel("training step (updates)", fontsize=8)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.tick_params(labelsize=7)
        a.ticklabel_format(axis="y", useOffset=False, style="plain") if a.get_yscale() == "linear" else None
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(ax.lines), 3),
               fontsize=7, frameon=False)
    return fig


def write_figures(out: Path, table, swept: list) -> list[str]:
    """compare_<field>.png per swept field and compare_norms.png in OUT, from the complete runs; their names."""
    done = table[table["status"] == "complete"]
    if not len(done):
        return []
    files = []
    for field in swept:
        fig = plot_metric_vs(done, field, swept, title=f"Sweep {out.name}")
        name = f"compare_{field.split('.')[-1]}.png"
        fig.savefig(out / name, dpi=DPI)
        files.append(name)
    fig = plot_norm_curves(out, done, swept)
    if fig is not None:
        fig.savefig(out / "compare_norms.png", dpi=DPI)
        files.append("compare_norms.png")
    return files
