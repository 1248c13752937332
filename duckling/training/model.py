"""Build the Duckling model and count its parameters."""
from __future__ import annotations

import torch

from duckling.config import ModelConfig


def build_model(cfg: ModelConfig | None = None, seed: int | None = None):
    """A freshly initialised ``GPT2LMHeadModel`` (tied embeddings unless the config says otherwise)."""
    from transformers import GPT2LMHeadModel

    cfg = cfg or ModelConfig()
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg.to_gpt2_config())
    model.loss_type = "ForCausalLM"  # the class name matches no loss type: every forward would log (a graph break when compiled)
    tied = model.lm_head.weight is model.transformer.wte.weight
    if tied != cfg.tie_word_embeddings:  # guard against a transformers default changing under us
        raise RuntimeError(f"expected tie_word_embeddings={cfg.tie_word_embeddings}, got tied={tied}")
    return model


def count_parameters(model) -> int:
    """Unique parameters (a tied W counts once)."""
    return sum(p.numel() for p in model.parameters())


_N_PARAMS: dict[str, int] = {}


def n_params(cfg: ModelConfig | None = None) -> int:
    """Unique parameters of the model ``cfg`` describes, counted on the model itself, built on the meta
    device (no memory, no initialisation; ~10 ms), once per config. The disk budget's checkpoint bytes
    (``duckling.recording.budget``) are computed from it."""
    cfg = cfg or ModelConfig()
    key = repr(cfg)
    if key not in _N_PARAMS:
        with torch.device("meta"):
            _N_PARAMS[key] = count_parameters(build_model(cfg))
    return _N_PARAMS[key]


def embedding_matrices(model) -> dict[str, torch.nn.Parameter]:
    """The matrices the recorder watches: ``wte`` (= W, tied), plus ``lm_head`` when untied."""
    mats = {"wte": model.transformer.wte.weight}
    if model.lm_head.weight is not model.transformer.wte.weight:
        mats["lm_head"] = model.lm_head.weight
    return mats
