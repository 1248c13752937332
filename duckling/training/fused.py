"""A fused group: K runs of one shape trained in one process as one model under one HF Trainer step
(issue 21; HFTA, Wang et al. MLSys 2021).

    results = train_group([cfg.override({"train.seed": s}) for s in (1, 2, 3)], ["runs/a", "runs/b", "runs/c"])

Each run keeps what makes it a run: its initialisation (``build_model(cfg.model, seed)``, the very
call ``duckling train`` makes), its data order (its seed's sampler), its dropout stream, learning
rate, weight decay, optimizer state and gradient clipping, its evaluation, its recording (one
``WRecorder`` per run, fed from its own parameters and optimizer) and its ordinary run folder
(config.json, run_info.json, checkpoints in the Trainer's format, final/), which ``duckling report``,
``compare``, ``Recording`` and ``duckling train --resume`` read like any other. ``fused_trainer``
explains how; ``fused_model`` holds the batched math.

A group of one is ``train`` itself (the ordinary path: byte-identical by construction). For K > 1 in
float32 on CPU each run matches its separate run to float rounding: the same masks, batches, update
rules and clipping, but the forward's sums are computed by other kernels (batched matmuls, a
hand-written attention and loss), which round differently (tests/test_fused.py; benchmarks/fused.py).

Grouping (for the sweep engine): runs fuse when ``group_key`` is equal, i.e. everything but the
per-run fields in ``PER_RUN`` (seed, learning rate, weight decay, clipping, optimizer
hyper-parameters, recording settings) is the same, including the optimizer.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from duckling.config import DucklingConfig, N_LIVE
from duckling.errors import DucklingError, RunInterrupted
from duckling.data.rows import as_rows, check_rows, collate
from duckling.training.model import build_model
from duckling.hf import quiet_hf, silence_unactionable_warnings
from duckling.training.run_folder import (check_run_dir, last_checkpoint, run_lock,
                                          update_run_info, write_run_files)
from duckling.training.safety import StopOnSignal, after_failure, check_disk, failure_advice, sync_recording
from duckling.training.trainer import (_trainer_classes, log_last_step, pick_compile, pick_device, pick_precision,
                                       training_arguments, tied_head_not_missing, tune_cpu_allocator)
from duckling.training import train as train_module
from duckling.training.resume import check_same_run
from duckling.training.train import TrainResult, _device_name, _tokenizer, train
from duckling.data import rows as rows_mod

PER_RUN = ("train.seed", "train.learning_rate", "train.weight_decay", "train.max_grad_norm", "train.sgd_momentum",
           "train.adam_beta1", "train.adam_beta2", "train.adam_epsilon")


def _ckpt_step(ckpt: Path) -> int:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]


def group_key(cfg: DucklingConfig) -> tuple:
    """Runs with equal keys can be fused: every field but the per-run ones (PER_RUN, record.*)."""
    return tuple((n, v) for n, v in sorted(cfg.flat().items()) if n not in PER_RUN and not n.startswith("record."))


def check_group(configs) -> None:
    if not configs:
        raise DucklingError("A fused group needs at least one run.")
    first = dict(group_key(configs[0]))
    for i, c in enumerate(configs[1:], 1):
        diff = [n for n, v in group_key(c) if first[n] != v]
        if diff:
            raise DucklingError(
                f"Run {i} of the fused group differs from run 0 in {', '.join(diff[:4])}: only "
                f"{', '.join(PER_RUN)} and record.* may differ within a group (one model shape, one optimizer, "
                "one schedule). Train it in another group, or with resources.fuse = 'off'.")


AUTO_K = 32  # "auto" on CUDA: ~130 MB of activations per run at batch 2 x 512 tokens (logits and their grads)


def plan_groups(configs, fuse="off", device: str = "cpu", phases=None) -> list[list[int]]:
    """The sweep's fused groups: lists of indices into ``configs``, in grid order.

    fuse: "off" (or 1) = one run per group; an integer K = groups of up to K compatible runs; "auto" =
    off on CPU and MPS (a CPU step is compute-bound: benchmarks/fused.py), up to AUTO_K on CUDA.
    phases: per run, where it stands (e.g. None = fresh, else its last checkpoint step): only runs in
    the same phase fuse, since a group starts and resumes as one."""
    if fuse == "auto":
        k = AUTO_K if device == "cuda" else 1
    elif fuse == "off":
        k = 1
    elif isinstance(fuse, int) and not isinstance(fuse, bool) and fuse >= 1:
        k = fuse
    else:
        raise DucklingError(f"resources.fuse = {fuse!r} is not valid: use \"auto\", \"off\" or a group size >= 1.")
    phases = [None] * len(configs) if phases is None else list(phases)
    classes: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        classes.setdefault((group_key(c), phases[i]), []).append(i)
    groups = [members[j:j + k] for members in classes.values() for j in range(0, len(members), k)]
    return sorted(groups, key=lambda g: g[0])


def _group_checkpoints(run_dirs, resume: bool):
    """Per run, the checkpoint a fused resume starts from: the newest step every run has complete."""
    if not resume:
        return [None] * len(run_dirs)
    lasts = [last_checkpoint(d) for d in run_dirs]
    step = min(_ckpt_step(c) for c in lasts)
    out = []
    for d in run_dirs:
        c = Path(d) / f"checkpoint-{step}"
        if not (c / "trainer_state.json").is_file():
            raise DucklingError(
                f"Cannot resume the fused group at step {step}: {Path(d).resolve()} has no complete checkpoint-{step} "
                "(its runs were checkpointed at different steps and the older one was rotated away). Resume that "
                "run on its own (`duckling train --run DIR --resume`), or the group with resources.fuse = 'off'.")
        out.append(c)
    return out


def train_group(configs, run_dirs, dataset=None, *, eval_dataset=None, resume: bool = False, tokenizer=None,
                progress: bool = True, callbacks=()) -> list[TrainResult]:
    """Train ``configs[k]`` into ``run_dirs[k]`` for every k, as one fused model (see the module doc).

    Same arguments as ``train`` (one dataset for the group); returns one TrainResult per run. Every
    member folder is locked for the whole group; Ctrl-C / SIGTERM checkpoint every run at the same
    step and raise ``RunInterrupted``; ``resume=True`` continues the group from the newest step that
    every run has checkpointed."""
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    if len(configs) != len(run_dirs):
        raise DucklingError(f"train_group got {len(configs)} configs but {len(run_dirs)} run folders.")
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise DucklingError("The runs of a fused group need distinct run folders.")
    check_group(configs)
    if len(configs) == 1:  # the ordinary path: a group of one is `duckling train` itself
        return [train(configs[0], dataset, run_dirs[0], eval_dataset=eval_dataset, callbacks=callbacks, resume=resume,
                      tokenizer=tokenizer, progress=progress)]
    cfg = configs[0]
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.compute_dtype, device)
    if pick_compile(cfg.train.compile, device) and cfg.train.compile is True:
        raise DucklingError("train.compile=True is not supported for a fused group yet: use compile='auto' or False.")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tok = _tokenizer(tokenizer, cfg, required=True)
    n_live = tok.n_live if tok is not None else N_LIVE
    if tok is not None and len(tok) != cfg.model.vocab_size:
        raise DucklingError(f"The config's vocab_size is {cfg.model.vocab_size} but the token mapping has {len(tok)} "
                            f"ids. Use the mapping the config was made for, or set model.vocab_size={len(tok)}.")
    rows = as_rows(cfg.data.dataset_dir if dataset is None else dataset, tok)
    check_rows(rows, cfg, n_live)
    eval_rows = None if eval_dataset is None else as_rows(eval_dataset, tok)
    if eval_rows is not None:
        check_rows(eval_rows, cfg, n_live, what="evaluation dataset")
        train_module._check_held_out(rows, eval_rows, cfg)  # train()'s own rule: no eval row repeats a training row
    if device == "cpu":
        tune_cpu_allocator()
    found = [check_run_dir(d, c, tok, resume) for d, c in zip(run_dirs, configs)]
    ckpts = _group_checkpoints(run_dirs, resume)
    if resume and _ckpt_step(ckpts[0]) >= cfg.train.max_steps:  # finished: only final/ is left, run by run
        return [train(c, dataset, d, eval_dataset=eval_dataset, resume=True, tokenizer=tokenizer, progress=False)
                for c, d in zip(configs, run_dirs)]
    models = [build_model(c.model, seed=c.train.seed) for c in configs]
    start = _ckpt_step(ckpts[0]) if resume else 0
    for d, c, m in zip(run_dirs, configs, models):
        check_disk(d, c, m, start, c.record.enabled, tuple(m.get_input_embeddings().weight.shape), n_live)
    names = [d.name for d in run_dirs]
    where = str(Path(dataset).resolve() if isinstance(dataset, (str, Path)) else
                Path(cfg.data.dataset_dir).resolve() if dataset is None else type(dataset).__name__)
    fingerprints = {"dataset_fingerprint": rows_mod.rows_fingerprint(rows),  # the data a resume checks
                    "eval_dataset_fingerprint": None if eval_rows is None else rows_mod.rows_fingerprint(eval_rows)}
    infos = [{"device": device, "device_name": _device_name(device), "precision": precision, "compile": "off",
              "optimizer": c.train.optimizer, "threads": torch.get_num_threads(), "n_train_rows": len(rows),
              "seq_len": rows.seq_len, "dataset": where, "fused": {"runs": names, "index": k}, **fingerprints}
             for k, c in enumerate(configs)]
    if resume:  # every member must compute what it computed before (device, arithmetic, threads, data)
        for d, f, info in zip(run_dirs, found, infos):
            check_same_run(d, f[1], info)
    try:
        with contextlib.ExitStack() as locks:
            for d in run_dirs:
                locks.enter_context(run_lock(d, create=not resume))
            for k, (d, c) in enumerate(zip(run_dirs, configs)):
                check_run_dir(d, c, tok, resume, locked=True)
                write_run_files(d, c, tok, None if ckpts[k] is None else ckpts[k], found[k][1], infos[k])
            return _fit_group(configs, run_dirs, models, ckpts, rows, eval_rows, device, precision, n_live,
                              progress, callbacks, resume)
    except OSError as e:
        raise DucklingError(f"Cannot write the fused group's run folders ({', '.join(map(str, run_dirs))}): "
                            f"{e.strerror or e}. Check the paths, permissions and free disk space; nothing was "
                            "trained.") from e


def _recorder_callback(slot):
    """A TrainerCallback that hands the Trainer's events to one run's WRecorder with that run's
    TrainingArguments, model and optimizer (the recorder then sees a plain run)."""
    from transformers import TrainerCallback

    class RunRecorder(TrainerCallback):
        pass

    def forward(event):
        def call(args, state, control, **kw):
            return getattr(slot.recorder, event)(slot.args, state, control,
                                                 **{**kw, "model": slot.model, "optimizer": slot.optimizer})
        return call

    cb = RunRecorder()
    for event in ("on_train_begin", "on_optimizer_step", "on_step_end", "on_train_end"):
        setattr(cb, event, forward(event))
    return cb


def _fit_group(configs, run_dirs, models, ckpts, rows, eval_rows, device, precision, n_live, progress, callbacks,
               resume) -> list[TrainResult]:
    from transformers import PrinterCallback, ProgressCallback

    from duckling.training.fused_model import FusedGPT2
    from duckling.training.fused_trainer import RunSlot, fused_trainer_class
    from duckling.training.recorder import WRecorder

    silence_unactionable_warnings()
    cfg = configs[0]
    gen_device = "cuda" if device == "cuda" else "cpu"
    slots = []
    for c, d, m, ck in zip(configs, run_dirs, models, ckpts):
        g = torch.Generator(device=gen_device)
        g.manual_seed(c.train.seed)  # the Trainer's set_seed(seed) of a separate run
        args = training_arguments(c, d, device, precision, save=True, evaluate=eval_rows is not None, progress=False)
        rec = None
        if c.record.enabled:
            probe = collate([(rows if eval_rows is None else eval_rows)[0]])["input_ids"]
            rec = WRecorder(d, c.record, n_live=n_live, probe_ids=probe)
        slots.append(RunSlot(model=m, args=args, cfg=c, run_dir=d, generator=g, recorder=rec, ckpt=ck))
    fused = FusedGPT2(models, [s.generator for s in slots])
    stop = StopOnSignal()
    _, Progress, Timer = _trainer_classes()
    timer = Timer(device, skip=min(10, cfg.train.max_steps // 5))
    own = [stop.callback] + [_recorder_callback(s) for s in slots if s.recorder is not None] + \
        [sync_recording(d) for d in run_dirs]
    with tempfile.TemporaryDirectory(prefix="duckling-fused-") as scratch:
        args = training_arguments(cfg, scratch, device, precision, save=True, evaluate=eval_rows is not None,
                                  progress=progress)
        args.max_grad_norm = 1.0  # so that the Trainer calls _clip_grad_norm, which clips per run
        trainer = fused_trainer_class()(model=fused, args=args, train_dataset=rows, eval_dataset=eval_rows,
                                        data_collator=collate, callbacks=[*own, timer, log_last_step(), *callbacks],
                                        slots=slots)
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        if progress:
            trainer.add_callback(Progress())
        recorders = [s.recorder for s in slots if s.recorder is not None]
        failed = None
        try:
            with stop.installed():
                with quiet_hf(), tied_head_not_missing(models[0]):
                    trainer.train(resume_from_checkpoint=str(ckpts[0]) if resume else None)
                if eval_rows is not None and not cfg.train.eval_steps and stop.signal is None:
                    trainer.evaluate()
        except BaseException as e:  # noqa: BLE001 - re-raised below after every run is closed
            failed = e
        finally:
            for rec in recorders:
                try:
                    rec.close("interrupted") if stop.signal else rec.close()
                except DucklingError as e:
                    failed = failed or e
            step = trainer.state.global_step
            removed = failed is not None and [after_failure(d, step, failed, not resume) for d in run_dirs]
        if failed is not None:
            if not isinstance(failed, (DucklingError, OSError)):
                raise failed
            every = ", ".join(map(str, run_dirs))
            raise DucklingError(failure_advice(run_dirs[0], step, failed, removed[0]) +
                                f" (The same holds for every run of the fused group: {every}.)") from failed
    return _finish_group(trainer, slots, timer, stop, device, precision)


def _finish_group(trainer, slots, timer, stop, device, precision) -> list[TrainResult]:
    step = trainer.state.global_step
    if stop.signal is not None:
        for s in slots:
            update_run_info(s.run_dir, status="interrupted", interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            global_step=step)
        dirs = " ".join(str(s.run_dir) for s in slots)
        raise RunInterrupted(f"{stop.signal} received: the fused group stopped after step {step} and saved "
                             f"checkpoint-{step} in each of its run folders ({dirs}). Continue it exactly from "
                             "there with train_group(..., resume=True), or each run alone with `duckling train "
                             "--run DIR --resume`.")
    trainer.sync_states()
    out = []
    for k, s in enumerate(slots):
        with trainer.as_run(k), quiet_hf():
            trainer.save_model(str(s.run_dir / "final"))
        s.state.save_to_json(str(s.run_dir / "final" / "trainer_state.json"))
        update_run_info(s.run_dir, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), global_step=step,
                        steps_per_s=timer.steps_per_s)
        out.append(TrainResult(model=s.model, cfg=s.cfg, run_dir=s.run_dir, log_history=list(s.state.log_history),
                               steps_per_s=timer.steps_per_s, global_step=step, device=device, precision=precision,
                               compile=None))
    return out


__all__ = ["train_group", "plan_groups", "group_key", "check_group", "PER_RUN", "AUTO_K"]
