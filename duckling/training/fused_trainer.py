"""The Trainer of a fused group: one HF Trainer step trains K runs of one shape (``FusedGPT2``).

Everything that makes a run a run is the separate run's own code, called with that run's objects
swapped in (``FusedTrainer.as_run(k)``: its model, TrainingArguments, TrainerState, optimizer, scheduler
and random stream): its optimizer and scheduler are built by the Trainer's own ``create_optimizer`` /
``create_scheduler`` (so its parameter groups, learning rate and weight decay are its own), its data
loader by the Trainer's own ``get_train_dataloader`` with its seed, its checkpoints by the Trainer's
own ``_save_checkpoint`` into its run folder (the ordinary format, rotated by its save_total_limit),
its evaluation by the Trainer's own ``evaluate`` on its model, and a resume loads each run's own
checkpoint. Only the training forward/backward is fused; clipping is per run (never one norm
across runs).

Random streams: a separate run draws its dropout masks and its DataLoader iterators' seeds from the
global CPU generator, seeded with its seed by the Trainer. Here run k has a generator of its own,
seeded the same; whatever the separate run does with the global generator (iterator seeds,
evaluation, checkpoints' rng_state.pth, a resume's restore) runs with run k's generator swapped in
as the global one, and the fused forward draws run k's masks from it in the separate run's order. On
CPU each run therefore sees exactly its separate run's masks and data.
"""
from __future__ import annotations

import collections
import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RunSlot:
    """One run of the group: its model (a FusedGPT2 member), its TrainingArguments and config."""

    model: object
    args: object
    cfg: object
    run_dir: Path
    generator: torch.Generator
    recorder: object | None = None
    optimizer: object = None
    scheduler: object = None
    state: object = None
    ckpt: Path | None = None  # the checkpoint this run resumes from


class GroupOptimizer(torch.optim.Optimizer):
    """K ordinary optimizers (one per run) as the one optimizer the Trainer steps. Their parameter
    groups are shared dicts, so ``param_groups`` here are theirs."""

    def __init__(self, optimizers):  # no Optimizer.__init__: there are no parameters of its own
        self.optimizers = list(optimizers)
        self.defaults = dict(self.optimizers[0].defaults)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self._optimizer_step_pre_hooks = collections.OrderedDict()
        self._optimizer_step_post_hooks = collections.OrderedDict()

    @property
    def state(self):
        return collections.ChainMap(*[o.state for o in self.optimizers])

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("a fused group's optimizer takes no closure")
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self):
        return {"runs": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict):
        for o, sd in zip(self.optimizers, state_dict["runs"]):
            o.load_state_dict(sd)


class GroupScheduler:
    """K ordinary LR schedulers stepped as one; ``before`` holds each run's lr before the last step
    (what a separate run logs)."""

    def __init__(self, schedulers):
        self.schedulers = list(schedulers)
        self.before = [s.get_last_lr()[0] for s in self.schedulers]

    def step(self, *a, **kw):
        self.before = [s.get_last_lr()[0] for s in self.schedulers]
        for s in self.schedulers:
            s.step()

    def get_last_lr(self):
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    def state_dict(self):
        return {"runs": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict):
        for s, sd in zip(self.schedulers, state_dict["runs"]):
            s.load_state_dict(sd)


class FusedLoader:
    """K prepared per-run DataLoaders as one: each step yields {"input_ids": (K, B, T)}. Every call
    into run k's loader (iterator creation, next batch) runs with run k's generator as the global one."""

    def __init__(self, loaders, swap):
        self.loaders, self.swap = list(loaders), swap

    def __len__(self) -> int:
        return len(self.loaders[0])

    def set_epoch(self, epoch: int) -> None:  # what Trainer._run_epoch does to its one loader
        for dl in self.loaders:
            if hasattr(dl, "set_epoch"):
                dl.set_epoch(epoch)
            inner = getattr(getattr(dl, "batch_sampler", None), "batch_sampler", None)
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(epoch)

    def skipping(self, n: int) -> "FusedLoader":
        from accelerate import skip_first_batches

        return FusedLoader([skip_first_batches(dl, n) for dl in self.loaders], self.swap)

    def __iter__(self):
        its = []
        for k, dl in enumerate(self.loaders):
            with self.swap(k):
                its.append(iter(dl))
        while True:
            batch = []
            for k, it in enumerate(its):
                with self.swap(k):
                    try:
                        batch.append(next(it))
                    except StopIteration:
                        return
            ids = torch.stack([b["input_ids"] for b in batch])
            yield {"input_ids": ids, "labels": ids}


