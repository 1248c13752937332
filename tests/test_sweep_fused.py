"""`duckling sweep` fuses by itself (issue 21), without Ray: the spec's [resources] fuse, the groups the
engine plans (grid order, compatible runs, one phase, no fusing for --storage), the dry run's "fused group"
column, and a fused group's task body trained in this process into ordinary run folders.
The Ray side (a fused sweep end to end) is test_sweep.py::test_fused_sweep_*."""
from __future__ import annotations

import json

import numpy as np
import pytest

from duckling.config import N_LIVE
from duckling.errors import DucklingError
from duckling.sweeps import engine
from duckling.sweeps.place import Place
from duckling.sweeps.spec import load_spec

T = 32
ROWS = np.random.default_rng(0).integers(0, N_LIVE, size=(24, T), dtype=np.uint16)
EVAL = np.random.default_rng(1).integers(0, N_LIVE, size=(6, T), dtype=np.uint16)
BASE = {"model.n_layer": 1, "model.n_positions": T, "model.n_embd": 32, "model.n_inner": 64, "train.max_steps": 6,
        "train.save_steps": 3, "train.logging_steps": 3, "train.compile": False, "train.compute_dtype": "fp32",
        "record.probe_every": 2}


def spec(repo_root, grid=None, fuse=None, **base):
    return {"dataset": ROWS, "eval_dataset": EVAL, "mapping": str(repo_root / "token_mapping.json"),
            "base": {**BASE, **base}, "grid": grid or {"train.weight_decay": [0.0, 0.1], "seeds": [0, 1, 2]},
            "resources": {"cpus": 1, **({} if fuse is None else {"fuse": fuse})}}


def groups(s, out, gpus, storage=None):
    s = load_spec(s)
    place = Place(out=out) if storage is None else Place(storage=storage)
    manifest = {"runs": [{"name": r.name} for r in s.runs]}
    got = engine._groups(s, place, s.runs, gpus, manifest)
    return [[r.name for r in g] for g in got], manifest


def test_fuse_setting_is_validated_with_the_spec(repo_root):
    assert load_spec(spec(repo_root)).fuse == "auto"
    for ok in ("auto", "off", 1, 4):
        assert load_spec(spec(repo_root, fuse=ok)).fuse == ok
    for bad in (0, -2, 2.5, True, "on", "4"):
        with pytest.raises(DucklingError, match=r"\[resources\] fuse = .* is not valid: use \"auto\""):
            load_spec(spec(repo_root, fuse=bad))
    with pytest.raises(DucklingError, match="use cpus and gpus .* and fuse"):
        load_spec({**spec(repo_root), "resources": {"fusion": 2}})


def test_engine_plans_fused_groups(repo_root, tmp_path):
    names = [r.name for r in load_spec(spec(repo_root)).runs]  # wd 0 x seeds 0,1,2, then wd 0.1 x seeds 0,1,2
    # auto: off on CPU (gpus 0), one group of every compatible run on a GPU
    assert groups(spec(repo_root), tmp_path / "a", 0.0)[0] == [[n] for n in names]
    got, manifest = groups(spec(repo_root), tmp_path / "a", 0.25)
    assert got == [names]
    assert [e["group"] for e in manifest["runs"]] == [1] * 6
    # a device the config pins to the CPU is not fused by auto, whatever the cluster has
    assert len(groups(spec(repo_root, **{"train.device": "cpu"}), tmp_path / "a", 0.25)[0]) == 6
    # an explicit K fuses on CPU too, in grid order, in groups of at most K
    assert groups(spec(repo_root, fuse=4), tmp_path / "a", 0.0)[0] == [names[:4], names[4:]]
    got, manifest = groups(spec(repo_root, fuse="off"), tmp_path / "a", 0.25)
    assert got == [[n] for n in names] and all("group" not in e for e in manifest["runs"])
    # only compatible runs fuse: another optimizer is another group
    grid = {"train.optimizer": ["adamw", "sgd"], "train.learning_rate": [1e-3, 3e-3]}
    got = groups(spec(repo_root, grid=grid, fuse=8), tmp_path / "b", 0.0)[0]
    assert got == [["optimizer=adamw__learning_rate=0.001__seed=42", "optimizer=adamw__learning_rate=0.003__seed=42"],
                   ["optimizer=sgd__learning_rate=0.001__seed=42", "optimizer=sgd__learning_rate=0.003__seed=42"]]
    # only runs at one step fuse: a run resumed from checkpoint-3 is a group of its own
    ck = tmp_path / "c" / names[1] / "checkpoint-3"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    got, manifest = groups(spec(repo_root, fuse=8), tmp_path / "c", 0.0)
    assert got == [[names[0], *names[2:]], [names[1]]]
    assert [e.get("group") for e in manifest["runs"]] == [1, None, 1, 1, 1, 1]


