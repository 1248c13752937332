"""The Ray side of a sweep: the body of one run's task, and what it reports to the driver.

A task trains one run with ``duckling.training.train.train``: in place in the sweep folder
(``--out``), or in this node's scratch, mirrored to the storage (``--storage``, sweeps/upload.py).
Whether a run starts, resumes or is already done is decided here from the folder (or the storage),
so a task that Ray retries, on this node or another, picks up where the run stands. A task returns
a small dict; a bad input (DucklingError) is returned as a failure and never retried, anything else
raises ``RunCrashed`` so that Ray's own ``retry_exceptions`` starts it again.
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

from duckling.config import DucklingConfig
from duckling.errors import DucklingError
from duckling.files import LOCK, check_unlocked, checkpoints, holder
from duckling.sweeps.cluster import node_info, watch_driver

REPORT_EVERY_S = 0.5  # a task reports its step to the progress actor at most this often
ORPHAN_WAIT_S = 120.0  # how long a task waits for a run of a dead driver to stop and release its folder


class RunCrashed(Exception):
    """A run failed for a reason other than its input (its traceback is the message): Ray retries it
    (``retry_exceptions``), resuming from the run's last checkpoint."""


def run_state(run_dir) -> str:
    """``complete`` (final/ saved and run_info finished), ``resumable`` (a complete checkpoint),
    ``fresh`` (no folder or an empty one) or ``restart`` (files but no checkpoint yet)."""
    run_dir = Path(run_dir)
    if (run_dir / "final" / "trainer_state.json").is_file():
        info = run_dir / "run_info.json"
        if info.is_file() and json.loads(info.read_text()).get("finished"):
            return "complete"
    if checkpoints(run_dir):
        return "resumable"
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return "fresh"
    return "restart"


def _check_own(held: list[str], cfg_text: str | None, cfg_dict: dict, where: str) -> None:
    if held and held != ["config.json"] and cfg_text is None:
        raise DucklingError(f"{where} holds files ({', '.join(held[:4])}) but is not a Duckling run folder; "
                            "the sweep will not overwrite it. Move it away and run the sweep again.")
    if cfg_text is not None and json.loads(cfg_text) != cfg_dict:
        raise DucklingError(f"{where} holds a run with another config; the sweep will not overwrite it. "
                            "Move it away, or run this spec into a new sweep folder.")


def clear_for_restart(run_dir: Path, cfg_dict: dict) -> None:
    """Empty a run folder that holds no checkpoint, so the run starts again from step 0.

    Nothing is lost: without a checkpoint the run cannot continue, and a run is deterministic
    (seeded init, dropout and data order), so the restart recomputes the same steps. Only a folder
    that this very run created (same config.json) is emptied."""
    check_unlocked(run_dir)  # a live writer (another sweep on this folder) is never disturbed
    cfg_file = run_dir / "config.json"
    _check_own(sorted(p.name for p in run_dir.iterdir() if p.name != LOCK),
               cfg_file.read_text() if cfg_file.is_file() else None, cfg_dict, str(run_dir))
    shutil.rmtree(run_dir)


