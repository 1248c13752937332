"""The Ray side of a sweep: the body of one run's task, and what it reports to the driver.

A task trains one run with ``duckling.training.train.train``: in place in the sweep folder
(``--out``), or in this node's scratch, mirrored to the storage (``--storage``, sweeps/upload.py).
A fused group's task (``job["members"]``, in place only) trains its K runs as one model with
``duckling.training.fused.train_group`` and returns one result per member.
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


def run_phase(run_dir) -> int | None:
    """Where a run not yet complete stands, for fusing: None (it starts from step 0) or the step of its
    last complete checkpoint (only runs in one phase fuse: a group starts and resumes as one)."""
    done = checkpoints(run_dir)
    return int(done[-1].name.split("-")[-1]) if done else None


def run_task(job: dict, dataset, eval_dataset, progress, callbacks=()):
    """Body of one Ray task (see the module docstring): a dict for a run, a list of them (one per
    member, in order) for a fused group. A bad input, an interrupt or a crash applies to every member."""
    import torch

    t0 = time.time()
    members = job.get("members") or [job]
    names = [m["name"] for m in members]
    torch.set_num_threads(job["threads"])  # no oversubscription: threads = the task's CPUs
    where = node_info()
    outs = [{"name": n, "status": "failed", "global_step": 0, "error": None, **where} for n in names]
    watch = announce(progress, names, where) if progress is not None else None

    def cbs(run_names, run_dirs=None):
        return [*callbacks, _node_recorder(where, run_dirs)] + \
            ([_Reporter(progress, run_names)] if progress is not None else [])

    try:
        if "members" in job:
            res = _group_in_place(job, dataset, eval_dataset, cbs, outs)
            return [{**r, "seconds": time.time() - t0} for r in res]
        res = (_in_storage if job.get("storage") else _in_place)(job, dataset, eval_dataset, cbs(names), outs[0])
        return {**res, "seconds": time.time() - t0}
    except KeyboardInterrupt:  # ray.cancel (Ctrl-C on the driver) or its death: train() saved a checkpoint
        res = [{**o, "status": "interrupted"} for o in outs]
    except DucklingError as e:  # bad input: retrying cannot help
        res = [{**o, "error": str(e)} for o in outs]
    except Exception:  # noqa: BLE001 - Ray retries it (RunCrashed); its traceback ends in the manifest
        raise RunCrashed(traceback.format_exc(limit=8)[-4000:]) from None
    finally:
        if watch is not None:
            watch.set()
    return res if "members" in job else res[0]


def _group_in_place(job, dataset, eval_dataset, cbs, outs) -> list[dict]:
    """A fused group in the sweep folder: members already complete are skipped, the others train as one
    fused model from the phase they share (fresh, or their common last checkpoint). Members whose folders
    no longer stand at one step (one was finished or resumed alone meanwhile) train one after another."""
    from duckling.training.fused import train_group
    from duckling.training.train import train

    members = job["members"]
    dirs = [Path(m["path"]) for m in members]
    for d in dirs:
        wait_unlocked(d)
    res: list = [None] * len(members)
    left = []
    for i, (m, d) in enumerate(zip(members, dirs)):
        state = run_state(d)
        outs[i]["started_as"] = state
        if state == "complete":
            step = int(json.loads((d / "run_info.json").read_text()).get("global_step", 0))
            res[i] = {**outs[i], "status": "complete", "global_step": step, "skipped": True}
            continue
        if state == "restart":
            clear_for_restart(d, m["config"])
        left.append(i)
    phases = {run_phase(dirs[i]) for i in left}
    cfgs = [DucklingConfig.from_dict(members[i]["config"]) for i in left]
    if len(phases) == 1:
        phase = phases.pop()
        rs = train_group(cfgs, [dirs[i] for i in left], dataset, eval_dataset=eval_dataset, resume=phase is not None,
                         tokenizer=job["mapping"], progress=False,
                         callbacks=cbs([members[i]["name"] for i in left], [dirs[i] for i in left]))
        for i, r in zip(left, rs):
            res[i] = _result(r, outs[i])
    else:
        for i, c in zip(left, cfgs):
            r = train(c, dataset=dataset, run_dir=dirs[i], eval_dataset=eval_dataset,
                      resume=run_phase(dirs[i]) is not None, tokenizer=job["mapping"],
                      callbacks=cbs([members[i]["name"]]), progress=False)
            res[i] = _result(r, outs[i])
    return res


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


def _node_recorder(where: dict, run_dirs=None):
    """A TrainerCallback that writes the node into run_info.json at the start of each (re)start:
    ``node`` (the last) and ``nodes`` (every start, in order). ``run_dirs``: a fused group's member
    folders (its Trainer's output_dir is a scratch folder); default the Trainer's output_dir."""
    from transformers import TrainerCallback

    class NodeRecorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            from duckling.training.run_folder import update_run_info

            for run_dir in run_dirs or [Path(args.output_dir)]:
                info = Path(run_dir) / "run_info.json"
                if info.is_file():
                    old = json.loads(info.read_text()).get("nodes", [])
                    stamp = {**where, "step": int(state.global_step), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    update_run_info(Path(run_dir), node=where, nodes=[*old, stamp])

    return NodeRecorder()


def announce(progress, names, where):
    """Tell the progress actor that these runs start here, and watch the driver (cluster.watch_driver).
    Waited on as futures: a task blocked in ``ray.get`` lends its CPU to Ray, which starts another run
    in it (3 runs on 2 cores while the actor was starting)."""
    for n in names:
        progress.start.remote(n, {k: where[k] for k in ("host", "node_id") if k in where}).future().result()
    return watch_driver(progress)


def _Reporter(actor, names):  # noqa: N802 - a class built lazily (transformers is imported in the worker)
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        """Sends the step to the progress actor for each run named (a fused group's members share their
        step) (fire and forget, at most every REPORT_EVERY_S)."""

        def __init__(self):
            self.last = 0.0

        def _send(self, step, force=False):
            now = time.monotonic()
            if force or now - self.last >= REPORT_EVERY_S:
                self.last = now
                for name in names:
                    actor.update.remote(name, int(step))

        def on_train_begin(self, args, state, control, **kw):
            self._send(state.global_step, force=True)

        def on_step_end(self, args, state, control, **kw):
            self._send(state.global_step, force=state.global_step >= state.max_steps)

    return Reporter()
