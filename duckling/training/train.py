"""Train a Duckling with the Hugging Face ``Trainer``: one call, the mission's defaults, a
self-describing run folder, resume, and the W recorder plugged in.

    result = train(DucklingConfig(), dataset="tokenized_dataset", run_dir="runs/a")
    model, tok, cfg = load_run("runs/a")

A run folder's life: everything checkable (config, dataset vs mapping, budget and free disk, device)
is checked before the folder is created; an exclusive lock is held for the whole run; Ctrl-C/SIGTERM
save a checkpoint at the last completed step; the recording is fsync'd before every checkpoint; a
failed write leaves status "failed", no partial files, and advice that fits where the run stands.
The Trainer's step itself is set up in ``trainer.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duckling.config import DucklingConfig, N_LIVE
from duckling.errors import DucklingError, RunInterrupted
from duckling.files import write_json
from duckling.data.rows import as_rows, check_rows, collate, overlapping_rows, rows_fingerprint
from duckling.data.vocab import CompactTokenizer
from duckling.training.model import build_model
from duckling.training.optim import optimizer_cls_and_kwargs
from duckling.training.trainer import (_trainer_classes, check_trainable_dtype, fused_adamw_available,  # noqa: F401
                                       load_finished_checkpoint, log_last_step, pick_compile, pick_device,
                                       pick_precision, training_arguments, tune_cpu_allocator)
from duckling.training.generate import generate  # noqa: F401  (the notebooks' API: train, load_run, generate)
from duckling.hf import quiet_hf, silence_unactionable_warnings
from duckling.training.run_folder import (check_run_dir, load_run, run_lock,  # noqa: F401 (load_run)
                                          update_run_info, write_run_files)
from duckling.training.resume import check_same_run, checkpoint_step, finish_recording
from duckling.training.safety import (StopOnSignal, after_failure, check_disk, empty_run_dir, failure_advice, sync_recording,
                                      write_failure)


# ---------------------------------------------------------------- one call
@dataclass
class TrainResult:
    """What a notebook needs after ``train``: the model, the logged losses, the speed."""

    model: object
    cfg: DucklingConfig
    run_dir: Path | None
    log_history: list[dict] = field(default_factory=list)
    steps_per_s: float = float("nan")  # this call, after warm-up, excluding eval and checkpoints
    global_step: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    compile: str | None = None  # the torch.compile mode used, None = eager

    def losses(self, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a logged quantity: ``loss`` (train, mean over the logging window) or ``eval_loss``."""
        pts = [(h["step"], h[key]) for h in self.log_history if key in h]
        return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)

    def eval_losses(self) -> tuple[np.ndarray, np.ndarray]:
        return self.losses("eval_loss")


def _tokenizer(tokenizer, cfg: DucklingConfig, required: bool):
    """A CompactTokenizer, a path to a mapping, False (explicitly none), or None = cfg.data.mapping_path.

    A run folder needs its mapping (it defines which ids are dead): a missing one is an error there."""
    if tokenizer is False:
        return None
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    path = Path(tokenizer or cfg.data.mapping_path)
    if not path.is_file():
        if tokenizer is None and not required:
            return None
        raise DucklingError(
            f"Token mapping {path.resolve()} not found. A recorded run needs the mapping that defines the live "
            "and dead ids: run from the repository root (the committed token_mapping.json), pass --mapping PATH "
            "(tokenizer=PATH), or tokenizer=False to train without one (ids >= 6144 then count as dead).")
    return CompactTokenizer.from_file(path)


