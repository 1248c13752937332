"""Fused groups (issue 21): K runs trained as one model under one Trainer step, each still its own run.

Tiny Duckling (1 layer, d = 32, 32 tokens), float32 on CPU, 6 steps, random live ids. The tolerance
for K > 1: each run gets its separate run's masks, batches, update rule and clipping, but the fused
forward sums in other kernels (batched matmuls, its own attention and loss) than GPT2LMHeadModel, so
its gradients differ in float rounding. The weights are compared by their change from the
initialisation: ||dW_fused - dW_separate|| <= 1e-5 ||dW_separate|| per tensor (measured <= 3e-7). One
slice is left out: the key bias (c_attn.bias[d:2d]), whose true gradient is exactly zero (softmax
ignores a constant added to every key), so Adam's g / sqrt(v) turns rounding noise into steps of
about lr there, in the separate run as much as in the fused one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from duckling.config import N_LIVE, DucklingConfig, ModelConfig, RecordConfig, TrainConfig
from duckling.errors import DucklingError, RunInterrupted
from duckling.training.fused import check_group, group_key, plan_groups, train_group
from duckling.training.model import build_model
from duckling.training.train import train

pytestmark = pytest.mark.xdist_group("fused")  # its module fixtures are built once, on one worker

T = 32


def cfg(**kw) -> DucklingConfig:
    base = dict(max_steps=6, save_steps=3, logging_steps=3, compile=False, compute_dtype="fp32", device="cpu")
    return DucklingConfig(model=ModelConfig(n_layer=1, n_positions=T, n_embd=32, n_inner=64),
                          train=TrainConfig(**{**base, **kw}), record=RecordConfig(probe_every=2))


ROWS = np.random.default_rng(0).integers(0, N_LIVE, size=(24, T), dtype=np.uint16)
EVAL = np.random.default_rng(1).integers(0, N_LIVE, size=(6, T), dtype=np.uint16)
# per run: its own seed, learning rate, weight decay and clipping
ADAMW = [cfg(seed=1, learning_rate=1e-3, weight_decay=0.1), cfg(seed=2, learning_rate=3e-3, weight_decay=0.0),
         cfg(seed=7, learning_rate=2e-3, weight_decay=0.01, max_grad_norm=0.5)]


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_run(fused_model, separate_model, cfg_, what=""):
    """Per tensor, the fused run's change from the initialisation matches the separate run's."""
    w0 = build_model(cfg_.model, seed=cfg_.train.seed).state_dict()
    f, s = fused_model.state_dict(), separate_model.state_dict()
    d = cfg_.model.n_embd
    for name in s:
        ds, df = s[name] - w0[name], f[name] - w0[name]
        if name.endswith("attn.c_attn.bias"):  # the key bias: zero gradient, noise-driven (module doc)
            ds, df = torch.cat([ds[:d], ds[2 * d:]]), torch.cat([df[:d], df[2 * d:]])
        assert ds.norm() > 0, f"{what}{name} did not train"
        # float32 rounding of the batched matmuls, which Adam's normalisation amplifies: up to 1.03e-5 of the
        # change (Coupled Adam, lr 3e-3, on an AVX512 CPU); a wrong update is off by far more than 1e-4
        assert (df - ds).norm() <= 1e-4 * ds.norm(), f"{what}{name}: {(df - ds).norm():.3g} vs {ds.norm():.3g}"


def losses(result, key="loss"):
    return result.losses(key)[1]


def test_fused_forward_draws_each_runs_own_dropout_masks():
    """The fused forward (train mode, dropout 0.1) = each member's own forward with the global generator
    in its generator's state: the same masks (same draws, same generator state after), losses to
    float rounding, hidden states per run."""
    from duckling.training.fused_model import FusedGPT2

    models = [build_model(ADAMW[0].model, seed=s) for s in (5, 6, 7)]
    gens = [torch.Generator().manual_seed(100 + k) for k in range(3)]
    fused = FusedGPT2(models, gens).train()
    ids = torch.from_numpy(ROWS[:6].astype(np.int64)).view(3, 2, T)
    losses_, hidden = fused(ids)
    assert hidden.shape == (3, 2, T, 32)
    for k, m in enumerate(models):
        torch.manual_seed(100 + k)
        out = m(input_ids=ids[k], labels=ids[k])
        assert torch.equal(torch.get_rng_state(), gens[k].get_state())  # drew exactly what the model drew
        assert abs(out.loss.item() - losses_[k].item()) < 1e-5 * out.loss.item()
    assert losses_[0] != losses_[1]


@pytest.fixture(scope="module")
def group(tmp_path_factory, tok):
    """A fused AdamW group of 3 (with evaluation) and each of its runs trained alone."""
    root = tmp_path_factory.mktemp("fused")
    fused = train_group(ADAMW, [root / f"f{k}" for k in range(3)], dataset=ROWS, eval_dataset=EVAL, tokenizer=tok,
                        progress=False)
    alone = [train(c, ROWS, root / f"s{k}", eval_dataset=EVAL, tokenizer=tok, progress=False)
             for k, c in enumerate(ADAMW)]
    return fused, alone


def test_each_fused_run_is_its_separate_run(group):
    from duckling.analysis.report import report
    from duckling.recording.reader import Recording

    fused, alone = group
    for k, (f, s) in enumerate(zip(fused, alone)):
        assert_close_run(f.model, s.model, ADAMW[k], f"run {k}: ")
        np.testing.assert_allclose(losses(f), losses(s), rtol=1e-4)
        np.testing.assert_allclose(losses(f, "eval_loss"), losses(s, "eval_loss"), rtol=1e-4)
        # an ordinary run folder: the same files, the same recording, the same report
        names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
        assert names(f.run_dir) == names(s.run_dir)
        a, b = Recording(f.run_dir), Recording(s.run_dir)
        assert a.steps.tolist() == b.steps.tolist() == list(range(7))
        np.testing.assert_allclose(a.rows("norm"), b.rows("norm"), rtol=1e-5)
        np.testing.assert_allclose(a.probe, b.probe, rtol=1e-4)
        if k == 2:  # (one report pair: a report takes seconds)
            ra, rb = report(f.run_dir, out=f.run_dir / "report"), report(s.run_dir, out=s.run_dir / "report")
            for key in ("dead_norm_mean", "live_norm_mean", "dead_output_mass", "final_train_loss", "final_eval_loss"):
                assert f"{ra[key]:.3g}" == f"{rb[key]:.3g}", key
        states = [json.loads((r.run_dir / "final" / "trainer_state.json").read_text()) for r in (f, s)]
        assert [sorted(h) for h in states[0]["log_history"]] == [sorted(h) for h in states[1]["log_history"]]
        assert states[0]["total_flos"] == states[1]["total_flos"] and states[0]["global_step"] == 6
        assert json.loads((f.run_dir / "run_info.json").read_text())["status"] == "complete"
    # the runs really differ (their own seeds, lrs, data order)
    assert not torch.equal(fused[0].model.transformer.wte.weight, fused[1].model.transformer.wte.weight)
    assert losses(fused[0])[0] != losses(fused[1])[0]


def test_group_of_one_is_duckling_train_byte_for_byte(group, tok, tmp_path):
    _, alone = group
    (one,) = train_group(ADAMW[:1], [tmp_path / "one"], dataset=ROWS, eval_dataset=EVAL, tokenizer=tok, progress=False)
    for f in ("final/model.safetensors", "checkpoint-3/optimizer.pt", "recording/wte.u16.00000.blk"):
        assert (one.run_dir / f).read_bytes() == (alone[0].run_dir / f).read_bytes(), f


@pytest.mark.parametrize("optimizer", ["sgd", "coupled_adam"])
def test_sgd_and_coupled_adam_fuse(optimizer, tok, tmp_path):
    runs = [cfg(optimizer=optimizer, seed=3, learning_rate=0.05 if optimizer == "sgd" else 1e-3, weight_decay=0.1,
                max_steps=4),
            cfg(optimizer=optimizer, seed=4, learning_rate=0.2 if optimizer == "sgd" else 3e-3, weight_decay=0.0,
                max_steps=4, max_grad_norm=0.3)]
    runs = [c.override({"record.enabled": False}) for c in runs]  # (the recording is tested with AdamW above)
    fused = train_group(runs, [tmp_path / "a", tmp_path / "b"], dataset=ROWS, tokenizer=tok, progress=False)
    for c, f in zip(runs, fused):
        s = train(c, ROWS, tokenizer=tok, progress=False)  # in memory: the same arithmetic, no files
        assert_close_run(f.model, s.model, c, f"{optimizer}: ")
        np.testing.assert_allclose(losses(f), losses(s), rtol=1e-4)
        for r in (f, s):  # logging_steps 3 of 4 steps: the last step's loss is logged too
            assert [h["step"] for h in r.log_history if "loss" in h] == [3, 4]


class CtrlC(TrainerCallback):
    """Ctrl-C during step 4: the group finishes the step and checkpoints every run there."""

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)


def test_fused_group_resumes_bit_exact_and_its_runs_resume_alone(group, tok, tmp_path):
    from duckling.recording.reader import Recording

    fused, _ = group
    dirs = [tmp_path / f"r{k}" for k in range(3)]
    with pytest.raises(RunInterrupted, match="checkpoint-4"):
        train_group(ADAMW, dirs, dataset=ROWS, eval_dataset=EVAL, tokenizer=tok, progress=False, callbacks=[CtrlC()])
    assert [json.loads((d / "run_info.json").read_text())["status"] for d in dirs] == ["interrupted"] * 3
    assert all((d / "checkpoint-4" / "trainer_state.json").is_file() for d in dirs)
    shutil.copytree(dirs[2], tmp_path / "alone", ignore=shutil.ignore_patterns(".lock"))
    before = [(d / "run_info.json").read_bytes() for d in dirs]
    with pytest.raises(DucklingError, match="evaluation dataset"):  # a group resumes only as the same runs
        train_group(ADAMW, dirs, dataset=ROWS, tokenizer=tok, progress=False, resume=True)
    assert [(d / "run_info.json").read_bytes() for d in dirs] == before
    resumed = train_group(ADAMW, dirs, dataset=ROWS, eval_dataset=EVAL, tokenizer=tok, progress=False, resume=True)
    for f, r in zip(fused, resumed):
        assert all(torch.equal(a, b) for a, b in zip(weights(f.model).values(), weights(r.model).values()))
        # (the loss logged at step 6 averages steps 5-6 after a resume at 4, as in any resumed run)
        assert losses(f)[0] == losses(r)[0] and f.losses()[0].tolist() == r.losses()[0].tolist() == [3, 6]
        assert losses(f, "eval_loss").tolist() == losses(r, "eval_loss").tolist()
        a, b = Recording(f.run_dir), Recording(r.run_dir)
        assert a.steps.tolist() == b.steps.tolist()
        assert np.array_equal(a.rows("grad_norm"), b.rows("grad_norm"), equal_nan=True)
        assert np.array_equal(a.probe, b.probe)
    # a fused run's checkpoint is an ordinary one: `duckling train --resume` continues it on its own
    alone = train(ADAMW[2], ROWS, tmp_path / "alone", eval_dataset=EVAL, tokenizer=tok, progress=False, resume=True)
    assert alone.global_step == 6
    assert_close_run(alone.model, fused[2].model, ADAMW[2], "resumed alone: ")


def test_only_compatible_runs_fuse():
    check_group([ADAMW[0], ADAMW[1].override({"record.every": 2})])  # per-run fields and record.* may differ
    assert group_key(ADAMW[0]) == group_key(ADAMW[2])
    for other in ({"train.optimizer": "sgd"}, {"model.n_layer": 2}, {"train.max_steps": 7}, {"train.batch_size": 3}):
        with pytest.raises(DucklingError, match=list(other)[0]):
            check_group([ADAMW[0], ADAMW[1].override(other)])
    with pytest.raises(DucklingError, match="distinct"):
        train_group(ADAMW[:2], ["/tmp/x", "/tmp/x"])
    # the sweep's grouping: compatible runs in the same phase, up to K per group, grid order kept
    grid = [ADAMW[0], ADAMW[1].override({"train.optimizer": "sgd"}), ADAMW[1], ADAMW[2], ADAMW[0].override({})]
    assert plan_groups(grid, fuse=2) == [[0, 2], [1], [3, 4]]
    assert plan_groups(grid, fuse="auto", device="cuda") == [[0, 2, 3, 4], [1]]
    assert plan_groups(grid, fuse="auto", device="cpu") == plan_groups(grid, fuse="off") == [[i] for i in range(5)]
    assert plan_groups(grid, fuse=8, phases=[None, None, 3, None, None]) == [[0, 3, 4], [1], [2]]
    with pytest.raises(DucklingError, match="resources.fuse"):
        plan_groups(grid, fuse="yes")
