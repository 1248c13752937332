"""The Hugging Face side of a step: device, precision and compile choices, TrainingArguments from
the config, and the Trainer subclass and callbacks (``train.py`` wires them into one call).

Kept out of a step (benchmarks/train_speed.py measures the effect): the nan/inf loss check and
blocking host-to-device copies (host syncs), token counting, per-step logging and FLOP counting.
Added: CUDA graphs through torch.compile on CUDA (compile="auto"), and on Linux CPUs an allocator
setting that stops every 32 MB logits buffer from being a fresh, page-faulting mmap.
"""
from __future__ import annotations

import contextlib
import logging
import platform
import time
from pathlib import Path

import torch

from duckling.config import DucklingConfig
from duckling.errors import DucklingError


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
    """Whether bf16 autocast runs on *native* bf16 arithmetic here (what ``train.compute_dtype='auto'`` uses).

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
    """The training arithmetic for ``train.compute_dtype``: ``auto`` -> ``bf16`` (mixed: float32 weights
    and optimizer, bf16 autocast) where supported, else ``fp32`` with a one-line notice; an explicit
    ``bf16`` only needs autocast to exist."""
    if requested not in ("auto", "bf16", "fp32"):
        raise DucklingError(f"Unknown train.compute_dtype {requested!r}: use auto, bf16 or fp32.")
    if requested == "auto":
        if bf16_supported(device):
            return "bf16"
        print(f"duckling: no native bf16 on {device}; training in float32 (train.compute_dtype='bf16' forces "
              "mixed bf16).")
        return "fp32"
    if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise DucklingError("This GPU cannot run bf16 (needs compute capability 8+). Use train.compute_dtype='fp32'.")
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


def graph_friendly(model):
    """Remove what splits this model's compiled forward; returns the model. Math unchanged.

    GPT2LMHeadModel's class name matches no transformers loss type, so every forward's
    ``loss_function`` calls ``logger.warning_once``, which dynamo cannot trace: a graph break between
    the logits and the loss (two graphs, the (B, T, V) logits crossing them). Naming the loss it
    already uses (ForCausalLM) removes the break.
    """
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def install_hidden_state_capture(model) -> None:
    """Install transformers' output-capturing hooks now, before anything is compiled: installed
    lazily by the first ``output_hidden_states`` forward they are a thread lock and
    ``register_forward_hook`` inside the traced code (graph breaks).

    transformers 5 has no top-level name for this; ``maybe_install_capturing_hooks`` is the call its
    own forward makes (idempotent; a model with nothing to capture gets no hook), pinned by
    tests/test_transformers_contract.py. transformers 4 has no such hooks: a no-op there."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4: hidden states are returned without hooks
        return
    maybe_install_capturing_hooks(getattr(model, "base_model", model))


def check_trainable_dtype(model, allow_bf16_params: bool) -> None:
    """Refuse the mission's known failure mode: bf16 *parameters* under AdamW."""
    bf16 = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    if bf16 and not allow_bf16_params:
        raise DucklingError(
            f"{len(bf16)} parameters (e.g. {bf16[0]}) are stored in bfloat16. With AdamW this keeps the "
            "optimizer state in bf16: Adam's second moment underflows and the loss floors at ~5.8. Keep "
            "the model in float32 and use bf16 *mixed* precision (train.compute_dtype='bf16', the "
            "default where supported). To demonstrate the failure on purpose, set "
            "train.allow_bf16_params=True.")


# ---------------------------------------------------------------- loading checkpoints
# What the Trainer logs when a resumed checkpoint lacks lm_head.weight. A tied lm_head.weight *is*
# wte and is never stored, so for a tied model the warning is noise. Its text is pinned by
# tests/test_transformers_contract.py.
TIED_HEAD_WARNING = "There were missing keys in the checkpoint model loaded: ['lm_head.weight']."


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


class _DropTiedHeadWarning(logging.Filter):
    def filter(self, record) -> bool:
        return record.getMessage() != TIED_HEAD_WARNING


@contextlib.contextmanager
def tied_head_not_missing(model):
    """While the Trainer loads a checkpoint into a tied ``model``, drop its lm_head.weight warning
    (a filter on the ``transformers.trainer`` logger; every other warning still shows)."""
    log, drop = logging.getLogger("transformers.trainer"), _DropTiedHeadWarning()
    if _tied(model):
        log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def load_finished_checkpoint(trainer, ckpt: Path) -> None:
    """Put a finished run's last checkpoint (step >= max_steps) into ``trainer`` without training:
    its weights into ``trainer.model`` in place, then its TrainerState.

    ``trainer.train(resume_from_checkpoint=ckpt)`` would run one step past max_steps here (an extra
    step, record and checkpoint), so the weights are loaded with safetensors and ``load_state_dict``,
    as the Trainer's own resume does. A tied lm_head.weight may be absent; anything else missing or
    unexpected means the checkpoint is not this model's, and is an error."""
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise DucklingError(f"{ckpt.resolve()} has trainer_state.json but no model.safetensors: the checkpoint is "
                            "damaged. Delete that checkpoint folder and resume again (from the one before it).")
    missing, unexpected = trainer.model.load_state_dict(load_file(weights, device="cpu"), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and _tied(trainer.model))]
    if missing or unexpected:
        raise DucklingError(f"{weights.resolve()} does not hold this model's weights (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}). The run folder was edited or mixed with another run; "
                            "restore it or start a new run.")
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))


# ---------------------------------------------------------------- the Trainer
def _trainer_classes():
    """Imported lazily so that ``import duckling.training.train`` stays cheap."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class DucklingTrainer(Trainer):
        """The Trainer, with a graph-friendly model and the final hidden state for the recorder."""

        _flops_per_token = None

        def __init__(self, model=None, *args, **kwargs):
            super().__init__(graph_friendly(model), *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Also hand the final hidden state (after ln_f) of every training forward to the
            callbacks that observe it (the recorder), outside the compiled model: a model output,
            not a hook that writes outside state from inside the graph."""
            observers = [cb for cb in self.callback_handler.callbacks if hasattr(cb, "observe_hidden")]
            if not observers or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not self._capture_ready:
                install_hidden_state_capture(self.model)
                self._capture_ready = True
            inputs = {**inputs, "output_hidden_states": -1}  # -1: keep only the last one
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            hidden = outputs.hidden_states[-1]  # (B, T, d) = ln_f's output (transformers ties it)
            for cb in observers:
                cb.observe_hidden(hidden)
            return (loss, outputs) if return_outputs else loss

        _capture_ready = False

        def floating_point_ops(self, inputs):
            # The base class walks every module and parameter on every step; the count never changes.
            if self._flops_per_token is None:
                self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return self._flops_per_token * inputs["input_ids"].numel()

        def train(self, *args, **kwargs):
            with tied_head_not_missing(self.model):
                return super().train(*args, **kwargs)

    class Progress(ProgressCallback):
        """The Trainer's bar, with the last logged losses as its postfix instead of printed dicts."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs:
                shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "eval_loss")}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # no nested evaluation bar: it leaves "[A" debris in logs and notebooks

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


def log_last_step():
    """A callback that logs the loss at the last step whatever ``train.logging_steps`` is: a run shorter than
    it (or not a multiple of it) still ends with its final training loss in ``log_history``."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


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
