"""The dead-token study's tables and figures (docs/results.md, "The dead-token study"; notebook 08).

    from duckling.sweeps.study import load, study_table, plot_norms_vs_null, plot_update_rule
    t = load("sweeps/study")                       # one row per complete run (duckling.sweeps.compare) + its folder
    study_table(t)                                  # mean ± std over seeds per optimizer x weight decay
    plot_norms_vs_null(t); plot_update_rule(t)      # Q1 and Q2 figures

Questions: 1. do dead rows grow or decay against the weight-decay null; 2. how much of their movement
the optimizer's update rule predicts from the recorded gradient norms and second moments; 3. do they
collapse onto one direction, along minus the mean hidden state; 4. which label-free indicator separates
them from live rows, when. Untied runs add their output matrix (lm_head) as rows of their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from duckling.analysis import metrics as A
from duckling.analysis import update_rule as U
from duckling.analysis.report import fmt
from duckling.recording.reader import Recording
from duckling.sweeps.compare import compare

WD_COLORS = {0.0: "tab:gray", 0.01: "tab:orange", 0.1: "tab:purple"}
OPT_COLORS = {"adamw": "tab:red", "coupled_adam": "tab:blue", "sgd": "tab:green"}
COLUMNS = {  # compare column: study table header
    "eval_loss": "held-out loss", "dead_norm_over_null": "Q1 norm / null", "update_measured_over_rule": "Q2 measured / rule",
    "displacement_over_lr_budget": "displacement / (Σlr·√d)",
    "dead_pairwise_cos": "Q3 pairwise cos", "dead_drift_cos": "Q3 cos(drift, -mean h)",
    "detect_auroc_norm": "Q4 AUROC small norm", "detect_auroc_cos_mean": "Q4 AUROC cos to mean",
    "detect_auroc_pc1": "Q4 AUROC PC1 tail", "magikarp_auroc": "Magikarp AUROC (labels)",
    "sep_step_norm_opposite": "first step: LARGE norm", "sep_step_cos_all_mean": "first step: cos to mean",
    "sep_step_pc1_opposite": "first step: PC1 short side",
}
LM_HEAD = {"dead_norm_over_null": "dead_norm_over_null", "update_measured_over_rule": "update_rule_measured_over_predicted",
           "dead_pairwise_cos": "dead_mean_pairwise_cosine", "displacement_over_lr_budget": "dead_displacement_over_lr_budget", "dead_drift_cos": "drift_cosine_to_neg_mean_hidden",
           "detect_auroc_norm": "detect_auroc_norm", "detect_auroc_cos_mean": "detect_auroc_cos_all_mean",
           "detect_auroc_pc1": "detect_auroc_pc1", "magikarp_auroc": "detect_label_using_auroc_cos_dead_mean_nopc1"}


def load(sweep_dir, progress: bool = False):
    """``duckling.sweeps.compare`` of a sweep folder (reports computed where missing), complete runs only, with
    each run's folder (``dir``), optimizer, weight decay and embeddings ("tied" / "untied, input (wte)");
    an untied run adds a row for its output matrix ("untied, output (lm_head)")."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    t = compare(sweep_dir, progress=progress)
    t = t[t["status"] == "complete"].copy()
    t["dir"] = [sweep_dir / n for n in t["name"]]
    cfgs = [json.loads((d / "config.json").read_text()) for d in t["dir"]]
    t["train.optimizer"] = [c["train"]["optimizer"] for c in cfgs]
    t["train.weight_decay"] = [float(c["train"]["weight_decay"]) for c in cfgs]
    tied = [c["model"]["tie_word_embeddings"] for c in cfgs]
    t["embeddings"] = ["tied" if x else "untied, input (wte)" for x in tied]
    out = t[~np.array(tied)].copy()
    for i, d in zip(out.index, out["dir"]):
        s = json.loads((d / "report" / "summary.json").read_text())
        for col, key in LM_HEAD.items():
            out.loc[i, col] = s.get(f"{key}_lm_head", np.nan)
        sep = s.get("detect_first_step_separable_lm_head", {})
        out.loc[i, "sep_step_norm_opposite"] = sep.get("norm", {}).get("opposite", {}).get("step", np.nan)
        out.loc[i, "sep_step_cos_all_mean"] = sep.get("cos_all_mean", {}).get("step", np.nan)
        out.loc[i, "sep_step_pc1_opposite"] = sep.get("pc1", {}).get("opposite", {}).get("step", np.nan)
    out["embeddings"] = "untied, output (lm_head)"
    return pd.concat([t, out], ignore_index=True)


def study_table(t):
    """Mean ± std over seeds of every question's number per optimizer x weight decay x embeddings;
    first separable steps as each seed's value ("never": not within the run)."""
    import pandas as pd

    rows = []
    for (opt, wd, emb), g in t.groupby(["train.optimizer", "train.weight_decay", "embeddings"], sort=False):
        r = {"optimizer": opt, "weight decay": wd, "embeddings": emb, "seeds": len(g)}
        for col, head in COLUMNS.items():
            v = pd.to_numeric(g[col], errors="coerce").astype(float) if col in g else pd.Series([np.nan])
            if col.startswith("sep_step"):
                r[head] = " / ".join("never" if np.isnan(x) else f"{x:.0f}" for x in v)
            else:
                r[head] = "" if v.isna().all() else f"{v.mean():.3g} ± {v.std():.2g}" if len(v) > 1 else f"{v.mean():.3g}"
        rows.append(r)
    return pd.DataFrame(rows)


