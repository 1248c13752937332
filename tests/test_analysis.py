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
    # token counts as a run's token_mapping.json holds them (no training dataset on this machine)
    tokens = [{"text": f"t{i}", "count": (N_LIVE - i) * 2 if i < N_LIVE else 0} for i in range(V)]
    (tmp_path / "untied" / "token_mapping.json").write_text(json.dumps({"tokens": tokens}))
    S = report(rec.run_dir)
    out = tmp_path / "untied" / "report"
    assert json.loads((out / "summary.json").read_text()) == S
    assert {p.name for p in out.glob("*.png")} == set(S["figures"]) and len(S["figures"]) == 20
    assert "frequency.png" in S["figures"] and "frequency_lm_head.png" in S["figures"]
    assert S["freq_source"].startswith("token_mapping.json counts") and "no final model" in S["loss_by_freq_note"]
    assert S["freq_buckets"]["n_tokens"] == [V - N_LIVE] + [5] * 8 + [4] * 2  # 48 live rows in 10 deciles
    assert len(S["norm_by_freq"]) == len(S["norm_by_freq_lm_head"]) == 11
    assert S["dead_path_over_decay_only"] == pytest.approx(1.0, rel=1e-3)  # the input matrix only decays
    assert S["dead_path_over_decay_only_lm_head"] > 10
    assert S["dead_spread_over_init"] == pytest.approx(np.prod(1 - lr[1:] * WD) ** 2, rel=0.01)  # decay scales it by f^2
    assert S["mean_shift_cos_neg_hidden_dead_lm_head"] > 0.9 and S["mean_shift_dead_lm_head"] > S["mean_shift_live_lm_head"]
    assert S["detect_auroc_post_hoc_norm"] == pytest.approx(max(S["detect_auroc_norm"], 1 - S["detect_auroc_norm"]))
    for k in ("median", "p05", "p95"):
        assert S[f"update_rule_step_ratio_{k}_lm_head"] > 0
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
    assert "**Dead rows follow weight decay alone**" in text and "grow past the weight-decay null" in out_text
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


# ---------------------------------------------------------------- issue 23 measures, answers known analytically
class FakeRec:
    """A recording in memory: snapshots W (T, V, d) at steps 0..T-1, per-row norms, hidden means."""

    def __init__(self, W, n_dead, hidden=None, run_dir="."):
        self.W = np.asarray(W, np.float32)
        T, V, d = self.W.shape
        self.steps = self.scalar_steps = np.arange(T)
        self.dead_ids, self.live_ids = np.arange(V - n_dead, V), np.arange(V - n_dead)
        self.meta = {"matrices": ["wte"], "shape": [V, d]}
        self.hidden_mean = np.full((T, d), np.nan) if hidden is None else np.asarray(hidden, np.float64)
        self.run_dir = run_dir

    def snapshot(self, step, matrix="wte"):
        return self.W[int(step)]

    def rows(self, field, matrix="wte"):
        assert field == "norm"
        return np.linalg.norm(self.W, axis=2)


def two_steps(X1_fn, V=400, d=8, n_dead=200, seed=0):
    rng = np.random.default_rng(seed)
    W0 = rng.normal(0, 0.02, (V, d))
    W1 = W0.copy()
    W1[V - n_dead:] = X1_fn(W0[V - n_dead:])
    return np.stack([W0, W1])


def test_common_displacement_raises_the_uncentred_cosine_only():
    from duckling.analysis import measures as M

    c = np.r_[0.3, np.zeros(7)]  # every dead row displaced by the same vector, 15x their spread
    W = two_steps(lambda X: X + c)
    rec = FakeRec(W, 200, hidden=np.stack([np.zeros(8), -c]))  # mean hidden state = -c
    col = A.collapse(rec)
    assert abs(col["dead_cos"][0]) < 0.05 and col["dead_cos"][1] > 0.95  # uncentred: "collapsed"
    np.testing.assert_allclose(col["pc_var"][1], col["pc_var"][0], rtol=1e-4)  # centred: unchanged
    np.testing.assert_allclose(col["dead_spread"][1] / col["dead_spread"][0], 1.0, rtol=1e-4)
    np.testing.assert_allclose(col["live_spread"][1], col["live_spread"][0], rtol=1e-6)
    assert abs(col["dead_cos_from_mean"][1] - col["dead_cos"][1]) < 0.01  # the shift alone explains the cosine
    assert col["pc1_noise"] == pytest.approx((1 + (8 / 200) ** 0.5) ** 2 / 8)
    ms = M.mean_shift(rec)
    assert ms["shift_dead"][1] == pytest.approx(0.3, rel=1e-5) and ms["shift_live"][1] == pytest.approx(0, abs=1e-7)
    assert ms["shift_all"][1] == pytest.approx(0.3 * 200 / 400, rel=1e-5)
    assert ms["cos_hidden_dead"][1] == pytest.approx(1.0, abs=1e-6) and ms["cos_hidden_all"][1] == pytest.approx(1.0, abs=1e-6)
    assert ms["shift_dead"][0] == 0 and ms["mean_norm_all"][0] == pytest.approx(np.linalg.norm(W[0].mean(0)), rel=1e-5)


