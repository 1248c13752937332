"""Training: the Trainer wrapper, run folders, interrupt + resume, bad input, generation.

Every run is a 1-layer, 64-token Duckling trained for a handful of steps on random live ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from duckling import cli
from duckling.data import rows as rows_mod
from duckling.config import N_LIVE, DucklingConfig, ModelConfig, RecordConfig, TrainConfig
from duckling.errors import DucklingError
from duckling.training.generate import generate, generate_ids
from duckling.training.model import build_model
from duckling.training.train import load_run, pick_device, pick_precision, train

T = 64


def tiny_cfg(**train_kw) -> DucklingConfig:
    # save_steps a multiple of logging_steps (equal loss logs after a resume); eager even on CUDA (fast)
    kw = dict(max_steps=6, save_steps=3, logging_steps=3, compile=False)
    return DucklingConfig(model=ModelConfig(n_layer=1, n_positions=T), train=TrainConfig(**{**kw, **train_kw}),
                          record=RecordConfig(probe_every=2))


def live_rows(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_LIVE, size=(n, T), dtype=np.uint16)  # (n, T)



class Interrupt(TrainerCallback):
    """Raise ``exc`` right after optimizer step ``k`` (as a crash or Ctrl-C would)."""

    def __init__(self, k: int, exc=KeyboardInterrupt):
        self.k, self.exc = k, exc

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.k:
            raise self.exc("injected")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok):
    """An uninterrupted recorded run of 6 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    return train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, progress=False)


def same_weights(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_run_folder_is_self_describing(reference, tok):
    run = reference.run_dir
    cfg = DucklingConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg == tiny_cfg()
    info = json.loads((run / "run_info.json").read_text())
    assert info["mapping_hash"] == tok.hash and info["global_step"] == 6
    assert info["device"] == reference.device and info["precision"] == reference.precision
    assert {"torch", "transformers", "datasets"} <= set(info["versions"])
    assert json.loads((run / "token_mapping.json").read_text())["mapping_hash"] == tok.hash
    assert (run / "checkpoint-6" / "trainer_state.json").is_file()
    model, tok2, cfg2 = load_run(run)
    assert same_weights(model, reference.model) and tok2.hash == tok.hash and cfg2 == cfg
    steps, losses = reference.losses()
    assert steps.tolist() == [3, 6] and np.isfinite(losses).all()

    from duckling.recording.reader import Recording

    rec = Recording(run)
    assert rec.steps.tolist() == list(range(7))  # W after 0..6 updates
    assert np.array_equal(rec.snapshot(6).astype(np.float32),
                          model.transformer.wte.weight.detach().to(torch.bfloat16).float().numpy())


def test_interrupted_run_resumes_bit_exact(reference, tok, tmp_path):
    from duckling.recording.reader import Recording

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, callbacks=[Interrupt(5)], progress=False)
    assert Recording(run).steps.tolist() == list(range(6))  # steps 0..5 readable after the crash
    assert not (run / "final").exists()

    resumed = train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    assert resumed.global_step == 6
    assert same_weights(resumed.model, reference.model)  # bit-exact: weights, optimizer, data order, dropout
    a, b = Recording(reference.run_dir), Recording(run)
    assert a.steps.tolist() == b.steps.tolist() == list(range(7))  # no gap, no duplicate
    assert np.array_equal(a.trajectory(np.arange(8192)), b.trajectory(np.arange(8192)))  # (steps, V, d)
    for field in ("norm", "update_norm", "grad_norm", "adam_v"):
        assert np.array_equal(a.rows(field), b.rows(field), equal_nan=True)
    assert np.array_equal(a.hidden_mean, b.hidden_mean, equal_nan=True)
    assert np.array_equal(a.probe, b.probe)
    assert resumed.losses()[1].tolist() == reference.losses()[1].tolist()
    assert len(json.loads((run / "run_info.json").read_text())["resumed"]) == 1


