"""The dead-token study's figures and tables (README, "The dead-token study"), from the sweep folders.

    python docs/results/study/figures.py [sweeps/study sweeps/study_untied] [--out docs/results/study]

Reads every complete run of the sweeps (`duckling sweep sweeps/study.toml` and
`sweeps/study_untied.toml`; their reports are computed where missing) and writes
  study_norms.png        Q1 (duckling.sweeps.study.plot_norms_vs_null)
  study_update_rule.png  Q2 at weight decay 0.01 (duckling.sweeps.study.plot_update_rule)
  study.md               Q1-Q4: mean ± std over seeds per configuration (duckling.sweeps.study.study_table)
  SWEEP_compare.{csv,md} each sweep's compare tables; runs/SWEEP__NAME/{config,summary}.json per run
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd

from duckling.sweeps.compare import markdown
from duckling.sweeps.study import load, plot_norms_vs_null, plot_update_rule, study_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", default=["sweeps/study", "sweeps/study_untied"])
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args()
    out = Path(a.out)
    parts = []
    for s in map(Path, a.sweeps):
        t = load(s)
        parts.append(t)
        for name in ("compare.csv", "compare.md"):
            shutil.copy(s / name, out / f"{s.name}_{name}")
        for d in dict.fromkeys(t["dir"]):
            dst = out / "runs" / f"{s.name}__{d.name}"
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(d / "config.json", dst / "config.json")
            shutil.copy(d / "report" / "summary.json", dst / "summary.json")
    t = pd.concat(parts, ignore_index=True)
    plot_norms_vs_null(t).savefig(out / "study_norms.png", dpi=110)
    plot_update_rule(t, 0.01).savefig(out / "study_update_rule.png", dpi=110)
    (out / "study.md").write_text("# The dead-token study: mean ± std over seeds\n\n" + markdown(study_table(t)),
                                  encoding="utf-8")
    print((out / "study.md").read_text())


if __name__ == "__main__":
    main()
