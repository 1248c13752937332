"""``duckling compare SWEEP_DIR``: one table row per run of a sweep, means over seeds with 95% intervals,
differences between configurations with theirs, and the figures across runs.

    from duckling.sweeps.compare import compare, by_config, differences, difference
    table = compare("sweeps/wd")      # also writes compare.csv, compare.md, compare_differences.csv, compare_*.png
    by_config(table)                  # per configuration: seeds, mean and 95% t interval of every measure
    difference(table, "eval_loss", {"train.weight_decay": 0.1}, {"train.weight_decay": 0.0})

Each row: the run's swept values and seed, its status, its final training and held-out loss and the
headline dead-token numbers of its report (``duckling.analysis.report``'s summary.json; a missing or
stale report is computed first, when the run's recording is there). A run that cannot be shown is never
a "complete" row: it is ``broken`` (its report failed or its summary cannot be read; ``problem`` holds
the error), ``missing`` (sweep.json says complete but the folder, or both its summary and its recording,
are gone; ``problem`` names where they were expected), or keeps its sweep.json state (pending, queued,
running, failed with its error, interrupted). One bad run never stops the others. Intervals:
``duckling.sweeps.stats`` (Student t over seeds; paired t for differences on the same seeds, Welch else).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from duckling.sweeps import stats
from duckling.errors import DucklingError
from duckling.files import write_json
from duckling.recording.layout import SUBDIR
from duckling.storage import Storage, as_local, local_path
from duckling.sweeps.engine import read_manifest
from duckling.sweeps.progress import text_table

# headline numbers of report summary.json: {key: (column, axis label)}. A new measure of the report is one
# line here (dotted keys walk nested dicts); every other numeric summary key still lands in compare.csv.
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
    **{f"detect_first_step_separable.{k}{o}.step": (f"sep_step_{k}{o.replace('.', '_')}",
                                                     f"first step AUROC >= 0.9: {k}{' (opposite)' if o else ''}")
       for k in ("norm", "cos_all_mean", "pc1") for o in ("", ".opposite")},
    "dead_output_mass": ("dead_output_mass", "probability mass on dead ids"),
    # issue 23 (duckling/analysis/report.py's docstring lists them): the centred collapse
    "dead_centred_pc1_share": ("dead_centred_pc1", "centred dead rows: variance share on PC1"),
    "dead_centred_pc1_share_noise": ("dead_centred_pc1_noise", "PC1 share that isotropic noise gives"),
    "dead_spread_over_init": ("dead_spread_over_init", "dead rows' spread around their mean / at step 0"),
    "live_spread_over_init": ("live_spread_over_init", "live rows' spread around their mean / at step 0"),
    "dead_pairwise_cosine_from_mean": ("dead_pairwise_cos_from_shift", "pairwise cosine the common shift alone gives"),
    # the mean embedding (Stollenwerk & Stollenwerk 2025)
    "mean_row_norm_all": ("mean_row_norm", "||mean embedding row||, last step"),
    "mean_row_norm_all_init": ("mean_row_norm_init", "||mean embedding row||, step 0"),
    **{f"mean_shift_{g}": (f"mean_shift_{g}", f"||mean row_N - mean row_0||, {g} rows") for g in ("all", "live", "dead")},
    **{f"mean_shift_cos_neg_hidden_{g}": (f"mean_shift_cos_hidden_{g}", f"cos(mean-row shift, -mean hidden), {g} rows")
       for g in ("all", "live", "dead")},
    # the update rule as a consistency check: per-step measured / rule
    **{f"update_rule_step_ratio_{q}": (f"update_step_ratio_{q}",
                                       f"per-step update measured / rule, {q} (a consistency check)")
       for q in ("median", "p05", "p95")},
    "dead_path_over_decay_only": ("dead_path_over_decay_only", "dead-row path / what decay alone moves"),
    # by token frequency (list index 0 = dead, 1 = rarest live decile D1, 10 = commonest D10)
    "loss_by_freq.1": ("loss_rarest_decile", "held-out loss on targets in the rarest live decile (nats)"),
    "loss_by_freq.10": ("loss_commonest_decile", "held-out loss on targets in the commonest decile (nats)"),
    "norm_by_freq.1": ("norm_rarest_decile", "mean row norm, rarest live decile"),
    "norm_by_freq.10": ("norm_commonest_decile", "mean row norm, commonest decile"),
    # chosen after seeing the labels: never the headline
    **{f"detect_auroc_post_hoc_{k}": (f"post_hoc_auroc_{k}", f"POST HOC max(A, 1-A): {k}")
       for k in ("norm", "cos_all_mean", "pc1")},
}
LABELS = {col: label for col, label in METRICS.values()}
# what `duckling compare` prints in the terminal ({column: header}); the wide table is compare.csv / .md
SHORT = {"name": "run", "status": "status", "train_loss": "loss", "eval_loss": "held-out loss",
         "dead_norm_over_null": "dead norm/null", "dead_pairwise_cos": "dead cos", "detect_auroc_norm": "AUROC norm"}
SHORT_MEANING = {
    "loss": "final training loss (nats/token)", "held-out loss": "final held-out loss (nats/token)",
    "dead norm/null": "mean dead-row norm / its pure-weight-decay value (1 = dead rows only decay)",
    "dead cos": "mean cosine between dead rows (0 = unrelated directions)",
    "AUROC norm": "AUROC of -||w|| for dead vs live rows (0.5 = chance)",
}
# the figures' panels and the differences table of compare.md (summary keys)
FIG_METRICS = ("final_eval_loss", "dead_norm_over_null", "dead_mean_pairwise_cosine", "dead_centred_pc1_share",
               "dead_spread_over_init", "mean_row_norm_all", "drift_cosine_to_neg_mean_hidden",
               "update_rule_step_ratio_median", "detect_auroc_norm", "detect_auroc_cos_all_mean", "detect_auroc_pc1",
               "detect_label_using_auroc_cos_dead_mean_nopc1")
UNHEALTHY = ("broken", "missing")  # compare could not show a run that should be there: `duckling compare` exits 1


# ---------------------------------------------------------------- one run's state
def _stale(run_dir: Path) -> bool:
    path = run_dir / "report" / "summary.json"
    newest = max((p.stat().st_mtime for p in (run_dir / "final" / "trainer_state.json",
                                               run_dir / "run_info.json") if p.is_file()), default=0)
    return not path.is_file() or path.stat().st_mtime < newest


def _plan(out: Path, entry: dict, refresh: bool) -> tuple[str, str]:
    """(what to do, why) for one sweep.json entry: "read" its summary, "compute" its report, or a final
    status ("missing", or its sweep.json status) with the problem to show."""
    run_dir = out / entry["path"]
    status, error = entry.get("status", "pending"), entry.get("error") or ""
    summary, recording = run_dir / "report" / "summary.json", run_dir / "recording"
    finished = (run_dir / "final").is_dir()
    if not run_dir.is_dir():
        if status == "complete":
            return "missing", f"run folder not found: expected at {run_dir.resolve()}"
        return status, _first_line(error)
    if not finished and status != "complete":  # not done (the run folder is the truth: a finished run counts)
        return status, _first_line(error)
    if recording.is_dir() and (refresh or _stale(run_dir)):
        return "compute", ""
    if summary.is_file():
        return "read", ""
    return "missing", (f"no report summary and no recording to compute it from: expected "
                       f"{summary.resolve()} or {recording.resolve()}")


def _fingerprint(files: dict) -> str:
    """What a remote run's report was computed from: its files' names and sizes."""
    return hashlib.sha1(json.dumps(sorted(files.items())).encode()).hexdigest()


def _remote_plan(st, into: Path, entry: dict, refresh: bool) -> tuple[str, str, dict]:
    """_plan for a sweep in a storage (``st``): the runs are listed there, their reports kept in ``into``;
    (what to do, why, the run's files)."""
    files, where = st.files(entry["path"]), st.url(entry["path"])
    status, error = entry.get("status", "pending"), entry.get("error") or ""
    if not files:
        return ("missing", f"run folder not found: expected at {where}", files) if status == "complete" else \
            (status, _first_line(error), files)
    if not any(n.startswith("final/") for n in files) and status != "complete":
        return status, _first_line(error), files
    report = into / entry["path"] / "report"
    try:
        source = json.loads((report / "source.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        source = None
    if f"{SUBDIR}/meta.json" in files and (refresh or source != _fingerprint(files)):
        return "compute", "", files
    if (report / "summary.json").is_file():
        return "read", "", files
    return "missing", f"no report summary and no recording to compute it from: expected {where}/{SUBDIR}", files


def _first_line(text: str) -> str:
    lines = [s for s in str(text).strip().splitlines() if s.strip()]
    return lines[-1].strip() if lines else ""  # a traceback's last line names the error


def _error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg if isinstance(e, DucklingError) else f"{type(e).__name__}: {msg}"


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / "report" / "summary.json"
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path.resolve()}: {e}") from e
    if not isinstance(s, dict):
        raise ValueError(f"{path.resolve()} is not a JSON object")
    return s


def _report(run, out=None) -> dict:
    from duckling.analysis.report import report

    return report(run, out)


def _compute(todo: list, progress: bool) -> dict:
    """{run: summary dict or the exception} for ``todo`` [(run folder or URI, report folder or None)]: reports
    computed several at a time (one process per CPU core; each report is single-threaded numpy work; in
    this process for memory://, which lives in it); one failure leaves the others standing."""
    if not todo:
        return {}
    if progress:
        print(f"computing {len(todo)} missing report(s) (duckling report RUN): "
              f"{', '.join(str(r).rsplit('/', 1)[-1] for r, _ in todo)}", flush=True)
    out: dict = {}
    workers = min(len(todo), os.cpu_count() or 1)
    if workers <= 1 or any(str(r).startswith("memory://") for r, _ in todo):
        for r, into in todo:
            try:
                out[r] = _report(r, into)
            except Exception as e:  # noqa: BLE001 - listed as broken with its error; the other runs go on
                out[r] = e
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    env = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in env})  # inherited by the spawned workers: no thread oversubscription
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {r: pool.submit(_report, r, into) for r, into in todo}
            for r, f in futures.items():
                try:
                    out[r] = f.result()
                except Exception as e:  # noqa: BLE001 - a worker's error, or its death (BrokenProcessPool)
                    out[r] = e
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out


