"""Sweeps on a local Ray: a tiny 2 x 2-seed sweep equals the same runs made with train(), a rerun
trains nothing, a run whose worker dies is finished with no gap on rerun, and bad specs or a folder
of another spec are refused before anything runs. One Ray instance serves every test here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from duckling.errors import DucklingError
from duckling.sweeps.spec import load_spec, run_name

pytestmark = pytest.mark.xdist_group("sweep")  # its module fixtures are built once, on one worker

STEPS = 20
BASE = {"train.max_steps": STEPS, "train.save_steps": 10, "train.logging_steps": 5, "model.n_layer": 1,
        "model.n_positions": 64, "train.compile": False, "record.probe_every": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok, repo_root):
    """A tiny train / held-out dataset pair (64-token rows) and the mapping they were built with."""
    from corpus import make_stories, write_corpus

    from duckling.data.build import build_dataset

    root = tmp_path_factory.mktemp("sweepdata")
    for name, n, seed in (("train", 200, 0), ("valid", 40, 1)):
        write_corpus(root / f"{name}.txt", make_stories(n, seed=seed))
        build_dataset(root / f"{name}.txt", tok, root / name, seq_len=64, progress=False)
    return {"dataset": str(root / "train"), "eval_dataset": str(root / "valid"),
            "mapping": str(repo_root / "token_mapping.json")}


@pytest.fixture(scope="module")
def ray_up():
    from duckling.sweeps.engine import start_ray

    ray = pytest.importorskip("ray")
    started = start_ray()
    yield
    if started:
        ray.shutdown()


def spec(data, grid=None, **base):
    return {**data, "base": {**BASE, **base},
            "grid": {"train.weight_decay": [0.0, 0.1], "seeds": [0, 1]} if grid is None else grid, "resources": {"cpus": 1}}


def same_recording(a, b) -> bool:
    """Same recorded steps 0..STEPS and byte-identical data files (snapshots, per-row scalars, probes)."""
    from duckling.recording.reader import Recording

    ra, rb = Recording(a), Recording(b)
    files = sorted(p.name for p in ra.root.iterdir() if p.suffix != ".json")
    return (ra.steps.tolist() == rb.steps.tolist() == list(range(STEPS + 1)) and len(files) >= 3
            and files == sorted(p.name for p in rb.root.iterdir() if p.suffix != ".json")
            and all((ra.root / f).read_bytes() == (rb.root / f).read_bytes() for f in files))


@pytest.fixture(scope="module")
def tiny_sweep(data, ray_up, tmp_path_factory):
    from duckling.sweeps.engine import sweep

    out = tmp_path_factory.mktemp("sw") / "wd"
    return out, sweep(spec(data), out, progress=False)


@pytest.mark.slow
def test_sweep_runs_equal_direct_train_and_rerun_trains_nothing(tiny_sweep, data, tmp_path):
    from duckling.config import DucklingConfig
    from duckling.sweeps.engine import sweep
    from duckling.training.train import train

    out, df = tiny_sweep
    assert sorted(df["name"]) == sorted(["weight_decay=0__seed=0", "weight_decay=0__seed=1",
                                         "weight_decay=0.1__seed=0", "weight_decay=0.1__seed=1"])
    assert (df["status"] == "complete").all() and (df["global_step"] == STEPS).all()
    assert df["eval_loss"].notna().all() and df["loss"].notna().all()
    manifest = json.loads((out / "sweep.json").read_text())
    assert {r["name"]: r["overrides"] for r in manifest["runs"]}["weight_decay=0.1__seed=1"] == \
        {"train.weight_decay": 0.1, "train.seed": 1}
    for row in df.itertuples():  # each run is an ordinary run folder, bit-equal to train() with that config
        cfg = DucklingConfig.from_dict(json.loads((out / row.name / "config.json").read_text()))
        assert cfg == DucklingConfig().override({**BASE, **row.overrides, "train.threads": 1})
        direct = train(cfg, dataset=data["dataset"], run_dir=tmp_path / row.name, eval_dataset=data["eval_dataset"],
                       tokenizer=data["mapping"], progress=False)
        assert direct.global_step == STEPS
        assert same_recording(out / row.name, tmp_path / row.name), row.name

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("sweep.json", ".lock")}
    again = sweep(spec(data), out, progress=False)
    assert (again["status"] == "complete").all()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("sweep.json", ".lock")} == stamps


@pytest.mark.slow
def test_killed_worker_is_completed_with_no_gap_on_rerun(tiny_sweep, data, tmp_path):
    from transformers import TrainerCallback

    from duckling.sweeps.engine import sweep

    marker = tmp_path / "killed-once"

    class KillOnce(TrainerCallback):  # a local class: Ray pickles it by value
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 15 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker process dies, as on a kill -9 or an out-of-memory kill

    one = spec(data, grid={"train.weight_decay": [0.1], "seeds": [1]})
    out = tmp_path / "sweep"
    df = sweep(one, out, progress=False, max_retries=0, callbacks=[KillOnce()])
    assert marker.exists() and df["status"].tolist() == ["failed"]
    assert "died" in df["error"][0].lower() or "crash" in df["error"][0].lower(), df["error"][0]
    run = out / "weight_decay=0.1__seed=1"
    assert (run / "checkpoint-10").is_dir() and not (run / "final").exists()

    df = sweep(one, out, progress=False)
    assert df["status"].tolist() == ["complete"] and df["attempts"].tolist() == [2]
    assert len(json.loads((run / "run_info.json").read_text())["resumed"]) == 1  # resumed, not restarted
    ref = tiny_sweep[0] / "weight_decay=0.1__seed=1"
    assert same_recording(run, ref)  # steps 11..15 of the dead worker were replaced, nothing missing


@pytest.mark.slow
def test_fused_sweep_runs_are_ordinary_runs_of_their_own(tiny_sweep, data, tmp_path):
    """fuse = 2 on CPU: one Ray task trains 2 runs as one model; each ends complete in its own run folder
    (one manifest entry each), matches the same run of the unfused tiny_sweep to float rounding, and
    `compare` reads the sweep like any other."""
    from duckling.sweeps.compare import compare
    from duckling.sweeps.engine import sweep

    fused = {**spec(data, grid={"train.weight_decay": [0.0, 0.1], "seeds": [0]}), "resources": {"cpus": 1, "fuse": 2}}
    out = tmp_path / "fused"
    df = sweep(fused, out, progress=False)
    assert (df["status"] == "complete").all() and (df["global_step"] == STEPS).all() and (df["group"] == 1).all()
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["status"], r["attempts"], r["group"]) for r in runs] == [("complete", 1, 1)] * 2
    for row in df.itertuples():
        info = json.loads((out / row.name / "run_info.json").read_text())
        assert info["fused"]["runs"] == list(df["name"]) and info["node"]["host"] == row.host
        alone = tiny_sweep[1].set_index("name").loc[row.name]
        assert abs(row.eval_loss - alone["eval_loss"]) < 1e-3 * alone["eval_loss"], (row.eval_loss, alone["eval_loss"])
    table = compare(out, write=False, progress=False)  # (its files and figures: test_compare_table_and_figures)
    assert len(table) == 2 and (table["status"] == "complete").all() and table["eval_loss"].notna().all()


def test_bad_specs_are_refused_before_any_run(data, tmp_path):
    from duckling.sweeps.engine import sweep

    out = tmp_path / "never"
    cases = [
        (spec(data, **{"train.weight_dekay": 0.1}), "Unknown config field 'train.weight_dekay'"),
        (spec(data, grid={"train.learning_rate": [1e-3, -1.0]}), "train.learning_rate = -1.0 is not valid"),
        (spec(data, grid={}), "[grid] is empty"),
        (spec(data, grid={"train.weight_decay": []}), "empty list"),
        (spec(data, grid={"train.weight_decay": 0.1}), "must be a list"),
        (spec(data, grid={"model.n_head": [3]}), "must divide model.n_embd"),
        ({k: v for k, v in spec(data).items() if k != "dataset"}, "has no 'dataset'"),
        ({**spec(data), "resources": {"cpus": 0}}, "cpus = 0 is not valid"),
        ({**spec(data), "seed": 3}, "Unknown sweep spec key"),
    ]
    for bad, message in cases:
        with pytest.raises(DucklingError) as err:
            sweep(bad, out, progress=False, dry_run=True)  # a dry run validates exactly as a real one
        assert message in str(err.value), (message, str(err.value))
    assert not out.exists()


@pytest.mark.slow
def test_toml_spec_names_and_other_spec_refused(tiny_sweep, data, tmp_path):
    from duckling.sweeps.engine import sweep

    toml = tmp_path / "wd.toml"
    toml.write_text(f'dataset = "{data["dataset"]}"\nmapping = "{data["mapping"]}"\n[base]\n"train.max_steps" = 5\n'
                    '[grid]\n"train.learning_rate" = [1e-4, 0.003]\n"model.tie_word_embeddings" = [true, false]\n'
                    "seeds = [7]\n")
    s = load_spec(toml)
    assert [r.name for r in s.runs] == ["learning_rate=0.0001__tie_word_embeddings=true__seed=7",
                                        "learning_rate=0.0001__tie_word_embeddings=false__seed=7",
                                        "learning_rate=0.003__tie_word_embeddings=true__seed=7",
                                        "learning_rate=0.003__tie_word_embeddings=false__seed=7"]
    assert run_name({"model.dropout": 0.0, "train.dropout": 1}, 0) == "model.dropout=0__train.dropout=1__seed=0"
    plan = sweep(toml, tmp_path / "plan", dry_run=True, progress=False)
    assert len(plan) == 4 and not (tmp_path / "plan").exists()

    out = tiny_sweep[0]
    with pytest.raises(DucklingError, match="another spec"):
        sweep(toml, out, dry_run=True, progress=False)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(DucklingError, match="not a sweep folder"):
        sweep(toml, tmp_path / "stuff", progress=False)


@pytest.mark.slow
def test_compare_table_and_figures(tiny_sweep):
    from duckling.sweeps.compare import compare

    out = tiny_sweep[0]
    table = compare(out, progress=False)
    assert len(table) == 4 and (table["status"] == "complete").all()
    assert table["train_loss"].notna().all() and table["eval_loss"].notna().all()
    assert table["dead_norm_over_null"].between(0.5, 2).all()
    for col in ("update_measured_over_rule", "detect_auroc_cos_mean", "magikarp_auroc"):  # the study's columns
        assert table[col].notna().all(), col
    for _, row in table.iterrows():  # flattened from the nested detect_first_step_separable of each summary
        sep = json.loads((out / row["name"] / "report" / "summary.json").read_text())["detect_first_step_separable"]
        for k in ("norm", "pc1"):
            want = sep[k]["opposite"]["step"]
            got = row[f"sep_step_{k}_opposite"]
            assert (want is None and np.isnan(got)) or got == want
    assert sorted(table.attrs["files"]) == sorted(["compare.csv", "compare.md", "compare_differences.csv",
                                                   "compare_weight_decay.png", "compare_norms.png"])
    for f in table.attrs["files"]:
        assert (out / f).stat().st_size > 0
    md = (out / "compare.md").read_text()
    assert "| train.weight_decay | seeds |" in md and "weight_decay=0.1__seed=1" in md
    from duckling.sweeps.compare import short_table

    short = short_table(table)  # what `duckling compare` prints: a few columns, every run, no NaN
    assert short.splitlines()[0].split()[:2] == ["run", "status"] and "held-out loss" in short.splitlines()[0]
    assert all(row["name"] in short for _, row in table.iterrows()) and "nan" not in short.lower()
    assert max(len(line) for line in short.splitlines()) < 120
    summary = out / "weight_decay=0__seed=0" / "report" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    compare(out, write=False, progress=False)  # reports are computed once
    assert summary.stat().st_mtime_ns == stamp


def test_dry_run_table_shows_no_none_and_the_board_says_pending(data, tmp_path, capsys):
    """What a user sees without Ray: the plan's table has "-" where no loss exists yet, and a run that
    Ctrl-C caught before it started is "pending" again (one that started is "interrupted")."""
    import sys
    import types

    from duckling.cli import main
    from duckling.sweeps import engine

    toml = tmp_path / "wd.toml"
    toml.write_text(f'dataset = "{data["dataset"]}"\nmapping = "{data["mapping"]}"\n[base]\n"train.max_steps" = 5\n'
                    '[grid]\n"train.weight_decay" = [0.0, 0.1]\n')
    assert main(["sweep", str(toml), "--out", str(tmp_path / "plan"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "nan" not in out.lower() and out.count(" -") >= 6, out
    first, header = out.splitlines()[:2]  # what the runs would learn from, said before anything trains
    assert first.startswith(f"training data: {data['dataset']}: ") and first.endswith(
        " rows x 64 tokens from 200 stories of " + str(Path(data["dataset"]).parent / "train.txt")), out
    assert header.split()[:2] == ["run", "status"]

    class Run:
        def __init__(self, name):
            self.name = name

    class Board:
        def __init__(self):
            self.events = []

        def event(self, name, status, error):
            self.events.append((name, status))

    (tmp_path / "sw" / "started").mkdir(parents=True)
    (tmp_path / "sw" / "started" / "config.json").write_text("{}")  # a run that began (no checkpoint yet)
    refs = {object(): Run("never"), object(): Run("started")}
    entries = {"never": {"status": "queued", "attempts": 0}, "started": {"status": "running", "attempts": 1}}
    fake_ray = types.SimpleNamespace(cancel=lambda ref: None, wait=lambda *a, **k: ([], []))
    board = Board()
    old = sys.modules.get("ray")
    sys.modules["ray"] = fake_ray
    try:
        engine._cancel(refs, entries, board, tmp_path / "sw")
    finally:
        sys.modules.pop("ray") if old is None else sys.modules.__setitem__("ray", old)
    assert entries == {"never": {"status": "pending", "attempts": 0},
                       "started": {"status": "interrupted", "attempts": 1}}
    assert board.events == [("never", "pending"), ("started", "interrupted")]
    from duckling.sweeps.place import Place

    assert engine._resume_command("my sweeps/wd.toml", Place(out=tmp_path)) == \
        f"duckling sweep 'my sweeps/wd.toml' --out {tmp_path}"


def test_huge_grid_refused_at_once_with_its_size(data, tmp_path):
    """A 9.6M-run grid is refused from the product of its list lengths, before anything is expanded."""
    import time

    from duckling.sweeps.spec import MAX_RUNS

    grid = {"train.learning_rate": [1e-5 * (i + 1) for i in range(400)], "train.weight_decay": [i / 1e3 for i in range(400)],
            "seeds": list(range(60))}
    t0 = time.process_time()
    with pytest.raises(DucklingError) as err:
        load_spec(spec(data, grid=grid))
    assert time.process_time() - t0 < 2  # CPU time of this process: the check never expands the grid
    msg = str(err.value)
    assert "9,600,000 runs" in msg and "400 train.learning_rate x 400 train.weight_decay x 60 seeds" in msg
    assert f"at most {MAX_RUNS:,}" in msg
    ok = {"train.weight_decay": [0.0, 0.1], "seeds": list(range(MAX_RUNS // 2 + 1))}  # just over the limit
    with pytest.raises(DucklingError, match=f"{MAX_RUNS + 2:,} runs"):
        load_spec(spec(data, grid=ok))


def test_out_that_is_a_file_and_a_dead_drivers_statuses(data, tmp_path):
    from duckling.sweeps import engine

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        with pytest.raises(DucklingError, match="is a file, not a folder"):
            engine.sweep(spec(data), out, progress=False, dry_run=True)
    # a driver that died (kill -9) left "queued" / "running": with its lock gone, they are read from disk
    from duckling.files import folder_lock, holder
    from duckling.sweeps.place import Place

    out = tmp_path / "sw"
    grid = {"train.weight_decay": [0.0, 0.1, 0.2]}
    place = Place(out=out)
    manifest = engine._open_folder(load_spec(spec(data, grid=grid)), place, dry_run=False)
    for e, st in zip(manifest["runs"], ("queued", "running", "complete")):
        e["status"] = st
    place.write_manifest(manifest)
    (out / manifest["runs"][1]["name"]).mkdir()
    (out / manifest["runs"][1]["name"] / "config.json").write_text("{}")
    plan = engine.sweep(spec(data, grid=grid), out, progress=False, dry_run=True)
    assert plan["status"].tolist() == ["pending", "interrupted", "pending"]  # complete: not on disk
    with folder_lock(out):  # while a driver holds the folder, a second one is refused
        assert holder(out) is None  # (this process holds it: re-entrant, so ask as another driver would)
        import subprocess
        import sys

        code = ("import sys; from duckling.sweeps.engine import driver_lock; from duckling.sweeps.place import Place\n"
                f"with driver_lock(Place(out={str(out)!r})): pass")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "being run by another sweep driver" in r.stderr, r.stderr


def test_resources_no_node_can_hold_are_refused_naming_the_largest_node():
    import types

    from duckling.sweeps.cluster import check_resources

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 8.0}},
             {"Alive": False, "Resources": {"CPU": 128.0, "GPU": 8.0}}]
    fake = types.SimpleNamespace(nodes=lambda: nodes)
    check_resources(fake, 8, 0)
    with pytest.raises(DucklingError) as err:
        check_resources(fake, 64, 0)
    assert "64 CPUs" in str(err.value) and "largest of its 2 nodes has 8 CPUs and no GPU" in str(err.value)
    assert "cpus to at most 8" in str(err.value) and "Nothing was submitted" in str(err.value)
    with pytest.raises(DucklingError, match="Set \\[resources\\] gpus = 0 \\(train on CPU\\)"):
        check_resources(fake, 1, 1)



class _SlowSteps:
    """A progress actor that takes seconds to answer, as a new actor does while its process starts."""

    def start(self, name, where):
        import time
        time.sleep(3.0)

    def ping(self):
        return True


def test_a_run_waiting_on_the_progress_actor_keeps_its_cpu(ray_up):
    """Ray lends the CPU of a task blocked in ray.get to its next task: a run announcing itself that way
    let a third run start on a 2-core machine. A task that holds every CPU and announces itself to a
    slow actor must keep them: Ray's free CPU, sampled while it waits, stays 0."""
    import sys
    import time

    import ray
    from ray import cloudpickle

    from duckling.sweeps.task import announce

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import tests/
    try:
        actor = ray.remote(_SlowSteps).options(num_cpus=0).remote()

        def body():
            t0 = time.time()
            announce(actor, ["run"], {"host": "here"}).set()
            return t0, time.time()

        ref = ray.remote(body).options(num_cpus=ray.cluster_resources()["CPU"]).remote()
        samples = []
        while not ray.wait([ref], timeout=0.1)[0]:
            samples.append((time.time(), ray.available_resources().get("CPU", 0.0)))
        t0, t1 = ray.get(ref)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    waiting = [cpu for t, cpu in samples if t0 + 0.5 < t < t1 - 0.3]  # Ray's view lags ~0.1 s
    assert len(waiting) >= 10 and max(waiting) == 0, samples
