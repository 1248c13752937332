"""The notebooks: their helper module (``duckling.notebook``) and every notebook run end to end.

Each notebook runs under papermill with tiny injected parameters (1 layer, 64-token context, a few
steps, ~60 stories), from ``notebooks/`` as jupyter lab would, writing only under tmp_path; the
tests then check what it produced. One tiny dataset is built once and shared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import make_stories, shared_stories, write_corpus
from duckling import notebook as nb
from duckling.config import N_LIVE, DucklingConfig
from duckling.errors import DucklingError

T = 64  # context of every tiny notebook run
TINY = {"model.n_positions": T, "model.n_layer": 1}  # config overrides of every tiny training


# ---------------------------------------------------------------- shared tiny data
@pytest.fixture(scope="session")
def tiny(tmp_path_factory, repo_root):
    """A 60-story corpus, 20 held-out stories and their 64-token dataset (built once)."""
    from duckling.data.build import build_dataset
    from duckling.data.vocab import CompactTokenizer

    try:
        tok = CompactTokenizer.from_file(repo_root / "token_mapping.json")
    except DucklingError as e:  # no offline tiktoken cache on this machine
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("tiny")
    train = write_corpus(d / "train.txt", shared_stories("train", 60) or make_stories(60))
    valid = write_corpus(d / "valid.txt", shared_stories("train", 20, skip=60) or make_stories(20, seed=1))
    build_dataset(train, tok, d / "dataset", seq_len=T, progress=False)
    return {"dir": d, "DATA": str(train), "VALID_DATA": str(valid), "DATASET_DIR": str(d / "dataset"), "tok": tok}


def run_notebook(repo_root, tmp_path, name: str, **params) -> dict:
    """Execute notebooks/<name>.ipynb with ``params`` from notebooks/ (as jupyter lab does)."""
    pm = pytest.importorskip("papermill")
    out = tmp_path / f"{name}.out.ipynb"
    pm.execute_notebook(str(repo_root / "notebooks" / f"{name}.ipynb"), str(out), parameters=params,
                        cwd=str(repo_root / "notebooks"), kernel_name="python3", progress_bar=False)
    executed = json.loads(out.read_text())
    text = outputs_text(executed)  # committed outputs must name no folder of the machine they ran on
    assert str(repo_root) not in text and "site-packages" not in text, text[:2000]
    return executed


def outputs_text(executed: dict) -> str:
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def n_tables(executed: dict) -> int:
    """DataFrames shown (their HTML carries pandas' class)."""
    return sum('class="dataframe"' in "".join(o.get("data", {}).get("text/html", "")) for c in executed["cells"]
               if c["cell_type"] == "code" for o in c.get("outputs", []))


def n_images(executed: dict) -> int:
    return sum("image/png" in o.get("data", {}) for c in executed["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Kernels use one torch thread: tiny models gain nothing from more, and on a busy 2-core
    machine (CI, or the tests beside other work) spinning threads made steps ~20x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------- helper module
def test_paths_resolve_from_notebooks_root_and_copies(repo_root, tmp_path, monkeypatch):
    (repo_root / "notebooks").is_dir() or pytest.skip("no notebooks/ folder")
    for cwd in (repo_root, repo_root / "notebooks", repo_root / "duckling"):  # a copy of 07 anywhere in the repo
        monkeypatch.chdir(cwd)
        assert nb.repo_root() == repo_root
        p = nb.path(None, DucklingConfig().data.dataset_dir)
        assert not p.is_absolute() and (cwd / p).resolve() == repo_root / "tokenized_dataset"
        assert (cwd / nb.path("token_mapping.json")).resolve() == repo_root / "token_mapping.json"
    monkeypatch.chdir(repo_root / "notebooks")
    assert str(nb.path("../pyproject.toml")) == "../pyproject.toml"  # from the working directory, as written
    assert nb.path(tmp_path) == tmp_path and nb.path(None) is None
    for p in ("runs/new/deeper/x.json", "token_mapping.json", "../pyproject.toml", "../runs/y"):
        assert nb.path(nb.path(p)) == nb.path(p)  # idempotent, also for files that do not exist yet
    assert (repo_root / "notebooks" / nb.path("runs/new/x.json")).resolve() == repo_root / "runs/new/x.json"
    run = nb.new_run_dir("exp")
    assert run.parent.resolve() == repo_root / "runs" and run.name.startswith("exp-") and not run.exists()


def test_data_parameter_and_missing_paths(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root / "notebooks")
    assert nb.source(None) is None and nb.source("sample") == "sample"  # the hub / the bundled text: as they are
    assert (repo_root / "notebooks" / nb.source("token_mapping.json")).resolve() == repo_root / "token_mapping.json"
    with pytest.raises(DucklingError) as e:  # names the absolute paths it looked at
        nb.source("no_such_corpus.txt")
    assert str(repo_root / "no_such_corpus.txt") in str(e.value)  # the repo root...
    assert str(repo_root / "notebooks" / "no_such_corpus.txt") in str(e.value)  # ...and the notebook's folder
    assert nb.path("no_such_corpus.txt") == nb.path("no_such_corpus.txt", must_exist=False)  # only inputs must exist


def test_every_notebook_parameter_cell_is_a_valid_config(repo_root):
    """OVERRIDES in every committed parameters cell goes through the config's own checks: a renamed or
    misspelt field, or a bad value, fails here rather than after minutes of a notebook run."""
    for p in sorted((repo_root / "notebooks").glob("0*.ipynb")):
        cell = next(c for c in json.loads(p.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
        params: dict = {}
        exec("".join(cell["source"]), {}, params)
        if p.name[:2] in ("01",):  # counts tokens only: no config to override
            assert "OVERRIDES" not in params, p.name
            continue
        assert isinstance(params["OVERRIDES"], dict), p.name
        DucklingConfig().override(params["OVERRIDES"])
        assert not {"STEPS", "CONTEXT", "MODEL", "TRAIN", "RECORD", "DEVICE"} & set(params), p.name  # old knobs
    with pytest.raises(DucklingError, match="train.max_steps"):
        DucklingConfig().override({"train.max_step": 5})


def test_smooth_plot_and_json(tmp_path):
    import pandas as pd

    assert np.allclose(nb.smooth([1, 3, 5, 7, 9], 3), [1, 3, 5, 7, 9])  # a line stays put: no lag
    assert np.allclose(nb.smooth([0, 3, 0, 3, 0], 3), [0, 1, 2, 1, 0])
    f = nb.save_json(tmp_path / "x" / "r.json", {"v": np.float32(1.5), "n": float("nan"), "a": np.arange(2), 3: tmp_path,
                                                 "t": pd.DataFrame([{"a": 1, "b": np.nan}])})
    assert json.loads(f.read_text()) == {"v": 1.5, "n": None, "a": [0, 1], "3": tmp_path.as_posix(),
                                         "t": [{"a": 1, "b": None}]}
    assert [nb._cell(x) for x in (0.123456, 2000.0, 283648.0, float("nan"))] == ["0.1235", "2,000", "283,648", "nan"]
    fig = nb.plot_curves({"x": ([1, 2], [3, 4])}, hline=(1, "ref"))
    assert len(fig.axes[0].lines) == 2


# ---------------------------------------------------------------- the notebooks
@pytest.mark.slow
def test_01_token_frequency(repo_root, tmp_path, tiny):
    res = tmp_path / "01.json"
    out = run_notebook(repo_root, tmp_path, "01_token_frequency", DATA="sample",  # the bundled text, by name
                       VALID_DATA=tiny["VALID_DATA"], RESULTS=str(res))
    r = json.loads(res.read_text())
    assert r["data"] == "sample" and r["n_stories"] == 500 and r["n_tokens"] > 500 * 20
    need = [r["min_vocab"][k] for k in sorted(r["min_vocab"], key=float)]
    assert need == sorted(need) and 1 <= need[0] and need[-1] <= r["distinct_tokens"]
    assert r["live_coverage"]["this corpus"] > 0.95 and 0.5 < r["live_coverage"]["held-out text"] <= 1
    assert n_images(out) == 1 and n_tables(out) == 3


@pytest.mark.slow
def test_02_build_tokenizer_and_dataset(repo_root, tmp_path, tiny):
    from duckling.data.build import check_no_dead, load_dataset_dir

    mapping, ds_dir = tmp_path / "mapping.json", tmp_path / "ds"
    out = run_notebook(repo_root, tmp_path, "02_build_tokenizer_and_dataset", DATA=tiny["DATA"],
                       MAPPING_OUT=str(mapping), DATASET_DIR=str(ds_dir), OVERRIDES={"model.n_positions": T},
                       N_EXAMPLES=2)
    from duckling.data.vocab import CompactTokenizer

    built = CompactTokenizer.from_file(mapping)  # validates the file
    assert built.provenance["n_stories"] == 60 and built.hash != tiny["tok"].hash
    ds = load_dataset_dir(ds_dir, tiny["tok"], fmt=None)  # built with the committed mapping
    assert check_no_dead(ds, N_LIVE, T)["n_rows"] == len(ds) > 10
    assert "exact round trip: True" in outputs_text(out) and n_images(out) == 1 and n_tables(out) == 1


@pytest.mark.slow
def test_03_bf16_check(repo_root, tmp_path, tiny):
    res = tmp_path / "03.json"
    out = run_notebook(repo_root, tmp_path, "03_bf16_check", DATA=tiny["DATA"], DATASET_DIR=tiny["DATASET_DIR"],
                       OVERRIDES={**TINY, "train.max_steps": 6, "train.logging_steps": 2}, RESULTS=str(res))
    r = json.loads(res.read_text())
    for run in ("mixed", "bf16_model"):
        assert r[run]["steps"] == [2, 4, 6] and all(2 < x < 10 for x in r[run]["loss"]) and r[run]["steps_per_s"] > 0
    assert r["mixed"]["loss"] != r["bf16_model"]["loss"]
    assert "refused: " in outputs_text(out) and n_images(out) == 1


@pytest.mark.slow
def test_04_layer_sweep(repo_root, tmp_path, tiny):
    """Through the sweep engine (local Ray, 1 CPU per run): one run folder per depth, compared."""
    res, sweep_dir = tmp_path / "04.json", tmp_path / "sweep04"
    out = run_notebook(repo_root, tmp_path, "04_layer_sweep", DATASET_DIR=tiny["DATASET_DIR"],
                       VALID_DATA=tiny["VALID_DATA"], VALID_DATASET_DIR=str(tmp_path / "valid"), LAYERS=[1, 2],
                       CPUS=1, SWEEP_DIR=str(sweep_dir), RESULTS=str(res),
                       OVERRIDES={"model.n_positions": T, "train.max_steps": 6, "train.logging_steps": 2,
                                  "record.every": 2})
    r = json.loads(res.read_text())
    rows = r["table"]
    assert r["steps"] == 6 and [row["layers"] for row in rows] == [1, 2] and rows[0]["speed vs first"] == 1
    assert rows[1]["parameters"] > rows[0]["parameters"]
    assert all(2 < row["loss"] < 10 and 2 < row["eval loss"] < 10 and row["steps/s"] > 0 for row in rows)
    assert all(c["steps"] == [2, 4, 6] for c in r["curves"].values())
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [e["status"] for e in manifest["runs"]] == ["complete", "complete"]
    for n in (1, 2):  # ordinary run folders, with the notebook's overrides and a recording
        run = sweep_dir / f"n_layer={n}__seed=42"
        c = json.loads((run / "config.json").read_text())
        assert c["model"]["n_layer"] == n and c["model"]["n_positions"] == T and c["record"]["every"] == 2
        assert (run / "recording").is_dir() and (run / "report" / "summary.json").is_file()
    assert (sweep_dir / "compare.csv").is_file() and n_images(out) == 3 and n_tables(out) == 2
    from duckling.data.build import load_dataset_dir

    assert len(load_dataset_dir(tmp_path / "valid", tiny["tok"], fmt=None)[0]["input_ids"]) == T  # held out, T-token rows


@pytest.mark.slow
def test_05_batch_sweep(repo_root, tmp_path, tiny):
    """Through the sweep engine: the same steps per batch size, loss per step and per second."""
    res, sweep_dir = tmp_path / "05.json", tmp_path / "sweep05"
    out = run_notebook(repo_root, tmp_path, "05_batch_sweep", DATASET_DIR=tiny["DATASET_DIR"], VALID_DATASET_DIR=None,
                       BATCH_SIZES=[1, 4], CPUS=1, SWEEP_DIR=str(sweep_dir), RESULTS=str(res),
                       OVERRIDES={**TINY, "train.max_steps": 10, "train.lr_scheduler_type": "constant",
                                  "train.logging_steps": 2, "record.every": 5})
    r = json.loads(res.read_text())
    assert [row["batch"] for row in r["table"]] == [1, 4]
    for row in r["table"]:
        assert row["steps"] == 10 and row["tokens seen"] == 10 * row["batch"] * T and row["eval loss"] is None
        assert row["tokens/s"] == pytest.approx(row["steps/s"] * row["batch"] * T) and 2 < row["loss"] < 10
        assert row["seconds"] == pytest.approx(10 / row["steps/s"])
    t_eq = min(row["seconds"] for row in r["table"])
    col = next(k for k in r["table"][0] if k.startswith("loss at "))
    assert col == f"loss at {t_eq:.0f}s" and all(2 < row[col] < 10 for row in r["table"])
    for name, c in r["curves"].items():
        assert c["steps"] == [2, 4, 6, 8, 10] and c["seconds"] == sorted(c["seconds"]) and len(c["loss"]) == 5
        c = json.loads((sweep_dir / name / "config.json").read_text())
        assert c["train"]["lr_scheduler_type"] == "constant" and c["model"]["n_layer"] == 1
    assert n_images(out) == 3 and n_tables(out) == 2


@pytest.mark.slow
def test_06_long_run(repo_root, tmp_path, tiny):
    run = tmp_path / "run06"
    run_notebook(repo_root, tmp_path, "06_long_run", DATA=tiny["DATA"], DATASET_DIR=tiny["DATASET_DIR"],
                 VALID_DATA=tiny["VALID_DATA"], VALID_DATASET_DIR=str(tmp_path / "valid"), EVAL_ROWS=8,
                 OVERRIDES={**TINY, "train.max_steps": 6, "train.logging_steps": 2, "train.eval_steps": 3,
                            "record.enabled": False},
                 RUN_DIR=str(run), PROMPTS=["Once upon a time"], MAX_NEW_TOKENS=8, PROGRESS=False)
    r = json.loads((run / "results.json").read_text())
    assert r["steps"] == 6 and r["loss"]["steps"] == [2, 4, 6] and r["eval_loss"]["steps"] == [3, 6]
    assert (run / "final" / "model.safetensors").is_file() and not (run / "recording").exists()
    assert json.loads((run / "config.json").read_text())["model"]["n_positions"] == T  # OVERRIDES reached the run
    g = r["generations"][0]
    assert g["prompt"] == "Once upon a time" and g["greedy"] and g["sampled"]


@pytest.mark.slow
def test_07_experiment_template(repo_root, tmp_path, tiny):
    run = tmp_path / "run07"
    out = run_notebook(repo_root, tmp_path, "07_experiment_template", DATA=tiny["DATA"],
                       DATASET_DIR=tiny["DATASET_DIR"], RUN_DIR=str(run), POINTS=4, PROGRESS=False,
                       OVERRIDES={**TINY, "train.max_steps": 6, "record.dtype": "mixed"})
    from duckling.recording.reader import Recording

    rec = Recording(run)
    assert rec.steps.tolist() == list(range(7)) and len(rec.dead_ids) == 2048
    assert json.loads((run / "config.json").read_text())["record"]["dtype"] == "mixed"
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["last_snapshot_step"] == 6 and 0.5 < summary["dead_norm_over_null"] < 2
    assert all((run / "report" / f).is_file() for f in summary["figures"]) and len(summary["figures"]) >= 7
    assert n_images(out) == 4 and n_tables(out) == 1  # norms, trajectories, collapse, detectability inline


@pytest.mark.slow
def test_08_dead_token_study(repo_root, tmp_path, tiny):
    """Two tied optimizers at given lrs x one decay level x one seed, the AdamW 1e-4 reference and the untied
    control, through the sweep engine; the table, figures, differences and findings from duckling.sweeps."""
    res, sweep_dir = tmp_path / "08.json", tmp_path / "sweep08"
    out = run_notebook(repo_root, tmp_path, "08_dead_token_study", DATASET_DIR=tiny["DATASET_DIR"],
                       VALID_DATA=tiny["VALID_DATA"], VALID_DATASET_DIR=str(tmp_path / "valid"),
                       OPTIMIZERS=["adamw", "coupled_adam"], LEARNING_RATES={"adamw": 1e-3, "coupled_adam": 1e-3},
                       KEPT=[0.9], SEEDS=[0], CPUS=1, SWEEP_DIR=str(sweep_dir), RESULTS=str(res),
                       OVERRIDES={**TINY, "train.max_steps": 6, "train.logging_steps": 2, "record.every": 2,
                                  "train.save_steps": 100, "train.eval_steps": 100})
    r = json.loads(res.read_text())
    assert [round(p["kept"], 2) for p in r["plan"]] == [0.9, 0.9]  # the decay leaves 90% over the 6 steps
    rows = {(row["optimizer"], row["learning rate"], row["embeddings"]): row for row in r["table"]}
    assert set(rows) == {("adamw", 1e-3, "tied"), ("coupled_adam", 1e-3, "tied"), ("adamw", 1e-4, "tied"),
                         ("adamw", 1e-3, "untied, input (wte)"), ("adamw", 1e-3, "untied, output (lm_head)")}
    assert float(rows[("adamw", 1e-3, "untied, input (wte)")]["Q1 norm / null"]) == pytest.approx(1.0, abs=1e-3)
    assert len(r["findings"]) == 5 and all("(Q4)" in f for f in r["findings"])
    assert {d["method"] for d in r["differences"]} == {"paired t"} and len(r["differences"]) > 0
    for name in ("adamw", "coupled_adam", "reference", "untied"):
        assert [e["status"] for e in json.loads((sweep_dir / name / "sweep.json").read_text())["runs"]] == ["complete"]
    assert n_images(out) == 4 and n_tables(out) == 7  # Q1, Q2, by frequency, every measure; three study tables
    _collected_study_reads_back(repo_root, sweep_dir, tmp_path / "committed")


def _collected_study_reads_back(repo_root, sweep_dir, into):
    """docs/results/study/figures.py: `collect` copies each run's config, summary and curves (no recording, no
    machine path); the tables from those files are load()'s, and the figures and tables are written."""
    import importlib.util

    import pandas as pd

    from duckling.sweeps.study import curves, load, load_runs, study_table

    spec = importlib.util.spec_from_file_location("study_figures", repo_root / "docs/results/study/figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    figures.main(["collect", *[str(sweep_dir / n) for n in ("adamw", "coupled_adam", "reference", "untied")],
                  "--out", str(into)])
    runs = sorted(p.name for p in (into / "runs").iterdir())
    assert [r.split("weight_decay=")[0] for r in runs] == ["adamw__", "coupled_adam__", "reference__seed=0",
                                                          "untied__seed=0"], runs
    for d in (into / "runs").iterdir():
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "curves.csv", "summary.json"]
        assert str(sweep_dir) not in (d / "config.json").read_text() + (d / "summary.json").read_text()
    direct = pd.concat([load(sweep_dir / n) for n in ("adamw", "coupled_adam", "reference", "untied")])
    pd.testing.assert_frame_equal(study_table(load_runs(into / "runs")).sort_values(["optimizer", "learning rate",
                                  "embeddings"]).reset_index(drop=True),
                                  study_table(direct).sort_values(["optimizer", "learning rate", "embeddings"])
                                  .reset_index(drop=True))
    run = sweep_dir / "adamw" / json.loads((sweep_dir / "adamw" / "sweep.json").read_text())["runs"][0]["name"]
    c = curves(into / "runs" / f"adamw__{run.name}")
    pd.testing.assert_frame_equal(c, curves(run), atol=1e-5)  # the committed curves are the recording's
    assert c["step"].tolist() == [0, 4, 6] and (c["null_norm"] > 0).all()
    figures.main(["--out", str(into)])
    assert all((into / f).is_file() for f in ("study.md", "differences.md", "findings.md", "runs.csv",
                                              "study_norms.png", "study_update_rule.png", "study_frequency.png"))
    _collected_study_errors(figures, sweep_dir, run, into)


def _collected_study_errors(figures, sweep_dir, run, into):
    """A collected run with a file missing or broken: an error that names it (figures.py prints it as one
    line); a collect that fails (a run whose recording is gone) leaves no half-written run folder;
    collecting again replaces."""
    import shutil

    broken = into.parent / "broken"
    shutil.copytree(into / "runs", broken / "runs")
    names = sorted(p.name for p in (broken / "runs").iterdir())
    (broken / "runs" / names[0] / "config.json").unlink()
    with pytest.raises(DucklingError, match=rf"{names[0]}/config.json cannot be read \(No such file"):
        figures.main(["--out", str(broken)])
    shutil.rmtree(broken / "runs" / names[0])
    (broken / "runs" / names[1] / "summary.json").write_text('{"eval_loss": ')
    with pytest.raises(DucklingError, match=rf"{names[1]}/summary.json cannot be read \(Expecting value"):
        figures.main(["--out", str(broken)])
    lone = into.parent / "lone" / f"adamw__{run.name}"
    shutil.copytree(run, lone, ignore=shutil.ignore_patterns("recording"))
    with pytest.raises(DucklingError, match="recording"):
        figures.main(["collect", str(lone), "--out", str(into.parent / "failed")])
    assert [p.name for p in (into.parent / "failed").rglob("*")] in ([], ["runs"])  # no run, no temporary folder
    with pytest.raises(DucklingError, match="is a collected run already"):
        figures.main(["collect", str(into / "runs" / lone.name), "--out", str(broken)])
    (into.parent / "a-file").write_text("")  # a folder that cannot be made: one line, no traceback
    p = subprocess.run([sys.executable, figures.__file__, "collect", str(lone), "--out", str(into.parent / "a-file")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == 1 and p.stderr.startswith("figures.py: error: ") and p.stderr.count("\n") == 1, p.stderr
    before = (into / "runs" / lone.name / "curves.csv").read_text()
    figures.main(["collect", str(sweep_dir / "adamw"), "--out", str(into)])
    assert (into / "runs" / lone.name / "curves.csv").read_text() == before and not list((into / "runs").glob(".*"))


def test_committed_notebooks_follow_the_rules(repo_root):
    """Imports first, then one `parameters` cell; no papermill-injected cell left behind (it would
    override a user's parameters on "Run all"); small; no machine paths in the outputs or the metadata; the helper
    functions that moved into the package are not called any more."""
    paths = sorted((repo_root / "notebooks").glob("0*.ipynb"))
    assert [p.name[:2] for p in paths] == ["01", "02", "03", "04", "05", "06", "07", "08"]
    gone = ("nb.make_config", "nb.overrides", "nb.prepare_data", "nb.text_rows", "nb.build_mapping",
            "nb.load_tokenizer", "nb.Table")
    for p in paths:
        raw = p.read_text(encoding="utf-8")
        cells, meta = json.loads(raw)["cells"], json.loads(raw)["metadata"]
        pm = meta.get("papermill", {})  # papermill records where it read and wrote: that machine's paths
        assert not {"input_path", "output_path"} & set(pm), f"{p.name}: strip papermill's input_path/output_path"
        assert not any(s in json.dumps(meta) for s in ("/work/", "/tmp/", "/root/", "/home/")), p.name
        code = [c for c in cells if c["cell_type"] == "code"]
        tags = [c["metadata"].get("tags", []) for c in code]
        assert "import duckling.notebook as nb" in "".join(code[0]["source"]), p.name
        assert "parameters" in tags[1] and sum("parameters" in t for t in tags) == 1, p.name
        assert not any("injected-parameters" in t for t in tags), f"{p.name}: delete the injected-parameters cell"
        assert not [g for g in gone if any(g in "".join(c["source"]) for c in code)], p.name
        assert len(raw) < 1_000_000, p.name
        text = outputs_text({"cells": cells})
        assert not any(s in text for s in ("/work/", "/tmp/", "/root/", "/home/")), p.name
