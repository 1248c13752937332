"""``duckling compare SWEEP_DIR``: one table row per run of a sweep and the figures across runs.

    from duckling.sweeps.compare import compare
    table = compare("sweeps/wd")      # also writes compare.csv, compare.md and compare_*.png there

Each row: the run's swept values and seed, its final training and held-out loss, and the headline
dead-token numbers of its report (``duckling.analysis.report``; a missing report is computed first).
Figures: each metric against each swept value (every seed a dot, the mean over seeds a line, the
spread over seeds a bar) and the dead-row norm curves of every configuration overlaid.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from duckling.analysis import metrics as A
from duckling.analysis.plots import DPI, FIGSIZE, STEP_LABEL
from duckling.analysis.report import report
from duckling.errors import DucklingError
from duckling.recording.reader import Recording
from duckling.sweeps.engine import read_manifest
from duckling.sweeps.progress import text_table

# headline numbers of report summary.json: {key: (column, axis label)}
METRICS = {
    "final_train_loss": ("train_loss", "final training loss (nats/token)"),
    "final_eval_loss": ("eval_loss", "held-out loss (nats/token)"),
    "dead_norm_over_null": ("dead_norm_over_null", "dead-row norm / weight-decay null"),
    "dead_norm_mean": ("dead_norm", "mean dead-row norm"),
    "dead_displacement_mean": ("dead_displacement", "mean dead-row displacement ||w_N - w_0||"),
    "dead_mean_pairwise_cosine": ("dead_pairwise_cos", "mean pairwise cosine of dead rows"),
    "drift_cosine_to_neg_mean_hidden": ("dead_drift_cos", "cos(dead drift, -mean hidden state)"),
    "dead_displacement_over_lr_budget": ("displacement_over_lr_budget", "dead-row displacement / (sum lr x sqrt d)"),
    "update_rule_measured_over_predicted": ("update_measured_over_rule",
                                            "dead-row update: measured / optimizer's rule"),
    "detect_auroc_norm": ("detect_auroc_norm", "AUROC: small norm => dead"),
    "detect_auroc_cos_all_mean": ("detect_auroc_cos_mean", "AUROC: high cosine to mean row => dead"),
    "detect_auroc_pc1": ("detect_auroc_pc1", "AUROC: PC1 long tail => dead"),
    "detect_label_using_auroc_cos_dead_mean_nopc1": ("magikarp_auroc", "AUROC: Magikarp (uses dead labels)"),
    # first evaluated step with AUROC >= 0.9 in the stated direction / the opposite one (NaN: never)
    **{f"detect_first_step_separable.{k}{o}.step": (f"sep_step_{k}{o.replace('.', '_')}", "")
       for k in ("norm", "cos_all_mean", "pc1") for o in ("", ".opposite")},
    "dead_output_mass": ("dead_output_mass", "probability mass on dead ids"),
}
# what `duckling compare` prints in the terminal ({column: header}); the wide table is compare.csv / .md
SHORT = {"name": "run", "status": "status", "train_loss": "loss", "eval_loss": "held-out loss",
         "dead_norm_over_null": "dead norm/null", "dead_pairwise_cos": "dead cos", "detect_auroc_norm": "AUROC norm"}
SHORT_MEANING = {
    "loss": "final training loss (nats/token)", "held-out loss": "final held-out loss (nats/token)",
    "dead norm/null": "mean dead-row norm / its pure-weight-decay value (1 = dead rows only decay)",
    "dead cos": "mean cosine between dead rows (0 = unrelated directions)",
    "AUROC norm": "AUROC of -||w|| for dead vs live rows (0.5 = chance)",
}
FIG_METRICS = ("final_eval_loss", "dead_norm_over_null", "dead_mean_pairwise_cosine",
               "drift_cosine_to_neg_mean_hidden", "update_rule_measured_over_predicted", "detect_auroc_norm",
               "detect_auroc_cos_all_mean", "detect_auroc_pc1", "detect_label_using_auroc_cos_dead_mean_nopc1")


def _summary(run_dir: Path, refresh: bool) -> dict:
    """The run's report summary.json, computed (with its figures) when missing or older than the run."""
    if refresh or _stale(run_dir):
        return report(run_dir)
    return json.loads((run_dir / "report" / "summary.json").read_text())


