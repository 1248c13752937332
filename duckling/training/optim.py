"""The optimizers of the dead-token study, beside the Trainer's own AdamW (``train.optimizer``).

- ``adamw``: the Trainer's torch AdamW (fused where available). Unchanged default.
- ``sgd``: SGD with heavy-ball momentum and *decoupled* weight decay (w <- w(1 - lr wd), as in AdamW),
  so that the weight-decay null model of the analysis means the same thing for every optimizer.
- ``coupled_adam``: AdamW whose second moment of the embedding matrices (parameters with
  ``vocab_size`` rows) is averaged over the vocabulary before it divides the update (Stollenwerk &
  Stollenwerk 2025, "Better Embeddings with Coupled Adam"; their reference code averages
  ``exp_avg_sq`` over dim 0 and broadcasts it back). Every other parameter gets plain AdamW,
  so on a model without an embedding matrix it *is* AdamW (tests/test_optim.py checks this).

Both keep their state in the usual names (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``), so the
recorder's ``adam_v`` field is recorded for coupled_adam (the per-row mean of the *uncoupled*
exp_avg_sq, as for AdamW) and is NaN for sgd.
"""
from __future__ import annotations

import math

import torch

from duckling.config import TrainConfig


class _PerParameter(torch.optim.Optimizer):
    """``step`` = the closure, then ``_update(p, group)`` for every parameter that has a gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss


class SGDW(_PerParameter):
    """SGD with momentum and decoupled weight decay: w <- w (1 - lr wd) - lr (mu b + g), b <- mu b + g."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, p, group) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd:
            p.mul_(1 - lr * wd)
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = p.grad.detach().clone()
        else:
            buf.mul_(mu).add_(p.grad)
        p.add_(buf, alpha=-lr)


class CoupledAdamW(_PerParameter):
    """AdamW; for parameters with ``vocab_size`` rows the second moment is averaged over the rows.

    The update math is torch's single-tensor AdamW, in its order, so that an uncoupled parameter
    gets exactly AdamW's update."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 vocab_size: int | None = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.vocab_size = vocab_size

    def coupled(self, p: torch.Tensor) -> bool:
        return self.vocab_size is not None and p.dim() == 2 and p.shape[0] == self.vocab_size

    def _update(self, p, group) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * wd)
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        v_used = v.mean(dim=0, keepdim=True) if self.coupled(p) else v  # (1, d) broadcast over rows
        denom = (v_used.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def optimizer_cls_and_kwargs(t: TrainConfig, vocab_size: int):
    """For ``Trainer(optimizer_cls_and_kwargs=...)``: None = the Trainer's own AdamW. The Trainer builds
    the parameter groups (weight decay on weights, not on biases and LayerNorms) and sets each
    group's weight decay; these kwargs fill in the rest."""
    if t.optimizer == "adamw":
        return None
    if t.optimizer == "sgd":
        return SGDW, {"lr": t.learning_rate, "momentum": t.sgd_momentum}
    if t.optimizer == "coupled_adam":
        return CoupledAdamW, {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon,
                              "vocab_size": vocab_size}
    raise ValueError(f"unknown optimizer {t.optimizer!r}")  # config.py validates the choice first
