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
import json
import math
from collections import Counter
from pathlib import Path

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


def study_plan(lrs: dict, kept, steps: int, schedule: str = "linear", warmup: int = 0) -> list[dict]:
    """The study's weight decays: per optimizer at its learning rate, the decay that leaves each share in
    ``kept`` of a dead row's norm by the end (1.0: no decay), rounded to 3 significant digits, with the
    share that rounded value really leaves: [{optimizer, lr, kept_target, wd, kept}]."""
    rows = []
    for opt, lr in lrs.items():
        for k in kept:
            wd = 0.0 if k >= 1 else float(f"{wd_for(k, lr, steps, schedule, warmup):.3g}")
            rows.append({"optimizer": opt, "lr": lr, "kept_target": k, "wd": wd,
                         "kept": decay_left(lr, wd, steps, schedule, warmup)})
    return rows


def study_specs(plan: list[dict], seeds, common: dict, base: dict, reference: dict | None = None,
                untied: bool = True) -> dict:
    """{name: sweep spec dict}: one spec per optimizer (its lr in base, its weight decays x seeds), the
    ``reference`` setting ({dotted name: value}, e.g. AdamW at the mission's lr) over the same seeds, and
    the untied control (the first optimizer at its middle weight decay). ``common``: dataset,
    eval_dataset, mapping, resources; ``base``: the overrides every run shares."""
    specs = {}
    for opt in dict.fromkeys(r["optimizer"] for r in plan):
        rows = [r for r in plan if r["optimizer"] == opt]
        specs[opt] = {**common, "base": {**base, "model.tie_word_embeddings": True, "train.optimizer": opt,
                                         "train.learning_rate": rows[0]["lr"]},
                      "grid": {"train.weight_decay": [r["wd"] for r in rows], "seeds": list(seeds)}}
    if reference:
        specs["reference"] = {**common, "base": {**base, "model.tie_word_embeddings": True, **reference},
                              "grid": {"seeds": list(seeds)}}
    if untied:
        first = [r for r in plan if r["optimizer"] == plan[0]["optimizer"]]
        mid = first[len(first) // 2]
        specs["untied"] = {**common, "base": {**base, "model.tie_word_embeddings": False, "train.optimizer":
                                              mid["optimizer"], "train.learning_rate": mid["lr"],
                                              "train.weight_decay": mid["wd"]}, "grid": {"seeds": list(seeds)}}
    return specs


def spec_toml(spec: dict, comment: str = "") -> str:
    """A spec dict as the TOML file ``duckling sweep`` reads (top-level paths, then [base], [grid], [resources])."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{k} = {val(spec[k])}" for k in ("dataset", "eval_dataset", "mapping") if spec.get(k) is not None]
    for table in ("base", "grid", "resources"):
        if spec.get(table):
            lines += ["", f"[{table}]"] + [f'"{k}" = {val(v)}' if "." in k else f"{k} = {val(v)}"
                                           for k, v in spec[table].items()]
    return "\n".join(lines) + "\n"


def tuned_lr(table, field: str = "train.learning_rate", col: str = "eval_loss") -> dict:
    """The lr of a tuning sweep's ``compare`` table with the lowest mean ``col`` over its seeds:
    {lr, mean, lo, hi, bracketed (a lower and a higher lr were tried), rows: [{lr, n, mean, lo, hi,
    runs}]}; runs that are not complete or have no value (diverged) count in ``runs`` only."""
    rows = []
    for lr, g in table.groupby(field, sort=True):
        ok = g[(g["status"] == "complete")][col]
        ci = stats.mean_ci(ok)
        rows.append({"lr": float(lr), "n": ci["n"], "mean": ci["mean"], "half": ci["half"], "lo": ci["lo"],
                     "hi": ci["hi"], "runs": len(g)})
    usable = [r for r in rows if r["n"] and math.isfinite(r["mean"])]
    if not usable:
        raise ValueError(f"no complete run with a {col} in this table")
    best = min(usable, key=lambda r: r["mean"])
    return {**{k: best[k] for k in ("lr", "mean", "half", "lo", "hi")},
            "bracketed": rows[0]["lr"] < best["lr"] < rows[-1]["lr"], "rows": rows}


def tuning_table(folders):
    """One row per run of the given sweep folders (one optimizer's tuning, possibly extended by a second
    sweep), from their sweep.json: the swept values, seed, status and held-out loss. No report is run."""
    import json
    from pathlib import Path

    import pandas as pd

    rows = []
    for folder in folders:
        for r in json.loads((Path(folder) / "sweep.json").read_text())["runs"]:
            rows.append({**r.get("point", {}), "seed": r.get("seed"), "status": r.get("status"),
                         "eval_loss": r.get("eval_loss"), "run": r.get("name"), "sweep": str(folder)})
    return pd.DataFrame(rows)


def _trained_on(sweeps) -> str:
    """Which training rows the tuning runs saw (their run_info.json fingerprints): a tuned lr holds for that data."""
    seen = Counter()  # (rows, sha256 prefix) -> runs
    for info in (q for d in sweeps for q in Path(d).glob("*/run_info.json")):
        try:
            r = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        fp = r.get("dataset_fingerprint") or {}
        seen[(fp.get("rows", r.get("n_train_rows")), fp.get("sha256", "")[:12])] += 1
    if not seen:
        return "  trained on: unknown (no run_info.json with a dataset fingerprint)"
    lines = [f"  trained on: {rows} rows (sha256 {sha or '?'}...) in {n} runs" for (rows, sha), n in seen.items()]
    return "\n".join(lines) + ("\n  WARNING: the runs saw different training data; the tuned lr mixes them"
                               if len(seen) > 1 else "")


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
    s = sub.add_parser("specs", help="write the study's sweep specs (one per optimizer, reference, untied)")
    s.add_argument("--lr", nargs="+", required=True, metavar="OPT=LR", help="tuned lr per optimizer, adamw=1e-3 ...")
    s.add_argument("--kept", type=float, nargs="+", default=[1.0, 0.9, 0.5], help="shares decay alone leaves")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--record-every", type=int, default=4)
    s.add_argument("--reference-lr", type=float, default=1e-4, help="AdamW's reference row (0: none)")
    s.add_argument("--reference-wd", type=float, default=0.01)
    s.add_argument("--dir", default="sweeps", help="folder of the specs; data paths are relative to it")
    s.add_argument("--prefix", default="study")
    s = sub.add_parser("best", help="the tuned lr from tuning sweeps' held-out losses (their sweep.json)")
    s.add_argument("sweeps", nargs="+", help="one optimizer's tuning sweep folders (a grid and its extensions)")
    a = p.parse_args(argv)
    if a.cmd == "best":
        b = tuned_lr(tuning_table(a.sweeps))
        print(f"{' + '.join(a.sweeps)}: tuned lr {b['lr']:g} (held-out loss, mean [95% t interval] over seeds: "
              f"{stats.fmt_ci(b)}; {'bracketed' if b['bracketed'] else 'NOT bracketed: extend the grid'})")
        for r in b["rows"]:
            print(f"  lr {r['lr']:<8g} {r['n']}/{r['runs']} runs  {stats.fmt_ci(r)}")
        print(_trained_on(a.sweeps))
        return 0
    if a.cmd == "specs":
        return _write_specs(a, t)
    print(f"prod_t (1 - lr_t * wd) over {a.steps} steps, {a.schedule} schedule, {a.warmup} warm-up steps")
    print(f"{'lr':>9} {'wd':>9} {'sum lr_t*wd':>12} {'kept':>8} {'removed':>8}")
    wds = a.wd if a.cmd == "decay" else None
    for lr in a.lr:
        for wd in wds or [wd_for(k, lr, a.steps, a.schedule, a.warmup) for k in a.kept]:
            for r in table([lr], [wd], a.steps, a.schedule, a.warmup):
                print(f"{r['lr']:>9.3g} {r['wd']:>9.4g} {r['sum_lr_wd']:>12.4g} {r['kept']:>8.4f} {r['removed']:>8.2%}")
    return 0


def _write_specs(a, t) -> int:
    from pathlib import Path

    lrs = {k: float(v) for k, v in (x.split("=", 1) for x in a.lr)}
    plan = study_plan(lrs, a.kept, a.steps, t.lr_scheduler_type, t.warmup_steps)
    common = {"dataset": "../tokenized_dataset", "eval_dataset": "../valid_dataset", "mapping": "../token_mapping.json",
              "resources": {"cpus": 1}}
    base = {"train.max_steps": a.steps, "train.save_steps": a.steps // 4, "train.eval_steps": a.steps // 4,
            "record.every": a.record_every}
    ref = {"train.optimizer": "adamw", "train.learning_rate": a.reference_lr, "train.weight_decay": a.reference_wd}
    specs = study_specs(plan, a.seeds, common, base, ref if a.reference_lr else None)
    kept = {(r["optimizer"], r["wd"]): r["kept"] for r in plan}
    for name, spec in specs.items():
        b = spec["base"]
        wds = spec["grid"].get("train.weight_decay", [b.get("train.weight_decay")])
        note = (f"The dead-token study (issue 23), {name}: {b['train.optimizer']} at lr {b['train.learning_rate']:g}, "
                f"{len(spec['grid']['seeds'])} seeds.\nWeight decays {wds}: decay alone leaves "
                + ", ".join(f"{kept.get((b['train.optimizer'], w), decay_left(b['train.learning_rate'], w, a.steps)):.3f}"
                            for w in wds)
                + f" of a dead row's norm over {a.steps} steps ({t.lr_scheduler_type} schedule), prod_t (1 - lr_t wd)."
                f"\nWritten by python -m duckling.sweeps.tuning specs.\n"
                f"  duckling sweep {a.dir}/{a.prefix}_{name}.toml --out {a.dir}/{a.prefix}/{name}")
        path = Path(a.dir) / f"{a.prefix}_{name}.toml"
        path.write_text(spec_toml(spec, note), encoding="utf-8")
        print(f"wrote {path}: {len(wds) * len(spec['grid']['seeds'])} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