def _stale(run_dir: Path) -> bool:
    path = run_dir / "report" / "summary.json"
    newest = max((p.stat().st_mtime for p in (run_dir / "final" / "trainer_state.json",
                                               run_dir / "run_info.json") if p.is_file()), default=0)
    return not path.is_file() or path.stat().st_mtime < newest


def _summaries(run_dirs: list, refresh: bool, progress: bool) -> dict:
    """{run_dir: report summary}: missing or stale reports are computed, several at a time (one
    process per CPU core; each report is single-threaded numpy work)."""
    todo = [r for r in run_dirs if refresh or _stale(r)]
    out = {r: json.loads((r / "report" / "summary.json").read_text()) for r in run_dirs if r not in todo}
    if todo and progress:
        print(f"computing {len(todo)} missing report(s) (duckling report RUN): {', '.join(r.name for r in todo)}",
              flush=True)
    workers = min(len(todo), os.cpu_count() or 1)
    if workers <= 1:
        out.update({r: _summary(r, refresh) for r in todo})
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    env = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in env})  # inherited by the spawned workers: no thread oversubscription
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            out.update(zip(todo, pool.map(report, todo)))
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out


def compare(out, *, write: bool = True, refresh_reports: bool = False, progress: bool = True):
    """The comparison table of a sweep folder (a pandas DataFrame, one row per run).

    Columns: name, the swept fields (dotted names), seed, status, steps, train_loss, eval_loss and
    the report's headline numbers (METRICS). Runs that are not complete keep NaN metrics. With
    ``write``, also writes OUT/compare.csv, OUT/compare.md and the figures OUT/compare_<field>.png
    (each metric vs that swept field) and OUT/compare_norms.png; their paths are in ``table.attrs``."""
    import pandas as pd

    out = Path(out)
    manifest = read_manifest(out)
    swept = list(manifest.get("swept", []))
    rows = []
    done = [out / e["path"] for e in manifest["runs"]
            if (out / e["path"] / "recording").is_dir() and (out / e["path"] / "final").is_dir()]
    summaries = _summaries(done, refresh_reports, progress)
    for entry in manifest["runs"]:
        run_dir = out / entry["path"]
        row = {"name": entry["name"], **entry["point"], "seed": entry["seed"], "status": entry["status"]}
        if run_dir in summaries:
            s = summaries[run_dir]
            row["status"] = "complete"
            row["steps"] = s.get("last_scalar_step")
            row.update({col: _get(s, key) for key, (col, _) in METRICS.items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    for _, (col, _) in METRICS.items():
        if col not in table:
            table[col] = np.nan
        table[col] = pd.to_numeric(table[col], errors="coerce")
    table.attrs["swept"] = swept
    if write:
        table.attrs["files"] = _write(out, table, swept)
    return table


def short_table(table) -> str:
    """The few columns ``duckling compare`` prints (SHORT; "-": no value yet), with what they mean."""
    cols = {c: h for c, h in SHORT.items() if c in table.columns}
    lines = [text_table(table.to_dict("records"), cols), ""]
    lines += [f"  {h}: {SHORT_MEANING[h]}" for h in cols.values() if h in SHORT_MEANING]
    return "\n".join(lines)


# ---------------------------------------------------------------- files
def _get(summary: dict, key: str):
    """summary[key], where a dotted key walks nested dicts ("a.b.c"); None when any part is missing."""
    v = summary
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown(df) -> str:
    """A GitHub markdown table of a DataFrame (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def by_config(table):
    """Mean and standard deviation over seeds of every metric, one row per configuration."""
    swept = table.attrs.get("swept", [])
    cols = [c for c, _ in METRICS.values() if table[c].notna().any()]
    done = table[table["status"] == "complete"]
    if not len(done):
        return done
    g = done.groupby(swept, dropna=False, sort=False) if swept else done.groupby(lambda _: "all")
    agg = g[cols].agg(["mean", "std"])
    agg.columns = [f"{c} {s}" for c, s in agg.columns]
    agg.insert(0, "seeds", g.size())
    return agg.reset_index()


def _mean_std_table(agg, swept: list):
    """``by_config`` with each metric as one "mean ± std" cell (the markdown view)."""
    import pandas as pd

    keep = [c for c in [*swept, "seeds"] if c in agg]
    cols = {c.rsplit(" ", 1)[0] for c in agg.columns if c.endswith(" mean")}
    view = pd.DataFrame({c: agg[c] for c in keep})
    for c in [m for m, _ in METRICS.values() if m in cols]:
        view[c] = [f"{m:.4g} ± {s:.2g}" if s == s else f"{m:.4g}" for m, s in zip(agg[f"{c} mean"], agg[f"{c} std"])]
    return view


def _write(out: Path, table, swept: list) -> list[str]:
    table.to_csv(out / "compare.csv", index=False)
    show = table.drop(columns=[c for c, _ in METRICS.values() if table[c].isna().all()])
    md = [f"# Sweep {out.name}: {len(table)} runs\n", "## Mean (std) over seeds per configuration\n"]
    agg = by_config(table)
    md += [markdown(_mean_std_table(agg, swept)) if len(agg) else "(no complete run yet)\n",
           "\n## Every run\n", markdown(show)]
    (out / "compare.md").write_text("\n".join(md), encoding="utf-8")
    files = ["compare.csv", "compare.md"]
    done = table[table["status"] == "complete"]
    if not len(done):
        return files
    for field in swept:
        fig = plot_metric_vs(done, field, swept)
        name = f"compare_{field.split('.')[-1]}.png"
        fig.savefig(out / name, dpi=DPI)
        files.append(name)
    fig = plot_norm_curves(out, done, swept)
    if fig is not None:
        fig.savefig(out / "compare_norms.png", dpi=DPI)
        files.append("compare_norms.png")
    return files


# ---------------------------------------------------------------- figures
def _positions(values) -> dict:
    """{value: x}: evenly spaced in sorted order (swept values are often log-spaced), or in the
    order given when they are not all numbers."""
    uniq = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in uniq):
        uniq = sorted(uniq)
    return {v: i for i, v in enumerate(uniq)}


def plot_metric_vs(done, field: str, swept: list, metrics=FIG_METRICS):
    """Each metric against the values of one swept field: every seed a dot, the mean over seeds a
    line with the min-max spread as a bar; one line per combination of the other swept fields."""
    from matplotlib.figure import Figure

    metrics = [m for m in metrics if done[METRICS[m][0]].notna().any()]
    ncols = 3 if len(metrics) > 4 else 2
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(FIGSIZE[0] * ncols / 1.6, FIGSIZE[1] * nrows / 1.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    others = [f for f in swept if f != field]
    groups = list(done.groupby(others, sort=False)) if others else [((), done)]
    xs = _positions(done[field].tolist())
    n_seeds = done.groupby(swept)["seed"].nunique().max() if swept else len(done)
    fig.suptitle(f"Sweep: metrics vs {field} (dots: {n_seeds} seed{'s' if n_seeds != 1 else ''}; "
                 "line: mean; bar: min-max over seeds)", fontsize=9)
    for ax, metric in zip(axes, metrics):
        col, label = METRICS[metric]
        for gi, (key, g) in enumerate(groups):
            color = f"C{gi % 10}"
            key = key if isinstance(key, tuple) else (key,)
            glabel = ", ".join(f"{f.split('.')[-1]}={v}" for f, v in zip(others, key)) or None
            offset = (gi - (len(groups) - 1) / 2) * 0.06  # keep the groups' dots apart
            stats = g.groupby(field, sort=False)[col].agg(["mean", "min", "max"])
            order = sorted(stats.index, key=lambda v: xs[v])
            x = np.array([xs[v] for v in order]) + offset
            mean, lo, hi = (stats.loc[order, k].to_numpy(float) for k in ("mean", "min", "max"))
            ax.scatter([xs[v] + offset for v in g[field]], g[col], s=12, color=color, alpha=0.5, lw=0)
            ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=color, lw=1.3, capsize=3, marker="o", ms=4,
                        label=glabel)
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], fontsize=8)
        ax.set_xlabel(field, fontsize=8)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if metric in ("dead_norm_over_null", "update_rule_measured_over_predicted"):
            ax.axhline(1.0, color="black", ls="--", lw=0.8)  # the null model / the rule's prediction
        if "auroc" in metric:
            ax.axhline(0.5, color="black", ls=":", lw=0.8)  # chance
    if others:
        axes[0].legend(fontsize=8, title=", ".join(f.split(".")[-1] for f in others), title_fontsize=8)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def _norm_curves(run_dir: Path):
    n = A.norms(Recording(run_dir))
    return n["steps"], n["dead"]["mean"], n["null_mean"]


def plot_norm_curves(out: Path, done, swept: list):
    """Mean dead-row norm of every configuration against the step (line: mean over seeds; band:
    min-max over seeds), with each configuration's weight-decay null model dashed; bottom: their ratio."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0] * 1.4, FIGSIZE[1] * 1.5), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    groups = list(done.groupby(swept, sort=False)) if swept else [((), done)]
    for gi, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        curves = []
        for name in g["name"]:
            try:
                curves.append(_norm_curves(out / name))
            except DucklingError:
                continue
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)  # a seed may have stopped early (time budget)
        steps = curves[0][0][:n]
        dead = np.stack([c[1][:n] for c in curves])  # (seeds, T)
        null = np.stack([c[2][:n] for c in curves])
        color = f"C{gi % 10}"
        label = ", ".join(f"{f.split('.')[-1]}={v}" for f, v in zip(swept, key)) or "all runs"
        label += f" ({len(curves)} seed{'s' if len(curves) != 1 else ''})"
        ax.plot(steps, dead.mean(0), color=color, lw=1.3, label=label)
        ax.fill_between(steps, dead.min(0), dead.max(0), color=color, alpha=0.2, lw=0)
        ax.plot(steps, null.mean(0), color=color, lw=0.9, ls="--")
        ratio = dead / null
        ax2.plot(steps, ratio.mean(0), color=color, lw=1.3)
        ax2.fill_between(steps, ratio.min(0), ratio.max(0), color=color, alpha=0.2, lw=0)
    if not ax.lines:
        return None
    ax.plot([], [], color="gray", ls="--", lw=0.9, label="weight-decay null ||w0||·Π(1-lr·wd)")
    fig.suptitle("Dead-row norms of every configuration (line: mean over seeds, band: min-max)", fontsize=9)
    ax.set_ylabel("mean dead-row L2 norm", fontsize=8)
    many = len(groups) > 4  # beside the panel, not over the curves
    ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {}))
    ratios = np.concatenate([line.get_ydata() for line in ax2.lines])
    if np.nanmax(ratios) > 10 * max(np.nanmin(ratios), 1e-12):  # one configuration far off: the rest stay visible
        ax2.set_yscale("log")
    ax2.axhline(1.0, color="black", ls="--", lw=0.8)
    ax2.set_ylabel("dead norm / null", fontsize=8)
    ax2.set_xlabel(STEP_LABEL, fontsize=8)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.tick_params(labelsize=7)
    return fig
