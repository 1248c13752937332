"""Findings: Markdown bullets of what one run's ``summary.json`` says (notebook 07 prints them).

Every claim is computed from the numbers it states, with the threshold in the text: a verb such as
"follow weight decay alone" appears only when the numbers printed beside it say so (the norm within 5%
of the decay null AND the path within 5% of the path decay alone gives). ``duckling.analysis.report``
re-exports ``findings`` and ``fmt``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

TOL = 0.05  # "within 5%": |x / reference - 1| <= TOL
COS_TOL = 0.05  # a measured cosine "follows" a predicted one within this absolute difference
RULE_TOL = 0.10  # the update rule "agrees" when 5-95% of per-step ratios lie within 1 +- RULE_TOL


def fmt(x, spec: str = ".3g") -> str:
    """A number as both findings print it (this module's, of one run, and duckling.sweeps.study's, of a
    study table): "n/a" when missing (None or NaN); a sequence (a study's mean per weight decay) as
    its values joined by " / "."""
    if isinstance(x, Iterable) and not isinstance(x, str):
        return " / ".join(fmt(v, spec) for v in x)
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _pct(x, spec: str = ".2f") -> str:
    return fmt(None if x is None else 100 * x, spec)


def _within(x, ref=1.0, tol=TOL) -> bool:
    return x is not None and math.isfinite(x) and abs(x / ref - 1) <= tol


def norm_claim(r, path_over_decay) -> str:
    """The norm bullet: the norm compared with the decay null, and "follow weight decay alone" only when
    the path (exact per-step update norms) also matches decay's within TOL."""
    pct = f"{100 * TOL:.0f}%"
    norm = (f"grow past the weight-decay null ({fmt(r)}x)" if r > 1 + TOL else
            f"shrink faster than the weight-decay null ({fmt(r)}x)" if r < 1 - TOL else
            f"end within {pct} of the weight-decay null ({fmt(r)}x)")
    if path_over_decay is None:
        return (f"**Dead-row norms {norm}**; this run has no weight decay, so decay alone would leave the rows "
                "in place: their movement is the gradient's.")
    path = f"their summed path is {fmt(path_over_decay)}x the path decay alone gives"
    if _within(r) and _within(path_over_decay):
        return f"**Dead rows follow weight decay alone**: norms {norm}, and {path} (both within {pct})."
    if _within(r):
        return (f"**Dead-row norms {norm}, but the rows do not follow weight decay alone**: {path} "
                f"(not within {pct}), so something else moves them without changing their norm much.")
    return f"**Dead-row norms {norm}**; {path}."


def collapse_claim(pc, pred, share, noise, share0, spread, live_pc) -> str:
    """The collapse bullet: the uncentred pairwise cosine beside what the common shift alone gives, and
    the centred measures beside their references; the verdict follows from those numbers."""
    text = (f"**Collapse**: dead rows' mean pairwise cosine is {fmt(pc, '.3f')} (live rows {fmt(live_pc, '.2f')}); "
            f"their common shift alone gives {fmt(pred, '.3f')}. Centred, PC1 holds {_pct(share)}% of "
            f"their variance (isotropic noise {_pct(noise)}%, init {_pct(share0)}%), and "
            f"their spread around their mean is {fmt(spread, '.3f')}x its initial value (1 = no contraction).")
    if None in (pc, pred, share, noise, spread):
        return text
    shift_explains = abs(pc - pred) <= COS_TOL
    centred_flat = share <= 2 * noise and spread >= 1 - 4 * TOL
    if shift_explains and centred_flat:
        return text + (f" So the pairwise cosine re-measures the shift of their mean (within {COS_TOL} of it): "
                       "the rows have not collapsed onto each other.")
    if centred_flat:
        return text + (f" The centred measures sit at their references, but the cosine differs from the common "
                       f"shift's by more than {COS_TOL}: rows of unequal norms, read the figure.")
    return text + (" The centred measures moved away from their references (PC1 share above twice the noise, or "
                   f"spread below {1 - 4 * TOL:.1f}x): the rows did contract around their mean.")


def rule_claim(opt, q, qi, total, total_i) -> str:
    """Q2 as a consistency check: the per-step distribution, and "agree" only when 5-95% of it lies within
    1 +- RULE_TOL."""
    med, p05, p95 = q
    text = (f"**Update rule ({opt}), a consistency check** (the rule is fed this run's own recorded gradients, so "
            f"it checks the recorded fields, it does not predict): per step, measured / predicted has median "
            f"{fmt(med)} (5-95% of steps: {fmt(p05)}-{fmt(p95)}) if each row's gradient kept its direction, median "
            f"{fmt(qi[0])} ({fmt(qi[1])}-{fmt(qi[2])}) if successive directions were uncorrelated; summed over the "
            f"run, {fmt(total)}x and {fmt(total_i)}x.")
    if p05 is None or p95 is None:
        return text
    if 1 - RULE_TOL <= p05 and p95 <= 1 + RULE_TOL:
        return text + f" The coherent form agrees within {100 * RULE_TOL:.0f}% on 90% of the steps."
    return text + (f" Per step, the coherent form's 5-95% range reaches beyond 1 +- {100 * RULE_TOL:.0f}%, which the "
                   "summed ratio hides.")


def findings(S: dict, sfx: str = "") -> str:
    """Markdown bullets of what a run's ``summary.json`` says, built from its numbers only (notebook 07
    prints them, so a copy of the notebook never shows findings its own run contradicts). ``sfx``:
    "" for the tied / input matrix, "_lm_head" for an untied run's output matrix."""
    g = lambda k: S.get(f"{k}{sfx}")  # noqa: E731
    loss = ", ".join(f"{w} loss {fmt(S.get(k), '.3f')}" for k, w in (("final_train_loss", "final training"),
                                                                      ("final_eval_loss", "held-out"))
                     if S.get(k) is not None)
    out = [f"*({S['last_scalar_step']} steps{'; ' + loss if loss else ''}; every number below is read from "
           "this run's `summary.json`.)*"]
    r, dn, ln = g("dead_norm_over_null"), g("dead_norm_mean"), g("live_norm_mean")
    if r is not None:
        size = "" if dn is None or ln is None else \
            f" They end {'larger' if dn > ln else 'smaller'} than the live rows ({fmt(dn)} vs {fmt(ln)})."
        out.append(f"- {norm_claim(r, g('dead_path_over_decay_only'))}{size}")
    b, p = g("dead_displacement_over_lr_budget"), g("dead_path_over_lr_budget")
    if b is not None:
        out.append(f"- **Displacement**: each dead row moved {fmt(g('dead_displacement_mean'))} from its "
                   f"initialisation, {fmt(100 * b, '.0f')}% of sum(lr) x sqrt(d) (the distance of a row moving lr "
                   f"per coordinate per step in a straight line); its path, summed step by step, is "
                   f"{fmt(100 * p, '.0f') if p is not None else 'n/a'}% of it.")
    if g("update_rule_measured_over_predicted") is not None:
        out.append("- " + rule_claim(g("update_rule_optimizer"),
                                     [g(f"update_rule_step_ratio_{k}") for k in ("median", "p05", "p95")],
                                     [g(f"update_rule_step_ratio_incoherent_{k}") for k in ("median", "p05", "p95")],
                                     g("update_rule_measured_over_predicted"),
                                     g("update_rule_measured_over_predicted_incoherent")))
    if g("dead_mean_pairwise_cosine") is not None:
        out.append("- " + collapse_claim(g("dead_mean_pairwise_cosine"), g("dead_pairwise_cosine_from_mean"),
                                         g("dead_centred_pc1_share") if g("dead_centred_pc1_share") is not None
                                         else g("dead_pc1_variance_fraction"),
                                         g("dead_centred_pc1_share_noise"), g("dead_centred_pc1_share_init"),
                                         g("dead_spread_over_init"), g("live_mean_pairwise_cosine")))
    if g("mean_shift_all") is not None:
        out.append(f"- **Mean embedding** (Stollenwerk & Stollenwerk 2025): the mean of all rows moved "
                   f"{fmt(g('mean_shift_all'))} (its norm {fmt(g('mean_row_norm_all_init'))} -> "
                   f"{fmt(g('mean_row_norm_all'))}); the mean live row {fmt(g('mean_shift_live'))}, the mean dead row "
                   f"{fmt(g('mean_shift_dead'))}. Cosine of each shift with minus the mean final hidden state: "
                   f"{fmt(g('mean_shift_cos_neg_hidden_all'), '.2f')} / {fmt(g('mean_shift_cos_neg_hidden_live'), '.2f')}"
                   f" / {fmt(g('mean_shift_cos_neg_hidden_dead'), '.2f')} (all / live / dead).")
    out += _frequency_lines(S, g)
    sep = g("detect_first_step_separable") or {}
    src = S.get("detect_direction_source") or {}
    for k, e in sep.items():
        a = g(f"detect_auroc_{k}")
        opp = e.get("opposite", {})
        line = (f"- Label-free **{e['direction']}** (direction fixed before the labels: {src.get(k, 'n/a')}): "
                f"AUROC {fmt(a, '.2f')} at the last step; AUROC >= 0.9 ")
        line += f"{e['resolution']}." if e["step"] is not None else f"not by step {e['after_step']}."
        ph, phd = g(f"detect_auroc_post_hoc_{k}"), g(f"detect_post_hoc_direction_{k}")
        if phd and phd != e["direction"]:
            line += f" Post hoc (direction chosen after seeing the labels): {phd}, AUROC {fmt(ph, '.2f')}"
            line += f", >= 0.9 {opp['resolution']}." if opp.get("step") is not None else "."
        out.append(line)
    using = g("detect_label_using_first_step_separable") or {}
    if using:
        out.append("- Using the dead labels (upper bounds, not detectors): " + "; ".join(
            f"{k} AUROC {fmt(g(f'detect_label_using_auroc_{k}'), '.2f')}, >= 0.9 {e['resolution']}"
            if e["step"] is not None else f"{k} AUROC {fmt(g(f'detect_label_using_auroc_{k}'), '.2f')}, never >= 0.9"
            for k, e in using.items()) + f" ({S.get(f'detect_step_grid{sfx}', '')}).")
    if S.get("dead_output_mass") is not None:
        out.append(f"- The softmax mass on dead tokens (probe batch) is {fmt(S['dead_output_mass'])} at step "
                   f"{S['dead_output_mass_step']}.")
    return "\n".join(out)


def _frequency_lines(S: dict, g) -> list[str]:
    """Norm (and held-out loss) by frequency bucket: dead, rarest and most frequent live decile."""
    nf, b = g("norm_by_freq"), S.get("freq_buckets")
    if not nf or not b:
        return []
    n0 = g("norm_by_freq_init") or [None] * len(nf)
    top = b["labels"][-1]
    line = (f"- **By frequency** (after Kunstner et al. 2024, Pinto et al. 2024; counts from {S.get('freq_source')}): "
            f"mean row norm {fmt(nf[0])} for dead tokens, {fmt(nf[1])} for the rarest live decile (D1, counts "
            f"{b['count_min'][1]}-{b['count_max'][1]}), {fmt(nf[-1])} for the most frequent ({top}, counts "
            f"{b['count_min'][-1]}-{b['count_max'][-1]}); at init {fmt(n0[0])} / {fmt(n0[1])} / {fmt(n0[-1])}.")
    lf = S.get("loss_by_freq")
    if lf:
        n = S.get("loss_by_freq_n_targets") or [None] * len(lf)
        line += (f" Held-out loss of the final model ({S.get('loss_by_freq_rows')} rows): {fmt(lf[1], '.2f')} nats "
                 f"on D1 targets (n={n[1]}), {fmt(lf[-1], '.2f')} on {top} targets (n={n[-1]}), "
                 f"{fmt(S.get('loss_by_freq_overall'), '.2f')} overall.")
    elif S.get("loss_by_freq_note"):
        line += f" Held-out loss by frequency: {S['loss_by_freq_note']}."
    return [line]