def test_contraction_and_one_line_show_in_the_centred_measures():
    shrink = two_steps(lambda X: X.mean(0) + 0.1 * (X - X.mean(0)))  # every row 10x closer to the mean
    col = A.collapse(FakeRec(shrink, 200))
    np.testing.assert_allclose(col["dead_spread"][1] / col["dead_spread"][0], 0.01, rtol=1e-3)
    np.testing.assert_allclose(col["pc_var"][1], col["pc_var"][0], rtol=1e-3)  # a scaling keeps the shape
    u = np.r_[0.6, 0.8, np.zeros(6)]
    line = two_steps(lambda X: X.mean(0) + np.outer((X - X.mean(0)) @ u, u))  # onto one line through the mean
    assert A.collapse(FakeRec(line, 200))["pc_var"][1, 0] == pytest.approx(1.0, abs=1e-5)


def test_cosine_predicted_by_the_mean_is_exact_for_rows_of_equal_norm():
    m, r, n = np.r_[0.0, 0.0, 1.0], 0.7, 6  # x_i = m + e_i, e_i orthogonal to m, |e_i| = r, sum e_i = 0
    E = r * np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0.6, 0.8, 0], [-0.6, -0.8, 0]])
    X = m + E
    W = np.stack([np.r_[np.eye(3), X], np.r_[np.eye(3), X]])
    col = A.collapse(FakeRec(W, n))
    assert col["dead_cos_from_mean"][0] == pytest.approx(A.mean_pairwise_cosine(X), abs=1e-6)
    assert col["dead_cos_from_mean"][0] == pytest.approx((1 - r ** 2 / (n - 1)) / (1 + r ** 2), abs=1e-6)


def test_step_ratio_distribution_and_post_hoc_reading():
    from duckling.analysis import measures as M

    q = M.step_ratio_stats(np.r_[np.nan, 0.0, np.linspace(0.8, 1.2, 101)])  # step 0 NaN and a 0 are skipped
    assert q["n_steps"] == 101 and q["median"] == pytest.approx(1.0)
    assert (q["p05"], q["p95"]) == (pytest.approx(0.82), pytest.approx(1.18))
    assert M.step_ratio_stats([np.nan])["median"] is None
    assert M.post_hoc(0.2, "norm") == (pytest.approx(0.8), A.OPPOSITE["norm"])
    assert M.post_hoc(0.7, "norm") == (0.7, A.LABEL_FREE["norm"]) and M.post_hoc(None, "pc1") == (None, None)


def test_frequency_deciles_and_norms_per_bucket():
    from duckling.analysis import measures as M

    V, n_dead = 120, 20
    counts = np.r_[np.arange(100)[::-1] * 3, np.zeros(n_dead, int)]  # live id i occurs 3 (99 - i) times
    b = M.frequency_buckets(counts, np.arange(100), np.arange(100, V))
    assert b["labels"][0] == "dead" and b["n_tokens"] == [20] + [10] * 10
    assert (b["bucket"][100:] == 0).all()
    assert set(b["bucket"][90:100]) == {1} and set(b["bucket"][:10]) == {10}  # D1 = rarest
    assert (b["count_min"][1], b["count_max"][1], b["count_max"][10]) == (0, 27, 297)
    W = np.ones((2, V, 4))
    W[1] *= (b["bucket"] + 1)[:, None]  # norm of a row at step 1 = 2 (bucket + 1)
    nf = M.norm_by_frequency(FakeRec(W, n_dead), b)
    np.testing.assert_allclose(nf["init"], 2.0)
    np.testing.assert_allclose(nf["final"], 2.0 * np.arange(1, 12))


