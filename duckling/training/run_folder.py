"""Run folders: one run per folder, self-describing, never overwritten, resumable.

RUN/config.json (full DucklingConfig), run_info.json (mapping hash, versions, device, precision,
start/resume/finish), token_mapping.json (copy), checkpoint-N/ (Trainer resume points),
final/ (save_pretrained + trainer_state.json), recording/ (docs/recording.md).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from duckling.config import DucklingConfig
from duckling.data.vocab import CompactTokenizer
from duckling.errors import DucklingError
from duckling.files import LOCK, _finite, check_unlocked, checkpoints, folder_lock, write_json
from duckling.hf import quiet_hf
from duckling.training.resume import check_checkpoint, check_recording_reaches, checkpoint_step

# Fields that may change on resume: none changes what is computed. device, compile and threads are
# requests: what they resolve to here (device, compile mode, CPU thread count, with the arithmetic) must
# equal what the run resolved (training.resume.check_same_run). The rest: worker processes only fetch
# rows (the order is the sampler's, seeded), logging / checkpoint cadence and the budget never touch the
# arithmetic, the ring's slots and the writer's encoding processes only change how the same bytes are
# written, and allow_eval_overlap only permits a check to pass. Every other field is compared.
RESUME_FREE = {f"train.{k}" for k in ("device", "compile", "threads", "dataloader_num_workers", "logging_steps",
                                     "save_steps", "save_total_limit", "allow_eval_overlap")} | \
    {"record.budget_gb", "record.queue_size", "record.writer_procs"}


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b and f"{prefix}{k}" not in RESUME_FREE:
            out.append(f"{prefix}{k}: run has {a!r}, now {b!r}")
    return out


def last_checkpoint(run_dir) -> Path | None:
    """The newest *complete* Trainer checkpoint (duckling.files.checkpoints), None if there is none."""
    done = checkpoints(run_dir)
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


def check_run_dir(run_dir: Path, cfg: DucklingConfig, tok, resume: bool,
                  locked: bool = False) -> tuple[Path | None, dict]:
    """Everything about the folder that can be checked before anything is written (no side effects).

    Returns (the checkpoint to resume from or None, the run_info already there)."""
    mapping_hash = getattr(tok, "hash", None)
    where = str(run_dir.resolve())
    if not locked:  # (this process's own lock never refuses it: folder_lock is re-entrant)
        check_unlocked(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DucklingError(f"The run folder {where} is a file. Choose a folder path for --run.")
    held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
    if not resume:
        if held:
            raise DucklingError(
                f"Run folder {where} is not empty ({', '.join(held[:4])}{'...' if len(held) > 4 else ''}). A run "
                "folder holds one run and is never overwritten: choose a new folder, or pass --resume / "
                "resume=True to continue it.")
        return None, {}
    if not run_dir.is_dir():
        raise DucklingError(f"Cannot resume: the run folder {where} does not exist. Check the path, or start a "
                            "new run there without --resume.")
    if not (run_dir / "config.json").is_file():
        raise DucklingError(f"{where} is not a Duckling run folder (no config.json); refusing to write into it. "
                            "Choose another folder.")
    try:
        old = json.loads((run_dir / "config.json").read_text())
        old_info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DucklingError(f"{where}: config.json or run_info.json is not valid JSON ({e}). The folder was "
                            "edited or damaged; restore the files or start a new run.")
    diff = _config_diff(DucklingConfig.from_dict(old).to_dict(), cfg.to_dict())  # older names mapped
    if diff:
        raise DucklingError(
            f"Cannot resume {where} with a different config ({'; '.join(diff)}). A resumed run "
            "must compute exactly what the original would have: drop the overrides, or start a new folder.")
    if old_info.get("mapping_hash") != mapping_hash:
        raise DucklingError(
            f"{where} was trained with token mapping {str(old_info.get('mapping_hash'))[:12]}, "
            f"not {str(mapping_hash)[:12]}. Resume with the run's own mapping ({where}/token_mapping.json).")
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        raise DucklingError(
            f"Nothing to resume in {where}: it holds no complete checkpoint (one is saved every "
            f"train.save_steps={cfg.train.save_steps} steps, and when a run is stopped with Ctrl-C). Its "
            "recording is kept as it is; start the run again in a new folder.")
    check_checkpoint(ckpt)
    check_recording_reaches(run_dir, cfg, ckpt, checkpoint_step(ckpt))
    return ckpt, old_info


def write_run_files(run_dir: Path, cfg: DucklingConfig, tok, ckpt: Path | None, old_info: dict, info: dict) -> None:
    """config.json, token_mapping.json (new runs) and run_info.json: called with the folder's lock held."""
    if ckpt is not None:
        info = {**old_info, "status": "running", "resumed": old_info.get("resumed", []) + [
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": ckpt.name, **info}]}
    else:
        info = {"mapping_hash": getattr(tok, "hash", None), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "status": "running", **info, "versions": _versions(), "git_commit": _git_commit()}
        write_json(run_dir / "config.json", cfg.to_dict())
        if tok is not None:
            tok.save(run_dir / "token_mapping.json")
    write_json(run_dir / "run_info.json", info)


def _git_commit() -> str | None:
    """The duckling checkout's commit (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def run_lock(run_dir: Path, create: bool):
    """Hold RUN/.lock for the whole run (duckling.files.folder_lock): one writer per run folder; a second
    process is refused with a FolderBusy naming the holder's process id.

    ``create``: make the folder (a new run); it is removed again if the run leaves nothing in it.
    """
    made = create and not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir):
        try:
            yield
        finally:
            if made and all(p.name == LOCK for p in run_dir.iterdir()):  # refused before any file: no trace
                (run_dir / LOCK).unlink(missing_ok=True)
                run_dir.rmdir()


def update_run_info(run_dir: Path, **kw) -> None:
    """Update run_info.json (``update_status_file``)."""
    update_status_file(run_dir / "run_info.json", **kw)


def update_status_file(path: Path, **kw) -> None:
    """Update a small JSON file (run_info.json, recording/meta.json) atomically (files.write_json: no
    NaN, no .tmp left). On a full disk, where even its temporary copy cannot be written, it is rewritten
    in place instead when the new text fits in the blocks the file already has: a status must tell the
    truth (``failed``), and overwriting allocated blocks takes no new space."""
    info = {**json.loads(path.read_text()), **kw}
    try:
        write_json(path, info)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        text = json.dumps(_finite(info), indent=2, default=str, allow_nan=False).encode() + b"\n"
        if len(text) > path.stat().st_blocks * 512:  # would need a new block: it cannot be written
            raise
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
            os.fsync(fd)
        finally:
            os.close(fd)


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
    try:
        cfg = DucklingConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DucklingError(f"{str((run_dir / 'config.json').resolve())!r} is not valid JSON ({e}); the run's config "
                            "was edited or damaged. Restore it, or pick another run.") from e
    src = run_dir / checkpoint if checkpoint else run_dir / "final"
    if not checkpoint and not (src / "model.safetensors").is_file():
        src = last_checkpoint(run_dir)
    if src is None or not src.is_dir():
        raise DucklingError(f"{str(run_dir)!r} holds no trained model yet (no final/ and no checkpoint). "
                            "Train it further or pick another run.")
    try:
        with quiet_hf():
            model = GPT2LMHeadModel.from_pretrained(str(src)).eval()
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, OSError, a bad config.json...
        raise DucklingError(f"The model in {src.resolve()} cannot be loaded ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'}): its files are "
                            "truncated or damaged. Load another checkpoint of the run (load_run(run, checkpoint=NAME)), "
                            "or resume the run to write final/ again.") from e
    tok = None
    if (run_dir / "token_mapping.json").is_file():
        tok = CompactTokenizer.from_file(run_dir / "token_mapping.json")
    return model, tok, cfg