@dataclass
class _Job:
    """What ``train`` resolved before the Trainer starts: in memory (run_dir None) or in a run folder."""

    cfg: DucklingConfig
    rows: object
    eval_rows: object | None
    device: str
    precision: str
    compile_mode: str | None  # None = eager
    progress: bool
    n_live: int = N_LIVE
    run_dir: Path | None = None
    ckpt: Path | None = None  # the checkpoint to resume from
    fresh: bool = False  # a new run folder: a failure before the first step removes it

    @property
    def record(self) -> bool:
        return self.run_dir is not None and self.cfg.record.enabled

    @functools.cached_property  # read once, before training: the Trainer may rotate that checkpoint away
    def done(self) -> bool:
        """Resuming a checkpoint at max_steps: only final/ is left to write."""
        return self.ckpt is not None and checkpoint_step(self.ckpt) >= self.cfg.train.max_steps


def _recorder(job: _Job):
    # imported here, not at the top: the recorder imports transformers, which ``import duckling.training.train``
    # does not need (the Trainer classes are built lazily too)
    from duckling.training.recorder import WRecorder  # resumes (truncate, append) when the Trainer starts at step > 0

    probe = collate([(job.rows if job.eval_rows is None else job.eval_rows)[0]])["input_ids"]  # (1, T): fixed probe
    return WRecorder(job.run_dir, job.cfg.record, n_live=job.n_live, probe_ids=probe)


def train(cfg: DucklingConfig | None = None, dataset=None, run_dir=None, *, eval_dataset=None,
          callbacks=(), resume: bool = False, tokenizer=None, model=None, progress: bool = True) -> TrainResult:
    """Train a Duckling. Every knob is in ``cfg`` (``cfg.override({"train.weight_decay": 0.1})``).

    dataset / eval_dataset: a ``tokenized_dataset/`` folder (default cfg.data.dataset_dir), a
      ``datasets.Dataset`` with equal-length ``input_ids`` rows, or a (N, T) integer array.
    run_dir: None trains in memory (no files, no recording: speed measurements); else the run folder,
      with the recording when cfg.record.enabled. Everything checkable is checked before the folder is
      created; the folder is locked for the whole run (one writer); Ctrl-C / SIGTERM save a checkpoint
      at the last completed step and raise ``RunInterrupted`` (resume=True continues exactly there).
    resume: continue run_dir from its last complete checkpoint (same config required).
    tokenizer: a CompactTokenizer or mapping path (default cfg.data.mapping_path; required with a
      run_dir unless ``tokenizer=False``).
    model: train this model instead of a fresh ``build_model(cfg.model)`` (notebook 03).
    """
    cfg = cfg or DucklingConfig()
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.compute_dtype, device)
    compile_mode = pick_compile(cfg.train.compile, device)
    threads = cfg.train.threads or torch.get_num_threads()  # set once everything is checked
    run_dir = None if run_dir is None else Path(run_dir)
    tok = _tokenizer(tokenizer, cfg, required=run_dir is not None)
    n_live = tok.n_live if tok is not None else N_LIVE
    if tok is not None and len(tok) != cfg.model.vocab_size:
        raise DucklingError(
            f"The config's vocab_size is {cfg.model.vocab_size} but the token mapping has {len(tok)} ids "
            f"({tok.n_live} live). Use the mapping the config was made for, or set model.vocab_size={len(tok)}.")
    rows = as_rows(cfg.data.dataset_dir if dataset is None else dataset, tok)
    check_rows(rows, cfg, n_live)
    eval_rows = None if eval_dataset is None else as_rows(eval_dataset, tok)
    if eval_rows is not None:
        check_rows(eval_rows, cfg, n_live, what="evaluation dataset")
        _check_held_out(rows, eval_rows, cfg)
    if model is None:
        model = build_model(cfg.model, seed=cfg.train.seed)
    elif (model.config.vocab_size, model.config.n_positions) != (cfg.model.vocab_size, cfg.model.n_positions):
        raise DucklingError("The model passed to train() does not match cfg.model (vocab_size, n_positions).")
    check_trainable_dtype(model, cfg.train.allow_bf16_params)
    if device == "cpu":
        tune_cpu_allocator()
    job = _Job(cfg, rows, eval_rows, device, precision, compile_mode, progress, n_live)
    if run_dir is None:
        torch.set_num_threads(threads)
        return _fit(job, model, callbacks)

    ckpt, old_info = check_run_dir(run_dir, cfg, tok, resume)
    if resume and not cfg.train.threads and device == "cpu" == old_info.get("device") and old_info.get("threads"):
        threads = int(old_info["threads"])  # unasked, a resume computes as the run did: with its thread count
    job = dataclasses.replace(job, run_dir=run_dir, ckpt=ckpt, fresh=not resume)
    start = checkpoint_step(ckpt) if ckpt else 0
    check_disk(run_dir, cfg, model, start, job.record, tuple(model.get_input_embeddings().weight.shape), n_live)
    info = {"device": device, "device_name": _device_name(device), "precision": precision,
            "compile": compile_mode or "off", "optimizer": cfg.train.optimizer, "threads": threads,
            "n_train_rows": len(rows), "seq_len": rows.seq_len,
            "dataset": str(Path(dataset).resolve() if isinstance(dataset, (str, Path)) else
                           Path(cfg.data.dataset_dir).resolve() if dataset is None else type(dataset).__name__),
            "dataset_fingerprint": rows_fingerprint(rows),
            "eval_dataset": str(Path(eval_dataset).resolve()) if isinstance(eval_dataset, (str, Path)) else None,
            "eval_dataset_fingerprint": None if eval_rows is None else rows_fingerprint(eval_rows)}
    if resume:
        check_same_run(run_dir, old_info, info)
    torch.set_num_threads(threads)
    try:
        with run_lock(run_dir, create=not resume):
            check_run_dir(run_dir, cfg, tok, resume, locked=True)  # again, under the lock: another writer may have won
            try:
                write_run_files(run_dir, cfg, tok, ckpt, old_info, info)
            except OSError:
                if not resume:
                    empty_run_dir(run_dir)
                raise
            return _fit(job, model, callbacks)
    except OSError as e:  # creating, locking or describing the folder
        raise DucklingError(f"Cannot write the run folder {run_dir.resolve()}: {e.strerror or e}. Check the "
                            "path, its permissions and the free disk space; nothing was trained.") from e


