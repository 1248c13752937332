"""Text from a trained Duckling: prompt -> compact ids -> ``model.generate`` -> text.

End-of-text (compact id 0) is both eos and pad. Dead ids are not masked: a model that puts mass on
them can emit them, and ``decode`` shows their GPT-2 text, which is itself an observation.
"""
from __future__ import annotations

import dataclasses

import torch

from duckling.config import EOT_ID, GenerateConfig
from duckling.hf import silence_unactionable_warnings


def _settings(gen: GenerateConfig | None, **given) -> GenerateConfig:
    """GenerateConfig (validated: temperature > 0, top_k >= 1, ...) from ``gen`` and explicit keywords."""
    gen = gen or GenerateConfig()
    given = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(gen, **given) if given else gen


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int | None = None, greedy: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, seed: int | None = None,
                 gen: GenerateConfig | None = None) -> list[int]:
    """Compact ids of the continuation (generation stops after an end-of-text). Unset arguments come
    from ``gen`` (default ``GenerateConfig()``: greedy, 60 tokens)."""
    g = _settings(gen, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  sample=None if greedy is None else not greedy)
    ctx = model.config.n_positions
    keep = max(ctx - g.max_new_tokens, 1)
    ids = (list(prompt_ids) or [EOT_ID])[-keep:]  # an empty prompt starts a new story
    silence_unactionable_warnings()  # a prompt of end-of-text alone makes transformers warn about padding
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        # fork_rng: sampling with a seed must not disturb the caller's random state
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(g.seed)
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=min(g.max_new_tokens, ctx - x.shape[1]),
                do_sample=g.sample, temperature=g.temperature if g.sample else None,
                top_k=g.top_k if g.sample else None, top_p=None, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    finally:
        model.train(was_training)
    return out[0, x.shape[1]:].tolist()


def generate(model, tok, prompt: str, max_new_tokens: int | None = None, greedy: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, seed: int | None = None,
             gen: GenerateConfig | None = None) -> str:
    """The continuation of ``prompt`` as text (greedy by default; ``greedy=False`` samples)."""
    ids = generate_ids(model, tok.encode(prompt), max_new_tokens, greedy, temperature, top_k, seed, gen=gen)
    return tok.decode(ids)
