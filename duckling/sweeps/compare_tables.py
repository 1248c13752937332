"""The files ``duckling compare`` writes beside the figures: compare.csv (every run, every column),
compare_differences.csv (``compare.differences``, long form) and compare.md (the runs that could not
be shown, the mean over seeds with its 95% interval per configuration, the differences from each
field's reference value with theirs, and every run)."""
from __future__ import annotations

import math
from pathlib import Path

from duckling.sweeps import stats
from duckling.sweeps.compare import LABELS, METRICS, by_config, differences


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown(df) -> str:
    """A GitHub markdown table of a DataFrame (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def ci_text(mean, lo, hi, digits: int = 4) -> str:
    """"mean [lo, hi]"; "mean" alone without an interval (one seed); "" without a value."""
    return stats.fmt_ci({"mean": mean, "lo": lo, "hi": hi, "half": hi - lo}, digits)


def mean_ci_table(agg, swept: list):
    """``by_config`` with each measure as one "mean [lo, hi]" cell (the markdown view)."""
    import pandas as pd

    view = pd.DataFrame({c: agg[c] for c in [*swept, "seeds"] if c in agg})
    for c in [m for m, _ in METRICS.values() if f"{m} mean" in agg]:
        view[c] = [ci_text(m, lo, hi) for m, lo, hi in zip(agg[f"{c} mean"], agg[f"{c} lo"], agg[f"{c} hi"])]
    return view


def differences_table(diffs):
    """``differences`` as one row per comparison, one "diff [lo, hi]" cell per measure, "*" where the
    interval excludes 0."""
    import pandas as pd

    rows = []
    for (field, value, ref, at), g in diffs.groupby(["field", "value", "reference", "at"], sort=False):
        first = g.iloc[0]
        row = {"comparison": f"{field.split('.')[-1]}={value} minus {field.split('.')[-1]}={ref}",
               "at": at or "-", "method": first["method"], "seeds": f"{first['n_a']} / {first['n_b']}"}
        for _, d in g.iterrows():
            txt = ci_text(d["diff"], d["lo"], d["hi"], 3)
            row[d["col"]] = txt + (" *" if txt and stats.excludes_zero(d) else "")
        rows.append(row)
    return pd.DataFrame(rows)


def _legend(cols) -> str:
    return "\n".join(f"- `{c}`: {LABELS[c]}" for c in cols if c in LABELS) + "\n"


def write_tables(out: Path, table, swept: list) -> list[str]:
    """compare.csv, compare_differences.csv and compare.md in OUT; their names."""
    table.to_csv(out / "compare.csv", index=False)
    counts = table["status"].value_counts()
    head = f"# Sweep {out.name}: {len(table)} runs, {counts.get('complete', 0)} complete" + "".join(
        f", {n} {s}" for s, n in counts.items() if s != "complete")
    md = [head + "\n"]
    problems = table.attrs.get("problems", [])
    if problems:
        import pandas as pd

        md += ["## Runs not in the statistics\n",
               "broken: its report failed or its summary cannot be read (the error); missing: sweep.json says "
               "complete but its files are not where expected; other states are sweep.json's.\n",
               markdown(pd.DataFrame(problems, columns=["name", "status", "problem"]))]
    agg = by_config(table)
    md += ["## Mean over seeds [95% interval] per configuration\n",
           f"Each cell: the mean over the configuration's complete runs and its {stats.METHOD}, t at n - 1 degrees "
           "of freedom; with one seed the mean alone (no interval).\n",
           markdown(mean_ci_table(agg, swept)) if len(agg) else "(no complete run yet)\n"]
    files = ["compare.csv", "compare.md"]
    diffs = differences(table)
    if len(diffs):
        diffs.to_csv(out / "compare_differences.csv", index=False)
        files.insert(1, "compare_differences.csv")
        md += ["## Differences from each field's first value [95% interval]\n",
               "Each row: the configurations with one swept field at a later value minus those at its first value, "
               "the other fields equal (`at`). Paired t: the mean of the per-seed differences over the seeds both "
               "ran, with its t interval; Welch t: different seeds, unequal variances. `*`: the interval excludes "
               "0. Every measure: compare_differences.csv.\n",
               markdown(differences_table(diffs))]
    cols = [c for c, _ in METRICS.values() if c in table and table[c].notna().any()]
    show = table[[c for c in table.columns if c in ("name", *swept, "seed", "status", "problem", "steps", *cols)]]
    md += ["## Every run\n", markdown(show), "\n## Columns\n",
           _legend(cols)]
    (out / "compare.md").write_text("\n".join(md), encoding="utf-8")
    return files