def _get(summary: dict, key: str):
    """summary[key], where a dotted key walks nested dicts and lists ("a.b.c", "a.3"); None when any part
    is missing."""
    v = summary
    for part in key.split("."):
        if isinstance(v, list) and part.isdigit():
            v = v[int(part)] if int(part) < len(v) else None
        else:
            v = v.get(part) if isinstance(v, dict) else None
    return v


def _numbers(summary: dict) -> dict:
    """Every numeric top-level summary key that METRICS does not name: compare.csv's extra columns."""
    named = {k.split(".")[0] for k in METRICS}
    return {k: float(v) for k, v in summary.items() if k not in named and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def measures(summary: dict) -> dict:
    """A complete run's columns from its summary.json: steps, every METRICS column (None where missing) and
    every other numeric top-level key."""
    return {"steps": summary.get("last_scalar_step"), **_numbers(summary),
            **{col: _get(summary, key) for key, (col, _) in METRICS.items()}}


# ---------------------------------------------------------------- the table
def compare(out, *, into=None, write: bool = True, refresh_reports: bool = False, progress: bool = True):
    """The comparison table of a sweep folder (a pandas DataFrame, one row per run of sweep.json).

    Columns: name, the swept fields (dotted names), seed, status, problem, steps, the METRICS columns
    and every other numeric key of the runs' summaries. Only ``complete`` rows have measures; the
    others say why in ``problem`` (module docstring). ``table.attrs``: "swept", "problems" (one dict per
    run that is not complete: name, status, problem) and, with ``write``, "files" (written into ``into``,
    default OUT: compare.csv, compare.md, compare_differences.csv, compare_<field>.png, compare_norms.png).

    ``out`` may be a sweep in a storage (the URI given to ``duckling sweep --storage``): it is only read,
    each run's recording block by block (duckling.recording.remote); ``into`` (a local folder, required
    then) receives the tables, the figures and each run's report (INTO/RUN/report, recomputed when the
    run's files in the storage change)."""
    import pandas as pd

    remote = local_path(out) is None
    if remote and into is None:
        raise DucklingError(f"{out} is in a storage, which compare only reads: give a local folder for the "
                            "table, the figures and the runs' reports (`duckling compare URI --out DIR`).")
    out = str(out) if remote else as_local(out)  # a folder or a file:// URI (duckling.storage)
    into = as_local(into) if into is not None else out
    manifest = read_manifest(out)
    swept = list(manifest.get("swept", []))
    if remote:
        st = Storage(out)
        plans = {e["name"]: _remote_plan(st, into, e, refresh_reports) for e in manifest["runs"]}
        runs = {e["name"]: (st.url(e["path"]), into / e["path"]) for e in manifest["runs"]}
    else:
        plans = {e["name"]: _plan(out, e, refresh_reports) for e in manifest["runs"]}
        runs = {e["name"]: (out / e["path"], out / e["path"]) for e in manifest["runs"]}
    todo = [(runs[n][0], runs[n][1] / "report" if remote else None) for n, p in plans.items() if p[0] == "compute"]
    computed = _compute(todo, progress)
    rows = []
    for entry in manifest["runs"]:
        run, run_dir = runs[entry["name"]]  # (where the run is, where its report is)
        action, problem = plans[entry["name"]][:2]
        row = {"name": entry["name"], **entry.get("point", {}), "seed": entry.get("seed"), "status": action,
               "problem": problem}
        if action in ("read", "compute"):
            try:
                s = computed[run] if action == "compute" else _read_summary(run_dir)
                if isinstance(s, BaseException):
                    raise s
                values = measures(s)
                if all(values[col] is None for col, _ in METRICS.values()):
                    raise ValueError(f"{run_dir / 'report' / 'summary.json'} holds none of compare's measures "
                                     f"(keys: {', '.join(sorted(s)[:8])}...): rerun `duckling report {run}`")
                row.update(status="complete", **values)
                if remote and action == "compute":  # what it was computed from: recomputed when that changes
                    write_json(run_dir / "report" / "source.json", {"run": run, "files": _fingerprint(plans[entry["name"]][2])})
            except Exception as e:  # noqa: BLE001 - listed as broken with its error; the other runs go on
                row.update(status="broken", problem=_error(e))
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in [c for c, _ in METRICS.values()] + ["steps"]:
        table[col] = pd.to_numeric(table[col], errors="coerce") if col in table else np.nan
    table.attrs["swept"] = swept
    table.attrs["problems"] = [{"name": r["name"], "status": r["status"], "problem": r["problem"]}
                               for r in rows if r["status"] != "complete"]
    if write:
        from duckling.sweeps.compare_plots import write_figures
        from duckling.sweeps.compare_tables import write_tables

        into.mkdir(parents=True, exist_ok=True)
        table.attrs["files"] = write_tables(into, table, swept) + write_figures(into, table, swept)
    return table


def markdown(df) -> str:
    """A GitHub markdown table of a DataFrame (``compare_tables.markdown``; docs/results/study/figures.py)."""
    from duckling.sweeps.compare_tables import markdown as table_md

    return table_md(df)


def unhealthy(table) -> list[dict]:
    """The runs compare could not show although they should be there (broken or missing)."""
    return [p for p in table.attrs.get("problems", []) if p["status"] in UNHEALTHY]


def short_table(table) -> str:
    """The few columns ``duckling compare`` prints (SHORT; "-": no value), what they mean, and one line
    per run that is not complete with its problem (a broken run's error, a missing run's expected path)."""
    cols = {c: h for c, h in SHORT.items() if c in table.columns}
    lines = [text_table(table.to_dict("records"), cols), ""]
    lines += [f"  {h}: {SHORT_MEANING[h]}" for h in cols.values() if h in SHORT_MEANING]
    counts = table["status"].value_counts()
    lines += ["", f"{counts.get('complete', 0)} of {len(table)} runs complete"
              + "".join(f", {n} {s}" for s, n in counts.items() if s != "complete")]
    lines += [f"  {p['status']}: {p['name']}" + (f": {p['problem']}" if p["problem"] else "")
              for p in table.attrs.get("problems", [])]
    return "\n".join(lines)


def by_config(table, metrics=None):
    """One row per configuration (the swept values) over its complete runs: ``seeds`` and, per measure,
    "<col> mean", "<col> lo", "<col> hi" (95% Student-t interval of the mean over seeds; NaN with one
    seed) and "<col> n" (seeds with a value)."""
    import pandas as pd

    swept = table.attrs.get("swept", [])
    done = table[table["status"] == "complete"]
    cols = [c for c in (metrics or [c for c, _ in METRICS.values()]) if c in done and done[c].notna().any()]
    rows = []
    groups = done.groupby(swept, dropna=False, sort=False) if swept else [((), done)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(swept, key)), "seeds": len(g)}
        for c in cols:
            ci = stats.mean_ci(g[c])
            row.update({f"{c} mean": ci["mean"], f"{c} lo": ci["lo"], f"{c} hi": ci["hi"], f"{c} n": ci["n"]})
        rows.append(row)
    return pd.DataFrame(rows)


