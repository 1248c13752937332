"""K Duckling models of one shape as one model: the math of ``GPT2LMHeadModel`` written once over a
leading run axis K (batched matmuls), for a fused group (``duckling.training.fused``).

The K models stay ordinary ``GPT2LMHeadModel`` objects (``FusedGPT2.runs[k]``, each built by
``build_model(cfg, seed_k)``): every forward stacks their parameters into (K, ...) tensors, so the
backward leaves each run's gradient in its own parameters, and each run's optimizer, checkpoint,
recorder and evaluation see a plain model. Only the training forward is fused.

Dropout: each run draws its masks from its own generator, in the order and shapes the model draws
them in a separate run (embeddings, then per block attention weights, attention output, MLP output;
``bernoulli_(1 - p)`` scaled by 1/(1 - p), as ``torch.nn.functional.dropout`` does on CPU). On CPU
with a run's generator in the state the global one has in that run, the masks are the same bits.

Why batched matmuls and not ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``: vmap
draws dropout for all runs from one stream (``randomness="different"``), so no run could get its own
masks, let alone the ones its separate run draws; and with torch 2.13 / transformers 5.24 vmap cannot
run GPT-2's forward at all (transformers calls ``.item()`` in it). benchmarks/fused.py tries it and
times the batched step against K separate steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Per block, the GPT2LMHeadModel parameter names stacked (K, ...) for the batched math.
_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
          "mlp.c_proj.weight", "mlp.c_proj.bias")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation (transformers' NewGELUActivation), written the same way."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class FusedGPT2(torch.nn.Module):
    """``runs``: K GPT2LMHeadModel of one config. ``forward(input_ids (K, B, T))`` ->
    (per-run mean next-token losses (K,), final hidden states (K, B, T, d) after ln_f)."""

    def __init__(self, runs, generators=None):
        super().__init__()
        self.runs = torch.nn.ModuleList(runs)
        c = runs[0].config
        for m in runs[1:]:
            if m.config.to_dict() != c.to_dict():
                raise ValueError("a fused group needs models of one config")
        if c.activation_function != "gelu_new" or c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn \
                or not c.scale_attn_weights:
            raise ValueError("FusedGPT2 implements GPT-2's default block (gelu_new, scaled attention)")
        self.n_head, self.n_layer, self.eps = c.n_head, c.n_layer, c.layer_norm_epsilon
        self.p_embd, self.p_attn, self.p_resid = c.embd_pdrop, c.attn_pdrop, c.resid_pdrop
        self.tied = runs[0].lm_head.weight is runs[0].transformer.wte.weight
        self.generators = generators  # per run, for dropout; None = the global generator

    @property
    def K(self) -> int:
        return len(self.runs)

    def _stack(self, name: str) -> torch.Tensor:
        return torch.stack([m.get_parameter(name) for m in self.runs])

    # --- the pieces -------------------------------------------------------------------------------
    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """x (K, ...): run k's mask drawn from its generator, as F.dropout draws it on CPU."""
        if not self.training or p == 0.0:
            return x
        if p == 1.0:
            return torch.zeros_like(x)
        gens = self.generators or [None] * self.K
        masks = [torch.empty(x.shape[1:], dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=g).div_(1 - p)
                 for g in gens]
        return x * torch.stack(masks)

    def _ln(self, x, w, b):
        """LayerNorm with per-run affine: x (K, B, T, d), w/b (K, d)."""
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(b[:, None, None, :], y, w[:, None, None, :])

    @staticmethod
    def _linear(x, w, b):
        """GPT-2's Conv1D per run: x (K, B, T, i) @ w (K, i, o) + b (K, o)."""
        K, B, T, i = x.shape
        return torch.baddbmm(b[:, None, :], x.reshape(K, B * T, i), w).view(K, B, T, -1)

    def _attention(self, h, w_attn, b_attn, w_proj, b_proj):
        K, B, T, d = h.shape
        H = self.n_head
        q, k, v = self._linear(h, w_attn, b_attn).split(d, dim=-1)
        q, k, v = (t.reshape(K * B, T, H, d // H).transpose(1, 2) for t in (q, k, v))  # (K*B, H, T, hd)
        if self.training and self.p_attn > 0.0:
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // H))  # (K*B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            att = self._dropout(att.view(K, B, H, T, T), self.p_attn).view(K * B, H, T, T)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(K, B, T, d)
        return self._dropout(self._linear(y, w_proj, b_proj), self.p_resid)

    # --- the model --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor):
        K, B, T = input_ids.shape
        wte = self._stack("transformer.wte.weight")  # (K, V, d)
        V, d = wte.shape[1:]
        offsets = torch.arange(K, device=input_ids.device).view(K, 1, 1) * V
        x = F.embedding(input_ids + offsets, wte.view(K * V, d))  # (K, B, T, d)
        x = x + self._stack("transformer.wpe.weight")[:, None, :T, :]
        x = self._dropout(x, self.p_embd)
        for i in range(self.n_layer):
            p = [self._stack(f"transformer.h.{i}.{n}") for n in _BLOCK]
            x = x + self._attention(self._ln(x, p[0], p[1]), *p[2:6])
            f = _gelu_new(self._linear(self._ln(x, p[6], p[7]), p[8], p[9]))
            x = x + self._dropout(self._linear(f, p[10], p[11]), self.p_resid)
        hidden = self._ln(x, self._stack("transformer.ln_f.weight"), self._stack("transformer.ln_f.bias"))
        head = wte if self.tied else self._stack("lm_head.weight")  # (K, V, d)
        logits = torch.bmm(hidden.reshape(K, B * T, d), head.transpose(1, 2)).view(K, B, T, V)
        losses = F.cross_entropy(logits[:, :, :-1].float().reshape(-1, V), input_ids[:, :, 1:].reshape(-1),
                                 reduction="none").view(K, -1).mean(dim=1)
        return losses, hidden