def swap_rng(gen: torch.Generator):
    """While inside: ``gen``'s state is the global generator of its device; afterwards ``gen`` holds
    what was drawn and the global generator is restored."""
    cuda = gen.device.type == "cuda"
    get = torch.cuda.get_rng_state if cuda else torch.get_rng_state
    put = torch.cuda.set_rng_state if cuda else torch.set_rng_state

    @contextlib.contextmanager
    def swapped():
        outer = get()
        put(gen.get_state())
        try:
            yield
        finally:
            gen.set_state(get())
            put(outer)

    return swapped()


_SHARED_STATE = ("epoch", "global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size",
                 "num_train_epochs", "is_local_process_zero", "is_world_process_zero", "stateful_callbacks")


def fused_trainer_class():
    """Built lazily (transformers is imported on use)."""
    import transformers.trainer as hf_trainer
    from transformers import Trainer, TrainerState

    class FusedTrainer(Trainer):
        """A Trainer over a FusedGPT2 whose member runs are ``slots`` (see the module docstring)."""

        def __init__(self, *a, slots, **kw):
            self.slots = slots
            super().__init__(*a, **kw)
            # what the Trainer reads off a member's class (GPT2LMHeadModel), not off the fused module
            self.label_names, self.can_return_loss = ["labels"], True
            self.run_loss = None  # (K,) training loss summed since the last log, per run
            self.run_total = [0.0] * len(slots)  # per run, what the Trainer keeps in _total_loss_scalar
            self.in_run = None  # the run whose objects are in the Trainer's seats (as_run)
            self._flops_per_token = 6 * slots[0].model.num_parameters(exclude_embeddings=True)

        @contextlib.contextmanager
        def as_run(self, k: int):
            """Run k's objects in the Trainer's seats, its generator as the global one."""
            s = self.slots[k]
            names = ("model", "model_wrapped", "args", "optimizer", "lr_scheduler", "optimizer_cls_and_kwargs")
            saved = {n: getattr(self, n) for n in names}
            saved_state, saved_seed = self.state, self.accelerator.dataloader_config.data_seed
            from duckling.training.optim import optimizer_cls_and_kwargs

            self.model = self.model_wrapped = s.model
            self.args, self.optimizer, self.lr_scheduler = s.args, s.optimizer, s.scheduler
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(s.cfg.train, s.cfg.model.vocab_size)
            self.accelerator.dataloader_config.data_seed = s.args.data_seed
            if s.state is not None:
                self.state = s.state
            self.in_run = k
            try:
                with swap_rng(s.generator):
                    yield s
            finally:
                for n, v in saved.items():
                    setattr(self, n, v)
                self.in_run = None
                self.state, self.accelerator.dataloader_config.data_seed = saved_state, saved_seed

        def sync_states(self) -> None:
            """Each run's TrainerState: its own log history, the group's step, epoch and counters."""
            for s in self.slots:
                if s.state is None:
                    s.state = (TrainerState.load_from_json(str(s.ckpt / "trainer_state.json")) if s.ckpt
                               else copy.deepcopy(self.state))
                    if s.ckpt is None:
                        s.state.log_history = []
                for name in _SHARED_STATE:
                    setattr(s.state, name, copy.deepcopy(getattr(self.state, name)))
                s.state.total_flos = self.state.total_flos  # counted per run (floating_point_ops)

        # --- data, optimizer, scheduler: the Trainer's own code, once per run ----------------------
        def get_train_dataloader(self):
            loaders = []
            for k in range(len(self.slots)):
                with self.as_run(k):
                    loaders.append(super().get_train_dataloader())
            return FusedLoader(loaders, self._swap)

        def _swap(self, k):
            return swap_rng(self.slots[k].generator)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                for k, s in enumerate(self.slots):
                    with self.as_run(k):
                        self.optimizer = None
                        s.optimizer = super().create_optimizer()
                self.optimizer = GroupOptimizer([s.optimizer for s in self.slots])
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                for k, s in enumerate(self.slots):
                    with self.as_run(k):
                        self.lr_scheduler = None
                        s.scheduler = super().create_scheduler(num_training_steps, s.optimizer)
                self.lr_scheduler = GroupScheduler([s.scheduler for s in self.slots])
            return self.lr_scheduler

        # --- the fused step ------------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not hasattr(model, "runs"):  # a member run's own evaluation (as_run)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses, hidden = model(inputs["input_ids"])  # (K,), (K, B, T, d)
            if model.training:
                d = losses.detach()
                self.run_loss = d.clone() if self.run_loss is None else self.run_loss + d
                for k, s in enumerate(self.slots):
                    if s.recorder is not None:
                        s.recorder.observe_hidden(hidden[k])
            loss = losses.sum()  # d(sum)/d(theta_k) = d(loss_k)/d(theta_k): each run's own gradient
            return (loss, {"losses": losses}) if return_outputs else loss

        def floating_point_ops(self, inputs):
            """One run's share (every run trains the same tokens' worth): a resume reads a run's own count."""
            return self._flops_per_token * inputs["input_ids"].numel() // len(self.slots)

        def _clip_grad_norm(self, model):
            """Per run, as ``accelerator.clip_grad_norm_`` clips a separate run (max_grad_norm 0: the
            norm only). Returns the (K,) pre-clip norms."""
            norms = []
            for s in self.slots:
                limit = s.cfg.train.max_grad_norm or float("inf")
                norms.append(torch.nn.utils.clip_grad_norm_(s.model.parameters(), limit))
            return torch.stack(norms)

        def _get_grad_norm(self, model, grad_norm=None):
            return self._clip_grad_norm(model) if grad_norm is None else grad_norm

        def _run_epoch(self, *a, **kw):
            """The Trainer's epoch, with its resume skip applied to each run's own loader."""
            original = hf_trainer.skip_first_batches
            hf_trainer.skip_first_batches = lambda dl, n: (dl.skipping(n) if isinstance(dl, FusedLoader)
                                                           else original(dl, n))
            try:
                return super()._run_epoch(*a, **kw)
            finally:
                hf_trainer.skip_first_batches = original

        # --- logging, evaluation, checkpoints: per run ---------------------------------------------
        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                     learning_rate=None):
            if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
                n = self.state.global_step - self._globalstep_last_logged
                losses = self.run_loss.tolist() if self.run_loss is not None else [float("nan")] * len(self.slots)
                norms = grad_norm.tolist() if isinstance(grad_norm, torch.Tensor) else [grad_norm] * len(self.slots)
                self.run_loss = None
                tr_loss -= tr_loss
                self._total_loss_scalar += sum(losses) / len(losses)
                self.run_total = [t + x for t, x in zip(self.run_total, losses)]
                self._globalstep_last_logged = self.state.global_step
                self.store_flos()
                self.sync_states()
                for k in range(len(self.slots)):
                    logs = {"loss": losses[k] / n}
                    if norms[k] is not None:
                        logs["grad_norm"] = norms[k]
                    logs["learning_rate"] = self.lr_scheduler.before[k]
                    with self.as_run(k):
                        self.log(logs, start_time)
            if self.control.should_evaluate:
                self._evaluate(trial, ignore_keys_for_eval)
            if self.control.should_save:
                self._save_checkpoint(model, trial)
                self.control = self.callback_handler.on_save(self.args, self.state, self.control)

        def log(self, logs, start_time=None):
            """The end-of-training summary goes to every run's history too, with its own train_loss."""
            if self.in_run is None and "train_loss" in logs:
                left = self.run_loss.tolist() if self.run_loss is not None else [0.0] * len(self.slots)
                steps = max(self.state.global_step - self._initial_global_step, 0.001)
                self.sync_states()
                for k in range(len(self.slots)):
                    own = {**logs, "train_loss": (self.run_total[k] + left[k]) / steps}
                    with self.as_run(k):
                        super().log(own, start_time)
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            """Each run evaluates its own model with the Trainer's own loop (its own eval loss);
            returns {"<prefix>_loss": mean over runs, "<prefix>_losses": per run}."""
            self.sync_states()
            per_run = []
            for k in range(len(self.slots)):
                with self.as_run(k), self.autocast_smart_context_manager():
                    per_run.append(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix))
            key = f"{metric_key_prefix}_loss"
            losses = [m[key] for m in per_run]
            return {key: sum(losses) / len(losses), f"{metric_key_prefix}_losses": losses}

        def _save_checkpoint(self, model, trial):
            self.store_flos()
            self.sync_states()
            for k, s in enumerate(self.slots):
                with self.as_run(k):
                    super()._save_checkpoint(s.model, trial)

        # --- resume: each run from its own checkpoint ----------------------------------------------
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            for k, s in enumerate(self.slots):
                with self.as_run(k):
                    super()._load_from_checkpoint(str(s.ckpt), s.model)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None:
                return
            for k, s in enumerate(self.slots):
                with self.as_run(k):
                    super()._load_optimizer_and_scheduler(str(s.ckpt))

        def _load_rng_state(self, checkpoint):
            if checkpoint is None:
                return
            for k, s in enumerate(self.slots):
                with self.as_run(k):
                    super()._load_rng_state(str(s.ckpt))

    return FusedTrainer