def test_resuming_a_finished_run_trains_no_step_and_rewrites_final_identically(reference, tok, tmp_path):
    """Killed after its last checkpoint, before final/: --resume only writes final/ (the Trainer's own
    resume would run one step past max_steps), with the weights the run ended on, byte for byte."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference.run_dir, run, ignore=shutil.ignore_patterns(".lock", "final"))
    kept = {p.relative_to(run): p.read_bytes() for p in run.rglob("*")
            if p.is_file() and p.name != "run_info.json" and p.name != ".lock"}
    resumed = train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    assert resumed.global_step == 6 and same_weights(resumed.model, reference.model)
    assert resumed.log_history == json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert (run / "final" / "model.safetensors").read_bytes() == \
        (reference.run_dir / "final" / "model.safetensors").read_bytes()
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.relative_to(run) in kept} == kept
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]  # no checkpoint-7
    assert json.loads((run / "run_info.json").read_text())["status"] == "complete"


def test_exception_keeps_recording_and_refusals_lose_nothing(tok, tmp_path):
    from duckling.recording.reader import Recording

    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, callbacks=[Interrupt(2, RuntimeError)],
              progress=False)
    assert Recording(run).steps.tolist() == [0, 1, 2]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    with pytest.raises(DucklingError, match="not empty"):  # a folder that holds a run is never overwritten
        train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, progress=False)
    with pytest.raises(DucklingError, match="different config.*learning_rate"):
        train(tiny_cfg(learning_rate=1e-3), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True,
              progress=False)
    with pytest.raises(DucklingError, match="no complete checkpoint"):  # crashed before checkpoint-3
        train(tiny_cfg(), dataset=live_rows(), run_dir=run, tokenizer=tok, resume=True, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_no_dead_id_reaches_a_batch(tok, tmp_path, monkeypatch):
    seen = []

    def spy(batch_rows):
        out = rows_mod.collate(batch_rows)
        seen.append(int(out["input_ids"].max()))
        return out

    monkeypatch.setattr("duckling.training.train.collate", spy)
    data = live_rows()
    data[:, -1] = N_LIVE - 1  # the largest live id is fine
    train(tiny_cfg(max_steps=3), dataset=data, progress=False)
    assert len(seen) >= 3 and max(seen) == N_LIVE - 1  # (accelerate fetches one batch ahead)

    data[17, 5] = N_LIVE  # one dead id anywhere: refused before anything is written
    with pytest.raises(DucklingError, match="dead"):
        train(tiny_cfg(), dataset=data, run_dir=tmp_path / "run", tokenizer=tok, progress=False)
    assert not (tmp_path / "run").exists()


def test_bad_config_and_foreign_dataset(tok, tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(DucklingError, match="vocab_size"):
        train(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=4096)),
              dataset=live_rows(), run_dir=tmp_path / "a", tokenizer=tok, progress=False)
    assert not (tmp_path / "a").exists()

    data = pytest.importorskip("duckling.data.build")
    from duckling.data.vocab import CompactTokenizer

    text = tmp_path / "stories.txt"
    text.write_text("\n<|endoftext|>\n".join(f"Once upon a time a cat named Tom saw {i} birds." for i in range(60)))
    data.build_dataset(str(text), tok, tmp_path / "ds", seq_len=T, progress=False)
    counts = np.random.default_rng(1).integers(0, 100, 50257)
    other = CompactTokenizer.from_counts(counts)
    with pytest.raises(DucklingError, match="another token mapping"):
        train(cfg, dataset=tmp_path / "ds", run_dir=tmp_path / "b", tokenizer=other, progress=False)
    assert not (tmp_path / "b").exists()


def test_bf16_parameters_refused_unless_opted_in():
    cfg = tiny_cfg(max_steps=2)
    model = build_model(cfg.model, seed=0).to(torch.bfloat16)
    with pytest.raises(DucklingError, match="allow_bf16_params"):
        train(cfg, dataset=live_rows(), model=model, progress=False)
    cfg = tiny_cfg(max_steps=2, allow_bf16_params=True)
    result = train(cfg, dataset=live_rows(), model=model, progress=False)
    assert result.model.transformer.wte.weight.dtype == torch.bfloat16 and result.global_step == 2


def test_device_and_precision_choice(capsys):
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DucklingError, match="not available"):
            pick_device("cuda")
    assert pick_precision("fp32", "cpu") == "fp32" and pick_precision("bf16", "cpu") == "bf16"
    auto = pick_precision("auto", "cpu")
    from duckling.training.trainer import bf16_supported

    assert auto == ("bf16" if bf16_supported("cpu") else "fp32")
    assert ("float32" in capsys.readouterr().out) == (auto == "fp32")  # the one-line notice
    with pytest.raises(DucklingError):
        pick_precision("fp16", "cpu")


def test_in_memory_training_learns_and_is_deterministic():
    cfg = tiny_cfg(max_steps=8, learning_rate=3e-3, logging_steps=1, compute_dtype="fp32")
    data = np.tile(np.arange(T, dtype=np.uint16), (16, 1))  # one memorisable row
    a = train(cfg, dataset=data, progress=False)
    b = train(cfg, dataset=data, progress=False)
    _, la = a.losses()
    assert la[-1] < la[0] - 0.5 and a.steps_per_s > 0 and a.run_dir is None
    assert la.tolist() == b.losses()[1].tolist()
    # a run too short for warm-up steps is still timed (it used to report NaN steps/s)
    assert train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=2)),
                 dataset=data, progress=False).steps_per_s > 0


def test_generate_greedy_sampled_and_dead_ids(tok):
    model = build_model(ModelConfig(n_layer=1, n_positions=T), seed=0).eval()
    prompt = tok.encode("Once upon a time")
    ids = generate_ids(model, prompt, max_new_tokens=5)
    x = torch.tensor([prompt])
    with torch.no_grad():  # greedy = argmax chain
        for _ in range(5):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ids == x[0, len(prompt):].tolist()[:len(ids)] and (len(ids) == 5 or ids[-1] == 0)  # eos stops
    state = torch.random.get_rng_state()
    s1 = generate(model, tok, "Once", 8, greedy=False, seed=3)
    assert s1 == generate(model, tok, "Once", 8, greedy=False, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # seeded sampling leaves the caller's RNG alone

    dead = N_LIVE + 56
    with torch.no_grad():  # every hidden state -> e_0, and only the dead row has a component there
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[dead, 0] = 1.0
    assert generate_ids(model, prompt, 3) == [dead] * 3  # not masked: a dead id can be emitted
    assert generate(model, tok, "Once", 3) == tok.token_text(dead) * 3


def test_cli_train_resume_and_generate(tok, tmp_path, capsys):
    data = pytest.importorskip("duckling.data.build")
    text = tmp_path / "stories.txt"
    text.write_text("\n<|endoftext|>\n".join(f"Once upon a time a dog named Max had {i} toys." for i in range(60)))
    data.build_dataset(str(text), tok, tmp_path / "ds", seq_len=T, progress=False)
    run = tmp_path / "run"
    base = ["train", "--dataset", str(tmp_path / "ds"), "--run", str(run), "--n-layer", "1",
            "--mapping", str(tok_path(tok, tmp_path))]
    assert cli.main(base + ["--max-steps", "3", "--no-record"]) == 0
    assert "to step 3" in capsys.readouterr().out
    assert cli.main(base + ["--max-steps", "3"]) == 2  # the folder holds a run
    assert cli.main(base + ["--resume", "--lr", "0.01"]) == 2  # a resume may not change the config
    assert "different config" in capsys.readouterr().err
    assert cli.main(base + ["--resume"]) == 0  # stored config, nothing left to do
    assert "to step 3" in capsys.readouterr().out
    assert cli.main(["generate", "--run", str(run), "Once upon", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")
    # an empty prompt starts a new story from end-of-text, with no transformers warning about padding
    # (a true process: transformers' log handler writes to the stderr it found at import)
    p = subprocess.run([sys.executable, "-m", "duckling.cli", "generate", "--run", str(run), "", "--max-new-tokens",
                        "4"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == 0 and p.stderr == "", p.stderr


def tok_path(tok, tmp_path):
    return tok.save(tmp_path / "token_mapping.json")
