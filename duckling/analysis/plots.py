"""One matplotlib helper per analysis (``duckling.analysis.metrics``): each takes that analysis' dict and
returns a ``Figure``; it never shows or saves. Dead rows are red, live rows blue, the null model
black and dashed, in every figure. Built on ``matplotlib.figure.Figure`` (no pyplot state), so
it works headless and in notebooks alike (a notebook displays a returned Figure)."""
from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

DEAD, LIVE, NULL = "tab:red", "tab:blue", "black"
NAMED = ("tab:orange", "tab:purple", "tab:brown", "tab:olive")  # individually named tokens
FIGSIZE = (7, 5)
# Every saved or inline figure's resolution (report PNGs, compare PNGs, notebooks): matplotlib's own
# default, so a report figure is 700 x 500 px (~50-100 kB) and one look is the same in every place.
DPI = 100
STEP_LABEL = "training step (updates)"
LEGEND_PT = 8  # smallest legend text


def _fig(nrows: int = 1, ncols: int = 1, title: str = "", sharex: bool = True):
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False).ravel()
    if title:  # wrapped to the figure's width: a long title is cut at both edges, not shrunk
        fig.suptitle(textwrap.fill(title, int(FIGSIZE[0] * 14)), fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    return fig, axes


def _band(ax, st, color, label, median=False, f=None, skip0=False):
    """Mean (or median) line and 10-90% band of an ``analysis._stats`` dict; ``f`` maps the values;
    ``skip0`` drops step 0 (no update or gradient yet: 0 or NaN, meaningless on a log axis)."""
    f = f or (lambda v: v)
    qs, q, s, m = st["q_steps"], f(st["q"]), st["steps"], f(st["mean"])
    if skip0:
        q, qs, m, s = q[qs > 0], qs[qs > 0], m[s > 0], s[s > 0]
    ax.fill_between(qs, q[:, 0], q[:, 2], color=color, alpha=0.2, lw=0)
    if median:
        ax.plot(qs, q[:, 1], color=color, lw=1.2, label=f"{label} (median, 10-90%)")
    else:
        ax.plot(s, m, color=color, lw=1.2, label=f"{label} (mean, 10-90%)")


def _named(ax, x, per_row, res, k=3):
    """Thin curves of the named dead rows, labelled by their token text."""
    for c, p, lab in zip(NAMED, res["named_pos"][:k], res["named_labels"][:k]):
        ax.plot(x, per_row[:, p], color=c, lw=0.8, alpha=0.9, label=f"dead {lab!r}")


def _label(ax, ylabel: str, *, steps: bool = False, log: bool = False, **legend) -> None:
    """Y label, the shared training-step x label (``steps``), log scale, and the legend."""
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    if steps:
        ax.set_xlabel(STEP_LABEL, fontsize=8)
    ax.legend(**{"fontsize": LEGEND_PT, **legend})


def _suffix(matrix: str, res=None) -> str:
    """Which matrix a figure shows: untied runs have an input (wte) and an output (lm_head) embedding."""
    if matrix == "lm_head":
        return "\noutput embedding (lm_head, untied run)"
    if res is not None and res.get("untied"):
        return "\ninput embedding (wte, untied run)"
    return "" if matrix == "wte" else f" [{matrix}]"


def plot_norms(res, matrix: str = "wte") -> Figure:
    """Analysis 1: dead-row norms vs pure weight decay (top) and their ratio to it (bottom)."""
    fig, (ax, ax2) = _fig(2, 1, f"Row norms vs weight-decay null model{_suffix(matrix, res)}")
    x = res["steps"]
    _band(ax, res["live"], LIVE, "live")
    _band(ax, res["dead"], DEAD, "dead")
    ax.plot(x, res["null_mean"], color=NULL, ls="--", lw=1, label="weight decay alone: ||w0||·Π(1-lr·wd)")
    _named(ax, x, res["per_dead"], res)
    _label(ax, "row L2 norm", ncol=2)
    ax2.plot(x, res["ratio"], color=DEAD, lw=1.2, label="mean dead norm / null")
    ax2.axhline(1.0, color=NULL, ls="--", lw=1)
    lo, hi = min(np.nanmin(res["ratio"]), 1.0), max(np.nanmax(res["ratio"]), 1.0)
    pad = max(0.1 * (hi - lo), 1e-3)  # pure decay stays within float32 noise of 1: keep the axis readable
    ax2.set_ylim(lo - pad, hi + pad)
    ax2.ticklabel_format(axis="y", useOffset=False)
    _label(ax2, "dead / null", steps=True)
    return fig


def plot_displacement(res, matrix: str = "wte") -> Figure:
    """Analysis 2: distance from init (top) and per-step update norm (bottom, log scale)."""
    fig, (ax, ax2) = _fig(2, 1, f"Displacement from init and per-step update{_suffix(matrix, res)}")
    _band(ax, res["live"], LIVE, "live", median=True)
    _band(ax, res["dead"], DEAD, "dead", median=True)
    _named(ax, res["steps"], res["per_dead"], res)
    ax.plot(res["update"]["dead"]["steps"], res["dead_path_mean"], color=DEAD, ls=":", lw=1,
            label="dead: mean path length Σ||Δw||")
    _label(ax, "distance from init\n||w_N − w_0||", ncol=2)
    for who, color in (("live", LIVE), ("dead", DEAD)):
        _band(ax2, res["update"][who], color, who, median=True, skip0=True)
    _label(ax2, "size of one update\n||w_N − w_(N−1)||", steps=True, log=True)
    return fig


def plot_drift(res, matrix: str = "wte") -> Figure:
    """Analysis 3: alignment of the mean dead displacement (top), dead-row projections on it (bottom)."""
    fig, (ax, ax2) = _fig(2, 1, f"Drift direction of dead rows{_suffix(matrix, res)}")
    x = res["steps"]
    ax.plot(x, res["cos_hidden"], color="tab:green", lw=1.2, label="cos(mean dead Δw, −mean hidden)")
    ax.plot(x, res["cos_live"], color=LIVE, lw=1.2, label="cos(mean dead Δw, −mean live row)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    _label(ax, "cosine")
    _band(ax2, res["proj_stats"], DEAD, "dead rows", median=True)
    _named(ax2, x, res["proj"], res)
    _label(ax2, "displacement along the final\nmean dead direction", steps=True)
    return fig


def plot_collapse(res, matrix: str = "wte") -> Figure:
    """Analysis 4, uncentred (top) against centred (middle, bottom): the dead rows' mean pairwise cosine
    beside the cosine their common displacement alone gives; the share of their centred variance on PC1
    (0-1 axis: 1 = all spread on one direction) against isotropic noise; their spread around their mean
    relative to init (1 = no contraction). A high pairwise cosine with the centred measures at their
    references is a common shift of the mean, not a collapse of the rows onto each other."""
    fig = Figure(figsize=(FIGSIZE[0], 6.5), layout="constrained")
    ax, ax2, ax3 = fig.subplots(3, 1, sharex=True, height_ratios=(1.3, 1, 1))
    fig.suptitle(f"Collapse of dead rows: uncentred vs centred{_suffix(matrix, res)}", fontsize=10)
    for a in (ax, ax2, ax3):
        a.grid(alpha=0.3)
        a.tick_params(labelsize=8)
    x = res["steps"]
    # measured curves broad and underneath, references thin and dashed on top: both stay visible where they meet
    ax.plot(x, res["dead_cos"], color=DEAD, lw=3, alpha=0.6, label="dead: mean pairwise cosine (uncentred)")
    if "dead_cos_from_mean" in res:
        ax.plot(x, res["dead_cos_from_mean"], color=NULL, ls="--", lw=1,
                label="dead: what their common shift alone gives")
        ax.text(0.99, 0.04, f"last step: measured {res['dead_cos'][-1]:.3f}, common shift alone "
                f"{res['dead_cos_from_mean'][-1]:.3f}", transform=ax.transAxes, ha="right", fontsize=7)
    ax.plot(x, res["dead_cos_to_mean"], color=DEAD, ls=":", lw=1.2, label="dead: mean cosine to the mean dead row")
    ax.plot(x, res["live_cos"], color=LIVE, lw=1.2, label="live: mean pairwise cosine")
    lo = min(-0.1, float(np.nanmin([res["dead_cos"], res["live_cos"], res["dead_cos_to_mean"]])) - 0.05)
    ax.set_ylim(lo, 1.05)
    _label(ax, "cosine\n(1 = one direction)", loc="upper left", fontsize=7)
    n, d = res["n_dead"], res["d"]
    edge = res.get("pc1_noise", (1 + (d / n) ** 0.5) ** 2 / d)
    ax2.plot(x, res["pc_var"][:, 0], color=DEAD, lw=3, alpha=0.6, label="dead rows' PC1 after centring")
    ax2.text(0.01, 0.5, f"last step: {res['pc_var'][-1, 0]:.4f} (init {res['pc_var'][0, 0]:.4f}, noise {edge:.4f})",
             transform=ax2.transAxes, fontsize=7)
    ax2.axhline(edge, color=NULL, ls="--", lw=1,
                label=f"isotropic noise ({edge:.3f}): no preferred direction")
    ax2.axhline(1.0, color="grey", ls=":", lw=1, label="1 = every dead row on one line")
    ax2.set_ylim(0, 1.05)
    _label(ax2, "share of centred\nvariance on PC1", loc="center right", fontsize=7)
    if "dead_spread" in res:
        ax3.plot(x, res["dead_spread"] / res["dead_spread"][0], color=DEAD, lw=3, alpha=0.6, label="dead rows")
        ax3.plot(x, res["live_spread"] / res["live_spread"][0], color=LIVE, lw=1.2, label="live rows")
        ax3.axhline(1.0, color=NULL, ls="--", lw=1, label="1 = spread as at init (no contraction)")
        hi = float(np.nanmax([res["dead_spread"] / res["dead_spread"][0], res["live_spread"] / res["live_spread"][0]]))
        ax3.set_ylim(0, max(1.25, 1.1 * hi))
        ax3.text(0.01, 0.04, f"0 = every dead row at one point; last step: dead {res['dead_spread'][-1] / res['dead_spread'][0]:.3f}",
                 transform=ax3.transAxes, fontsize=7, color="grey")
        _label(ax3, "spread around their mean\n/ spread at init", steps=True, loc="center right", fontsize=7)
    else:
        ax3.set_visible(False)
        ax2.set_xlabel(STEP_LABEL, fontsize=8)
    return fig


def plot_trajectories(res, matrix: str = "wte", n_named: int = 2) -> Figure:
    """Analysis 5: 2-D PCA map: rows at the first (hollow) and last step (filled), the group means'
    paths (drawn last, outlined, the live one dashed, so neither hides the other) and ``n_named`` named
    tokens' paths per group (x = init, dot = final step)."""
    from matplotlib import patheffects
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    fig.suptitle(f"Trajectories in the top-2 PCA plane ({res['explained']:.0%} of variance)"
                 f"{_suffix(matrix, res)}", fontsize=10)
    d = res["cloud_is_dead"]
    for who, mask, color in (("live", ~d, LIVE), ("dead", d, DEAD)):
        ax.scatter(*res["cloud_first"][mask].T, facecolors="none", edgecolors=color, s=10, lw=0.5, alpha=0.4)
        ax.scatter(*res["cloud_last"][mask].T, color=color, s=6, lw=0, alpha=0.5)
    handles = [Line2D([], [], ls="", marker="o", mfc="none", mec=LIVE, label="live rows (sample): ○ init, ● final"),
               Line2D([], [], ls="", marker="o", mfc="none", mec=DEAD, label="dead rows: ○ init, ● final")]
    outline = [patheffects.Stroke(linewidth=5, foreground="white"), patheffects.Normal()]
    for path, color, ls, who in ((res["dead_mean"], DEAD, "-", "dead"), (res["live_mean"], LIVE, "--", "live")):
        ax.plot(*path.T, color=color, lw=2.5, ls=ls, zorder=5, path_effects=outline)
        ax.plot(*path[0], "x", color=color, ms=8, mew=2, zorder=6)
        ax.plot(*path[-1], "o", color=color, mec="black", ms=8, zorder=6)
        handles.append(Line2D([], [], color=color, lw=2.5, ls=ls, marker="o", ms=6, label=f"mean {who} row: path, ● final"))
    dead_c, live_c = iter(("tab:orange", "tab:brown", "tab:pink", "tab:olive")), \
        iter(("tab:cyan", "tab:purple", "tab:green", "tab:gray"))
    is_dead = np.asarray(res["named_dead"])
    pick = [i for grp in (np.flatnonzero(is_dead), np.flatnonzero(~is_dead))
            for i in (grp[np.linspace(0, len(grp) - 1, min(n_named, len(grp))).round().astype(int)] if len(grp) else [])]
    for i in pick:
        t, c = res["track"][:, i], next(dead_c if is_dead[i] else live_c)
        h, = ax.plot(*t.T, color=c, lw=0.9, alpha=0.9, marker="o", markevery=[len(t) - 1], ms=4, zorder=4,
                     label=f"{'dead' if is_dead[i] else 'live'} token {res['named_labels'][i]!r}")
        ax.plot(*t[0], "x", ms=5, color=c, zorder=4)
        handles.append(h)
    ax.set_xlabel("principal component 1 (embedding units)", fontsize=8)
    ax.set_ylabel("principal component 2 (embedding units)", fontsize=8)
    ax.legend(handles=handles, fontsize=LEGEND_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="x = init, ● = final step", title_fontsize=LEGEND_PT)
    return fig


# detectability: one style per indicator (colour, line, marker), so coinciding curves stay apart
_DETECT_STYLE = {"norm": ("black", "-", "o"), "cos_all_mean": ("tab:green", "-", "^"), "pc1": ("tab:cyan", "-", "s"),
                 "cos_dead_mean": ("tab:red", "--", None), "cos_dead_mean_nopc1": ("tab:orange", "-.", None)}


def plot_detectability(res, matrix: str = "wte") -> Figure:
    """Analysis 6: AUROC of each indicator over steps, each in its fixed direction: label-free ones
    (solid, with markers, drawn on top) as a user without labels reads them, label-using ones (broad,
    dashed, underneath) as upper bounds. The legend sits below the axes; the chance line and the two
    separation bands are in it."""
    fig = Figure(figsize=(FIGSIZE[0], 7), layout="constrained")
    ax = fig.subplots()
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    fig.suptitle(f"Detectability of dead rows{_suffix(matrix, res)}", fontsize=10)
    free, using = res.get("label_free", {}), res.get("label_using", {})
    short = {"cos_dead_mean": "cosine to mean dead row", "cos_dead_mean_nopc1": "Magikarp (PC1 removed)"}
    x = res["steps"]
    every = max(1, len(x) // 10)
    for i, (key, a) in enumerate(res["auroc"].items()):
        color, ls, marker = _DETECT_STYLE.get(key, ("grey", "-", "x"))
        if key in using:
            ax.plot(x, a, color=color, lw=3.5, ls=ls, alpha=0.45, zorder=2,
                    label=f"uses labels: {short.get(key, key)} (upper bound)")
        else:
            ax.plot(x, a, color=color, lw=1.2, ls=ls, marker=marker, ms=5, mfc="none" if i % 2 else color,
                    markevery=(i * every // 3 % every, every), zorder=4, label=f"label-free: {free.get(key, key)}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance (0.5)")
    ax.axhspan(0.9, 1.02, color="tab:green", alpha=0.08, lw=0, label="≥ 0.9: separates in the stated direction")
    ax.axhspan(-0.02, 0.1, color="tab:red", alpha=0.08, lw=0, label="≤ 0.1: separates the other way")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(STEP_LABEL, fontsize=8)
    ax.set_ylabel("AUROC in the stated direction\n(1 = separates, 0 = separates the other way)", fontsize=8)
    fig.legend(fontsize=LEGEND_PT, loc="outside lower center", ncol=1)
    return fig


def plot_frequency(buckets, nf, loss, source: str, matrix: str = "wte", untied: bool = False) -> Figure:
    """Embedding norm (top) and held-out loss (bottom) by token-frequency bucket: dead tokens (frequency 0)
    then the live tokens' deciles, rarest first (after Kunstner et al. 2024, Pinto et al. 2024)."""
    fig, (ax, ax2) = _fig(2, 1, "Row norm and held-out loss by token frequency (after Kunstner et al. 2024, "
                          f"Pinto et al. 2024){_suffix(matrix, {'untied': untied})}")
    k = len(buckets["labels"])
    x = np.arange(k)
    ticks = [f"{lab}\n{lo}" if lo == hi else f"{lab}\n{lo}-{hi}" for lab, lo, hi in
             zip(buckets["labels"], buckets["count_min"], buckets["count_max"])]
    ax.plot(x, nf["init"], "o", mfc="none", color=NULL, label="at init")
    ax.plot(x[:1], nf["final"][:1], "o", color=DEAD, ms=7, label=f"dead, step {nf['step']}")
    ax.plot(x[1:], nf["final"][1:], "o-", color=LIVE, label=f"live deciles, step {nf['step']}")
    ax.set_ylim(0, 1.15 * float(np.nanmax([nf["init"], nf["final"]])))
    _label(ax, "mean row norm", fontsize=7, loc="lower right")
    if "note" in loss:
        import textwrap

        ax2.text(0.5, 0.5, textwrap.fill("held-out loss by frequency " + loss["note"], 90), ha="center", va="center",
                 fontsize=8, transform=ax2.transAxes)
        ax2.set_yticks([])
    else:
        ok = np.asarray(loss["n_targets"]) > 0
        ax2.plot(x[ok], np.asarray(loss["loss"])[ok], "o-", color=LIVE,
                 label=f"held-out loss, final model ({loss['rows']} rows of {loss['dataset']})")
        ax2.axhline(loss["overall"], color=NULL, ls="--", lw=1, label=f"all targets: {loss['overall']:.3g}")
        for xi, yi, ni in zip(x[ok], np.asarray(loss["loss"])[ok], np.asarray(loss["n_targets"])[ok]):
            ax2.annotate(f"n={ni}", (xi, yi), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6)
        ax2.text(0.01, 0.04, "dead tokens never occur as targets", transform=ax2.transAxes, fontsize=7, color="grey")
        _label(ax2, "cross-entropy of the\ntarget token (nats)", fontsize=7, loc="best")
    ax2.set_xticks(x, ticks, fontsize=7)
    ax2.set_xlabel(f"frequency bucket: dead, then live deciles (D1 = rarest), with the count range;\n"
                   f"counts from {source}", fontsize=7)
    return fig


def plot_output_mass(res) -> Figure:
    """Analysis 7: total and maximum softmax probability on dead tokens, fixed probe batch."""
    fig, (ax,) = _fig(title="Softmax mass on dead tokens (probe batch)")
    ax.plot(res["steps"], res["total"], "o-", ms=3, color=DEAD, lw=1.2,
            label="total dead probability (mean over positions)")
    ax.plot(res["steps"], res["max"], "s--", ms=3, color=DEAD, lw=1, alpha=0.7,
            label="max over positions and dead tokens")
    ax.axhline(res["uniform"], color=NULL, ls="--", lw=1, label="uniform softmax: n_dead / V")
    _label(ax, "softmax probability", steps=True, log=True)
    return fig


def plot_gradients(res, matrix: str = "wte") -> Figure:
    """Analysis 8: per-row gradient norms (top) and sqrt of Adam's second moment (bottom), log scale."""
    fig, (ax, ax2) = _fig(2, 1, f"Gradient channel{_suffix(matrix, res)}")
    for field, a, unit in (("grad_norm", ax, "gradient norm of a row\n||g||"),
                           ("adam_v", ax2, "Adam's second moment\nsqrt(row mean of v)")):
        for who, color in (("live", LIVE), ("dead", DEAD)):
            st = res[field][who]  # step 0 holds NaN: no gradient yet
            if not np.nanmax(st["mean"], initial=0) > 0:  # e.g. untied input rows: exactly zero, invisible on log axes
                a.text(0.02, 0.05 if who == "dead" else 0.15, f"{who}: exactly 0 (or no Adam state) at every step",
                       color=color, transform=a.transAxes, fontsize=LEGEND_PT)
                continue
            # mean, not median: with untied input rows most live rows get no gradient in a step
            _band(a, st, color, who, f=np.sqrt if field == "adam_v" else None, skip0=True)
        if a.lines:
            a.set_yscale("log")
        a.set_ylabel(unit, fontsize=8)
    if res.get("adam_epsilon"):
        ax2.axhline(res["adam_epsilon"], color=NULL, ls="--", lw=1, label="Adam eps (update stops growing below it)")
    for a in (ax, ax2):
        if a.lines:
            a.legend(fontsize=LEGEND_PT)
    ax2.set_xlabel(STEP_LABEL + "\nv = Adam's running mean of squared gradients (exp_avg_sq), beta2 = 0.999 per step",
                   fontsize=8)
    return fig

def plot_loss(log_history: list[dict]) -> Figure:
    """Training loss (mean over each logging window) and evaluation loss from the Trainer's
    ``log_history`` (``trainer_state.json``), against the training step."""
    fig, (ax,) = _fig(title="Loss")
    for key, color, label, marker in (("loss", "tab:gray", "train (logging-window mean)", None),
                                      ("eval_loss", "tab:green", "held-out (eval)", "o")):
        pts = [(e["step"], e[key]) for e in log_history if key in e]
        if pts:
            x, y = np.array(pts).T
            ax.plot(x, y, color=color, lw=1.2, marker=marker, ms=3, label=label)
    _label(ax, "cross-entropy (nats/token)", steps=True)
    return fig


def plot_update_rule(res, matrix: str = "wte") -> Figure:
    """Question 2: measured mean dead-row update size against the update rule's prediction (top, log)
    and their ratio per step (bottom; 1 = the rule, fed the recorded norms, predicts the update)."""
    fig, (ax, ax2) = _fig(2, 1, f"Update-rule consistency check ({res['optimizer']}): measured dead-row updates vs "
                          f"the rule fed the run's own recorded gradients{_suffix(matrix, res)}")
    x, ok = res["steps"], res["steps"] > 0
    ax.plot(x[ok], res["measured"][ok], color=DEAD, lw=1.4, label="measured ||Δw|| (mean over dead rows)")
    ax.plot(x[ok], res["coherent"][ok], color=NULL, ls="--", lw=1,
            label="predicted, gradient keeps its direction (upper)")
    ax.plot(x[ok], res["incoherent"][ok], color="grey", ls=":", lw=1.2,
            label="predicted, gradient directions uncorrelated")
    ax.plot(x[ok], res["full_speed"][ok], color="tab:green", lw=1, alpha=0.8, label="lr·√d (lr per coordinate)")
    if np.nanmax(res["decay"][ok], initial=0) > 0:
        ax.plot(x[ok], res["decay"][ok], color="tab:purple", lw=0.8, alpha=0.8, label="weight-decay part lr·wd·||w||")
    _label(ax, "size of one update", log=True, fontsize=LEGEND_PT, loc="lower left")
    b = res["ratio_band"]
    ax2.fill_between(x[ok], b[ok, 0], b[ok, 2], color=DEAD, alpha=0.2, lw=0)
    ax2.plot(x[ok], res["ratio"][ok], color=NULL, lw=1.2, label="measured / predicted (direction kept; 10-90% of rows)")
    ax2.plot(x[ok], res["ratio_incoherent"][ok], color="grey", ls=":", lw=1.2,
             label="measured / predicted (uncorrelated directions)")
    ax2.axhline(1.0, color=DEAD, lw=0.6)
    _label(ax2, "measured / predicted", steps=True, log=True, loc="best")
    from matplotlib.ticker import ScalarFormatter
    for axis in (ax2.yaxis,):  # plain numbers (0.5, 2) rather than 5x10^-1 on the ratio axis
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    return fig
