"""The dead-token study's own figures and tables (README, "The dead-token study"), from the sweep folders.

    python docs/results/study/figures.py [sweeps/study] [sweeps/study_untied] [--out docs/results/study]

Reads every complete run of the two sweeps (`duckling sweep sweeps/study.toml` and
`sweeps/study_untied.toml`, then `duckling compare` on each so that every run has its report) and writes
  study_norms.png        Q1: mean dead-row norm / weight-decay null per step, per optimizer and weight decay
                         (line: mean over seeds; band: min-max over seeds)
  study_update_rule.png  Q2: measured / predicted dead-row update per step, per optimizer (weight
                         decay 0.01; line: mean over seeds; band: min-max)
  study.md               Q1-Q4: mean ± std over seeds of the headline numbers per configuration
  runs/NAME/{config,summary}.json   each run's config and report summary (no recordings)
Uses only duckling's analyses (analysis.norms, update_rule.update_prediction).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from duckling import analysis as A
from duckling import update_rule as U
from duckling.compare import compare
from duckling.recording import Recording

OPT_COLORS = {"adamw": "tab:red", "coupled_adam": "tab:blue", "sgd": "tab:green"}
WD_COLORS = {0.0: "tab:gray", 0.01: "tab:orange", 0.1: "tab:purple"}


def runs(sweep: Path) -> pd.DataFrame:
    t = compare(sweep, write=True, progress=False)
    t = t[t["status"] == "complete"].copy()
    t["dir"] = [sweep / n for n in t["name"]]
    if "train.optimizer" not in t:
        cfg = [json.loads((d / "config.json").read_text())["train"] for d in t["dir"]]
        t["train.optimizer"] = [c["optimizer"] for c in cfg]
        t["train.weight_decay"] = [c["weight_decay"] for c in cfg]
    return t


def _band(ax, x, ys, color, ls, label):
    ys = np.asarray(ys)
    ax.plot(x, ys.mean(0), color=color, ls=ls, lw=1.4, label=label)
    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)


def fig_norms(t: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(10, 6.4), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True, sharey="row")
    fig.suptitle("Q1: do dead rows grow or decay? Top: mean dead-row norm (solid) and what weight decay alone "
                 "would leave (dashed).\nBottom: their ratio (1 = decay alone). Line: mean of 3 seeds; band: "
                 "min-max over seeds", fontsize=10)
    for j, opt in enumerate(OPT_COLORS):
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


def fig_update_rule(t: pd.DataFrame, wd: float = 0.01) -> Figure:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle(f"Q2: how much of the dead rows' movement does the update rule predict? (weight decay {wd:g}; "
                 "line: mean of 3 seeds, band: min-max)", fontsize=10)
    for opt in OPT_COLORS:
        g = t[(t["train.optimizer"] == opt) & (t["train.weight_decay"] == wd)]
        if not len(g):
            continue
        res = [U.update_prediction(Recording(d)) for d in g["dir"]]
        x = res[0]["steps"]
        ok = x > 0
        _band(axes[0], x[ok], [r["measured"][ok] for r in res], OPT_COLORS[opt], "-", f"{opt}: measured")
        axes[0].plot(x[ok], np.mean([r["coherent"][ok] for r in res], 0), color=OPT_COLORS[opt], ls="--", lw=1,
                     label=f"{opt}: rule (gradient keeps its direction)")
        _band(axes[1], x[ok], [r["ratio"][ok] for r in res], OPT_COLORS[opt], "-", opt)
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


COLS = {  # compare.csv column: README header
    "eval_loss": "held-out loss", "dead_norm_over_null": "Q1 norm / null", "dead_pairwise_cos": "Q3 pairwise cos",
    "dead_drift_cos": "Q3 cos(drift, -mean h)", "update_measured_over_rule": "Q2 measured / rule",
    "displacement_over_lr_budget": "displacement / (Σlr·√d)", "detect_auroc_norm": "Q4 AUROC small norm",
    "detect_auroc_cos_mean": "Q4 AUROC cos to mean", "detect_auroc_pc1": "Q4 AUROC PC1 tail",
    "magikarp_auroc": "Magikarp AUROC (labels)", "sep_step_norm": "first step: small norm",
    "sep_step_norm_opposite": "first step: LARGE norm", "sep_step_cos_all_mean": "first step: cos to mean",
    "sep_step_pc1_opposite": "first step: PC1 short side",
}
LM_HEAD = {"dead_norm_over_null": "dead_norm_over_null_lm_head",  # the untied run's output matrix
           "dead_pairwise_cos": "dead_mean_pairwise_cosine_lm_head",
           "dead_drift_cos": "drift_cosine_to_neg_mean_hidden_lm_head",
           "update_measured_over_rule": "update_rule_measured_over_predicted_lm_head",
           "displacement_over_lr_budget": "dead_displacement_over_lr_budget_lm_head",
           "detect_auroc_norm": "detect_auroc_norm_lm_head", "detect_auroc_cos_mean": "detect_auroc_cos_all_mean_lm_head",
           "detect_auroc_pc1": "detect_auroc_pc1_lm_head",
           "magikarp_auroc": "detect_label_using_auroc_cos_dead_mean_nopc1_lm_head"}


def lm_head_rows(t: pd.DataFrame) -> pd.DataFrame:
    """The untied runs' output-embedding (lm_head) numbers under the same column names."""
    u = t.copy()
    for d_i, d in enumerate(u["dir"]):
        s = json.loads((d / "report" / "summary.json").read_text())
        for col, key in LM_HEAD.items():
            u.loc[u.index[d_i], col] = s.get(key, np.nan)
        for col in [c for c in COLS if c.startswith("sep_step")]:
            k, opp = col[len("sep_step_"):].replace("_opposite", ""), col.endswith("_opposite")
            sep = s.get("detect_first_step_separable_lm_head", {}).get(k, {})
            u.loc[u.index[d_i], col] = (sep.get("opposite", {}) if opp else sep).get("step", np.nan)
    u["model"] = "untied, output (lm_head)"
    return u


