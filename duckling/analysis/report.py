"""``duckling report RUN_DIR``: every dead-token figure as PNG plus ``summary.json`` of headline numbers.

Figures are named after the analysis (``norms.png``); an untied run gets the same set again for
its output matrix with a ``_lm_head`` suffix, and summary keys follow the same rule.

Detectability keys (changed with issue 13; every AUROC is in a fixed, stated direction, never max(A, 1-A)):
``detect_auroc_norm`` / ``_cos_all_mean`` / ``_pc1`` are the label-free indicators, directions in
``detect_label_free`` (``_cos_all_mean`` and ``_pc1`` were max(A, 1-A) before: values < 0.5 now mean
the stated direction is wrong). ``detect_label_using_auroc_cos_dead_mean`` and
``..._cos_dead_mean_nopc1`` (Magikarp) were ``detect_auroc_cos_dead_mean*``.
``detect_first_step_separable`` (was ``detect_first_step_separable_0.9``, a step from max(A, 1-A)):
per label-free indicator, the first evaluated step with AUROC >= 0.9 in the stated direction and
in the opposite one, each with the evaluated step before it (the resolution);
``detect_label_using_first_step_separable`` the same for the label-using ones.

Keys added with issue 23 (per matrix: an untied run adds each again with ``_lm_head``; "no sfx" = once):
- centred collapse: ``dead_centred_pc1_share`` (share of variance on PC1 of the centred dead rows, last
  step; == ``dead_pc1_variance_fraction``), ``dead_centred_pc1_share_init`` (step 0),
  ``dead_centred_pc1_share_noise`` (what isotropic noise gives: (1 + sqrt(d/n))^2 / d),
  ``dead_spread_over_init`` / ``live_spread_over_init`` (mean ||row - group mean||^2 at the last step over
  step 0; 1 = no contraction), ``dead_pairwise_cosine_from_mean`` (the pairwise cosine the common
  displacement alone gives, beside the measured ``dead_mean_pairwise_cosine``).
- mean embedding: ``mean_shift_{all,live,dead}`` = ||mean row_N - mean row_0||, ``mean_row_norm_{all,live,
  dead}`` and ``..._init``, ``mean_shift_cos_neg_hidden_{all,live,dead}`` = cosine(shift, -mean hidden
  state averaged over updates 1..N).
- update rule as a consistency check: ``update_rule_step_ratio_{median,p05,p95}`` (per-step measured /
  predicted, coherent form; 5-95% over steps), ``update_rule_step_ratio_incoherent_{median,p05,p95}``,
  ``update_rule_n_steps``.
- decay-only reference: ``dead_path_decay_only`` (mean dead-row path that decoupled decay alone gives,
  sum_t lr_t wd ||w_t-1||, from the exact scalars), ``dead_path_over_decay_only`` (measured path / it;
  None when wd = 0).
- frequency (after Kunstner et al. 2024, Pinto et al. 2024): ``freq_source`` (no sfx), ``freq_buckets``
  (no sfx: {"labels": ["dead", "D1", ..., "D10"], "n_tokens", "count_min", "count_max"}; D1 = rarest live
  decile), ``norm_by_freq`` / ``norm_by_freq_init`` (mean row norm per bucket, same order), and, no sfx,
  ``loss_by_freq`` (held-out loss per target bucket, dead = None), ``loss_by_freq_n_targets``,
  ``loss_by_freq_overall``, ``loss_by_freq_rows``, or ``loss_by_freq_note`` (why it was skipped).
- blind indicators: ``detect_direction_source`` ({indicator: where its fixed direction comes from},
  metrics.BLIND_DIRECTIONS), ``detect_auroc_post_hoc_{k}`` = max(A, 1 - A) with
  ``detect_post_hoc_direction_{k}``: chosen after seeing the labels, never the headline.
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

from duckling.analysis import measures as M  # noqa: E402
from duckling.analysis.findings import findings, fmt  # noqa: E402,F401  (re-exported: notebook 07, sweeps.study)
from duckling.analysis import metrics as A  # noqa: E402
from duckling.analysis import plots as P  # noqa: E402
from duckling.analysis import update_rule as U  # noqa: E402
from duckling.errors import DucklingError  # noqa: E402
from duckling.files import checkpoints, write_json  # noqa: E402
from duckling.recording.reader import Recording  # noqa: E402
from duckling.storage import local_path  # noqa: E402


def _num(x):
    """JSON-safe float (NaN/inf -> None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _spacing(steps) -> str:
    """Mean spacing of an evaluated step grid, e.g. "1.2" or "39"."""
    gap = float(np.mean(np.diff(steps))) if len(steps) > 1 else 0.0
    return f"{gap:.2g}" if gap < 10 else f"{gap:.0f}"


def _trainer_state(run_dir: Path) -> dict | None:
    """The Trainer's state of a finished run (final/), else of its latest complete checkpoint, else None."""
    last = checkpoints(run_dir)[-1:]
    for path in [run_dir / "final" / "trainer_state.json", *(c / "trainer_state.json" for c in last)]:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def report(run_dir, out=None, max_points: int | None = A.MAX_POINTS, eval_dataset=None) -> dict:
    """Write every figure into ``out`` (default RUN_DIR/report) and return the summary dict.

    ``eval_dataset``: the held-out dataset folder for the loss by frequency bucket (default: the one
    run_info.json or the run's sweep.json names; without one, or without RUN/final, it is skipped with a note).
    ``run_dir`` may be a storage URI (duckling.storage): the recording is read from there block by block,
    ``out`` is then required (a local folder) and the loss by frequency is skipped (it needs the model).

    Snapshot-based curves are evaluated at ``max_points`` evenly spaced recorded steps (always
    including the first and last; None or 0 = every recorded step); per-step scalars use every step."""
    remote = local_path(run_dir) is None  # a run in a storage (an fsspec URI): read remotely, block by block
    if remote:
        if out is None:
            raise DucklingError(f"{run_dir} is in a storage, which the report only reads: pass --out a local "
                                "folder for its figures and summary.json.")
        rec = Recording(run_dir)
        run_dir = rec.run_dir  # a local copy of the run's small files (config.json, trainer_state.json...)
    else:
        run_dir = local_path(run_dir)
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
    S: dict = {"run": Path(run_dir).resolve().name,  # the folder name only: no machine path in a shared summary
               "last_snapshot_step": int(rec.steps[-1]),
               "last_scalar_step": int(rec.scalar_steps[-1]), "n_snapshots": len(rec.steps),
               "n_points": len(steps), "matrices": list(rec.meta.get("matrices", ["wte"])),
               "drift_reference": "cos_hidden: -(mean final hidden state averaged over updates 1..N); "
                                  "cos_live: -(mean live row at step N)",
               "detect_auroc_convention": "dead = positive class; every AUROC in the fixed direction of "
                                          "detect_label_free / detect_label_using (1 = separates, 0.5 = chance, "
                                          "< 0.5 = the stated direction is wrong for this run); label_using "
                                          "indicators build their reference from the dead labels: an upper bound, "
                                          "not a detector",
               "detect_label_free": A.LABEL_FREE, "detect_label_using": A.LABEL_USING,
               "update_rule_convention": "per step, mean over dead rows of the measured update ||w_N - w_N-1|| "
                                         "over the optimizer's rule fed the recorded gradient norms and row-mean "
                                         "second moments (duckling/analysis/update_rule.py); coherent = each row's gradient "
                                         "keeps its direction (upper bound on the first moment), incoherent = "
                                         "uncorrelated directions; a CONSISTENCY CHECK of the recorded fields, not a "
                                         "prediction (the rule is fed the run's own gradients): "
                                         "update_rule_measured_over_predicted* are sums over all steps, "
                                         "update_rule_step_ratio_* the median and 5-95% of the per-step ratios",
               "detect_direction_source": A.DIRECTION_SOURCE,
               "lr_budget_convention": "sum over updates of lr x sqrt(d): the straight-line distance of a row "
                                       "moving lr per coordinate per step (Adam's constant-gradient limit)",
               "figures": []}

    def put(name, fig, sfx=""):
        fig.savefig(out / f"{name}{sfx}.png", dpi=P.DPI)
        S["figures"].append(f"{name}{sfx}.png")

    untied = len(S["matrices"]) > 1
    budget = U.lr_budget(rec)  # (T,) sum of lr x sqrt(d)
    counts, S["freq_source"] = M.token_counts(rec)
    buckets = None if counts is None else M.frequency_buckets(counts, rec.live_ids, rec.dead_ids)
    if buckets is not None:
        S["freq_buckets"] = {k: buckets[k] for k in ("labels", "n_tokens", "count_min", "count_max")}
        loss = {"note": "skipped: the run is in a storage and the loss by frequency needs its trained model on this "
                        "machine: download the run (duckling.storage.Storage(URI).download) and report it there"} \
            if remote else M.loss_by_frequency(run_dir, buckets, eval_dataset)
        if "note" in loss:
            S["loss_by_freq_note"] = loss["note"]
        else:
            S.update(loss_by_freq=[_num(x) for x in loss["loss"]], loss_by_freq_n_targets=loss["n_targets"].tolist(),
                     loss_by_freq_overall=_num(loss["overall"]), loss_by_freq_rows=loss["rows"],
                     loss_by_freq_dataset=loss["dataset"])
    for m in S["matrices"]:
        sfx = "" if m == "wte" else f"_{m}"
        rec.preload(steps, m)  # the analyses below pass over these steps several times: decode once

        n = {**A.norms(rec, m), "untied": untied}
        put("norms", P.plot_norms(n, m), sfx)
        d = {**A.displacement(rec, m, steps), "untied": untied}
        put("displacement", P.plot_displacement(d, m), sfx)
        dr = {**A.drift(rec, m, steps), "untied": untied}
        put("drift", P.plot_drift(dr, m), sfx)
        c = {**A.collapse(rec, m, steps), "untied": untied}
        put("collapse", P.plot_collapse(c, m), sfx)
        ms = M.mean_shift(rec, m, steps)
        put("trajectories", P.plot_trajectories({**A.trajectory_map(rec, m, steps), "untied": untied}, m), sfx)
        det = A.detectability(rec, m, steps)
        put("detectability", P.plot_detectability(det, m), sfx)
        put("gradients", P.plot_gradients({**A.gradient_channel(rec, m), "untied": untied}, m), sfx)
        rec.preload([], m)  # free it: the rest uses per-step scalars
        last = int(A._scalar_index(rec, [d["steps"][-1]])[0])  # the displacement's last step among the scalars
        u = U.update_prediction(rec, m)
        put("update_rule", P.plot_update_rule(u, m), sfx)
        if buckets is not None:
            nf = M.norm_by_frequency(rec, buckets, m)
            put("frequency", P.plot_frequency(buckets, nf, loss, S["freq_source"], m, untied), sfx)
            S.update({f"norm_by_freq{sfx}": [_num(x) for x in nf["final"]],
                      f"norm_by_freq_init{sfx}": [_num(x) for x in nf["init"]]})
        q2, q2i = M.step_ratio_stats(u["ratio"]), M.step_ratio_stats(u["ratio_incoherent"])
        decay_path = float(np.nansum(u["decay"][:last + 1]))
        sep = {k: {"direction": A.LABEL_FREE[k], "threshold": 0.9,
                   **A.first_separable(det["steps"], det["auroc"][k]),
                   "opposite": {"direction": A.OPPOSITE[k],
                                **A.first_separable(det["steps"], det["auroc"][k], opposite=True)}}
               for k in A.LABEL_FREE}
        S.update({f"{k}{sfx}": v for k, v in {
            "dead_norm_over_null": _num(n["ratio"][-1]),
            "dead_norm_mean": _num(n["dead"]["mean"][-1]),
            "live_norm_mean": _num(n["live"]["mean"][-1]),
            "dead_displacement_mean": _num(d["dead"]["mean"][-1]),
            "dead_mean_pairwise_cosine": _num(c["dead_cos"][-1]),
            "live_mean_pairwise_cosine": _num(c["live_cos"][-1]),
            "dead_cos_to_mean_dead": _num(c["dead_cos_to_mean"][-1]),
            "dead_pc1_variance_fraction": _num(c["pc_var"][-1, 0]),
            "dead_centred_pc1_share": _num(c["pc_var"][-1, 0]),
            "dead_centred_pc1_share_init": _num(c["pc_var"][0, 0]),
            "dead_centred_pc1_share_noise": _num(c["pc1_noise"]),
            "dead_spread_over_init": _num(c["dead_spread"][-1] / c["dead_spread"][0]),
            "live_spread_over_init": _num(c["live_spread"][-1] / c["live_spread"][0]),
            "dead_pairwise_cosine_from_mean": _num(c["dead_cos_from_mean"][-1]),
            **{f"mean_shift_{g}": _num(ms[f"shift_{g}"][-1]) for g in ("all", "live", "dead")},
            **{f"mean_row_norm_{g}": _num(ms[f"mean_norm_{g}"][-1]) for g in ("all", "live", "dead")},
            **{f"mean_row_norm_{g}_init": _num(ms[f"mean_norm_{g}"][0]) for g in ("all", "live", "dead")},
            **{f"mean_shift_cos_neg_hidden_{g}": _num(ms[f"cos_hidden_{g}"][-1]) for g in ("all", "live", "dead")},
            "drift_cosine_to_neg_mean_hidden": _num(dr["cos_hidden"][-1]),
            "drift_cosine_to_neg_mean_live": _num(dr["cos_live"][-1]),
            **{f"detect_auroc_{k}": _num(det["auroc"][k][-1]) for k in A.LABEL_FREE},
            **{f"detect_auroc_post_hoc_{k}": _num(M.post_hoc(det["auroc"][k][-1], k)[0]) for k in A.LABEL_FREE},
            **{f"detect_post_hoc_direction_{k}": M.post_hoc(det["auroc"][k][-1], k)[1] for k in A.LABEL_FREE},
            **{f"detect_label_using_auroc_{k}": _num(det["auroc"][k][-1]) for k in A.LABEL_USING},
            "detect_first_step_separable": sep,
            "detect_label_using_first_step_separable": {
                k: {"threshold": 0.9, **A.first_separable(det["steps"], det["auroc"][k])} for k in A.LABEL_USING},
            "detect_step_grid": f"{len(det['steps'])} evaluated steps from {int(det['steps'][0])} to "
                                f"{int(det['steps'][-1])}, about every {_spacing(det['steps'])} steps",
            "dead_displacement_over_lr_budget": _num(d["dead"]["mean"][-1] / budget[last]),
            "dead_path_over_lr_budget": _num(d["dead_path_mean"][last] / budget[last]),
            "update_rule_optimizer": u["optimizer"],
            "update_rule_measured_over_predicted": _num(U.path_ratio(u)),
            "update_rule_measured_over_predicted_incoherent": _num(U.path_ratio(u, "incoherent")),
            **{f"update_rule_step_ratio_{k}": q2[k] for k in ("median", "p05", "p95")},
            **{f"update_rule_step_ratio_incoherent_{k}": q2i[k] for k in ("median", "p05", "p95")},
            "update_rule_n_steps": q2["n_steps"],
            "dead_path_decay_only": _num(decay_path),
            "dead_path_over_decay_only": _num(d["dead_path_mean"][last] / decay_path) if decay_path > 0 else None,
            "update_rule_v_check_median": _num(np.nanmedian(u["v_check"])) if np.isfinite(u["v_check"]).any()
            else None,
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
    write_json(out / "summary.json", S)
    return S
