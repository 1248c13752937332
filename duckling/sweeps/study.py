"""The dead-token study's tables (docs/results.md, "The dead-token study"; notebook 08).

    from duckling.sweeps.study import load, study_table, study_tables
    t = load("sweeps/study")                       # one row per complete run (duckling.sweeps.compare) + its folder
    collect("sweeps/study", "docs/results/study/runs")  # each run's config, summary and curves, small enough to commit
    t = load_runs("docs/results/study/runs")        # the same table from those files, with no recording
    study_table(t)                                  # mean [95% t interval] over seeds per optimizer x lr x weight decay
    study_tables(t)                                 # the same, one table per question group
    findings(t)                                     # one markdown bullet per optimizer, from the table

The figures are in duckling.sweeps.study_plots (plot_norms_vs_null, plot_update_rule, plot_by_frequency).

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
from duckling.sweeps.compare_tables import ci_text

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
        s, seed = read_json(d / "summary.json"), read_json(d / "config.json").get("train", {}).get("seed")
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
    elif (source / CURVES).is_file():
        raise DucklingError(f"{source} is a collected run already (it is read as it is, from OUT/runs/).")
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
                write_json(tmp / f, _portable(read_json(src)))
            curves(run_dir).to_csv(tmp / CURVES, index=False, float_format="%.6g")
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(dst)
    return written


def read_json(path: Path) -> dict:
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

    cfgs = [read_json(d / "config.json") for d in t["dir"]]
    t["train.optimizer"] = [c["train"]["optimizer"] for c in cfgs]
    t["train.learning_rate"] = [float(c["train"]["learning_rate"]) for c in cfgs]
    t["train.weight_decay"] = [float(c["train"]["weight_decay"]) for c in cfgs]
    tied = [c["model"]["tie_word_embeddings"] for c in cfgs]
    t["embeddings"] = ["tied" if x else "untied, input (wte)" for x in tied]
    out = t[~np.array(tied)].copy()
    for i, d in zip(out.index, out["dir"]):
        s = read_json(summary_path(d))
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
