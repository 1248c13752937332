"""The dead-token study's tables and figures (docs/results.md, "The dead-token study"), from its sweep folders.

    python docs/results/study/figures.py [SWEEP ...] [--out docs/results/study]

SWEEP defaults to the study's five sweeps, sweeps/study5/{adamw,coupled_adam,sgd,reference,untied}
(`duckling sweep sweeps/study5_NAME.toml --out sweeps/study5/NAME`); every complete run is read (reports
computed where missing, 2 at a time) and the script writes into --out:
  study.md               the three tables of duckling.sweeps.study.study_tables: mean [95% Student-t
                         interval] over seeds per optimizer x lr x weight decay x embeddings
  differences.md         each decay against none, each optimizer against the first at the same decay share,
                         tuned AdamW against the reference: paired t intervals over the shared seeds
  study_norms.png        Q1 (plot_norms_vs_null)
  study_update_rule.png  Q2 at each optimizer's middle weight decay (plot_update_rule)
  study_frequency.png    loss and row norm by token-frequency bucket (plot_by_frequency)
  findings.md            one bullet per optimizer, written from the table (findings)
  SWEEP_compare.{csv,md} each sweep's compare tables; runs/SWEEP__RUN/{config,summary}.json per run
Absolute paths of this machine are cut from the copied files (a path becomes its last two parts).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from duckling.sweeps.compare import differences, markdown
from duckling.sweeps.compare_tables import differences_table
from duckling.sweeps.study import (findings, load, plot_by_frequency, plot_norms_vs_null, plot_update_rule,
                                   study_tables)
from duckling.sweeps.tuning import decay_left

SWEEPS = [f"sweeps/study5/{n}" for n in ("adamw", "coupled_adam", "sgd", "reference", "untied")]
DIFF_COLUMNS = ("eval_loss", "dead_norm_over_null", "dead_pairwise_cos", "dead_centred_pc1", "dead_spread_over_init",
                "mean_row_norm", "update_step_ratio_median", "detect_auroc_norm", "detect_auroc_cos_mean",
                "magikarp_auroc", "loss_rarest_decile")


def _portable(value):
    """A JSON value with this machine's absolute paths cut to their last two parts."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and len(Path(value).parts) > 3:
        return str(Path(*Path(value).parts[-2:]))
    return value


def _copy_json(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(_portable(json.loads(src.read_text())), indent=2) + "\n", encoding="utf-8")


def _kept(run_dir: Path) -> float:
    """prod_t (1 - lr_t wd) of the run's own schedule, to 2 digits: the optimizers' decays line up by it."""
    tr = json.loads((run_dir / "config.json").read_text())["train"]
    return round(decay_left(float(tr["learning_rate"]), float(tr["weight_decay"]), int(tr["max_steps"]),
                            tr["lr_scheduler_type"], int(tr["warmup_steps"])), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", default=SWEEPS)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args()
    out = Path(a.out)
    parts = []
    for s in map(Path, a.sweeps):
        t = load(s)
        parts.append(t)
        for name in ("compare.csv", "compare.md"):
            text = (s / name).read_text(encoding="utf-8").replace(str(s.resolve().parent) + "/", "")
            (out / f"{s.name}_{name}").write_text(text, encoding="utf-8")
        for d in dict.fromkeys(t["dir"]):
            _copy_json(d / "config.json", out / "runs" / f"{s.name}__{d.name}" / "config.json")
            _copy_json(d / "report" / "summary.json", out / "runs" / f"{s.name}__{d.name}" / "summary.json")
        shutil.copy(s / "spec.toml", out / f"{s.name}_spec.toml")
    t = pd.concat(parts, ignore_index=True)
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
    print(tables)


if __name__ == "__main__":
    main()