def test_loss_by_frequency_skips_with_a_note_and_measures_log_v_for_zero_logits(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    from duckling.analysis import measures as M

    V, n_dead = 40, 8
    b = M.frequency_buckets(np.r_[np.arange(32), np.zeros(n_dead, int)], np.arange(32), np.arange(32, V), n=4)
    run = tmp_path / "run"
    run.mkdir()
    assert "no final model" in M.loss_by_frequency(run, b)["note"]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied: every logit is 0, every target's loss is log V
    model.save_pretrained(run / "final")
    assert "no held-out dataset" in M.loss_by_frequency(run, b)["note"]
    assert "not on this machine" in M.loss_by_frequency(run, b, eval_dataset=tmp_path / "nowhere")["note"]
    rows = np.random.default_rng(0).integers(0, 32, (6, 16))
    monkeypatch.setattr(M, "dataset_tokens", lambda path, n_rows, h: rows[:n_rows])
    res = M.loss_by_frequency(run, b, eval_dataset=tmp_path)  # a folder that exists; its rows are ``rows``
    want = np.bincount(b["bucket"][rows[:, 1:].ravel()], minlength=5)
    np.testing.assert_array_equal(res["n_targets"], want)
    np.testing.assert_allclose(res["loss"][want > 0], np.log(V), rtol=1e-5)
    assert np.isnan(res["loss"][0]) and res["overall"] == pytest.approx(np.log(V), rel=1e-5)


# ---------------------------------------------------------------- findings agree with the numbers they state
def _summary(**kw):
    S = {"last_scalar_step": 500, "dead_norm_over_null": 1.0, "dead_norm_mean": 0.2, "live_norm_mean": 0.3,
         "dead_path_over_decay_only": 1.0, "dead_mean_pairwise_cosine": 0.72, "dead_pairwise_cosine_from_mean": 0.715,
         "dead_centred_pc1_share": 0.0123, "dead_centred_pc1_share_noise": 0.0122,
         "dead_centred_pc1_share_init": 0.0121, "dead_spread_over_init": 0.99, "live_mean_pairwise_cosine": 0.38,
         "update_rule_optimizer": "adamw", "update_rule_measured_over_predicted": 1.0,
         "update_rule_measured_over_predicted_incoherent": 4.0, "update_rule_step_ratio_median": 1.0,
         "update_rule_step_ratio_p05": 0.97, "update_rule_step_ratio_p95": 1.03}
    return {**S, **kw}


def test_findings_claim_decay_alone_only_when_norm_and_path_say_so():
    from duckling.analysis.findings import findings

    assert "**Dead rows follow weight decay alone**" in findings(_summary())
    # notebook 07's case: norm within 5% of the null, but the rows moved far more than decay alone moves them
    text = findings(_summary(dead_path_over_decay_only=2000.0))
    assert "**Dead rows follow weight decay alone**" not in text and "do not follow weight decay alone" in text
    assert "2e+03x the path decay alone gives" in text
    text = findings(_summary(dead_norm_over_null=1.3, dead_path_over_decay_only=1.0))
    assert "grow past the weight-decay null (1.3x)" in text and "follow weight decay alone" not in text
    assert "no weight decay" in findings(_summary(dead_path_over_decay_only=None))


def test_findings_collapse_verdict_follows_the_centred_numbers():
    from duckling.analysis.findings import findings

    text = findings(_summary())
    assert "cosine is 0.720" in text and "alone gives 0.715" in text and "have not collapsed" in text
    text = findings(_summary(dead_spread_over_init=0.3))
    assert "did contract" in text and "have not collapsed" not in text and "0.300x its initial value" in text
    text = findings(_summary(dead_centred_pc1_share=0.2))
    assert "did contract" in text and "PC1 holds 20.00%" in text
    assert "differs from the common shift's" in findings(_summary(dead_pairwise_cosine_from_mean=0.4))


def test_findings_update_rule_is_a_consistency_check_with_its_per_step_spread():
    from duckling.analysis.findings import findings

    text = findings(_summary())
    assert "consistency check" in text and "agrees within 10% on 90% of the steps" in text
    text = findings(_summary(update_rule_step_ratio_p05=0.83, update_rule_step_ratio_p95=1.15))
    assert "0.83-1.15" in text and "reaches beyond 1 +- 10%" in text and "agrees within" not in text