def _select(table, where: dict):
    done = table[table["status"] == "complete"]
    mask = np.ones(len(done), bool)
    for k, v in where.items():
        mask &= (done[k] == v).to_numpy()
    return done[mask]


def difference(table, col: str, a: dict, b: dict) -> dict:
    """Mean of ``col`` over the complete runs matching ``a`` minus that over those matching ``b`` (dicts of
    column: value), with its 95% interval: paired t on the seeds both share, else Welch
    (``stats.diff_ci``): {diff, lo, hi, half, df, n_a, n_b, method}."""
    ga, gb = _select(table, a), _select(table, b)
    return stats.diff_ci(ga[col].to_numpy(float), gb[col].to_numpy(float), ga["seed"].tolist(), gb["seed"].tolist())


def differences(table, metrics=None, swept=None):
    """Every configuration minus its reference, one swept field at a time: for each field, each value
    after the field's first (the reference) against that first value, with the other fields held
    fixed. Long form, one row per comparison x measure: field, value, reference, at (the other
    fields), col, diff, lo, hi, n_a, n_b, method."""
    import pandas as pd

    swept = table.attrs.get("swept", []) if swept is None else swept
    cols = [METRICS[m][0] if m in METRICS else m for m in (metrics or FIG_METRICS)]
    done = table[table["status"] == "complete"]
    cols = [c for c in cols if c in done and done[c].notna().any()]
    rows = []
    for field in swept:
        values = list(dict.fromkeys(done[field]))
        others = [f for f in swept if f != field]
        contexts = [dict(zip(others, k if isinstance(k, tuple) else (k,)))
                    for k, _ in done.groupby(others, sort=False)] if others else [{}]
        for ctx in contexts:
            for v in values[1:]:
                if not (len(_select(table, {**ctx, field: v})) and len(_select(table, {**ctx, field: values[0]}))):
                    continue  # a combination that was not run
                for c in cols:
                    d = difference(table, c, {**ctx, field: v}, {**ctx, field: values[0]})
                    at = ", ".join(f"{k.split('.')[-1]}={x}" for k, x in ctx.items())
                    rows.append({"field": field, "value": v, "reference": values[0], "at": at, "col": c,
                                 **{k: d[k] for k in ("diff", "lo", "hi", "n_a", "n_b", "method")}})
    return pd.DataFrame(rows, columns=["field", "value", "reference", "at", "col", "diff", "lo", "hi",
                                       "n_a", "n_b", "method"])
