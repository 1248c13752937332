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
from .generate import generate  # noqa: F401  (the notebooks' API: train, load_run, generate)
from .runs import load_run, prepare_run_dir, quiet_hf, update_run_info  # noqa: F401


# ---------------------------------------------------------------- device and precision
def pick_device(requested: str = "auto") -> str:
    """``auto`` = cuda, then mps, then cpu; an explicit device that is missing is an error."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if have[d])
    if requested not in have:
        raise DucklingError(f"Unknown device {requested!r}: use auto, cuda, mps or cpu.")
    if not have[requested]:
        raise DucklingError(f"Device {requested!r} is not available on this machine (torch "
                            f"{torch.__version__}). Use device='auto' to pick the best one present.")
    return requested


def bf16_supported(device: str) -> bool:
    """Whether bf16 autocast runs on *native* bf16 arithmetic here (what ``precision='auto'`` uses).

    cuda: compute capability >= 8 (Ampere+). mps: macOS 14+ (M1/M2 emulate bf16 in fp32 units).
    cpu: AVX512-BF16 or AMX instructions; without them oneDNN emulates bf16, which is no faster
    than float32. On this project's AMD EPYC (AVX512-BF16) bf16 autocast was ~20% faster per step.
    """
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "mps":  # the rule TrainingArguments(bf16=True) itself applies on a Mac
        return torch.backends.mps.is_macos_or_newer(14, 0)
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in native)


def pick_precision(requested: str, device: str) -> str:
    """``auto`` -> ``bf16`` (mixed: float32 weights and optimizer, bf16 autocast) where supported,
    else ``fp32`` with a one-line notice; an explicit ``bf16`` only needs autocast to exist."""
    if requested not in ("auto", "bf16", "fp32"):
        raise DucklingError(f"Unknown precision {requested!r}: use auto, bf16 or fp32.")
    if requested == "auto":
        if bf16_supported(device):
            return "bf16"
        print(f"duckling: no native bf16 on {device}; training in float32 (precision='bf16' forces mixed bf16).")
        return "fp32"
    if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise DucklingError("This GPU cannot run bf16 (needs compute capability 8+). Use precision='fp32'.")
    return requested


def pick_compile(requested, device: str) -> str | None:
    """The ``torch.compile`` mode, or None for eager. ``auto`` = CUDA only.

    On CUDA a step of this 1.5M-parameter model is launch-bound (H100: ~1 ms of kernels under
    ~10 ms of Python and launches), so "reduce-overhead" (CUDA graphs) nearly doubles steps/s after a
    ~20-40 s compile. Elsewhere an explicit True uses the default mode: on CPU the compile takes
    minutes on a small machine, and MPS support is young.
    """
    if requested == "auto":
        requested = device == "cuda"
    if not requested:
        return None
    return "reduce-overhead" if device == "cuda" else "default"


def tune_cpu_allocator() -> None:
    """Keep big CPU buffers on glibc's heap instead of a fresh mmap per allocation.

    A step allocates several (B*T, V) float32 buffers (logits, log-softmax, their gradients: 32 MB
    each at batch 2 x 512). glibc serves allocations >= 32 MB with mmap and returns them to the OS on
    free, so every step page-faults ~200 MB of zeroed pages: measured ~20% of a CPU step. Raising
    the mmap and trim thresholds keeps that memory reused. Process-wide, Linux/glibc only, harmless.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 512 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def check_trainable_dtype(model, allow_bf16_params: bool) -> None:
    """Refuse the mission's known failure mode: bf16 *parameters* under AdamW."""
    bf16 = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    if bf16 and not allow_bf16_params:
        raise DucklingError(
            f"{len(bf16)} parameters (e.g. {bf16[0]}) are stored in bfloat16. With AdamW this keeps the "
            "optimizer state in bf16: Adam's second moment underflows and the loss floors at ~5.8. Keep "
            "the model in float32 and use bf16 *mixed* precision (TrainConfig.precision='bf16', the "
            "default where supported). To demonstrate the failure on purpose, set "
            "TrainConfig.allow_bf16_params=True.")


