"""The dead-token study's figures (docs/results.md, "The dead-token study"; notebook 08), from the table of
``duckling.sweeps.study.load`` or ``load_runs``:

    plot_norms_vs_null(t); plot_update_rule(t)      # Q1 and Q2
    plot_by_frequency(t)                            # loss and row norm per token-frequency bucket

Each draws the mean over seeds with its pointwise 95% Student-t interval (a band, or a bar).
"""
from __future__ import annotations

import numpy as np

from duckling.sweeps.compare_plots import band
from duckling.sweeps.study import curves, read_json, summary_path

WD_COLORS = ("tab:gray", "tab:orange", "tab:purple", "tab:brown", "tab:olive")  # by rank within an optimizer
OPT_COLORS = {"adamw": "tab:red", "coupled_adam": "tab:blue", "sgd": "tab:green"}


def _band(ax, x, ys, color, ls, label):
    """Mean over seeds and its pointwise 95% t interval (compare_plots.band)."""
    mean, lo, hi = band(ys)
    ax.plot(x, mean, color=color, ls=ls, lw=1.4, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)


def _colors(t) -> dict:
    """{(optimizer, lr): colour}: the optimizer's own colour for its first lr, distinct others after it."""
    extra, seen, out = iter(["tab:purple", "tab:brown", "tab:olive", "tab:pink", "tab:cyan", "black"]), set(), {}
    for opt, lr in _configs(t):
        out[(opt, lr)] = OPT_COLORS.get(opt, "black") if opt not in seen else next(extra, "black")
        seen.add(opt)
    return out


def _configs(t) -> list:
    """[(optimizer, learning rate)] in the table's order: one column of the figures each."""
    return list(dict.fromkeys(zip(t["train.optimizer"], t["train.learning_rate"])))


