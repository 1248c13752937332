"""Analyses on synthetic recordings whose answers are known by construction."""
from __future__ import annotations

import json

import numpy as np
import pytest

from duckling.analysis import metrics as A
from duckling.errors import DucklingError
from duckling.recording.reader import Recording
from duckling.recording.writer import RecordingWriter

V, N_LIVE, D = 64, 48, 8  # 48 live rows, 16 dead rows of size 8
WD = 0.1  # large, so decay is visible over a few steps


def write(run_dir, W, lr, hidden=None, matrices=("wte",), precision="float32", every=1, grad=None,
          probe=True, train=None, adam_v=None):
    """Record trajectories W[m] (T+1, V, d) as the recorder would: scalars every step, snapshots every k."""
    T = len(lr) - 1
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"train": {"learning_rate": 1e-2, "weight_decay": WD, "max_steps": T, "warmup_steps": 0,
                     "lr_scheduler_type": "linear", "adam_epsilon": 1e-8, **(train or {})}}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    W = W if isinstance(W, dict) else {"wte": W}
    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, dtype=precision, every=every,
                        block_steps=7, matrices=matrices)
    rng = np.random.default_rng(1)
    for t in range(T + 1):
        rows = {}
        for m in matrices:
            upd = np.linalg.norm(W[m][t] - W[m][t - 1], axis=1) if t else np.zeros(V)
            g = np.full(V, np.nan) if t == 0 else (grad if grad is not None else rng.random(V) + 0.1)
            g = g[t] if np.ndim(g) == 2 else g  # (T+1, V): per-step gradient norms
            v = g ** 2 * 1e-3 if adam_v is None else adam_v[t]
            rows[m] = np.stack([np.linalg.norm(W[m][t], axis=1), upd, g, v])
        snap = {m: W[m][t].astype(np.float32) for m in matrices} if t % every == 0 else None
        hm = None if hidden is None or t == 0 else hidden[t]
        w.append_step(t, rows, hidden_mean=hm, lr=lr[t], snapshot=snap)
        if probe and t % 5 == 0:
            w.append_probe(t, 0.25 * 0.9 ** t, 0.01 * 0.9 ** t)
    w.close()
    return Recording(run_dir)


def linear_lr(T, base=1e-2):
    lr = base * np.maximum(0, (T - (np.arange(T + 1) - 1)) / T)
    lr[0] = np.nan
    return lr


def decayed(T, lr, seed=0):
    """Pure AdamW decay of a GPT-2-like init: w_t = w_{t-1} (1 - lr_t wd)."""
    W = np.empty((T + 1, V, D))
    W[0] = np.random.default_rng(seed).normal(0, 0.02, (V, D))
    for t in range(1, T + 1):
        W[t] = W[t - 1] * (1 - lr[t] * WD)
    return W


