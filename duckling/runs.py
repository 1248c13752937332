"""Run folders: one run per folder, self-describing, never overwritten, resumable.

RUN/config.json (full DucklingConfig), run_info.json (mapping hash, versions, device, precision,
start/resume/finish), token_mapping.json (copy), checkpoint-N/ (Trainer resume points),
final/ (save_pretrained + trainer_state.json), recording/ (docs/recording.md).
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .config import DucklingConfig
from .errors import DucklingError

# "How" fields of TrainConfig: changing them on resume does not change what is computed
RESUME_FREE = {"device", "compile", "dataloader_num_workers", "logging_steps", "save_steps", "save_total_limit"}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a file


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b and not (prefix == "train." and k in RESUME_FREE):
            out.append(f"{prefix}{k}: run has {a!r}, now {b!r}")
    return out


def last_checkpoint(run_dir) -> Path | None:
    """The newest *complete* Trainer checkpoint (trainer_state.json is the last file written)."""
    ckpts = sorted(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                   if p.name.split("-")[-1].isdigit() else -1)
    done = [p for p in ckpts if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__}
    for name in ("datasets", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def prepare_run_dir(run_dir: Path, cfg: DucklingConfig, tok, resume: bool, info: dict) -> Path | None:
    """Check the folder against this run, write config/run_info/mapping; return the resume checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mapping_hash = getattr(tok, "hash", None)
    held = [p.name for p in run_dir.iterdir()]
    ckpt = None
    if held and not resume:
        raise DucklingError(
            f"Run folder {str(run_dir)!r} is not empty ({', '.join(sorted(held)[:4])}...). A run folder holds "
            "one run and is never overwritten: choose a new folder, or pass --resume / resume=True to continue it.")
    if held:
        if not (run_dir / "config.json").is_file():
            raise DucklingError(f"{str(run_dir)!r} is not a Duckling run folder (no config.json); refusing "
                                "to write into it. Choose another folder.")
        old = json.loads((run_dir / "config.json").read_text())
        diff = _config_diff(old, cfg.to_dict())
        if diff:
            raise DucklingError(
                f"Cannot resume {str(run_dir)!r} with a different config ({'; '.join(diff)}). A resumed run "
                "must compute exactly what the original would have: drop the overrides, or start a new folder.")
        old_info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
        if old_info.get("mapping_hash") != mapping_hash:
            raise DucklingError(
                f"{str(run_dir)!r} was trained with token mapping {str(old_info.get('mapping_hash'))[:12]}, "
                f"not {str(mapping_hash)[:12]}. Resume with the run's own mapping ({run_dir}/token_mapping.json).")
        ckpt = last_checkpoint(run_dir)
        if ckpt is None:
            raise DucklingError(
                f"Nothing to resume in {str(run_dir)!r}: it holds no complete checkpoint (one is saved every "
                f"train.save_steps={cfg.train.save_steps} steps). Its recording is kept as it is; start the "
                "run again in a new folder.")
        info = {**old_info, "resumed": old_info.get("resumed", []) + [
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": ckpt.name if ckpt else None, **info}]}
    else:
        info = {"mapping_hash": mapping_hash, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **info,
                "versions": _versions()}
        _write_json(run_dir / "config.json", cfg.to_dict())
        if tok is not None:
            tok.save(run_dir / "token_mapping.json")
    _write_json(run_dir / "run_info.json", info)
    return ckpt


def update_run_info(run_dir: Path, **kw) -> None:
    path = run_dir / "run_info.json"
    _write_json(path, {**json.loads(path.read_text()), **kw})


@contextlib.contextmanager
def quiet_hf():
    """Silence transformers' per-file progress bars (weights loading, shard writing) for a moment."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_run(run_dir, checkpoint: str | None = None):
    """(model, tokenizer, cfg) of a run: its final model, else its last checkpoint (or ``checkpoint``).

    The model is on CPU in eval mode; the tokenizer is the run's own copy of the mapping (None if
    the run was trained without one).
    """
    from transformers import GPT2LMHeadModel

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise DucklingError(f"{str(run_dir)!r} is not a Duckling run folder (no config.json). Train one with "
                            "`duckling train --run DIR`.")
    cfg = DucklingConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    src = run_dir / checkpoint if checkpoint else run_dir / "final"
    if not checkpoint and not (src / "model.safetensors").is_file():
        src = last_checkpoint(run_dir)
    if src is None or not src.is_dir():
        raise DucklingError(f"{str(run_dir)!r} holds no trained model yet (no final/ and no checkpoint). "
                            "Train it further or pick another run.")
    with quiet_hf():
        model = GPT2LMHeadModel.from_pretrained(str(src)).eval()
    tok = None
    if (run_dir / "token_mapping.json").is_file():
        from .vocab import CompactTokenizer

        tok = CompactTokenizer.from_file(run_dir / "token_mapping.json")
    return model, tok, cfg
