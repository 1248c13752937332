"""The dead-token study's tables and figures (docs/results.md, "The dead-token study"), from its committed runs.

    python docs/results/study/figures.py collect SOURCE ...   # runs -> docs/results/study/runs (then commit them)
    python docs/results/study/figures.py [--out docs/results/study]

The study is five sweeps, `duckling sweep sweeps/study5_NAME.toml --out sweeps/study5/NAME` for NAME in adamw,
reference, coupled_adam, sgd and untied. `collect` copies from each SOURCE (a sweep folder, or a run folder
named SWEEP__RUN that was trained alone with its sweep's config) what the tables and figures need into
OUT/runs/SWEEP__RUN: config.json, summary.json and curves.csv (the Q1 and Q2 curves every 4th step), a few
tens of KB a run, committed. Without `collect`, the script reads OUT/runs and writes into OUT:
  study.md               the three tables of duckling.sweeps.study.study_tables: mean [95% Student-t
                         interval] over seeds per optimizer x lr x weight decay x embeddings
  summary.md             the two tables of docs/results.md (SUMMARY's columns of study.md), with the share
                         of a dead row's norm that decay alone leaves
  differences.md         each decay against none, each optimizer against the first at the same decay share,
                         tuned AdamW against the reference: paired t intervals over the shared seeds
  runs.csv               one row per run (and per untied run's output matrix): every measure
  study_norms.png        Q1 (plot_norms_vs_null)
  study_update_rule.png  Q2 at each optimizer's middle weight decay (plot_update_rule)
  study_frequency.png    loss and row norm by token-frequency bucket (plot_by_frequency)
  findings.md            one bullet per optimizer, written from the table (findings)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from duckling.errors import DucklingError
from duckling.sweeps.compare import differences, markdown
from duckling.sweeps.compare_tables import differences_table
from duckling.sweeps.study import collect, findings, load_runs, study_table, study_tables
from duckling.sweeps.study_plots import plot_by_frequency, plot_norms_vs_null, plot_update_rule
from duckling.sweeps.tuning import decay_left

# docs/results.md's two tables: {compare column: header}, a subset of study.md's columns
SUMMARY = {
    "loss and Q1-Q3": {
        "eval_loss": "held-out loss", "loss_rarest_decile": "held-out loss, rarest live decile",
        "dead_norm_over_null": "Q1 dead norm / decay null", "update_step_ratio_median": "Q2 per-step ratio, median",
        "dead_pairwise_cos": "Q3 pairwise cos", "dead_centred_pc1": "Q3 centred PC1 share (noise {noise:.3g})",
        "dead_spread_over_init": "Q3 spread / init"},
    "the mean embedding and Q4": {
        "mean_row_norm": "||mean row||", "mean_shift_dead": "mean shift, dead rows",
        "mean_shift_cos_hidden_all": "cos(mean shift, -mean h)", "detect_auroc_norm": "Q4 small norm",
        "detect_auroc_cos_mean": "Q4 high cos to mean", "detect_auroc_pc1": "Q4 PC1 long tail",
        "magikarp_auroc": "Magikarp (uses labels)"},
}
DIFF_COLUMNS = ("eval_loss", "dead_norm_over_null", "dead_pairwise_cos", "dead_centred_pc1", "dead_spread_over_init",
                "mean_row_norm", "update_step_ratio_median", "detect_auroc_norm", "detect_auroc_cos_mean",
                "magikarp_auroc", "loss_rarest_decile")


def _kept(run_dir: Path) -> float:
    """prod_t (1 - lr_t wd) of the run's own schedule, to 2 digits: the optimizers' decays line up by it."""
    tr = json.loads((run_dir / "config.json").read_text())["train"]
    return round(decay_left(float(tr["learning_rate"]), float(tr["weight_decay"]), int(tr["max_steps"]),
                            tr["lr_scheduler_type"], int(tr["warmup_steps"])), 2)


def tables_and_figures(out: Path) -> str:
    t = load_runs(out / "runs")
    t.drop(columns=["dir"]).to_csv(out / "runs.csv", index=False, float_format="%.6g")
    plot_norms_vs_null(t).savefig(out / "study_norms.png", dpi=110)
    plot_update_rule(t).savefig(out / "study_update_rule.png", dpi=110)
    plot_by_frequency(t).savefig(out / "study_frequency.png", dpi=110)
    tables = "".join(f"## {title}\n\n{markdown(tab)}\n\n" for title, tab in study_tables(t).items())
    (out / "study.md").write_text("# The dead-token study: mean [95% Student-t interval] over seeds\n\n" + tables,
                                  encoding="utf-8")
    kept = {d: _kept(d) for d in t["dir"]}
    summary = ""
    for title, cols in SUMMARY.items():
        noise = t["dead_centred_pc1_noise"].mean()  # what isotropic rows give: a function of the shape only
        tab = study_table(t, {k: v.format(noise=noise) for k, v in cols.items()})
        tab.insert(3, "decay kept", [kept[d] for d in t.groupby(["train.optimizer", "train.learning_rate",
                                     "train.weight_decay", "embeddings"], sort=False)["dir"].first()])
        summary += f"## {title}\n\n{markdown(tab)}\n\n"
    (out / "summary.md").write_text("# The study in two tables: mean [95% Student-t interval] over seeds\n\n"
                                    + summary, encoding="utf-8")
    tied = t[t["embeddings"] == "tied"].copy()
    tied["setting"] = [f"{o} lr {lr:g}" for o, lr in zip(tied["train.optimizer"], tied["train.learning_rate"])]
    tied["decay kept"] = [kept[d] for d in tied["dir"]]  # the share of a dead row's norm decay alone leaves
    diffs = differences(tied, [c for c in DIFF_COLUMNS if c in tied], swept=["setting", "decay kept"])
    (out / "differences.md").write_text("# Differences: mean of the per-seed differences [95% paired t interval]\n\n"
                                        + markdown(differences_table(diffs)) + "\n", encoding="utf-8")
    (out / "findings.md").write_text("# Findings, written from study.md's means\n\n" + "\n".join(findings(t)) + "\n",
                                     encoding="utf-8")
    return tables


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent))
    if argv[:1] == ["collect"]:
        ap.add_argument("sources", nargs="+")
        a = ap.parse_args(argv[1:])
        for source in a.sources:
            for d in collect(source, Path(a.out) / "runs"):
                print(f"collected {d}")
        return
    a = ap.parse_args(argv)
    print(tables_and_figures(Path(a.out)))


if __name__ == "__main__":
    try:
        main()
    except DucklingError as e:
        sys.exit(f"figures.py: error: {e}")
    except OSError as e:  # a folder that cannot be written (read-only, full disk): nothing half-written is kept
        sys.exit(f"figures.py: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}")