def _band(ax, x, ys, color, ls, label):
    ys = np.asarray(ys)
    ax.plot(x, ys.mean(0), color=color, ls=ls, lw=1.4, label=label)
    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)


def plot_norms_vs_null(t):
    """Q1: per optimizer, the mean dead-row norm (solid) with what decay alone would leave (dashed), and
    their ratio, per weight decay (line: mean over seeds; band: min-max)."""
    from matplotlib.figure import Figure

    t = t[t["embeddings"] == "tied"]
    opts = list(dict.fromkeys(t["train.optimizer"]))
    fig = Figure(figsize=(3.4 * len(opts) + 0.4, 6.4), layout="constrained")
    axes = fig.subplots(2, len(opts), sharex=True, sharey="row", squeeze=False)
    fig.suptitle("Q1: do dead rows grow or decay? Top: mean dead-row norm (solid) and what weight decay alone "
                 "would leave (dashed).\nBottom: their ratio (1 = decay alone). Line: mean over seeds; band: "
                 "min-max over seeds", fontsize=10)
    for j, opt in enumerate(opts):
        top, bottom = axes[0, j], axes[1, j]
        for wd, g in t[t["train.optimizer"] == opt].groupby("train.weight_decay"):
            curves = [A.norms(Recording(d)) for d in g["dir"]]
            n = min(len(c["ratio"]) for c in curves)
            x, color = curves[0]["steps"][:n], WD_COLORS.get(wd, "black")
            _band(top, x, [c["dead"]["mean"][:n] for c in curves], color, "-", f"weight decay {wd:g}")
            top.plot(x, np.mean([c["null_mean"][:n] for c in curves], 0), color=color, ls="--", lw=1)
            _band(bottom, x, [c["ratio"][:n] for c in curves], color, "-", f"weight decay {wd:g}")
        bottom.axhline(1, color="black", lw=0.7)
        top.set_title(opt, fontsize=10)
        bottom.set_xlabel("optimizer step", fontsize=9)
        for ax in (top, bottom):
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        top.legend(fontsize=8)
    axes[0, 0].set_ylabel("mean dead-row norm ||w||", fontsize=9)
    axes[1, 0].set_ylabel("dead-row norm / decay-only null", fontsize=9)
    return fig


def plot_update_rule(t, weight_decay: float | None = None):
    """Q2: measured mean dead-row update per step against each optimizer's rule (gradient keeping its
    direction), and their ratio, at one weight decay (default: the middle one swept)."""
    from matplotlib.figure import Figure

    t = t[t["embeddings"] == "tied"]
    wds = sorted(set(t["train.weight_decay"]))
    wd = weight_decay if weight_decay is not None else wds[len(wds) // 2]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle(f"Q2: how much of the dead rows' movement does the update rule predict? (weight decay {wd:g}; "
                 "line: mean over seeds, band: min-max)", fontsize=10)
    for opt in dict.fromkeys(t["train.optimizer"]):
        g = t[(t["train.optimizer"] == opt) & (t["train.weight_decay"] == wd)]
        res = [U.update_prediction(Recording(d)) for d in g["dir"]]
        if not res:
            continue
        x = res[0]["steps"]
        ok, color = x > 0, OPT_COLORS.get(opt, "black")
        _band(axes[0], x[ok], [r["measured"][ok] for r in res], color, "-", f"{opt}: measured")
        axes[0].plot(x[ok], np.mean([r["coherent"][ok] for r in res], 0), color=color, ls="--", lw=1,
                     label=f"{opt}: rule (gradient keeps its direction)")
        _band(axes[1], x[ok], [r["ratio"][ok] for r in res], color, "-", opt)
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


INDICATORS = {"detect_auroc_norm": ("row norm", "small norm => dead", "LARGE norm => dead"),
              "detect_auroc_cos_mean": ("cosine to the mean row", "high cosine => dead", "low cosine => dead"),
              "detect_auroc_pc1": ("PC1 projection", "long tail => dead", "short side => dead")}


def findings(t) -> list[str]:
    """One markdown bullet per optimizer (and per untied matrix) with the means over seeds that answer
    the four questions, per weight decay: written from the table, so they always agree with it."""
    lines = []
    for (opt, emb), g in t.groupby(["train.optimizer", "embeddings"], sort=False):
        by = g.groupby("train.weight_decay", sort=True)
        wds = " / ".join(f"{wd:g}" for wd in by.groups)

        def col(c):
            return fmt(by[c].mean())  # one value per weight decay, as report.findings prints a run's

        auc = {k: by[k].mean() for k in INDICATORS}
        best = max(INDICATORS, key=lambda k: float(np.nanmax(np.maximum(auc[k], 1 - auc[k]))))
        a = float(auc[best].iloc[int(np.nanargmax(np.maximum(auc[best], 1 - auc[best])))])
        name, right, wrong = INDICATORS[best]
        lines.append(
            f"- **{opt}, {emb}** (weight decay {wds}): dead-row norm / decay-only null "
            f"{col('dead_norm_over_null')} (Q1); measured / predicted update {col('update_measured_over_rule')} "
            f"(Q2); pairwise cosine {col('dead_pairwise_cos')}, drift cosine to -mean hidden state "
            f"{col('dead_drift_cos')} (Q3); best label-free indicator: {name}, "
            f"{right if a >= 0.5 else wrong} (AUROC {max(a, 1 - a):.3f}) (Q4).")
    return lines
