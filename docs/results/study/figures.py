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
from duckling.sweeps.study import (collect, findings, load_runs, plot_by_frequency, plot_norms_vs_null,
                                   plot_update_rule, study_tables)
from duckling.sweeps.tuning import decay_left

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
    tied = t[t["embeddings"] == "tied"].copy()
    tied["setting"] = [f"{o} lr {lr:g}" for o, lr in zip(tied["train.optimizer"], tied["train.learning_rate"])]
    tied["decay kept"] = [_kept(d) for d in tied["dir"]]  # the share of a dead row's norm decay alone leaves
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
