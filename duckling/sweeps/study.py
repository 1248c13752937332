"""The dead-token study's tables and figures (docs/results.md, "The dead-token study"; notebook 08).

    from duckling.sweeps.study import load, study_table, study_tables, plot_norms_vs_null, plot_update_rule, plot_by_frequency
    t = load("sweeps/study")                       # one row per complete run (duckling.sweeps.compare) + its folder
    collect("sweeps/study", "docs/results/study/runs")  # each run's config, summary and curves, small enough to commit
    t = load_runs("docs/results/study/runs")        # the same table from those files, with no recording
    study_table(t)                                  # mean [95% t interval] over seeds per optimizer x lr x weight decay
    study_tables(t)                                 # the same, one table per question group
    plot_norms_vs_null(t); plot_update_rule(t)      # Q1 and Q2 figures
    plot_by_frequency(t)                            # loss and norm per token-frequency bucket

Questions: 1. do dead rows grow or decay against the weight-decay null; 2. how much of their movement
the optimizer's update rule predicts from the recorded gradient norms and second moments; 3. do they
collapse onto one direction, along minus the mean hidden state; 4. which label-free indicator separates
them from live rows, when. Untied runs add their output matrix (lm_head) as rows of their own.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from duckling.analysis import metrics as A
from duckling.analysis import update_rule as U
from duckling.analysis.report import fmt
from duckling.errors import DucklingError
from duckling.files import write_json
from duckling.recording.reader import Recording
from duckling.sweeps import stats
from duckling.sweeps.compare import METRICS, compare, measures
from duckling.sweeps.compare_plots import band
from duckling.sweeps.compare_tables import ci_text

WD_COLORS = ("tab:gray", "tab:orange", "tab:purple", "tab:brown", "tab:olive")  # by rank within an optimizer
OPT_COLORS = {"adamw": "tab:red", "coupled_adam": "tab:blue", "sgd": "tab:green"}
# compare column: study table header, one table per group (study_tables); COLUMNS: all of them
TABLES = {
    "loss, Q1 and Q2": {
        "eval_loss": "held-out loss", "loss_rarest_decile": "held-out loss, rarest decile",
        "dead_norm_over_null": "Q1 norm / null", "displacement_over_lr_budget": "displacement / (Σlr·√d)",
        "update_measured_over_rule": "Q2 measured / rule (summed)", "update_step_ratio_median": "Q2 per-step median",
        "update_step_ratio_p05": "Q2 per-step 5%", "update_step_ratio_p95": "Q2 per-step 95%"},
    "Q3: collapse and the mean embedding": {
        "dead_pairwise_cos": "Q3 pairwise cos", "dead_pairwise_cos_from_shift": "pairwise cos from the common shift",
        "dead_centred_pc1": "centred PC1 share", "dead_centred_pc1_noise": "noise level",
        "dead_spread_over_init": "spread / init", "dead_drift_cos": "cos(drift, -mean h)",
        "mean_row_norm": "||mean row||", "mean_shift_live": "mean shift, live", "mean_shift_dead": "mean shift, dead",
        "mean_shift_cos_hidden_all": "cos(mean shift, -mean h)"},
    "Q4: label-free indicators (fixed directions) and Magikarp": {
        "detect_auroc_norm": "small norm", "detect_auroc_cos_mean": "high cos to mean",
        "detect_auroc_pc1": "PC1 long tail", "magikarp_auroc": "Magikarp (labels)",
        "post_hoc_auroc_norm": "post hoc: norm", "post_hoc_auroc_cos_all_mean": "post hoc: cos to mean",
        "post_hoc_auroc_pc1": "post hoc: PC1",
        "sep_step_norm_opposite": "first step: LARGE norm", "sep_step_cos_all_mean": "first step: cos to mean",
        "sep_step_pc1_opposite": "first step: PC1 short side"},
}
COLUMNS = {k: v for cols in TABLES.values() for k, v in cols.items()}
CURVES, CURVE_EVERY = "curves.csv", 4  # a collected run's Q1/Q2 curves, every 4th step
# an untied run's output matrix: {column: summary key}, read as KEY_lm_head (losses belong to the run)
LM_HEAD = {col: key for key, (col, _) in METRICS.items()
           if col in COLUMNS and "." not in key and not key.startswith(("final_", "loss_by"))}


def load(sweep_dir, progress: bool = False):
    """``duckling.sweeps.compare`` of a sweep folder (reports computed where missing), complete runs only, with
    each run's folder (``dir``), optimizer, weight decay and embeddings ("tied" / "untied, input (wte)");
    an untied run adds a row for its output matrix ("untied, output (lm_head)")."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    t = compare(sweep_dir, progress=progress)
    t = t[t["status"] == "complete"].copy()
    t["dir"] = [sweep_dir / n for n in t["name"]]
    return _annotate(t)


