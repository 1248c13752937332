"""Train a Duckling with the Hugging Face ``Trainer``: one call, the mission's defaults, a
self-describing run folder, resume, and the W recorder plugged in.

    result = train(DucklingConfig(), dataset="tokenized_dataset", run_dir="runs/a")
    model, tok, cfg = load_run("runs/a")

Kept out of a step (benchmarks/train_speed.py measures the effect): the nan/inf loss check and
blocking host-to-device copies (host syncs), token counting, per-step logging and FLOP counting,
python-list collation (rows stay uint16 views of the Arrow memory map until a batch is stacked).
Added: CUDA graphs through torch.compile on CUDA (compile="auto"), and on Linux CPUs an allocator
setting that stops every 32 MB logits buffer from being a fresh, page-faulting mmap.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DucklingConfig, N_LIVE
from .errors import DucklingError
from .rows import as_rows, check_rows, collate
from .trainer import (_trainer_classes, check_trainable_dtype, fused_adamw_available,  # noqa: F401
                      pick_compile, pick_device, pick_precision, training_arguments, tune_cpu_allocator)
from .generate import generate  # noqa: F401  (the notebooks' API: train, load_run, generate)
from .runs import load_run, prepare_run_dir, quiet_hf, update_run_info  # noqa: F401


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


def _tokenizer(tokenizer, cfg: DucklingConfig):
    """A CompactTokenizer, a path to a mapping, or None = cfg.data.mapping_path if that file exists."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    path = Path(tokenizer or cfg.data.mapping_path)
    if tokenizer is None and not path.is_file():
        return None
    from .vocab import CompactTokenizer

    return CompactTokenizer.from_file(path)


def _recorder(run_dir: Path, cfg: DucklingConfig, n_live: int, probe_ids):
    from .recorder import WRecorder  # resumes (truncate, append) when the Trainer starts at step > 0

    return WRecorder(run_dir, cfg.record, n_live=n_live, probe_ids=probe_ids)