def plot_norms_vs_null(t):
    """Q1: per optimizer and learning rate, the mean dead-row norm (solid) with what decay alone would leave
    (dashed), and their ratio, per weight decay (line: mean over seeds; band: its 95% t interval)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    t = t[t["embeddings"] == "tied"]
    opts = _configs(t)
    fig = Figure(figsize=(3.4 * len(opts) + 0.4, 6.4), layout="constrained")
    axes = fig.subplots(2, len(opts), sharex=True, sharey="row", squeeze=False)
    fig.suptitle("Q1: do dead rows grow or decay? Top: mean dead-row norm (solid) and what weight decay alone "
                 "would leave (dashed).\nBottom: their ratio (1 = decay alone). Line: mean over seeds; band: "
                 "its 95% Student-t interval", fontsize=10)
    for j, (opt, lr) in enumerate(opts):
        top, bottom = axes[0, j], axes[1, j]
        sel = t[(t["train.optimizer"] == opt) & (t["train.learning_rate"] == lr)]
        for k, (wd, g) in enumerate(sel.groupby("train.weight_decay")):
            cs = [curves(d) for d in g["dir"]]
            n = min(len(c) for c in cs)
            x, color = cs[0]["step"].to_numpy()[:n], WD_COLORS[k % len(WD_COLORS)]
            _band(top, x, [c["dead_norm"].to_numpy()[:n] for c in cs], color, "-", f"weight decay {wd:g}")
            top.plot(x, np.mean([c["null_norm"].to_numpy()[:n] for c in cs], 0), color=color, ls="--", lw=1)
            _band(bottom, x, [c["norm_ratio"].to_numpy()[:n] for c in cs], color, "-", f"weight decay {wd:g}")
        bottom.axhline(1, color="black", lw=0.7)
        top.set_title(f"{opt}, lr {lr:g}", fontsize=10)
        bottom.set_xlabel("optimizer step", fontsize=9)
        for ax in (top, bottom):
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 0.215, not 2.15 x 10^-1
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        top.legend(fontsize=8)
    lo, hi = axes[1, 0].get_ylim()  # shared row: a ratio within 10% of 1 is drawn as what it is, not as a slope
    axes[1, 0].set_ylim(min(lo, 0.9), max(hi, 1.1))
    axes[0, 0].set_ylabel("mean dead-row norm ||w||", fontsize=9)
    axes[1, 0].set_ylabel("dead-row norm / decay-only null", fontsize=9)
    return fig


def plot_update_rule(t, weight_decay: float | None = None):
    """Q2: measured mean dead-row update per step against each optimizer's rule (gradient keeping its
    direction), and their ratio, at one weight decay per optimizer and learning rate (default: the
    middle one it ran)."""
    from matplotlib.figure import Figure

    t = t[t["embeddings"] == "tied"]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle("Q2: how much of the dead rows' movement does the update rule predict? (a consistency check: "
                 "the rule is fed the recorded gradients)\nline: mean over seeds, band: its 95% Student-t interval",
                 fontsize=10)
    for j, (opt, lr) in enumerate(_configs(t)):
        sel = t[(t["train.optimizer"] == opt) & (t["train.learning_rate"] == lr)]
        wds = sorted(set(sel["train.weight_decay"]))
        wd = weight_decay if weight_decay is not None else wds[len(wds) // 2]
        g = sel[sel["train.weight_decay"] == wd]
        res = [curves(d) for d in g["dir"]]
        if not res:
            continue
        n = min(len(r) for r in res)
        res = [{c: r[c].to_numpy(np.float64)[:n] for c in r} for r in res]
        x = res[0]["step"]
        ok = (x > 0) & np.all([np.isfinite(r["update_ratio"]) for r in res], 0)
        name, color = f"{opt} lr {lr:g} wd {wd:g}", _colors(t)[(opt, lr)]
        _band(axes[0], x[ok], [r["update_measured"][ok] for r in res], color, "-", f"{name}: measured")
        axes[0].plot(x[ok], np.mean([r["update_rule"][ok] for r in res], 0), color=color, ls="--", lw=1,
                     label=f"{name}: rule (gradient keeps its direction)")
        _band(axes[1], x[ok], [r["update_ratio"][ok] for r in res], color, "-", name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean dead-row update ||w_N - w_N-1||", fontsize=9)
    axes[1].axhline(1, color="black", lw=0.7)
    axes[1].set_ylabel("measured / predicted (1 = the rule explains it)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)
    return fig


def plot_by_frequency(t):
    """Held-out loss on targets and mean row norm (over its value at init) per token-frequency bucket
    (dead, then the live deciles D1 = rarest to D10), one line per optimizer, lr and weight decay (marker:
    mean over seeds; bar: its 95% t interval). After Kunstner et al. 2024 and Pinto et al. 2024."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    t = t[t["embeddings"] == "tied"]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle("By token frequency (dead tokens never occur; D1 = rarest tenth of the live tokens, D10 = commonest)"
                 "\nmarker: mean over seeds, bar: its 95% Student-t interval", fontsize=10)
    colors, labels = _colors(t), None
    for (opt, lr), sel in t.groupby(["train.optimizer", "train.learning_rate"], sort=False):
        for k, (wd, g) in enumerate(sel.groupby("train.weight_decay")):
            sums = [read_json(summary_path(d)) for d in g["dir"]]
            labels = sums[0]["freq_buckets"]["labels"]
            x = np.arange(len(labels)) + (k - 1) * 0.12
            style = dict(color=colors[(opt, lr)], marker="os^Dv"[k % 5], ms=4, lw=1, capsize=2,
                         ls=("-", "--", ":", "-.")[k % 4], label=f"{opt} lr {lr:g}, wd {wd:g}")
            loss = np.array([[np.nan if v is None else v for v in s_["loss_by_freq"]] for s_ in sums], float)
            norm = np.array([np.divide(s_["norm_by_freq"], s_["norm_by_freq_init"]) for s_ in sums], float)
            for ax, v in ((axes[0], loss), (axes[1], norm)):
                mean, lo, hi = band(v)
                ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], **style)
    for ax, ylab in ((axes[0], "held-out loss on targets in the bucket (nats)"),
                     (axes[1], "mean row norm / at step 0")):
        ax.set_xticks(range(len(labels or [])), labels or [], fontsize=8)
        ax.set_xlabel("token-frequency bucket (training data)", fontsize=9)
        ax.set_ylabel(ylab, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[1].axhline(1, color="black", lw=0.7)
    axes[1].set_yscale("log")
    for set_formatter in (axes[1].yaxis.set_major_formatter, axes[1].yaxis.set_minor_formatter):
        set_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 4, not 4 x 10^0
    axes[0].legend(fontsize=7, ncol=1)
    return fig
