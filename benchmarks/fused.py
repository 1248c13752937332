"""Fused groups (issue 21): equivalence and speed figures.

CPU (default):
    python benchmarks/fused.py [--k 3] [--steps 20] [--seq 128]
prints, per optimizer, each fused run's max |W_fused - W_separate| after --steps steps and the same
relative to how far the run moved (max over tensors of ||dW_f - dW_s|| / ||dW_s||); then
``fused_cpu_ratio`` = (wall time of the K runs one after another) / (wall time of the K runs fused),
both from the Trainer's own steps/s (after warm-up, without evaluation and checkpoints): above 1 the
fused group is faster. No target: a CPU step is compute-bound, so fusing mostly saves the per-step
Python and launch overhead. Last, one fused forward+backward step vs ``torch.func`` (stack_module_state
+ functional_call + vmap) over transformers' GPT-2, and vs K separate steps.

GPU (benchmarks/gpu_check.sh):
    python benchmarks/fused.py --device cuda --ks 8 16 32 [--steps 150] [--record-every 10]
prints ``gpu_packing_ratio`` = aggregate recorded steps/s of a fused group of K (K x its steps/s)
/ steps/s of one recorded run alone (``duckling train``'s own path, compiled as by default), for
each K, with the Duckling's real shape (2 layers, d = 128, 512 tokens, batch 2). Disk: K runs x
steps / record-every snapshots of 2 MB (bf16 W), removed after each measurement.
"""
from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0], and a sibling named like a stdlib module
# (benchmarks/tokenize.py) would shadow it: import from the repo instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from duckling.config import N_LIVE, DucklingConfig  # noqa: E402
from duckling.training.fused import train_group  # noqa: E402
from duckling.training.model import build_model  # noqa: E402
from duckling.training.train import train  # noqa: E402

LRS = {"adamw": (1e-3, 3e-3, 2e-3, 5e-4), "coupled_adam": (1e-3, 3e-3, 2e-3, 5e-4), "sgd": (0.1, 0.3, 0.05, 0.2)}
WDS = (0.1, 0.0, 0.01, 0.05)


