"""The study's optimizers (duckling/training/optim.py): CoupledAdamW is AdamW where nothing is coupled, couples
the second moment of embedding-shaped parameters, SGDW follows its update rule, and each trains."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from duckling.config import N_LIVE, DucklingConfig
from duckling.errors import DucklingError
from duckling.training.optim import SGDW, CoupledAdamW
from duckling.recording.reader import Recording
from duckling.training.train import train


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _fit(model, opt, steps=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_coupled_adam_is_adamw_without_an_embedding():
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    a, b = _mlp(), _mlp()
    ref = _fit(a, torch.optim.AdamW(a.parameters(), foreach=False, **kw))
    got = _fit(b, CoupledAdamW(b.parameters(), vocab_size=1000, **kw))  # no parameter has 1000 rows
    for x, y in zip(ref, got):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


def test_coupled_adam_shares_the_second_moment_over_rows():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 3))
    opt = CoupledAdamW([W], lr=0.1, weight_decay=0.0, vocab_size=6)
    W.grad = torch.tensor([[1.0, 0, 0]] + [[1e-3, 0, 0]] * 5)  # one row with a large gradient
    before = W.detach().clone()
    opt.step()
    step = (W.detach() - before)[:, 0]
    # AdamW's first step moves every row by ~lr whatever its gradient; coupled: in proportion to it
    ratio = (step[1:] / step[0]).numpy()
    assert np.allclose(ratio, 1e-3, rtol=1e-4), ratio
    plain = torch.nn.Parameter(before.clone())
    plain.grad = W.grad
    torch.optim.AdamW([plain], lr=0.1, weight_decay=0.0).step()
    assert np.allclose((plain.detach() - before)[:, 0].numpy(), -0.1, rtol=1e-4)


def test_sgdw_update_rule():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SGDW([w], lr=0.1, momentum=0.5, weight_decay=0.2)
    expected, buf = w.detach().clone(), None
    for g in ([1.0, 1.0], [0.5, -1.0], [0.0, 2.0]):
        w.grad = torch.tensor(g)
        opt.step()
        buf = torch.tensor(g) if buf is None else 0.5 * buf + torch.tensor(g)
        expected = expected * (1 - 0.1 * 0.2) - 0.1 * buf
        torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize("optimizer", ["sgd", "coupled_adam"])
def test_each_optimizer_trains_and_records(tmp_path, tok, optimizer):
    cfg = DucklingConfig().override({
        "train.optimizer": optimizer, "train.max_steps": 4, "train.save_steps": 4, "train.compile": False,
        "train.compute_dtype": "fp32", "model.n_layer": 1, "model.n_positions": 32, "record.probe_every": 0})
    rows = np.random.default_rng(0).integers(0, N_LIVE, size=(16, 32), dtype=np.uint16)
    result = train(cfg, dataset=rows, run_dir=tmp_path / "run", tokenizer=tok, progress=False)
    assert result.global_step == 4
    rec = Recording(tmp_path / "run")
    v = rec.rows("adam_v")[1:]  # step 0 has no optimizer state
    if optimizer == "sgd":
        assert np.isnan(v).all()  # no second moment to record
    else:
        assert np.isfinite(v).all() and (v > 0).any()
    assert np.all(rec.rows("update_norm")[1:].max(axis=1) > 0)  # every step moved W


def test_an_old_runs_record_format_keys_are_dropped_quietly():
    """One recording layout is written: record.format and record.chunk_steps are gone from the config,
    and an older run's config.json that has them still loads (docs/recording.md)."""
    d = DucklingConfig().to_dict()
    d["record"].update(format=1, chunk_steps=256)
    assert DucklingConfig.from_dict(d) == DucklingConfig()
    with pytest.raises(DucklingError, match="record.format"):
        DucklingConfig().override({"record.format": 1})