def table(t: pd.DataFrame) -> str:
    keys = ["train.optimizer", "train.weight_decay", "model"]
    rows = []
    for key, g in t.groupby(keys, sort=False):
        r = {"optimizer": key[0], "weight decay": key[1], "embeddings": key[2], "seeds": len(g)}
        for c, h in COLS.items():
            v = pd.to_numeric(g[c], errors="coerce").astype(float)
            if c.startswith("sep_step"):  # steps: the seeds' values (never = not within the run)
                r[h] = " / ".join("never" if np.isnan(x) else f"{x:.0f}" for x in v)
            else:
                r[h] = "" if v.isna().all() else f"{v.mean():.3g} ± {v.std():.2g}"
        rows.append(r)
    df = pd.DataFrame(rows)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", default=["sweeps/study", "sweeps/study_untied"])
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args()
    out = Path(a.out)
    parts = []
    for s in a.sweeps:
        t = runs(Path(s))
        t["model"] = "untied, input (wte)" if "untied" in Path(s).name else "tied"
        parts.append(t)
        if "untied" in Path(s).name:
            parts.append(lm_head_rows(t))
        for name in ("compare.csv", "compare.md"):
            shutil.copy(Path(s) / name, out / f"{Path(s).name}_{name}")
        for d in t["dir"]:
            dst = out / "runs" / f"{Path(s).name}__{d.name}"
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(d / "config.json", dst / "config.json")
            shutil.copy(d / "report" / "summary.json", dst / "summary.json")
    t = pd.concat(parts, ignore_index=True)
    tied = t[t["model"] == "tied"]
    fig_norms(tied).savefig(out / "study_norms.png", dpi=110)
    fig_update_rule(tied).savefig(out / "study_update_rule.png", dpi=110)
    (out / "study.md").write_text("# The dead-token study: mean ± std over seeds\n\n" + table(t), encoding="utf-8")
    print((out / "study.md").read_text())


if __name__ == "__main__":
    main()