def load_runs(folder):
    """The table of ``load`` from a folder of collected runs (``collect``: SWEEP__RUN/config.json,
    summary.json, curves.csv), with no recording: what docs/results/study commits. ``sweep``: SWEEP. Sorted by
    optimizer, lr (highest first), embeddings, weight decay and seed: the first rows are the references of
    ``differences``."""
    import pandas as pd

    folder = Path(folder)
    dirs = sorted(d for d in folder.iterdir() if (d / "summary.json").is_file()) if folder.is_dir() else []
    rows = []
    if not dirs:
        raise DucklingError(f"{folder} holds no collected run (SWEEP__RUN/summary.json): collect a study's "
                            "sweeps into it first.")
    for d in dirs:
        s, seed = _read_json(d / "summary.json"), _read_json(d / "config.json").get("train", {}).get("seed")
        rows.append({"sweep": d.name.split("__")[0], "name": d.name.split("__", 1)[-1], "seed": seed,
                     "status": "complete", "problem": "", **measures(s)})
    t = pd.DataFrame(rows)
    for col in [c for c, _ in METRICS.values()] + ["steps"]:
        t[col] = pd.to_numeric(t[col], errors="coerce")
    t["dir"] = dirs
    order = ["train.optimizer", "train.learning_rate", "embeddings", "train.weight_decay", "seed"]
    return _annotate(t).sort_values(order, ascending=[True, False, True, True, True], kind="stable",
                                    ignore_index=True)  # per optimizer: highest lr first, then no decay first


def summary_path(run_dir) -> Path:
    """A run's summary.json: collected (RUN/summary.json) or in its run folder (RUN/report/summary.json)."""
    run_dir = Path(run_dir)
    return run_dir / "summary.json" if (run_dir / "summary.json").is_file() else run_dir / "report" / "summary.json"


def curves(run_dir, every: int = CURVE_EVERY):
    """A run's Q1 and Q2 curves every ``every`` steps (and the last), as a DataFrame: step, dead_norm (mean
    dead-row norm), null_norm (what decay alone leaves), norm_ratio (their ratio, per step), update_measured,
    update_rule (the rule with the gradient keeping its direction), update_ratio. Read from a collected
    run's curves.csv, else computed from its recording (metrics.norms, update_rule.update_prediction)."""
    import pandas as pd

    run_dir = Path(run_dir)
    if (run_dir / CURVES).is_file():
        return pd.read_csv(run_dir / CURVES)
    rec = Recording(run_dir)
    n, u = A.norms(rec), U.update_prediction(rec)
    df = pd.DataFrame({"step": n["steps"], "dead_norm": n["dead"]["mean"], "null_norm": n["null_mean"],
                       "norm_ratio": n["ratio"]})
    df = df.merge(pd.DataFrame({"step": u["steps"], "update_measured": u["measured"], "update_rule": u["coherent"],
                                "update_ratio": u["ratio"]}), on="step", how="left")
    df = df.astype({c: np.float64 for c in df if c != "step"})  # as read back from curves.csv
    return df[(df["step"] % every == 0) | (df.index == len(df) - 1)].reset_index(drop=True)


def collect(source, into) -> list[Path]:
    """Copy what the study's tables and figures need from runs into ``into``/SWEEP__RUN: config.json and
    summary.json (absolute paths cut to their last two parts) and curves.csv. ``source``: a sweep folder
    (SWEEP: its name; its complete runs, reports computed where missing) or one run folder already named
    SWEEP__RUN (a run trained alone with its sweep's config). Returns the folders written."""
    source, into = Path(source), Path(into)
    if not source.is_dir():
        raise DucklingError(f"{source} is not a folder: give a sweep folder or a run folder named SWEEP__RUN.")
    if (source / "sweep.json").is_file():
        t = compare(source, write=False, progress=False)
        pairs = [(source / n, f"{source.name}__{n}") for n in t.loc[t["status"] == "complete", "name"]]
    elif "__" in source.name and (source / "report" / "summary.json").is_file():
        pairs = [(source, source.name)]
    else:
        raise DucklingError(f"{source} is neither a sweep folder nor a reported run named SWEEP__RUN.")
    written = []
    for run_dir, name in pairs:  # each run written whole into a temporary folder, then moved into place
        dst, tmp = into / name, into / f".{name}.collecting"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for src, f in ((run_dir / "config.json", "config.json"),
                           (run_dir / "report" / "summary.json", "summary.json")):
                write_json(tmp / f, _portable(_read_json(src)))
            curves(run_dir).to_csv(tmp / CURVES, index=False, float_format="%.6g")
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(dst)
    return written