def test_pure_decay_matches_null_model(tmp_path):
    T = 30
    lr = linear_lr(T)
    rec = write(tmp_path / "run", decayed(T, lr), lr)
    n = A.norms(rec)
    np.testing.assert_allclose(n["ratio"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(n["null_mean"][-1], n["per_dead"][0].mean() * np.prod(1 - lr[1:] * WD), rtol=1e-6)
    # lr.f32 missing (NaN): the schedule rebuilt from config.json gives the same null model
    rec2 = write(tmp_path / "run2", decayed(T, lr), np.full(T + 1, np.nan))
    np.testing.assert_allclose(A.norms(rec2)["ratio"], 1.0, rtol=1e-5)


def test_lr_from_config_matches_hf_scheduler():
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    for kind, warm in (("linear", 0), ("linear", 5), ("cosine", 3), ("constant", 0)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        sched = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=20)
        used = [np.nan]
        for _ in range(20):  # lr used by update N = what the optimizer holds at its N-th step
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        cfg = {"learning_rate": 1e-3, "warmup_steps": warm, "max_steps": 20, "lr_scheduler_type": kind}
        np.testing.assert_allclose(A.lr_from_config(cfg, 21), used, rtol=1e-9, err_msg=kind)


def planted(T=40, seed=0, common=True):
    """Dead rows move along one direction u (or random walks if not ``common``); hidden mean = -u."""
    rng = np.random.default_rng(seed)
    u = A._unit(rng.normal(size=D))
    W = np.empty((T + 1, V, D))
    W[0] = rng.normal(0, 0.02, (V, D))
    for t in range(1, T + 1):
        step = 0.01 * u if common else rng.normal(0, 0.01, (V - N_LIVE, D))
        W[t] = W[t - 1] + rng.normal(0, 1e-3, (V, D))
        W[t, N_LIVE:] += step
    hidden = -u + rng.normal(0, 0.3, (T + 1, D))
    return W, hidden, u


def test_planted_drift_direction_is_recovered(tmp_path):
    W, hidden, u = planted()
    rec = write(tmp_path / "run", W, linear_lr(40), hidden=hidden, every=3)  # stride: steps 0, 3, ..., 39
    d = A.drift(rec)
    assert list(d["steps"]) == list(range(0, 40, 3))
    assert A._cos(d["direction"], u) > 0.99
    assert d["cos_hidden"][-1] > 0.95  # displacement points along -(mean hidden)
    assert np.all(np.diff(d["proj"].mean(1)) > 0)  # every dead row keeps moving along it
    c = A.collapse(rec)
    assert c["dead_cos"][-1] > 0.9 and c["pc_var"][-1, 0] < 0.5  # collapsed, residual isotropic
    assert abs(c["live_cos"][-1]) < 0.1


def test_random_walk_control_does_not_collapse(tmp_path):
    W, hidden, _ = planted(common=False)
    c = A.collapse(write(tmp_path / "run", W, linear_lr(40), hidden=hidden))
    assert abs(c["dead_cos"][-1]) < 0.1


def test_mean_pairwise_cosine_matches_brute_force():
    X = np.random.default_rng(0).normal(size=(50, 8)) + 0.5
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = U @ U.T
    brute = (C.sum() - np.trace(C)) / (50 * 49)
    assert A.mean_pairwise_cosine(X) == pytest.approx(brute, rel=1e-10)


def test_auroc_ranks():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3  # many ties
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert A.auroc(s, y) == pytest.approx(brute)
    assert A.auroc(np.r_[np.zeros(5), np.ones(3)], np.r_[np.zeros(5), np.ones(3)] > 0) == 1.0
    assert A.auroc(np.ones(8), np.arange(8) > 4) == 0.5


def test_separated_groups_give_auroc_one(tmp_path):
    T = 12
    lr = linear_lr(T)
    W = decayed(T, lr)
    W[:, N_LIVE:] *= 0.1  # dead rows: 10x smaller norm, and pointing one way
    W[:, N_LIVE:] += np.r_[1.0, np.zeros(D - 1)] * 0.01
    det = A.detectability(write(tmp_path / "run", W, lr))
    assert det["auroc"]["norm"][-1] == 1.0
    assert det["auroc"]["cos_dead_mean"][-1] == 1.0
    # label-free scores are read in their fixed direction (never max(A, 1 - A)): the shared 0.01 offset
    # makes the dead rows point along the mean row ("high cosine to the mean row => dead" holds, ~0.9),
    # while PC1 is dominated by the live rows' spread: the dead rows sit a little on its short side (< 0.5)
    assert det["auroc"]["cos_all_mean"][-1] > 0.85
    assert det["auroc"]["pc1"][-1] == pytest.approx(0.441, abs=0.03)
    assert set(det["label_free"]) == {"norm", "cos_all_mean", "pc1"}
    assert set(det["label_using"]) == {"cos_dead_mean", "cos_dead_mean_nopc1"}


@pytest.mark.slow
def test_report_untied_writes_both_matrices(tmp_path):
    """One report over an untied run covers both code paths (tied runs hold "wte" only)."""
    from duckling.analysis.report import report

    W, hidden, _ = planted(T=20)
    lr = linear_lr(20)
    # the input matrix only decays, lm_head carries the planted drift; bf16 snapshots
    rec = write(tmp_path / "untied", {"wte": decayed(20, lr), "lm_head": W}, lr, hidden=hidden,
                matrices=("wte", "lm_head"), grad=np.zeros(V), precision="bf16")
    # a Trainer state, as a finished run leaves it: the report adds the loss curve and final losses
    (tmp_path / "untied" / "final").mkdir()
    log = [{"step": 10, "loss": 8.0}, {"step": 20, "loss": 7.5}, {"step": 20, "eval_loss": 7.7}]
    (tmp_path / "untied" / "final" / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    S = report(rec.run_dir)
    out = tmp_path / "untied" / "report"
    assert json.loads((out / "summary.json").read_text()) == S
    assert {p.name for p in out.glob("*.png")} == set(S["figures"]) and len(S["figures"]) == 18
    assert "loss.png" in S["figures"] and (S["final_train_loss"], S["final_eval_loss"]) == (7.5, 7.7)
    assert "norms_lm_head.png" in S["figures"] and "output_mass.png" in S["figures"]
    for k in ("dead_norm_over_null", "dead_mean_pairwise_cosine", "drift_cosine_to_neg_mean_hidden",
              "drift_cosine_to_neg_mean_live", "detect_auroc_norm", "dead_output_mass",
              "detect_label_using_auroc_cos_dead_mean", "dead_displacement_over_lr_budget",
              "update_rule_measured_over_predicted"):
        assert isinstance(S[k], float) and isinstance(S.get(f"{k}_lm_head", 0.0), float), k
    assert S["dead_norm_over_null"] == pytest.approx(1.0, rel=1e-5)  # pure decay
    assert S["dead_norm_over_null_lm_head"] > 2
    assert S["drift_cosine_to_neg_mean_hidden_lm_head"] > 0.9
    assert S["dead_mean_pairwise_cosine_lm_head"] > 0.8 > S["dead_mean_pairwise_cosine"]
    from duckling.analysis.report import findings  # notebook 07's prose: built from the summary's own numbers

    text, out_text = findings(S), findings(S, "_lm_head")
    assert "follow weight decay alone" in text and "grow instead of decaying" in out_text
    assert f"{S['dead_norm_over_null_lm_head']:.3g}x" in out_text and "uses" not in text.split("Using")[0].lower()
    with pytest.raises(DucklingError):
        A.norms(write(tmp_path / "tied", W, lr), matrix="lm_head")


def test_report_cli_errors_clearly(tmp_path, capsys):
    from duckling.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "no recording" in capsys.readouterr().err


def test_report_reads_the_final_state_else_the_newest_complete_checkpoint(tmp_path):
    from duckling.analysis.report import _trainer_state

    assert _trainer_state(tmp_path) is None
    for n, done in ((9, True), (10, True), (12, False)):  # by step, not by name; 12 is half-written
        (tmp_path / f"checkpoint-{n}").mkdir()
        if done:
            (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text(json.dumps({"global_step": n}))
    assert _trainer_state(tmp_path) == {"global_step": 10}
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    assert _trainer_state(tmp_path) == {"global_step": 12}


def test_findings_numbers_read_missing_as_n_a_and_a_study_per_weight_decay():
    from duckling.analysis.report import fmt

    assert (fmt(None), fmt(float("nan")), fmt(np.float64(1.23456)), fmt(0.5, ".2f")) == ("n/a", "n/a", "1.23", "0.50")
    assert fmt(np.array([1.0, np.nan, 0.0341])) == "1 / n/a / 0.0341"  # study.findings: one value per weight decay


def test_indicator_without_first_pc_matches_direct_formula():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(300, 8)).astype(np.float32)
    dead = np.arange(300) >= 240
    W[dead] += 0.5
    Wc = W - W.mean(0)
    v1 = np.linalg.eigh(Wc.T @ Wc)[1][:, -1]
    Wr = Wc - np.outer(Wc @ v1, v1)
    ref = A._unit(Wr) @ A._unit(Wr[dead].mean(0))
    np.testing.assert_allclose(A.indicators(W, dead)["cos_dead_mean_nopc1"], ref, atol=1e-5)


# ---------------------------------------------------------------- question 2: update rule vs measured
def simulate(opt, T=60, wd=0.0, coherent=True, seed=0, mu=0.9, b1=0.9, b2=0.999, eps=1e-8):
    """Run ``opt`` (as duckling.training.optim / torch AdamW compute it) on W (V, D) with synthetic gradients whose
    coordinates all have the same size within a row (so Adam's v is uniform over a row's coordinates);
    ``coherent``: each row's gradient keeps its direction (only its size changes over time)."""
    rng = np.random.default_rng(seed)
    lr = linear_lr(T)
    W = np.empty((T + 1, V, D))
    W[0] = rng.normal(0, 0.02, (V, D))
    scale = rng.uniform(0.5, 2.0, (V, 1)) * 1e-3
    signs = rng.choice([-1.0, 1.0], (V, D))
    m, v, buf = np.zeros((V, D)), np.zeros((V, D)), np.zeros((V, D))
    gn, vn = np.full((T + 1, V), np.nan), np.full((T + 1, V), np.nan)
    for t in range(1, T + 1):
        s = rng.choice([-1.0, 1.0], (V, D)) if not coherent else signs
        g = (0.9 ** t + 0.1) * scale * s
        w = W[t - 1] * (1 - lr[t] * wd)
        if opt == "sgd":
            buf = mu * buf + g
            w = w - lr[t] * buf
        else:
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            vu = v.mean(0, keepdims=True) if opt == "coupled_adam" else v
            w = w - lr[t] / (1 - b1 ** t) * m / (np.sqrt(vu / (1 - b2 ** t)) + eps)
            vn[t] = v.mean(1)
        W[t], gn[t] = w, np.linalg.norm(g, axis=1)
    return W, lr, gn, vn


@pytest.mark.parametrize("opt", ["adamw", "coupled_adam", "sgd"])
def test_update_rule_predicts_coherent_updates_exactly(tmp_path, opt):
    from duckling.analysis.update_rule import path_ratio, update_prediction

    W, lr, gn, vn = simulate(opt)
    rec = write(tmp_path / "run", W, lr, grad=gn, adam_v=vn, train={"optimizer": opt, "weight_decay": 0.0})
    u = update_prediction(rec)
    assert u["optimizer"] == opt
    np.testing.assert_allclose(u["ratio"][1:], 1.0, rtol=1e-4)  # constant direction: the coherent bound is exact
    np.testing.assert_allclose(u["ratio_band"][1:], 1.0, rtol=1e-4)
    assert (u["incoherent"][2:] < u["coherent"][2:]).all()
    assert path_ratio(u) == pytest.approx(1.0, rel=1e-4)
    if opt == "sgd":
        assert np.isnan(u["v_check"]).all()
    else:  # the row-mean second moment rebuilt from the gradient norms is the recorded one
        np.testing.assert_allclose(u["v_check"][1:], 1.0, rtol=1e-4)
    if opt == "adamw":  # a constant-direction gradient under Adam: close to lr per coordinate
        assert 0.3 < np.nanmean(u["measured"][1:] / u["full_speed"][1:]) <= 1.0 + 1e-6


def test_update_rule_random_directions_follow_the_incoherent_estimate(tmp_path):
    from duckling.analysis.update_rule import update_prediction

    W, lr, gn, vn = simulate("sgd", T=80, coherent=False)
    u = update_prediction(write(tmp_path / "run", W, lr, grad=gn, adam_v=vn, train={"optimizer": "sgd",
                                                                                     "weight_decay": 0.0}))
    late = slice(20, None)  # momentum buffers in a steady state
    assert 0.75 < np.nanmean(u["ratio_incoherent"][late]) < 1.1
    assert np.nanmean(u["ratio"][late]) < 0.5  # the coherent bound overestimates random walks


def test_update_rule_weight_decay_part_and_budget(tmp_path):
    from duckling.analysis.update_rule import lr_budget, update_prediction

    T = 30
    lr = linear_lr(T)
    rec = write(tmp_path / "run", decayed(T, lr), lr, grad=np.zeros(V), adam_v=np.zeros((T + 1, V)),
                train={"optimizer": "sgd"})  # pure decay, WD = 0.1: the prediction is the decay part alone
    u = update_prediction(rec)
    np.testing.assert_allclose(u["ratio"][1:], 1.0, rtol=1e-4)
    np.testing.assert_allclose(u["decay"][1:], u["coherent"][1:], rtol=1e-12)
    np.testing.assert_allclose(lr_budget(rec)[-1], np.nansum(lr) * np.sqrt(D), rtol=1e-6)
