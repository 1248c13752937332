"""The model is the mission's Duckling: exact parameter count, W shape, tying, config round trip."""
import dataclasses

import pytest

from duckling.config import N_DEAD, N_LIVE, VOCAB_SIZE, DucklingConfig, ModelConfig
from duckling.training.model import build_model, count_parameters, embedding_matrices


def test_parameter_count_and_w_shape():
    model = build_model(seed=0)
    assert count_parameters(model) == 1_510_912  # the number in README.md
    (w,) = embedding_matrices(model).values()
    assert tuple(w.shape) == (8192, 128) == (VOCAB_SIZE, ModelConfig().n_embd)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: dead rows feel the softmax
    assert N_LIVE + N_DEAD == VOCAB_SIZE and N_LIVE == 6144


def test_untied_control_has_two_matrices():
    model = build_model(ModelConfig(tie_word_embeddings=False), seed=0)
    mats = embedding_matrices(model)
    assert set(mats) == {"wte", "lm_head"}
    assert mats["wte"].data_ptr() != mats["lm_head"].data_ptr()


def test_same_seed_same_init():
    a, b = build_model(seed=42), build_model(seed=42)
    assert (a.transformer.wte.weight == b.transformer.wte.weight).all()
    # GPT-2 init: std 0.02, so a row norm is ~0.02 * sqrt(128) ~ 0.23
    norms = a.transformer.wte.weight.norm(dim=1)
    assert norms.mean().item() == pytest.approx(0.02 * 128**0.5, rel=0.05)


def test_config_round_trip():
    cfg = DucklingConfig()
    cfg.train = dataclasses.replace(cfg.train, max_steps=7)
    again = DucklingConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.train.max_steps == 7
