"""``duckling compare``'s statistics, robustness and figures, on sweep folders made of summary files
(no training): the t interval against published t quantiles, paired and Welch differences, broken and
missing runs listed with their error or expected path (never a "complete" row without numbers), and
y axes that do not blow noise up into an effect. The weight-decay arithmetic of the study, too."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from duckling.sweeps import stats

# t(0.975, df), df = 1..10, 15, 20, 30, 60, 120: the printed table of every statistics textbook
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def test_t_quantiles_match_the_table():
    for df, t in T975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4), df
    assert stats.t_quantile(0.995, 4) == pytest.approx(4.604, abs=6e-4)
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)  # the normal's
    assert stats.t_cdf(-2.776445, 4) == pytest.approx(0.025, abs=1e-6)
    assert 2.776 < stats.t_quantile(0.975, 3.5) < 3.182  # Welch's fractional degrees of freedom


def test_mean_interval_and_differences():
    ci = stats.mean_ci([1, 2, 3, 4, 5, None, float("nan")])  # missing values are dropped
    assert ci["n"] == 5 and ci["mean"] == 3
    assert ci["half"] == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    one = stats.mean_ci([7.0])
    assert one["mean"] == 7 and math.isnan(one["lo"]) and stats.fmt_ci(one) == "7"
    # Welch by hand: var/n = 1/3 and 1.5, df = (11/6)^2 / ((1/3)^2/2 + 1.5^2/3) = 4.1724
    w = stats.diff_ci([1, 2, 3], [2, 2, 5, 7])
    assert w["method"] == "Welch t" and w["diff"] == -2 and w["df"] == pytest.approx(4.17241, rel=1e-5)
    assert w["half"] == pytest.approx(stats.t_quantile(0.975, w["df"]) * math.sqrt(11 / 6), rel=1e-9)
    # the same seeds: paired by seed, not by position
    p = stats.diff_ci([1.0, 2.0, 3.0], [5.0, 2.0, 2.0], seeds_a=[0, 1, 2], seeds_b=[0, 1, 2])
    q = stats.diff_ci([1.0, 2.0, 3.0], [2.0, 2.0, 5.0], seeds_a=[0, 1, 2], seeds_b=[2, 1, 0])
    assert p["method"] == q["method"] == "paired t" and p["diff"] == q["diff"] == pytest.approx(-1)
    assert p["half"] == pytest.approx(stats.t_quantile(0.975, 2) * np.std([-4, 0, 1], ddof=1) / math.sqrt(3))
    assert not stats.excludes_zero(p) and stats.excludes_zero({"lo": 0.1, "hi": 0.3})


# ---------------------------------------------------------------- a sweep folder of summaries
SWEPT = ["train.optimizer", "train.weight_decay"]
BASE = {"adamw": 1.3, "sgd": 1.0}


def summary(opt: str, seed: int) -> dict:
    r = np.random.default_rng(seed)
    return {"last_scalar_step": 2000, "final_train_loss": 8.491 + 1e-4 * r.standard_normal(),
            "final_eval_loss": 8.492 + 1e-4 * r.standard_normal(), "dead_norm_over_null": BASE[opt] + 0.01 * seed,
            "dead_mean_pairwise_cosine": 0.8, "detect_auroc_norm": 0.1 + 0.01 * seed, "a_new_measure": 3.0}


def make_sweep(root, seeds=range(3), skip=(), corrupt=(), runs_extra=()):
    """2 optimizers x wd 0.1 x seeds, every run a folder with report/summary.json."""
    root.mkdir()
    runs = []
    for opt in BASE:
        for s in seeds:
            name = f"optimizer={opt}__weight_decay=0.1__seed={s}"
            runs.append({"name": name, "point": {"train.optimizer": opt, "train.weight_decay": 0.1}, "seed": s,
                         "status": "complete", "path": name, "error": None})
            if name in skip:
                continue
            (root / name / "report").mkdir(parents=True)
            (root / name / "report" / "summary.json").write_text("{oops" if name in corrupt else
                                                                 json.dumps(summary(opt, s)))
    (root / "sweep.json").write_text(json.dumps({"identity": {}, "swept": SWEPT, "runs": runs + list(runs_extra)}))
    return root


def test_broken_and_missing_runs_are_listed_and_the_rest_compared(tmp_path, capsys):
    from duckling.cli import main
    from duckling.sweeps.compare import compare, short_table

    failed = {"name": "optimizer=sgd__weight_decay=0.1__seed=9", "point": {"train.optimizer": "sgd",
              "train.weight_decay": 0.1}, "seed": 9, "status": "failed", "path": "optimizer=sgd__weight_decay=0.1__seed=9",
              "error": "Traceback (most recent call last):\n  ...\nRuntimeError: loss is NaN at step 12"}
    out = make_sweep(tmp_path / "sw", skip={"optimizer=adamw__weight_decay=0.1__seed=1"},
                     corrupt={"optimizer=sgd__weight_decay=0.1__seed=2"}, runs_extra=[failed])
    gone = out / "optimizer=sgd__weight_decay=0.1__seed=0"  # a folder without summary or recording
    (gone / "report" / "summary.json").unlink()
    (gone / "final").mkdir()
    ruined = out / "optimizer=adamw__weight_decay=0.1__seed=2"  # a recording the report cannot read
    (ruined / "report" / "summary.json").unlink()
    (ruined / "recording").mkdir()
    (ruined / "final").mkdir()

    assert main(["compare", str(out)]) == 1  # broken or missing: exit 1 after writing everything
    cap = capsys.readouterr()
    assert "4 run(s) broken or missing" in cap.err and "optimizer=sgd__weight_decay=0.1__seed=9" in cap.out
    assert sorted(p.name for p in out.glob("compare*")) == ["compare.csv", "compare.md", "compare_differences.csv",
                                                           "compare_optimizer.png", "compare_weight_decay.png"]
    t = compare(out, write=False, progress=False)
    status = dict(zip(t["name"], t["status"]))
    problem = dict(zip(t["name"], t["problem"]))
    assert status == {"optimizer=adamw__weight_decay=0.1__seed=0": "complete",
                      "optimizer=adamw__weight_decay=0.1__seed=1": "missing",
                      "optimizer=adamw__weight_decay=0.1__seed=2": "broken",
                      "optimizer=sgd__weight_decay=0.1__seed=0": "missing",
                      "optimizer=sgd__weight_decay=0.1__seed=1": "complete",
                      "optimizer=sgd__weight_decay=0.1__seed=2": "broken",
                      "optimizer=sgd__weight_decay=0.1__seed=9": "failed"}
    assert "expected at" in problem["optimizer=adamw__weight_decay=0.1__seed=1"]
    assert str((gone / "report" / "summary.json").resolve()) in problem["optimizer=sgd__weight_decay=0.1__seed=0"]
    assert "summary.json" in problem["optimizer=sgd__weight_decay=0.1__seed=2"]
    assert "recording" in problem["optimizer=adamw__weight_decay=0.1__seed=2"]  # the report's own error
    assert problem["optimizer=sgd__weight_decay=0.1__seed=9"] == "RuntimeError: loss is NaN at step 12"
    done = t[t["status"] == "complete"]
    assert done["eval_loss"].notna().all() and done["dead_norm_over_null"].notna().all()
    assert t.loc[t["status"] != "complete", "eval_loss"].isna().all()  # never a complete row without numbers
    assert (done["a_new_measure"] == 3.0).all()  # a summary key compare does not name still reaches compare.csv
    short = short_table(t)
    assert "2 of 7 runs complete" in short and short.count("broken:") == 2 and short.count("missing:") == 2
    md = (out / "compare.md").read_text()
    assert "## Runs not in the statistics" in md and "loss is NaN" in md


def test_an_unfinished_sweep_is_not_unhealthy(tmp_path):
    from duckling.sweeps.compare import compare, short_table, unhealthy

    pending = {"name": "later", "point": {"train.optimizer": "sgd", "train.weight_decay": 0.1}, "seed": 5,
               "status": "pending", "path": "later", "error": None}
    t = compare(make_sweep(tmp_path / "sw", runs_extra=[pending]), write=False, progress=False)
    assert unhealthy(t) == [] and "6 of 7 runs complete, 1 pending" in short_table(t)  # `duckling compare`: exit 0


def test_means_intervals_and_differences(tmp_path):
    from duckling.sweeps.compare import by_config, compare, difference
    from duckling.sweeps.compare_tables import write_tables

    out = make_sweep(tmp_path / "sw", seeds=range(5))
    t = compare(out, write=False, progress=False)
    assert write_tables(out, t, SWEPT) == ["compare.csv", "compare_differences.csv", "compare.md"]
    agg = by_config(t).set_index("train.optimizer")
    ci = stats.mean_ci(1.3 + 0.01 * np.arange(5))
    assert agg.loc["adamw", "dead_norm_over_null mean"] == pytest.approx(ci["mean"])
    assert agg.loc["adamw", "dead_norm_over_null lo"] == pytest.approx(ci["lo"])
    d = difference(t, "dead_norm_over_null", {"train.optimizer": "sgd"}, {"train.optimizer": "adamw"})
    assert d["method"] == "paired t" and d["diff"] == pytest.approx(-0.3) and d["half"] == pytest.approx(0, abs=1e-9)
    md = (out / "compare.md").read_text()
    assert "95% Student-t interval" in md and "| train.optimizer | train.weight_decay | seeds |" in md
    row = next(line for line in md.splitlines() if line.startswith("| optimizer=sgd minus optimizer=adamw"))
    assert "paired t" in row and "-0.3 [-0.3, -0.3] *" in row


def test_axes_show_noise_as_noise(tmp_path):
    from duckling.sweeps.compare import compare
    from duckling.sweeps.compare_plots import plot_metric_vs, y_limits

    t = compare(make_sweep(tmp_path / "sw", seeds=range(5)), write=False, progress=False)
    fig = plot_metric_vs(t, "train.optimizer", SWEPT)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    lo, hi = axes["held-out loss (nats/token)"].get_ylim()
    assert hi - lo >= 0.5  # losses 1e-4 apart: a flat line, not a slope across the panel
    assert axes["held-out loss (nats/token)"].yaxis.get_major_formatter().get_offset() == ""
    lo, hi = axes["AUROC: small norm => dead"].get_ylim()
    assert lo <= 0 and hi >= 1
    lo, hi = axes["dead-row norm / weight-decay null"].get_ylim()
    assert lo <= 0 and hi >= 1.34
    assert not any(ax.get_legend() for ax in fig.axes)  # the legend sits below the panels
    assert fig.legends and "train.optimizer" in fig._suptitle.get_text()
    assert y_limits("something_new", 4.0, 4.001)[0] < 0  # an unknown positive measure keeps 0 in view
    assert y_limits("something_new", -0.5, 0.5) == pytest.approx((-0.55, 0.55))


def test_norm_curves_band_is_the_t_interval(tmp_path, monkeypatch):
    from duckling.sweeps import compare_plots as P
    from duckling.sweeps.compare import compare

    t = compare(make_sweep(tmp_path / "sw"), write=False, progress=False)
    steps = np.arange(0, 101, 10)

    def curves(run_dir):
        s = int(run_dir.name[-1])
        null = np.linspace(0.5, 0.45, len(steps))
        return steps, null * (1.2 + 0.01 * s), null

    monkeypatch.setattr(P, "_norm_curves", curves)
    m, lo, hi = P.band(np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]]))
    assert m.tolist() == [2, 2] and hi[0] - m[0] == pytest.approx(stats.t_quantile(0.975, 2) / math.sqrt(3))
    assert hi[1] == lo[1] == 2
    fig = P.plot_norm_curves(tmp_path / "sw", t, SWEPT)
    top, ratio = fig.axes[:2]
    assert top.get_ylim()[0] == 0 and ratio.get_ylim()[0] == 0 and ratio.get_ylim()[1] >= 1.22
    assert "95% Student-t" in fig._suptitle.get_text()


def test_weight_decay_left_by_the_schedule():
    pytest.importorskip("transformers")
    from duckling.sweeps.tuning import decay_left, lr_schedule, wd_for

    n = 2000
    linear = 1e-3 * (n - np.arange(n)) / n  # the Trainer's default: linear to 0, no warm-up
    assert lr_schedule(1e-3, n) == pytest.approx(linear)
    assert decay_left(1e-3, 0.1, n) == pytest.approx(np.prod(1 - linear * 0.1), rel=1e-12)
    assert decay_left(1e-4, 0.1, n) == pytest.approx(0.990, abs=5e-4)  # the old study: 1% at most
    assert decay_left(1e-3, wd_for(0.5, 1e-3, n), n) == pytest.approx(0.5, rel=1e-9)


def test_tuning_best_reads_held_out_losses_from_sweep_json(tmp_path, capsys):
    """`python -m duckling.sweeps.tuning best A B`: one optimizer's grid and its extension, merged; the
    lowest mean held-out loss wins, with its t interval, and the bracket is checked; it says which training
    rows the runs saw, and warns when they differ."""
    import json
    from pathlib import Path

    from duckling.sweeps import tuning

    def sweep(folder, losses):
        runs = [{"name": f"lr={lr}__seed={s}", "point": {"train.learning_rate": lr}, "seed": s,
                 "status": "complete" if loss is not None else "failed", "eval_loss": loss}
                for (lr, s), loss in losses.items()]
        folder.mkdir()
        (folder / "sweep.json").write_text(json.dumps({"runs": runs}))
        return str(folder)

    a = sweep(tmp_path / "grid", {(3e-4, 0): 4.30, (3e-4, 1): 4.26, (1e-3, 0): 4.37, (1e-3, 1): 4.36})
    assert tuning.main(["best", a]) == 0
    first = capsys.readouterr().out.split("\n")[0]
    assert "tuned lr 0.0003" in first and "NOT bracketed" in first
    b = sweep(tmp_path / "low", {(1e-4, 0): 4.40, (1e-4, 1): None})
    assert tuning.main(["best", a, b]) == 0
    out = capsys.readouterr().out
    assert "tuned lr 0.0003" in out and "4.28 [" in out and " bracketed" in out and "NOT" not in out
    assert "lr 0.0001   1/2 runs  4.4" in out
    assert "trained on: unknown" in out  # these runs have no run_info.json
    for folder, rows, sha in ((a, 977, "ab" * 32), (b, 185, "cd" * 32)):  # the data each run learned from
        for run in json.loads((Path(folder) / "sweep.json").read_text())["runs"]:
            (Path(folder) / run["name"]).mkdir()
            (Path(folder) / run["name"] / "run_info.json").write_text(json.dumps(
                {"dataset_fingerprint": {"rows": rows, "seq_len": 512, "sha256": sha}}))
    assert tuning.main(["best", a, b]) == 0
    out = capsys.readouterr().out
    assert "trained on: 977 rows (sha256 abababababab...) in 4 runs" in out
    assert "trained on: 185 rows" in out and "WARNING: the runs saw different training data" in out
    best = tuning.tuned_lr(tuning.tuning_table([a]))
    assert best["lr"] == 3e-4 and not best["bracketed"] and best["lo"] < 4.28 < best["hi"]