# ---------------------------------------------------------------- the Trainer
def _trainer_classes():
    """Imported lazily so that ``import duckling.train`` stays cheap."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class DucklingTrainer(Trainer):
        _flops_per_token = None

        def floating_point_ops(self, inputs):
            # The base class walks every module and parameter on every step; the count never changes.
            if self._flops_per_token is None:
                self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return self._flops_per_token * inputs["input_ids"].numel()

        def _issue_warnings_after_load(self, load_result):
            # A tied lm_head.weight is not stored in checkpoints (it *is* wte); transformers 5 warns anyway.
            tied = self.model.lm_head.weight is self.model.transformer.wte.weight
            missing = [k for k in load_result.missing_keys if not (tied and k == "lm_head.weight")]
            super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    class Progress(ProgressCallback):
        """The Trainer's bar, with the last logged losses as its postfix instead of printed dicts."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs:
                shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "eval_loss")}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    class Timer(TrainerCallback):
        """Steps/s of this call, after ``skip`` warm-up steps, excluding evaluation and checkpoints.

        One clock read per step and two device syncs per run: nothing that waits on the device."""

        def __init__(self, device: str, skip: int):
            self.device, self.skip, self.steps_per_s = device, skip, float("nan")
            self.t0 = self.paused = self.last = None

        def _sync(self):
            if self.device == "cuda":
                torch.cuda.synchronize()
            elif self.device == "mps":
                torch.mps.synchronize()

        def on_train_begin(self, args, state, control, **kw):
            self.first, self.excluded = state.global_step, 0.0
            if self.skip == 0:  # a run too short to spare warm-up steps: time all of it
                self._sync()
                self.t0 = self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.first + self.skip:
                self._sync()
                self.t0 = time.perf_counter()
            self.last = time.perf_counter()

        def _exclude(self, *a, **kw):  # evaluation / checkpoint time since the last step
            if self.t0 is not None and self.last is not None:
                now = time.perf_counter()
                self.excluded += now - self.last
                self.last = now

        on_evaluate = on_save = _exclude

        def on_train_end(self, args, state, control, **kw):
            if self.t0 is not None and state.global_step > self.first + self.skip:
                self._sync()
                dt = time.perf_counter() - self.t0 - self.excluded
                self.steps_per_s = (state.global_step - self.first - self.skip) / dt

    return DucklingTrainer, Progress, Timer


def fused_adamw_available(device: str) -> bool:
    """torch's fused AdamW kernel (same update rule, one kernel for all parameters)."""
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def training_arguments(cfg: DucklingConfig, output_dir, device: str, precision: str, *,
                       save: bool, evaluate: bool, progress: bool, compile_mode: str | None = None):
    """TrainingArguments = the config's values plus the settings that keep a step lean."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size * 4, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler_type,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        optim="adamw_torch_fused" if fused_adamw_available(device) else "adamw_torch",
        bf16=precision == "bf16", use_cpu=device == "cpu", torch_compile=compile_mode is not None,
        torch_compile_mode=None if compile_mode in (None, "default") else compile_mode,
        logging_strategy="steps", logging_steps=t.logging_steps, logging_nan_inf_filter=False,
        save_strategy="steps" if save else "no", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if evaluate and t.eval_steps else "no", eval_steps=t.eval_steps or None,
        # pinned batches copied without blocking: the host never waits for the device between steps
        dataloader_num_workers=t.dataloader_num_workers, dataloader_pin_memory=device == "cuda",
        accelerator_config={"non_blocking": device == "cuda"},
        remove_unused_columns=False, report_to="none", disable_tqdm=not progress,
        include_num_input_tokens_seen="no",
    )


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
    precision = pick_precision(cfg.train.precision, device)
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