def _read_json(path: Path) -> dict:
    """A run's JSON file as a dict, or a DucklingError that names it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else e
        raise DucklingError(f"{path} cannot be read ({why}): collect the run again, or remove its folder.") from None
    if not isinstance(value, dict):
        raise DucklingError(f"{path} holds no JSON object: collect the run again, or remove its folder.")
    return value


def _portable(value):
    """A JSON value with absolute paths cut to their last two parts (no machine's paths in committed files)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and len(Path(value).parts) > 3:
        return str(Path(*Path(value).parts[-2:]))
    return value


def _annotate(t):
    """``t`` (with ``dir``) plus each run's optimizer, lr, weight decay and embeddings from its config.json;
    an untied run adds a row for its output matrix (lm_head)."""
    import pandas as pd

    cfgs = [_read_json(d / "config.json") for d in t["dir"]]
    t["train.optimizer"] = [c["train"]["optimizer"] for c in cfgs]
    t["train.learning_rate"] = [float(c["train"]["learning_rate"]) for c in cfgs]
    t["train.weight_decay"] = [float(c["train"]["weight_decay"]) for c in cfgs]
    tied = [c["model"]["tie_word_embeddings"] for c in cfgs]
    t["embeddings"] = ["tied" if x else "untied, input (wte)" for x in tied]
    out = t[~np.array(tied)].copy()
    for i, d in zip(out.index, out["dir"]):
        s = _read_json(summary_path(d))
        for col, key in LM_HEAD.items():
            out.loc[i, col] = s.get(f"{key}_lm_head", np.nan)
        sep = s.get("detect_first_step_separable_lm_head", {})
        out.loc[i, "sep_step_norm_opposite"] = sep.get("norm", {}).get("opposite", {}).get("step", np.nan)
        out.loc[i, "sep_step_cos_all_mean"] = sep.get("cos_all_mean", {}).get("step", np.nan)
        out.loc[i, "sep_step_pc1_opposite"] = sep.get("pc1", {}).get("opposite", {}).get("step", np.nan)
    out["embeddings"] = "untied, output (lm_head)"
    return pd.concat([t, out], ignore_index=True)


def study_tables(t) -> dict:
    """{title: study_table} for each group of TABLES (one table would be 30 columns wide)."""
    return {title: study_table(t, cols) for title, cols in TABLES.items()}


def study_table(t, columns: dict | None = None):
    """Mean over seeds with its 95% Student-t interval, "mean [lo, hi]" (one seed: the value), of every
    question's number (``columns``, default all of COLUMNS) per optimizer x learning rate x weight decay x
    embeddings; first separable steps as each seed's value ("never": not within the run)."""
    import pandas as pd

    columns = COLUMNS if columns is None else columns
    rows = []
    keys = ["train.optimizer", "train.learning_rate", "train.weight_decay", "embeddings"]
    for (opt, lr, wd, emb), g in t.groupby(keys, sort=False):
        r = {"optimizer": opt, "learning rate": lr, "weight decay": wd, "embeddings": emb, "seeds": len(g)}
        for col, head in columns.items():
            v = pd.to_numeric(g[col], errors="coerce").astype(float) if col in g else pd.Series([np.nan])
            if col.startswith("sep_step"):
                r[head] = " / ".join("never" if np.isnan(x) else f"{x:.0f}" for x in v)
            else:
                ci = stats.mean_ci(v)
                r[head] = ci_text(ci["mean"], ci["lo"], ci["hi"], 3 if col.startswith("update_step") else 4)
        rows.append(r)
    return pd.DataFrame(rows)


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
            sums = [_read_json(summary_path(d)) for d in g["dir"]]
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


INDICATORS = {"detect_auroc_norm": ("row norm", "small norm => dead", "LARGE norm => dead"),
              "detect_auroc_cos_mean": ("cosine to the mean row", "high cosine => dead", "low cosine => dead"),
              "detect_auroc_pc1": ("PC1 projection", "long tail => dead", "short side => dead")}


def findings(t) -> list[str]:
    """One markdown bullet per optimizer (and per untied matrix) with the means over seeds that answer
    the four questions, per weight decay: written from the table, so they always agree with it."""
    lines = []
    for (opt, lr, emb), g in t.groupby(["train.optimizer", "train.learning_rate", "embeddings"], sort=False):
        by = g.groupby("train.weight_decay", sort=True)
        wds = " / ".join(f"{wd:g}" for wd in by.groups)

        def col(c):
            return fmt(by[c].mean())  # one value per weight decay, as report.findings prints a run's

        auc = {k: by[k].mean() for k in INDICATORS}  # each in its direction fixed before the study
        best = max(INDICATORS, key=lambda k: float(np.nanmax(auc[k])))
        a = float(np.nanmax(auc[best]))
        name, right, _ = INDICATORS[best]
        low = min(INDICATORS, key=lambda k: float(np.nanmin(auc[k])))
        b = float(np.nanmin(auc[low]))
        post_hoc = (f"; post hoc (direction chosen after the labels): {INDICATORS[low][0]}, {INDICATORS[low][2]} "
                    f"{1 - b:.3f}" if b < 0.4 else "")
        lines.append(
            f"- **{opt} at lr {lr:g}, {emb}** (weight decay {wds}; means over seeds): dead-row norm / decay-only null "
            f"{col('dead_norm_over_null')} (Q1); measured / predicted update {col('update_measured_over_rule')} "
            f"(Q2); pairwise cosine {col('dead_pairwise_cos')}, drift cosine to -mean hidden state "
            f"{col('dead_drift_cos')} (Q3); best label-free indicator in its fixed direction: {name}, {right} "
            f"(AUROC {a:.3f}; 0.5 = chance){post_hoc} (Q4).")
    return lines