def _fit(job: _Job, model, callbacks) -> TrainResult:
    """Run the Trainer (in memory when job.run_dir is None); the run folder is locked by the caller."""
    silence_unactionable_warnings()
    stop = StopOnSignal()
    recorders = [_recorder(job)] if job.record else []
    own = [stop.callback, *recorders, sync_recording(job.run_dir)] if job.run_dir is not None else []
    with contextlib.ExitStack() as scratch:
        out = job.run_dir or scratch.enter_context(tempfile.TemporaryDirectory(prefix="duckling-"))
        trainer, timer = _trainer(job, model, out, own, callbacks)
        _run(job, trainer, stop, recorders)
    return _finish(job, trainer, timer, stop)


def _trainer(job: _Job, model, out, own: list, callbacks):
    """The DucklingTrainer for ``job`` (writing to ``out``) and its step timer."""
    from transformers import PrinterCallback, ProgressCallback

    DucklingTrainer, Progress, Timer = _trainer_classes()
    cfg = job.cfg
    timer = Timer(job.device, skip=min(10, cfg.train.max_steps // 5))
    args = training_arguments(cfg, out, job.device, job.precision, save=job.run_dir is not None,
                              evaluate=job.eval_rows is not None, progress=job.progress, compile_mode=job.compile_mode)
    trainer = DucklingTrainer(model=model, args=args, train_dataset=job.rows, eval_dataset=job.eval_rows,
                              data_collator=collate, callbacks=[*own, timer, log_last_step(), *callbacks],
                              optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(cfg.train, cfg.model.vocab_size))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # logs are in log_history, never printed per step
    if job.progress:
        trainer.add_callback(Progress())
    return trainer, timer


def _run(job: _Job, trainer, stop: StopOnSignal, recorders: list) -> None:
    """Train (a finished run only loads its last checkpoint) and evaluate. Whatever happens the
    recorders are closed (the recording keeps every complete step); a failed run folder is cleaned
    up and its error becomes advice that fits where the run stands."""
    failed = None
    try:
        with stop.installed() if job.run_dir is not None else contextlib.nullcontext():
            if job.done:  # the Trainer would run one step past max_steps here
                load_finished_checkpoint(trainer, job.ckpt)
                if job.record:  # a kill during the close-time compaction left it unfinished: finish it first
                    finish_recording(job.run_dir, trainer.state.global_step)
            else:
                with quiet_hf():  # no per-checkpoint "Writing model shards" bars
                    trainer.train(resume_from_checkpoint=str(job.ckpt) if job.ckpt else None)
            if job.eval_rows is not None and not job.cfg.train.eval_steps and not job.done and stop.signal is None:
                trainer.evaluate()
    except (DucklingError, OSError) as e:
        failed = e
    except BaseException as e:
        failed = e
        if not write_failure(e):  # safetensors and torch.save report a full disk in their own types
            raise
    finally:  # also on an exception or Ctrl-C
        for cb in recorders:
            try:
                cb.close("interrupted") if stop.signal else cb.close()
            except DucklingError as e:
                failed = failed or e
        step = trainer.state.global_step
        removed = job.run_dir is not None and failed is not None and after_failure(job.run_dir, step, failed, job.fresh)
    if failed is not None:
        if job.run_dir is None:
            raise failed
        raise DucklingError(failure_advice(job.run_dir, step, failed, removed)) from failed


def _finish(job: _Job, trainer, timer, stop: StopOnSignal) -> TrainResult:
    """A stopped run says where to resume; a complete one writes final/ and its status."""
    run_dir, step = job.run_dir, trainer.state.global_step
    if run_dir is not None and stop.signal is not None:
        update_run_info(run_dir, status="interrupted", interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"), global_step=step)
        raise RunInterrupted(f"{stop.signal} received: stopped after step {step} and saved checkpoint-{step} in "
                             f"{run_dir.resolve()}. Continue exactly from there with `duckling train --run "
                             f"{run_dir} --resume` (or train(..., resume=True)).")
    if run_dir is not None:
        try:
            with quiet_hf():
                trainer.save_model(str(run_dir / "final"))
            # (TrainerState.save_to_json would write a NaN loss as NaN, which is not JSON)
            write_json(run_dir / "final" / "trainer_state.json", dataclasses.asdict(trainer.state))
            # a finished run resumed trains nothing: its speed is the one measured when it trained
            speed = {} if job.done or not math.isfinite(timer.steps_per_s) else {"steps_per_s": timer.steps_per_s}
            update_run_info(run_dir, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), global_step=step,
                            **speed)
        except Exception as e:
            if not (isinstance(e, OSError) or write_failure(e)):
                raise
            after_failure(run_dir, step, e, fresh=False)
            raise DucklingError(failure_advice(run_dir, step, e, False)) from e
    return TrainResult(model=trainer.model, cfg=job.cfg, run_dir=run_dir, log_history=list(trainer.state.log_history),
                       steps_per_s=timer.steps_per_s, global_step=step, device=job.device, precision=job.precision,
                       compile=job.compile_mode)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _check_held_out(rows, eval_rows, cfg: DucklingConfig) -> None:
    """An evaluation set must be held out: none of its rows may be a training row (by row hash),
    unless train.allow_eval_overlap says so."""
    if cfg.train.allow_eval_overlap:
        return
    n = overlapping_rows(rows, eval_rows)
    if n:
        raise DucklingError(
            f"{n:,} of the {len(eval_rows):,} rows of the evaluation dataset are also training rows (equal token ids): "
            "its loss would not be held out. Build the evaluation set from other text (e.g. `duckling build --data "
            "DIR --split validation --out valid_dataset`, where DIR holds train/ and validation/ subfolders), or pass "
            "--allow-eval-overlap (train.allow_eval_overlap=true) to evaluate on it anyway.")
