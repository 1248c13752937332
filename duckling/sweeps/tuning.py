"""The study's learning rates and weight decays: the tuned lr of a tuning sweep, what decay alone does to a
row over a run, prod_t (1 - lr_t * wd), and the weight decay that leaves a chosen share.

    python -m duckling.sweeps.tuning decay --lr 1e-4 1e-3 --wd 0.01 0.1 --steps 2000
    python -m duckling.sweeps.tuning best sweeps/tune_lr_adamw      # the lr with the lowest held-out loss
    python -m duckling.sweeps.tuning wd --lr 1e-3 --kept 0.9 0.5     # the decays that leave 90% / 50%

Every optimizer of the study decays the same way (AdamW, Coupled Adam and SGDW all do
w <- w (1 - lr_t wd) before their update; duckling/training/optim.py), so a dead row that no gradient
reaches ends at ||w_0|| * prod_t (1 - lr_t wd): the weight-decay null of ``duckling report``. lr_t is
the Trainer's own schedule (transformers.get_scheduler with the config's lr_scheduler_type and
warmup_steps: linear decay to 0 by default), the learning rate of each of the ``steps`` updates.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from duckling.sweeps import stats


def lr_schedule(lr: float, steps: int, schedule: str = "linear", warmup: int = 0) -> np.ndarray:
    """The learning rate of each of ``steps`` optimizer updates, as the Hugging Face Trainer sets it."""
    import torch
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = np.empty(steps)
    for i in range(steps):
        out[i] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    return out


def decay_left(lr: float, wd: float, steps: int, schedule: str = "linear", warmup: int = 0) -> float:
    """prod_t (1 - lr_t * wd) over the run: the share of its norm a row keeps under decay alone."""
    return float(np.prod(1.0 - lr_schedule(lr, steps, schedule, warmup) * wd))


def wd_for(kept: float, lr: float, steps: int, schedule: str = "linear", warmup: int = 0) -> float:
    """The weight decay whose prod_t (1 - lr_t * wd) is ``kept`` (0 < kept <= 1), by bisection."""
    if not 0 < kept <= 1:
        raise ValueError(f"kept is a share of the norm in (0, 1], got {kept}")
    sched = lr_schedule(lr, steps, schedule, warmup)
    lo, hi = 0.0, 1.0 / sched.max()  # at 1 / max lr one step would zero the row
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.prod(1.0 - sched * mid) > kept else (lo, mid)
    return 0.5 * (lo + hi)


def table(lrs, wds, steps: int, schedule: str = "linear", warmup: int = 0) -> list[dict]:
    """One row per (lr, wd): sum_t lr_t * wd, the share kept and the share removed (1 - kept)."""
    rows = []
    for lr in lrs:
        sched = lr_schedule(lr, steps, schedule, warmup)
        for wd in wds:
            kept = float(np.prod(1.0 - sched * wd))
            rows.append({"lr": lr, "wd": wd, "sum_lr_wd": float(sched.sum() * wd), "kept": kept, "removed": 1 - kept})
    return rows


def tuned_lr(table, field: str = "train.learning_rate", col: str = "eval_loss") -> dict:
    """The lr of a tuning sweep's ``compare`` table with the lowest mean ``col`` over its seeds:
    {lr, mean, lo, hi, bracketed (a lower and a higher lr were tried), rows: [{lr, n, mean, lo, hi,
    runs}]}; runs that are not complete or have no value (diverged) count in ``runs`` only."""
    rows = []
    for lr, g in table.groupby(field, sort=True):
        ok = g[(g["status"] == "complete")][col]
        ci = stats.mean_ci(ok)
        rows.append({"lr": float(lr), "n": ci["n"], "mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "runs": len(g)})
    usable = [r for r in rows if r["n"] and math.isfinite(r["mean"])]
    if not usable:
        raise ValueError(f"no complete run with a {col} in this table")
    best = min(usable, key=lambda r: r["mean"])
    return {**{k: best[k] for k in ("lr", "mean", "lo", "hi")},
            "bracketed": rows[0]["lr"] < best["lr"] < rows[-1]["lr"], "rows": rows}


def main(argv=None) -> int:
    from duckling.config import DucklingConfig

    t = DucklingConfig().train
    p = argparse.ArgumentParser(prog="python -m duckling.sweeps.tuning", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("decay", "wd"):
        s = sub.add_parser(name)
        s.add_argument("--lr", type=float, nargs="+", required=True, help="peak learning rates")
        s.add_argument("--steps", type=int, default=2000, help="optimizer updates (the study: 2,000)")
        s.add_argument("--schedule", default=t.lr_scheduler_type, help=f"lr schedule (config: {t.lr_scheduler_type})")
        s.add_argument("--warmup", type=int, default=t.warmup_steps, help=f"warm-up steps (config: {t.warmup_steps})")
        if name == "decay":
            s.add_argument("--wd", type=float, nargs="+", required=True, help="weight decays")
        else:
            s.add_argument("--kept", type=float, nargs="+", required=True, help="shares of the norm to keep")
    s = sub.add_parser("best")
    s.add_argument("sweeps", nargs="+", help="tuning sweep folders (duckling compare is run on each)")
    a = p.parse_args(argv)
    if a.cmd == "best":
        from duckling.sweeps.compare import compare

        for folder in a.sweeps:
            b = tuned_lr(compare(folder, progress=False))
            print(f"{folder}: tuned lr {b['lr']:g} (held-out loss {stats.fmt_ci(b)}; "
                  f"{'bracketed' if b['bracketed'] else 'NOT bracketed: extend the grid'})")
            for r in b["rows"]:
                print(f"  lr {r['lr']:<8g} {r['n']}/{r['runs']} runs  {stats.fmt_ci(r)}")
        return 0
    print(f"prod_t (1 - lr_t * wd) over {a.steps} steps, {a.schedule} schedule, {a.warmup} warm-up steps")
    print(f"{'lr':>9} {'wd':>9} {'sum lr_t*wd':>12} {'kept':>8} {'removed':>8}")
    wds = a.wd if a.cmd == "decay" else None
    for lr in a.lr:
        for wd in wds or [wd_for(k, lr, a.steps, a.schedule, a.warmup) for k in a.kept]:
            for r in table([lr], [wd], a.steps, a.schedule, a.warmup):
                print(f"{r['lr']:>9.3g} {r['wd']:>9.4g} {r['sum_lr_wd']:>12.4g} {r['kept']:>8.4f} {r['removed']:>8.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