def wait_unlocked(run_dir: Path, timeout: float = ORPHAN_WAIT_S) -> None:
    """A run of a driver that died stops at its next step (cluster.watch_driver) and releases its
    folder: wait for that, then refuse (FolderBusy names the holder) if it is still held."""
    deadline = time.monotonic() + timeout
    while run_dir.is_dir() and holder(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    if run_dir.is_dir():
        check_unlocked(run_dir)


def run_task(job: dict, dataset, eval_dataset, progress, callbacks=()) -> dict:
    """Body of one Ray task (see the module docstring)."""
    import torch

    t0 = time.time()
    name = job["name"]
    torch.set_num_threads(job["threads"])  # no oversubscription: threads = the task's CPUs
    where = node_info()
    out = {"name": name, "status": "failed", "global_step": 0, "error": None, **where}
    watch = None
    if progress is not None:
        import ray

        ray.get(progress.start.remote(name, {k: where[k] for k in ("host", "node_id") if k in where}))
        watch = watch_driver(progress)
    try:
        cbs = [*callbacks, _node_recorder(where)] + ([_Reporter(progress, name)] if progress is not None else [])
        res = (_in_storage if job.get("storage") else _in_place)(job, dataset, eval_dataset, cbs, out)
        return {**res, "seconds": time.time() - t0}
    except KeyboardInterrupt:  # ray.cancel (Ctrl-C on the driver) or its death: train() saved a checkpoint
        return {**out, "status": "interrupted"}
    except DucklingError as e:  # bad input: retrying cannot help
        return {**out, "error": str(e)}
    except Exception:  # noqa: BLE001 - Ray retries it (RunCrashed); its traceback ends in the manifest
        raise RunCrashed(traceback.format_exc(limit=8)[-4000:]) from None
    finally:
        if watch is not None:
            watch.set()


def _result(r, out: dict) -> dict:
    steps, losses = r.losses()
    ev = r.eval_losses()[1]
    return {**out, "status": "complete", "global_step": r.global_step, "steps_per_s": r.steps_per_s,
            "loss": float(losses[-1]) if len(losses) else None, "eval_loss": float(ev[-1]) if len(ev) else None}


def _in_place(job, dataset, eval_dataset, cbs, out) -> dict:
    from duckling.training.train import train  # torch and the Trainer: in the worker, never for `duckling compare`

    run_dir = Path(job["path"])
    wait_unlocked(run_dir)
    state = run_state(run_dir)
    out["started_as"] = state
    if state == "complete":
        step = int(json.loads((run_dir / "run_info.json").read_text()).get("global_step", 0))
        return {**out, "status": "complete", "global_step": step, "skipped": True}
    if state == "restart":
        clear_for_restart(run_dir, job["config"])
    r = train(DucklingConfig.from_dict(job["config"]), dataset=dataset, run_dir=run_dir, eval_dataset=eval_dataset,
              resume=state == "resumable", tokenizer=job["mapping"], callbacks=cbs, progress=False)
    return _result(r, out)


def _in_storage(job, dataset, eval_dataset, cbs, out) -> dict:
    """Train in this node's scratch from what the storage holds; upload as the run goes; verify."""
    from duckling.storage import Storage
    from duckling.sweeps import upload
    from duckling.training.train import train

    storage, name = Storage(job["storage"]), job["name"]
    state = upload.stored_state(storage, name)
    out["started_as"] = state
    if state == "complete":
        rec = upload.upload_record(storage, name)
        return {**out, **{k: rec.get(k) for k in ("global_step", "loss", "eval_loss", "steps_per_s")},
                "status": "complete", "skipped": True}
    run_dir = upload.scratch_root() / job["sweep_id"] / name
    wait_unlocked(run_dir)
    if state == "resumable":
        upload.fetch_for_resume(storage, name, run_dir)
    else:  # nothing to resume: the storage's copy (if any) must be this run's, then both start empty
        files = sorted(storage.files(name))
        cfg_text = storage.read_bytes(f"{name}/config.json").decode() if "config.json" in files else None
        _check_own(files, cfg_text, job["config"], storage.url(name))
        storage.remove_tree(name)
        if run_dir.exists():
            shutil.rmtree(run_dir)
    mirror = upload.Mirror(run_dir, storage, name)
    try:
        r = train(DucklingConfig.from_dict(job["config"]), dataset=dataset, run_dir=run_dir,
                  eval_dataset=eval_dataset, resume=state == "resumable", tokenizer=job["mapping"],
                  callbacks=[*cbs, upload.uploader(mirror)], progress=False)
    except KeyboardInterrupt:
        mirror.checkpoint()  # the checkpoint train() saved on its way out
        raise
    res = _result(r, out)
    try:
        mirror.finish({k: res.get(k) for k in ("global_step", "loss", "eval_loss", "steps_per_s", "host", "node_id")})
    except upload.UploadError as e:
        raise RunCrashed(str(e)) from None  # Ray retries: the run is complete in scratch, the upload is redone
    shutil.rmtree(run_dir, ignore_errors=True)  # the storage holds it, verified
    return res


def _node_recorder(where: dict):
    """A TrainerCallback that writes the node into run_info.json at the start of each (re)start:
    ``node`` (the last) and ``nodes`` (every start, in order)."""
    from transformers import TrainerCallback

    class NodeRecorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            from duckling.training.run_folder import update_run_info

            run_dir = Path(args.output_dir)
            info = run_dir / "run_info.json"
            if info.is_file():
                old = json.loads(info.read_text()).get("nodes", [])
                stamp = {**where, "step": int(state.global_step), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                update_run_info(run_dir, node=where, nodes=[*old, stamp])

    return NodeRecorder()


def _Reporter(actor, name):  # noqa: N802 - a class built lazily (transformers is imported in the worker)
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        """Sends the run's step to the progress actor (fire and forget, at most every REPORT_EVERY_S)."""

        def __init__(self):
            self.last = 0.0

        def _send(self, step, force=False):
            now = time.monotonic()
            if force or now - self.last >= REPORT_EVERY_S:
                self.last = now
                actor.update.remote(name, int(step))

        def on_train_begin(self, args, state, control, **kw):
            self._send(state.global_step, force=True)

        def on_step_end(self, args, state, control, **kw):
            self._send(state.global_step, force=state.global_step >= state.max_steps)

    return Reporter()