def configs(optimizer: str, k: int, steps: int, seq: int, device: str, **kw) -> list[DucklingConfig]:
    base = DucklingConfig().override({"model.n_positions": seq, "train.max_steps": steps, "train.device": device,
                                      "train.optimizer": optimizer, "train.save_steps": steps,
                                      "train.logging_steps": max(1, steps // 4), **kw})
    return [base.override({"train.seed": i, "train.learning_rate": LRS[optimizer][i % 4],
                           "train.weight_decay": WDS[i % 4]}) for i in range(k)]


def rows(seq: int, n: int = 4096) -> np.ndarray:
    return np.random.default_rng(0).integers(0, N_LIVE, size=(n, seq), dtype=np.uint16)


def key_out(bias: torch.Tensor, d: int) -> torch.Tensor:
    """c_attn.bias without its key third: its true gradient is 0 (softmax ignores a constant added to
    every key), so under Adam its steps are normalised rounding noise, in any run."""
    return torch.cat([bias[:d], bias[2 * d:]])


def equivalence(args) -> None:
    data = rows(args.seq)
    print(f"equivalence: K={args.k} fused vs separate, {args.steps} steps, float32 on CPU, {args.seq} tokens")
    ratio_done = False
    for opt in ("adamw", "sgd", "coupled_adam"):
        cfgs = configs(opt, args.k, args.steps, args.seq, "cpu", **{"train.compute_dtype": "fp32",
                                                                    "record.enabled": False})
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            fused = train_group(cfgs, [Path(tmp) / f"r{i}" for i in range(args.k)], dataset=data, tokenizer=False,
                                progress=False)
            t_fused = time.perf_counter() - t
        t = time.perf_counter()
        alone = [train(c, data, tokenizer=False, progress=False) for c in cfgs]
        t_alone = time.perf_counter() - t
        for i, (f, s, c) in enumerate(zip(fused, alone, cfgs)):
            w0 = build_model(c.model, seed=c.train.seed).state_dict()
            fs, ss = f.model.state_dict(), s.model.state_dict()
            diff = max((fs[n] - ss[n]).abs().max().item() for n in ss)
            rel = {n: ((fs[n] - ss[n]).norm() / (ss[n] - w0[n]).norm()).item() for n in ss}
            d = c.model.n_embd
            keyless = {n: ((key_out(fs[n], d) - key_out(ss[n], d)).norm() / (key_out(ss[n] - w0[n], d)).norm()).item()
                       for n in ss if n.endswith("c_attn.bias")}
            rest = {**rel, **keyless}
            print(f"  {opt:12s} run {i} (lr {c.train.learning_rate:g}, wd {c.train.weight_decay:g}): "
                  f"max|W diff| = {diff:.2e}; ||dW_f - dW_s|| / ||dW_s||: max {max(rel.values()):.2e} "
                  f"({max(rel, key=rel.get)}), without the key bias {max(rest.values()):.2e} "
                  f"({max(rest, key=rest.get)}); final loss {f.losses()[1][-1]:.4f} vs {s.losses()[1][-1]:.4f}")
        if not ratio_done:
            sequential = sum(1 / s.steps_per_s for s in alone)
            print(f"fused_cpu_ratio = {sequential * fused[0].steps_per_s:.2f} ({opt}, K={args.k}: fused "
                  f"{fused[0].steps_per_s:.2f} steps/s for all K; alone "
                  f"{', '.join(f'{s.steps_per_s:.2f}' for s in alone)} steps/s each; wall incl. set-up "
                  f"{t_fused:.0f} s fused vs {t_alone:.0f} s one after another)")
            ratio_done = True


def step_kernels(args) -> None:
    """One forward+backward of K models: the fused module, torch.func's vmap, K separate models."""
    from torch.func import functional_call, stack_module_state, vmap

    from duckling.config import ModelConfig
    from duckling.training.fused_model import FusedGPT2

    K, B, T = args.k, 2, args.seq
    cfg = ModelConfig(n_positions=T, dropout=0.0)  # vmap has no per-run dropout streams: compare without
    models = [build_model(cfg, seed=s) for s in range(K)]
    ids = torch.randint(0, N_LIVE, (K, B, T))

    def timed(step, reps=3) -> float:
        step()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - t) / reps * 1e3

    fused = FusedGPT2(models)
    print(f"one step, K={K}, {T} tokens, batch 2 (ms, forward+backward):")
    print(f"  batched matmuls (FusedGPT2): {timed(lambda: fused(ids)[0].sum().backward()):.0f}")
    print(f"  K separate GPT2LMHeadModel : "
          f"{timed(lambda: [m(input_ids=ids[k], labels=ids[k]).loss.backward() for k, m in enumerate(models)]):.0f}")
    params, buffers = stack_module_state(models)
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    base = build_model(cfg).to("meta")

    def loss(p, b, x):
        logits = functional_call(base, (p, b), (x,)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    try:
        ms = timed(lambda: vmap(loss, randomness="same")(params, buffers, ids).sum().backward())
        print(f"  torch.func vmap            : {ms:.0f}")
    except RuntimeError as e:
        print(f"  torch.func vmap            : fails ({str(e).splitlines()[0][:120]})")


def gpu_packing(args) -> None:
    data = rows(512, n=8192)
    kw = {"record.every": args.record_every, "train.save_steps": 10 ** 6}
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        (one_cfg,) = configs("adamw", 1, args.steps, 512, "cuda", **kw)
        one = train(one_cfg, data, Path(tmp) / "one", tokenizer=False, progress=False)
        shutil.rmtree(Path(tmp) / "one")
        print(f"one recorded run alone: {one.steps_per_s:.1f} steps/s (compile {one.compile})")
        for k in args.ks:
            cfgs = configs("adamw", k, args.steps, 512, "cuda", **kw)
            dirs = [Path(tmp) / f"g{k}" / f"r{i}" for i in range(k)]
            t = time.perf_counter()
            fused = train_group(cfgs, dirs, dataset=data, tokenizer=False, progress=False)
            wall = time.perf_counter() - t
            shutil.rmtree(Path(tmp) / f"g{k}")
            agg = k * fused[0].steps_per_s
            print(f"gpu_packing_ratio K={k}: {agg / one.steps_per_s:.2f} (fused {fused[0].steps_per_s:.2f} steps/s "
                  f"x {k} runs = {agg:.1f} recorded steps/s; {wall:.0f} s wall incl. set-up and close; peak "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
            torch.cuda.reset_peak_memory_stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--k", type=int, default=3, help="CPU: runs per group")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32], help="cuda: group sizes")
    p.add_argument("--steps", type=int, default=None, help="steps per run (cpu 20, cuda 150)")
    p.add_argument("--seq", type=int, default=128, help="CPU: tokens per row")
    p.add_argument("--record-every", type=int, default=10, help="cuda: snapshot stride")
    p.add_argument("--scratch", default=None, help="cuda: folder for the temporary run folders")
    p.add_argument("--skip-kernels", action="store_true", help="CPU: skip the one-step kernel comparison")
    args = p.parse_args()
    if args.device == "cuda":
        args.steps = args.steps or 150
        gpu_packing(args)
    else:
        args.steps = args.steps or 20
        equivalence(args)
        if not args.skip_kernels:
            step_kernels(args)


if __name__ == "__main__":
    main()
