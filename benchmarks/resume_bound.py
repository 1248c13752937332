"""How far a resumed run lands from an uninterrupted one (bit-exact on CPU and CUDA eager; a bound with
torch.compile on CUDA). Run on the device the bound is for:

    python -P benchmarks/resume_bound.py [--device cuda] [--steps 200] [--compile auto|false]

Trains the default configuration (real text if --dataset is given, else random live ids) for --steps
steps into a run folder, and again with a Ctrl-C-like interrupt a few steps after the mid-run
checkpoint followed by --resume; prints the largest absolute weight difference between the two final
models and the largest difference of their logged losses.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # benchmarks/tokenize.py would shadow the stdlib

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--compile", default="auto", help="auto (CUDA graphs on CUDA) | false (eager)")
    ap.add_argument("--dataset", default=None, help="tokenized dataset folder (default: random live ids)")
    ap.add_argument("--json", default=None, metavar="PATH")
    a = ap.parse_args()

    import torch
    from transformers import TrainerCallback

    from duckling.config import N_LIVE, DucklingConfig
    from duckling.training.train import train

    n, half = a.steps, a.steps // 2
    cfg = DucklingConfig().override({"train.device": a.device, "train.max_steps": n, "train.save_steps": half,
                                     "train.compile": "auto" if a.compile == "auto" else False})
    data = a.dataset or np.random.default_rng(0).integers(0, N_LIVE, size=(64, cfg.model.n_positions))

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == half + 3:
                raise KeyboardInterrupt("injected")

    work = Path(tempfile.mkdtemp(prefix="duckling-resume-"))
    tok = REPO / "token_mapping.json"
    ref = train(cfg, dataset=data, run_dir=work / "ref", tokenizer=tok, progress=False)
    try:
        train(cfg, dataset=data, run_dir=work / "cut", tokenizer=tok, callbacks=[Interrupt()], progress=False)
    except KeyboardInterrupt:  # (duckling's RunInterrupted is one)
        pass
    res = train(cfg, dataset=data, run_dir=work / "cut", tokenizer=tok, resume=True, progress=False)
    diff = max(float((p.detach().float() - q.detach().float()).abs().max())
               for p, q in zip(ref.model.parameters(), res.model.parameters()))
    la, lb = ref.losses()[1], res.losses()[1]
    m = min(len(la), len(lb))
    out = {"device": ref.device, "device_name": torch.cuda.get_device_name() if ref.device == "cuda" else ref.device,
           "compile": ref.compile, "steps": n, "resumed_from": half, "max_abs_weight_diff": diff,
           "max_abs_loss_diff": float(np.abs(la[:m] - lb[:m]).max()) if m else None, "bit_exact": diff == 0.0}
    for k, v in out.items():
        print(f"{k}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the two run folders and their recordings


if __name__ == "__main__":
    main()
