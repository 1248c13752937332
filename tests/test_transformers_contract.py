"""What Duckling relies on in transformers beyond its documented calls, pinned so that an upgrade that
changes it fails here, with the reason, instead of silently changing a run.

- the text of the Trainer's missing-keys warning (trainer.TIED_HEAD_WARNING, dropped for a tied head);
- ``transformers.utils.output_capturing.maybe_install_capturing_hooks`` (no top-level name; what
  trainer.install_hidden_state_capture calls before anything is compiled) and ``output_hidden_states=-1``;
- the signatures of the Trainer methods DucklingTrainer overrides and calls positionally.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from duckling.config import N_LIVE, ModelConfig
from duckling.data.rows import as_rows, collate
from duckling.errors import DucklingError
from duckling.training.model import build_model
from duckling.training.trainer import (TIED_HEAD_WARNING, _trainer_classes, install_hidden_state_capture,
                                       load_finished_checkpoint)

T = 16
MAJOR = int(transformers.__version__.split(".")[0])


def tiny_model(seed=0, tie=True):
    return build_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=T,
                                   tie_word_embeddings=tie), seed=seed)


def rows():
    return as_rows(np.random.default_rng(0).integers(0, N_LIVE, size=(8, T), dtype=np.uint16), None)


def trainer(cls, model, out, max_steps, callbacks=()):
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=1, report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=1, seed=0)
    return cls(model=model, args=args, train_dataset=rows(), data_collator=collate, callbacks=list(callbacks))


class Records(logging.Handler):
    """What the ``transformers.trainer`` logger lets through (after its filters)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers.trainer").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers.trainer").removeHandler(self)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint-1 of a plain Trainer run of a tied tiny model, and the model it was saved from."""
    out = tmp_path_factory.mktemp("ckpt")
    t = trainer(Trainer, tiny_model(), out, max_steps=1)
    t.train()
    return out / "checkpoint-1", t.model


def test_the_trainer_logs_tied_head_warning_and_duckling_drops_only_that(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    with Records() as plain:
        trainer(Trainer, tiny_model(seed=1), tmp_path / "a", max_steps=2).train(resume_from_checkpoint=str(ckpt))
    assert TIED_HEAD_WARNING in plain.messages, (
        "transformers no longer logs duckling.training.trainer.TIED_HEAD_WARNING when resuming a tied model "
        f"(it logged {plain.messages}): update TIED_HEAD_WARNING to the new text, or remove the filter if the "
        "warning is gone")
    DucklingTrainer, _, _ = _trainer_classes()
    with Records() as ours:
        trainer(DucklingTrainer, tiny_model(seed=1), tmp_path / "b", max_steps=2).train(resume_from_checkpoint=str(ckpt))
    assert not any("missing keys" in m for m in ours.messages), ours.messages
    assert logging.getLogger("transformers.trainer").filters == []  # removed after train(): other warnings show
    with Records() as after:
        logging.getLogger("transformers.trainer").warning(TIED_HEAD_WARNING)
    assert after.messages == [TIED_HEAD_WARNING]


def test_an_untied_model_keeps_the_warning(tmp_path):
    """The filter is for a tied head only: an untied lm_head.weight missing from a checkpoint is real."""
    t = trainer(Trainer, tiny_model(tie=False), tmp_path / "a", max_steps=1)
    t.train()
    ckpt = tmp_path / "a" / "checkpoint-1"
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    DucklingTrainer, _, _ = _trainer_classes()
    with Records() as ours:
        trainer(DucklingTrainer, tiny_model(seed=1, tie=False), tmp_path / "b", max_steps=2).train(
            resume_from_checkpoint=str(ckpt))
    assert TIED_HEAD_WARNING in ours.messages


def test_load_finished_checkpoint_restores_weights_and_state_without_a_step(checkpoint, tmp_path):
    ckpt, saved = checkpoint
    DucklingTrainer, _, _ = _trainer_classes()

    class Steps(TrainerCallback):
        n = 0

        def on_step_end(self, *a, **kw):
            self.n += 1

    steps = Steps()
    t = trainer(DucklingTrainer, tiny_model(seed=1), tmp_path / "a", max_steps=1, callbacks=[steps])
    load_finished_checkpoint(t, ckpt)
    assert steps.n == 0 and t.state.global_step == 1
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), saved.state_dict().values()))
    assert t.model.lm_head.weight is t.model.transformer.wte.weight  # loading in place keeps the tie

    other = trainer(DucklingTrainer, build_model(ModelConfig(n_layer=2, n_embd=16, n_head=2, n_inner=32,
                                                             n_positions=T)), tmp_path / "b", max_steps=1)
    with pytest.raises(DucklingError, match="does not hold this model's weights"):
        load_finished_checkpoint(other, ckpt)


def test_hidden_state_capture_is_installed_before_compile_and_returns_ln_f():
    """The compiled forward must find transformers' capturing hooks already installed (installing them
    itself is a graph break), and the recorder reads ``outputs.hidden_states[-1]`` of an
    ``output_hidden_states=-1`` forward as ln_f's output."""
    import torch._dynamo as dynamo

    if MAJOR >= 5:  # transformers 4 has no capturing hooks; 5 must still offer this call
        from transformers.utils.output_capturing import maybe_install_capturing_hooks  # noqa: F401
    model = tiny_model().train()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, N_LIVE, size=(2, T)).astype(np.int64))
    install_hidden_state_capture(model)  # before any forward, as DucklingTrainer does
    dynamo.reset()
    e = dynamo.explain(model)(input_ids=x, labels=x, output_hidden_states=-1)
    dynamo.reset()
    assert e.graph_break_count == 0, ("install_hidden_state_capture no longer installs transformers' output "
                                      f"capturing hooks up front: {[r.reason for r in e.break_reasons]}")

    seen = []
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        out = model(input_ids=x, labels=x, output_hidden_states=-1)
    finally:
        hook.remove()
    assert torch.equal(out.hidden_states[-1], seen[0])
    if MAJOR >= 5:
        assert all(h is None for h in out.hidden_states[:-1])  # -1 keeps only the last one (memory)


def test_overridden_trainer_methods_keep_their_signatures():
    """DucklingTrainer.compute_loss calls super() positionally; a reorder would pass the wrong values."""
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(Trainer.compute_loss) == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    assert params(Trainer.floating_point_ops) == ["self", "inputs"]
    assert "resume_from_checkpoint" in params(Trainer.train)
    assert "optimizer_cls_and_kwargs" in params(Trainer.__init__)
    from transformers.trainer_callback import ProgressCallback

    assert ProgressCallback().training_bar is None  # Progress.on_log reads it
