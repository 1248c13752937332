"""``duckling report RUN_DIR``: every dead-token figure as PNG plus ``summary.json`` of headline numbers.

Figures are named after the analysis (``norms.png``); an untied run gets the same set again for
its output matrix with a ``_lm_head`` suffix, and summary keys follow the same rule.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

if "numpy" not in sys.modules:  # only effective before numpy loads OpenBLAS, i.e. from the CLI
    # The report's matrices are small (8192 x 128 grams, 128 x 128 eigh): one BLAS thread is nearly
    # as fast as several on an idle CPU, and 10-40x faster on a busy shared one (measured:
    # gram 3 ms with 1 thread vs 130 ms with 2 spinning threads under load 4 on 2 cores).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from . import analysis as A  # noqa: E402
from . import plots as P  # noqa: E402
from .errors import DucklingError  # noqa: E402

DPI = 100  # with plots.FIGSIZE (6 x 4 in): 600 x 400 px, ~50-100 kB per PNG


def _num(x):
    """JSON-safe float (NaN/inf -> None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _first_step(steps, values, threshold: float):
    """First step at which ``values`` reaches ``threshold`` (None if never)."""
    hit = np.flatnonzero(np.asarray(values) >= threshold)
    return int(steps[hit[0]]) if len(hit) else None


def _trainer_state(run_dir: Path) -> dict | None:
    """The Trainer's state of a finished run (final/), else of its latest checkpoint, else None."""
    ckpts = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    for path in [run_dir / "final" / "trainer_state.json", *reversed(ckpts)]:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def report(run_dir, out=None, max_points: int | None = A.MAX_POINTS) -> dict:
    """Write every figure into ``out`` (default RUN_DIR/report) and return the summary dict.

    Snapshot-based curves are evaluated at ``max_points`` evenly spaced recorded steps (always
    including the first and last; None or 0 = every recorded step); per-step scalars use every step."""
    from .recording import Recording

    run_dir = Path(run_dir)
    if not (run_dir / "recording").is_dir():
        raise DucklingError(f"{run_dir} has no recording/ folder: pass the folder given to "
                            "`duckling train --run`, from a run trained with recording enabled.")
    rec = Recording(run_dir)
    if len(rec.steps) < 2:
        raise DucklingError(f"the recording in {run_dir} holds {len(rec.steps)} snapshot(s); the report "
                            "needs at least two (step 0 and a later one): train for more steps.")
    out = Path(out) if out is not None else run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only disk
        raise DucklingError(f"Cannot write the report into {out.resolve()} ({e.strerror or e}): pass --out a "
                            "writable folder path (not a file).") from e
    steps = A.thin(rec.steps, max_points or None)
    S: dict = {"run": str(run_dir), "last_snapshot_step": int(rec.steps[-1]),
               "last_scalar_step": int(rec.scalar_steps[-1]), "n_snapshots": len(rec.steps),
               "n_points": len(steps), "matrices": list(rec.meta.get("matrices", ["wte"])),
               "drift_reference": "cos_hidden: -(mean final hidden state averaged over updates 1..N); "
                                  "cos_live: -(mean live row at step N)",
               "detect_auroc_convention": "dead = positive class; norm scores -||w|| (AUROC < 0.5 means dead "
                                          "rows are larger); cos_dead_mean* use the dead labels; cos_all_mean "
                                          "and pc1 are unsupervised and report max(A, 1 - A)",
               "figures": []}

    def put(name, fig, sfx=""):
        fig.savefig(out / f"{name}{sfx}.png", dpi=DPI)
        S["figures"].append(f"{name}{sfx}.png")

    for m in S["matrices"]:
        sfx = "" if m == "wte" else f"_{m}"

        n = A.norms(rec, m)
        put("norms", P.plot_norms(n, m), sfx)
        d = A.displacement(rec, m, steps)
        put("displacement", P.plot_displacement(d, m), sfx)
        dr = A.drift(rec, m, steps)
        put("drift", P.plot_drift(dr, m), sfx)
        c = A.collapse(rec, m, steps)
        put("collapse", P.plot_collapse(c, m), sfx)
        put("trajectories", P.plot_trajectories(A.trajectory_map(rec, m, steps), m), sfx)
        det = A.detectability(rec, m, steps)
        put("detectability", P.plot_detectability(det, m), sfx)
        put("gradients", P.plot_gradients(A.gradient_channel(rec, m), m), sfx)
        S.update({f"{k}{sfx}": v for k, v in {
            "dead_norm_over_null": _num(n["ratio"][-1]),
            "dead_norm_mean": _num(n["dead"]["mean"][-1]),
            "live_norm_mean": _num(n["live"]["mean"][-1]),
            "dead_displacement_mean": _num(d["dead"]["mean"][-1]),
            "dead_mean_pairwise_cosine": _num(c["dead_cos"][-1]),
            "live_mean_pairwise_cosine": _num(c["live_cos"][-1]),
            "dead_cos_to_mean_dead": _num(c["dead_cos_to_mean"][-1]),
            "dead_pc1_variance_fraction": _num(c["pc_var"][-1, 0]),
            "drift_cosine_to_neg_mean_hidden": _num(dr["cos_hidden"][-1]),
            "drift_cosine_to_neg_mean_live": _num(dr["cos_live"][-1]),
            **{f"detect_auroc_{k}": _num(v[-1]) for k, v in det["auroc"].items()},
            "detect_first_step_separable_0.9": {  # first step with max(AUROC, 1 - AUROC) >= 0.9
                k: _first_step(det["steps"], np.maximum(v, 1 - v), 0.9) for k, v in det["auroc"].items()},
        }.items()})
    probe = A.output_mass(rec)
    if len(probe["steps"]):
        put("output_mass", P.plot_output_mass(probe))
        S.update(dead_output_mass=_num(probe["total"][-1]), dead_output_max_prob=_num(probe["max"][-1]),
                 dead_output_mass_step=int(probe["steps"][-1]))
    state = _trainer_state(run_dir)
    if state:
        put("loss", P.plot_loss(state["log_history"]))
        for key in ("loss", "eval_loss"):
            last = [e for e in state["log_history"] if key in e]
            if last:
                S[f"final_{'train_loss' if key == 'loss' else key}"] = _num(last[-1][key])
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(S, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return S
