"""Text from a trained Duckling: prompt -> compact ids -> ``model.generate`` -> text.

End-of-text (compact id 0) is both eos and pad. Dead ids are not masked: a model that puts mass on
them can emit them, and ``decode`` shows their GPT-2 text, which is itself an observation.
"""
from __future__ import annotations

import torch

from .config import EOT_ID


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int = 60, greedy: bool = True,
                 temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> list[int]:
    """Compact ids of the continuation (generation stops after an end-of-text)."""
    ctx = model.config.n_positions
    keep = max(ctx - max_new_tokens, 1)
    ids = (list(prompt_ids) or [EOT_ID])[-keep:]  # an empty prompt starts a new story
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        # fork_rng: sampling with a seed must not disturb the caller's random state
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=min(max_new_tokens, ctx - x.shape[1]),
                do_sample=not greedy, temperature=None if greedy else temperature,
                top_k=None if greedy else top_k, top_p=None, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    finally:
        model.train(was_training)
    return out[0, x.shape[1]:].tolist()


def generate(model, tok, prompt: str, max_new_tokens: int = 60, greedy: bool = True,
             temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
    """The continuation of ``prompt`` as text (greedy by default; ``greedy=False`` samples)."""
    ids = generate_ids(model, tok.encode(prompt), max_new_tokens, greedy, temperature, top_k, seed)
    return tok.decode(ids)


def cli_generate(args) -> int:
    """``duckling generate --run DIR "prompt"``: print the prompt and its continuation."""
    from .runs import load_run

    model, tok, _ = load_run(args.run)
    text = generate(model, tok, args.prompt, args.max_new_tokens, greedy=not args.sample,
                    temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0