def train(cfg: DucklingConfig | None = None, dataset=None, run_dir=None, *, eval_dataset=None,
          callbacks=(), resume: bool = False, tokenizer=None, model=None, progress: bool = True) -> TrainResult:
    """Train a Duckling. Every knob is in ``cfg`` (``dataclasses.replace`` it to experiment).

    dataset / eval_dataset: a ``tokenized_dataset/`` folder (default cfg.data.dataset_dir), a
      ``datasets.Dataset`` with equal-length ``input_ids`` rows, or a (N, T) integer array.
    run_dir: None trains in memory (no files, no recording: sweeps and speed measurements);
      else the run folder, with the recording when cfg.record.enabled.
    resume: continue run_dir from its last complete checkpoint (same config required).
    tokenizer: a CompactTokenizer or mapping path (default cfg.data.mapping_path when present).
    model: train this model instead of a fresh ``build_model(cfg.model)`` (notebook 03).
    """
    from transformers import PrinterCallback, ProgressCallback, TrainerState

    from .model import build_model

    cfg = cfg or DucklingConfig()
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.compute_dtype, device)
    compile_mode = pick_compile(cfg.train.compile, device)
    if device == "cpu":
        tune_cpu_allocator()
    tok = _tokenizer(tokenizer, cfg)
    n_live = tok.n_live if tok is not None else N_LIVE
    if tok is not None and len(tok) != cfg.model.vocab_size:
        raise DucklingError(
            f"The config's vocab_size is {cfg.model.vocab_size} but the token mapping has {len(tok)} ids "
            f"({tok.n_live} live). Use the mapping the config was made for, or set model.vocab_size={len(tok)}.")
    rows = as_rows(cfg.data.dataset_dir if dataset is None else dataset, tok)
    check_rows(rows, cfg, n_live)
    eval_rows = None if eval_dataset is None else as_rows(eval_dataset, tok)
    if eval_rows is not None:
        check_rows(eval_rows, cfg, n_live)

    if model is None:
        model = build_model(cfg.model, seed=cfg.train.seed)
    elif (model.config.vocab_size, model.config.n_positions) != (cfg.model.vocab_size, cfg.model.n_positions):
        raise DucklingError("The model passed to train() does not match cfg.model (vocab_size, n_positions).")
    check_trainable_dtype(model, cfg.train.allow_bf16_params)

    record = run_dir is not None and cfg.record.enabled
    ckpt, extra = None, []
    if run_dir is not None:
        run_dir = Path(run_dir)
        info = {"device": device, "device_name": _device_name(device), "precision": precision,
                "compile": compile_mode or "off", "optimizer": "AdamW",
                "n_train_rows": len(rows), "seq_len": rows.seq_len,
                "dataset": str(dataset if isinstance(dataset, (str, Path)) else cfg.data.dataset_dir
                               if dataset is None else type(dataset).__name__)}
        ckpt = prepare_run_dir(run_dir, cfg, tok, resume, info)
    if record:
        probe = collate([(rows if eval_rows is None else eval_rows)[0]])["input_ids"]  # (1, T): fixed probe
        extra.append(_recorder(run_dir, cfg, n_live, probe))

    DucklingTrainer, Progress, Timer = _trainer_classes()
    timer = Timer(device, skip=min(10, cfg.train.max_steps // 5))
    tmp = None if run_dir is not None else tempfile.TemporaryDirectory(prefix="duckling-")
    args = training_arguments(cfg, run_dir or tmp.name, device, precision, save=run_dir is not None,
                              evaluate=eval_rows is not None, progress=progress, compile_mode=compile_mode)
    trainer = DucklingTrainer(model=model, args=args, train_dataset=rows, eval_dataset=eval_rows,
                              data_collator=collate, callbacks=[*extra, timer, *callbacks])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # logs are in log_history, never printed per step
    if progress:
        trainer.add_callback(Progress())
    done = ckpt is not None and _ckpt_step(ckpt) >= cfg.train.max_steps
    try:
        if done:  # the Trainer would run one extra step here; a finished run only needs its final/
            trainer._load_from_checkpoint(str(ckpt))
            trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
        else:
            with quiet_hf():  # no per-checkpoint "Writing model shards" bars
                trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if eval_rows is not None and not cfg.train.eval_steps and not done:
            trainer.evaluate()
    finally:  # also on an exception or Ctrl-C: the recording keeps every complete step
        for cb in extra:
            cb.close()
        if tmp is not None:
            tmp.cleanup()

    model = trainer.model
    if run_dir is not None:
        with quiet_hf():
            trainer.save_model(str(run_dir / "final"))
        trainer.state.save_to_json(str(run_dir / "final" / "trainer_state.json"))
        update_run_info(run_dir, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        global_step=trainer.state.global_step, steps_per_s=timer.steps_per_s)
    return TrainResult(model=model, cfg=cfg, run_dir=run_dir, log_history=list(trainer.state.log_history),
                       steps_per_s=timer.steps_per_s, global_step=trainer.state.global_step,
                       device=device, precision=precision, compile=compile_mode)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _ckpt_step(ckpt: Path) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["global_step"]


# ---------------------------------------------------------------- CLI
def cli_train(args) -> int:
    """``duckling train``: the run's stored config on --resume, else the defaults, plus the flags given."""
    run = Path(args.run)
    stored = run / "config.json"
    cfg = DucklingConfig.from_dict(json.loads(stored.read_text())) if args.resume and stored.is_file() \
        else DucklingConfig()
    t, m, r = {}, {}, {}
    for flag, group, key in [("max_steps", t, "max_steps"), ("batch_size", t, "batch_size"),
                             ("lr", t, "learning_rate"), ("device", t, "device"),
                             ("train_precision", t, "precision"), ("n_layer", m, "n_layer"),
                             ("record_every", r, "every"), ("precision", r, "precision"),
                             ("budget_gb", r, "budget_gb"), ("eval_steps", t, "eval_steps")]:
        if getattr(args, flag, None) is not None:
            group[key] = getattr(args, flag)
    if getattr(args, "compile", None):
        t["compile"] = {"on": True, "off": False}.get(args.compile, "auto")
    if args.untied:
        m["tie_word_embeddings"] = False
    if args.no_record:
        r["enabled"] = False
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **t),
                              model=dataclasses.replace(cfg.model, **m),
                              record=dataclasses.replace(cfg.record, **r))
    mapping = run / "token_mapping.json" if args.resume and (run / "token_mapping.json").is_file() \
        else getattr(args, "mapping", None)
    result = train(cfg, dataset=args.dataset, run_dir=run, eval_dataset=args.eval_dataset,
                   resume=args.resume, tokenizer=mapping)
    steps, losses = result.losses()
    last = f", loss {losses[-1]:.3f}" if len(losses) else ""
    print(f"trained {run} to step {result.global_step}{last}, {result.steps_per_s:.1f} steps/s "
          f"({result.device}, {result.precision})")
    return 0


def cli_generate(args) -> int:
    from .generate import cli_generate as run_cli

    return run_cli(args)