def test_storage_sweeps_do_not_fuse(repo_root, tmp_path):
    assert groups(spec(repo_root), None, 0.25, storage=str(tmp_path / "st"))[0] == [[r.name] for r in
                                                                                   load_spec(spec(repo_root)).runs]
    with pytest.raises(DucklingError, match=r"fuse = 2 cannot be used with --storage.*fuse = \"off\""):
        engine.sweep(spec(repo_root, fuse=2), storage=str(tmp_path / "st"), dry_run=True, progress=False)
    assert not (tmp_path / "st").exists()


def test_dry_run_shows_the_fused_groups(repo_root, tok, tmp_path, capsys):
    from corpus import make_stories, write_corpus

    from duckling.cli import main
    from duckling.data.build import build_dataset

    write_corpus(tmp_path / "t.txt", make_stories(40, seed=0))  # a TOML spec names a dataset folder
    build_dataset(tmp_path / "t.txt", tok, tmp_path / "data", seq_len=T, progress=False)
    toml = tmp_path / "wd.toml"
    toml.write_text(f'dataset = "data"\nmapping = "{repo_root / "token_mapping.json"}"\n[base]\n'
                    '"train.max_steps" = 5\n"model.n_positions" = 32\n[grid]\n"train.weight_decay" = [0.0, 0.1, 0.2]\n'
                    '[resources]\nfuse = 2\n')
    capsys.readouterr()
    assert main(["sweep", str(toml), "--out", str(tmp_path / "plan"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training data: ") and " rows x 32 tokens from 40 stories of " in lines[0], lines
    lines = lines[1:]  # then the plan
    assert lines[0].split()[:4] == ["run", "status", "fused", "group"], lines
    assert [line.split()[2] for line in lines[1:]] == ["1", "1", "-"], lines
    assert not (tmp_path / "plan").exists()


def test_fused_group_task_trains_ordinary_run_folders_and_skips_complete_ones(repo_root, tmp_path):
    """The Ray task's body for a group of 2 (run here, no Ray): one result per member, each an ordinary,
    complete run folder (run_info names its fused group and its node); run again, it trains nothing."""
    from duckling.recording.reader import Recording
    from duckling.sweeps.task import run_state, run_task

    s = load_spec(spec(repo_root, grid={"train.weight_decay": [0.0, 0.1]}, fuse=2))
    members = [{"name": r.name, "path": str(tmp_path / r.name), "config": r.cfg.to_dict()} for r in s.runs]
    job = {**members[0], "mapping": s.mapping, "threads": 1, "sweep_id": "x", "storage": None, "members": members}
    res = run_task(job, s.dataset, s.eval_dataset, None)
    assert [r["name"] for r in res] == [r.name for r in s.runs]
    for r in res:
        assert r["status"] == "complete" and r["global_step"] == 6 and r["started_as"] == "fresh", r
        assert r["loss"] is not None and r["eval_loss"] is not None
        run = tmp_path / r["name"]
        assert run_state(run) == "complete" and Recording(run).steps.tolist() == list(range(7))
        info = json.loads((run / "run_info.json").read_text())
        assert info["fused"]["runs"] == [m["name"] for m in members] and info["nodes"][0]["step"] == 0
    assert res[0]["loss"] != res[1]["loss"]  # two runs, not one twice
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = run_task(job, s.dataset, s.eval_dataset, None)
    assert all(r["status"] == "complete" and r["skipped"] for r in again)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    bad = {**job, "members": [{**m, "config": {**m["config"], "model": {**m["config"]["model"], "n_embd": 48}}}
                              if i else m for i, m in enumerate(members)]}
    for m in bad["members"]:
        m["path"] = str(tmp_path / "bad" / m["name"])
    res = run_task(bad, s.dataset, s.eval_dataset, None)  # a bad input fails every member, with the reason
    assert [r["status"] for r in res] == ["failed", "failed"] and all("differs from run 0" in r["error"] for r in res)


def test_ctrl_c_leaves_every_member_of_a_fused_group_interrupted(tmp_path):
    """Ctrl-C cancels a fused group's one task: each member is "interrupted" (its folder has files), or
    "pending" when the group never started (no Ray here: a stand-in with cancel and wait)."""
    import sys
    import types

    class Run:
        def __init__(self, name):
            self.name = name

    events = []
    board = types.SimpleNamespace(event=lambda name, status, error: events.append((name, status)))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    refs = {object(): [Run("a"), Run("b")], object(): [Run("c"), Run("d")]}
    entries = {n: {"status": "running", "attempts": 1} for n in "abcd"}
    old = sys.modules.get("ray")
    sys.modules["ray"] = types.SimpleNamespace(cancel=lambda ref: None, wait=lambda *a, **k: ([], []))
    try:
        engine._cancel(refs, entries, board, tmp_path)
    finally:
        sys.modules.pop("ray") if old is None else sys.modules.__setitem__("ray", old)
    assert {n: e["status"] for n, e in entries.items()} == {"a": "interrupted", "b": "interrupted",
                                                             "c": "pending", "d": "pending"}
    assert events == [("a", "interrupted"), ("b", "interrupted"), ("c", "pending"), ("d", "pending")]
