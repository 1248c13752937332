"""Sweeps on Ray: every grid point x seed of a spec is one Ray task that runs an ordinary
``duckling.training.train.train`` into ``OUT/<name>/`` (readable by ``report``, ``Recording``, ``generate``).

    from duckling.sweeps.engine import sweep
    runs = sweep("sweeps/wd.toml", "sweeps/wd")          # local Ray on this machine
    runs = sweep("sweeps/wd.toml", "sweeps/wd", address="auto")   # an existing Ray cluster

Runs write straight to the sweep folder (a shared filesystem on a cluster); a task returns only a
small dict, so no artifact goes through Ray's object store. The sweep folder holds ``spec.toml`` (a
copy of the spec file), ``sweep.json`` (the spec's identity and one entry per run: name, overrides,
status, path) and the run folders; everything in sweep.json can be rebuilt from the run folders.

Running the same sweep again skips complete runs, resumes interrupted ones from their last
checkpoint and retries failed ones. Whether a run resumes is decided inside its task from its folder,
so a task that Ray or the user restarts always picks up where the folder stands.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
import traceback
from pathlib import Path

from duckling.config import DucklingConfig
from duckling.errors import DucklingError
from duckling.files import LOCK, check_unlocked, checkpoints, write_json
from duckling.sweeps.progress import Board, Steps
from duckling.sweeps.spec import DEFAULT_GPUS, Spec, check_disk, load_spec

MANIFEST = "sweep.json"
SPEC_COPY = "spec.toml"
FORMAT = 1
REPORT_EVERY_S = 0.5  # a task reports its step to the progress actor at most this often


# ---------------------------------------------------------------- run folders
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


def _clear_for_restart(run_dir: Path, cfg_dict: dict) -> None:
    """Empty a run folder that holds no checkpoint, so the run starts again from step 0.

    Nothing is lost: without a checkpoint the run cannot continue, and a run is deterministic
    (seeded init, dropout and data order), so the restart recomputes the same steps. Only a folder
    that this very run created (same config.json) is emptied."""
    check_unlocked(run_dir)  # a live writer (another sweep on this folder) is never disturbed
    cfg_file = run_dir / "config.json"
    held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if held and held != ["config.json"] and not cfg_file.is_file():
        raise DucklingError(f"{run_dir} holds files ({', '.join(held[:4])}) but is not a Duckling run folder; "
                            "the sweep will not overwrite it. Move it away and run the sweep again.")
    if cfg_file.is_file() and json.loads(cfg_file.read_text()) != cfg_dict:
        raise DucklingError(f"{run_dir} holds a run with another config; the sweep will not overwrite it. "
                            "Move it away, or run this spec into a new sweep folder.")
    shutil.rmtree(run_dir)


# ---------------------------------------------------------------- Ray side
def _run_task(job: dict, dataset, eval_dataset, progress, callbacks=()) -> dict:
    """Body of one Ray task: train one run into its folder; return a small dict, never raise."""
    import torch

    from duckling.training.train import train  # torch and the Trainer: in the worker, never for `duckling compare`

    t0 = time.time()
    name, run_dir = job["name"], Path(job["path"])
    torch.set_num_threads(job["threads"])  # no oversubscription: threads = the task's CPUs
    out = {"name": name, "status": "failed", "global_step": 0, "error": None, "retry": True}
    try:
        state = run_state(run_dir)
        out["started_as"] = state
        if state == "complete":
            return {**out, "status": "complete", "global_step": _finished_step(run_dir), "skipped": True}
        if state == "restart":
            _clear_for_restart(run_dir, job["config"])
        cfg = DucklingConfig.from_dict(job["config"])
        cbs = [*callbacks] + ([_Reporter(progress, name)] if progress is not None else [])
        r = train(cfg, dataset=dataset, run_dir=run_dir, eval_dataset=eval_dataset,
                  resume=state == "resumable", tokenizer=job["mapping"], callbacks=cbs, progress=False)
        steps, losses = r.losses()
        ev = r.eval_losses()[1]
        return {**out, "status": "complete", "global_step": r.global_step, "steps_per_s": r.steps_per_s,
                "loss": float(losses[-1]) if len(losses) else None,
                "eval_loss": float(ev[-1]) if len(ev) else None, "seconds": time.time() - t0}
    except KeyboardInterrupt:  # ray.cancel (Ctrl-C on the driver): train() keeps every complete step
        return {**out, "status": "interrupted", "retry": False}
    except DucklingError as e:  # bad input: retrying cannot help
        return {**out, "error": str(e), "retry": False}
    except Exception:  # noqa: BLE001 - reported in the manifest, the other runs go on
        return {**out, "error": traceback.format_exc(limit=8)[-4000:]}


def _finished_step(run_dir: Path) -> int:
    return int(json.loads((run_dir / "run_info.json").read_text()).get("global_step", 0))


def _reporter_class():
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        """Sends the run's step to the progress actor (fire and forget, at most every REPORT_EVERY_S)."""

        def __init__(self, actor, name):
            self.actor, self.name, self.last = actor, name, 0.0

        def _send(self, step, force=False):
            now = time.monotonic()
            if force or now - self.last >= REPORT_EVERY_S:
                self.last = now
                self.actor.update.remote(self.name, int(step))

        def on_train_begin(self, args, state, control, **kw):
            self._send(state.global_step, force=True)

        def on_step_end(self, args, state, control, **kw):
            self._send(state.global_step, force=state.global_step >= state.max_steps)

    return Reporter


def _Reporter(actor, name):  # noqa: N802 - a class built lazily (transformers is imported in the worker)
    return _reporter_class()(actor, name)


def _ray():
    """The ray module; without it (Ray is the optional [sweep] extra) a one-line error naming the install."""
    try:
        import ray
    except ImportError:
        raise DucklingError("Sweeps run on Ray, which is not installed: pip install 'duckling[sweep]' "
                            "(in a checkout: pip install -e '.[sweep]').") from None
    return ray


def start_ray(address: str | None = None) -> bool:
    """Connect to Ray: ``address`` / $RAY_ADDRESS (e.g. "auto" for a running cluster), else a fresh
    local instance with every CPU of this machine, no dashboard and no worker log forwarding.
    Returns True when this call started (or connected) Ray, False when it was already up."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kw = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
              logging_level=logging.ERROR)
    if address == "local":  # a fresh instance: all CPUs, runs at normal priority (Ray's default nices workers to 15)
        kw.update(num_cpus=os.cpu_count(), _system_config={"worker_niceness": 0})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence Ray's future-default warning
    try:
        ray.init(address=address, **kw)
    except ConnectionError as e:
        raise DucklingError(f"Cannot connect to a Ray cluster at {address!r} ({e}). Start one with "
                            "`ray start --head`, or leave out --address / RAY_ADDRESS for a local Ray.") from None
    return True


# ---------------------------------------------------------------- the sweep folder
def _manifest_path(out: Path) -> Path:
    return out / MANIFEST


def read_manifest(out) -> dict:
    """The sweep folder's ``sweep.json``: {"identity", "runs": [{name, overrides, seed, status, path, ...}]}."""
    path = _manifest_path(Path(out))
    if not path.is_file():
        raise DucklingError(f"{out} is not a sweep folder (no {MANIFEST}). Run `duckling sweep SPEC --out {out}`.")
    return json.loads(path.read_text())


def _write_manifest(out: Path, manifest: dict) -> None:
    write_json(_manifest_path(out), manifest, indent=1)


def _open_folder(spec: Spec, out: Path, dry_run: bool) -> dict:
    """The manifest of ``out``: created for a new sweep, checked against the spec for an old one."""
    ident = json.loads(json.dumps(spec.identity(), default=str))
    if _manifest_path(out).is_file():
        old = read_manifest(out)
        if old.get("identity") != ident:
            diff = [k for k in ident if old.get("identity", {}).get(k) != ident[k]]
            raise DucklingError(
                f"{out} holds a sweep started from another spec (it differs in: {', '.join(diff) or 'format'}). "
                "A sweep folder belongs to one spec: run this spec with a new --out, or run the original spec "
                f"again to finish that sweep (its copy is {out / SPEC_COPY}).")
        by_name = {r["name"]: r for r in old["runs"]}
    elif out.exists() and any(out.iterdir()):
        raise DucklingError(f"{out} is not empty and holds no {MANIFEST}: it is not a sweep folder. Choose a new "
                            "--out folder for the sweep.")
    else:
        by_name = {}
    runs = []
    for r in spec.runs:
        old = by_name.get(r.name, {})
        runs.append({"name": r.name, "overrides": r.overrides, "point": r.point, "seed": r.seed,
                     "path": r.name, "status": old.get("status", "pending"),
                     "attempts": old.get("attempts", 0), "error": old.get("error"),
                     **{k: old[k] for k in ("global_step", "steps_per_s", "loss", "eval_loss") if k in old}})
    manifest = {"format": FORMAT, "identity": ident, "swept": list(spec.grid), "runs": runs}
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        if spec.source_text is not None and not (out / SPEC_COPY).is_file():
            (out / SPEC_COPY).write_text(spec.source_text, encoding="utf-8")
        _write_manifest(out, manifest)
    return manifest


def _table(out: Path, manifest: dict):
    import pandas as pd

    rows = []
    for r in manifest["runs"]:
        rows.append({"name": r["name"], **r["point"], "seed": r["seed"], "status": r["status"],
                     "on_disk": r.get("state_on_disk"),
                     "path": str(out / r["path"]), "overrides": r["overrides"], "attempts": r["attempts"],
                     **{k: r.get(k) for k in ("global_step", "steps_per_s", "loss", "eval_loss", "error")}})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the sweep
def sweep(spec_or_path, out, *, address: str | None = None, progress: bool = True, max_retries: int = 1,
          dry_run: bool = False, callbacks=()):
    """Run every grid point x seed of a spec as a Ray task into ``out/<name>/``; returns a DataFrame
    with one row per run (name, the swept values, seed, status, path, overrides, attempts,
    global_step, steps_per_s, loss, eval_loss, error).

    spec_or_path: a TOML spec file or a dict of the same shape (sweep_spec.py documents it; a dict
      may give ``dataset`` / ``eval_dataset`` as (N, T) arrays). Everything is validated, and the
      disk needed by the whole sweep checked, before any run starts.
    address: a Ray cluster ("auto", "ray://host:10001", host:port); default $RAY_ADDRESS, else a local Ray.
    max_retries: a run that crashes is started again (resuming its checkpoint) up to this many
      times in this call; a bad-input error (DucklingError) is not retried. Running the sweep again
      retries every failed run.
    dry_run: validate and return the plan (with each run's state on disk) without starting Ray.
    callbacks: TrainerCallbacks added to every run (pickled to the workers).
    Ctrl-C cancels the runs (each keeps its recording and checkpoints) and raises KeyboardInterrupt;
    running the same command again resumes them.
    """
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    if not dry_run:
        _ray()  # Ray is an extra: say so before the sweep folder is made
    out = Path(out).resolve()
    manifest = _open_folder(spec, out, dry_run)
    entries = {e["name"]: e for e in manifest["runs"]}
    states = {r.name: run_state(out / r.name) for r in spec.runs}
    for r in spec.runs:
        entries[r.name]["state_on_disk"] = states[r.name]
        if states[r.name] == "complete":
            entries[r.name].update(status="complete", global_step=_finished_step(out / r.name))
    todo = [r for r in spec.runs if states[r.name] != "complete"]
    check_disk(spec, out, todo)
    if dry_run or not todo:
        if not dry_run:
            _write_manifest(out, manifest)
        if progress and not dry_run:
            print(f"sweep {out}: all {len(spec.runs)} runs are complete; nothing to train.")
        return _table(out, manifest)
    _execute(spec, out, manifest, todo, address, progress, max_retries, list(callbacks),
             _resume_command(spec_or_path, out))
    return _table(out, manifest)


def _resume_command(spec_or_path, out: Path) -> str:
    """The command that resumes this sweep: its spec file as it was given (relative paths in a spec are
    read from the spec file's folder, so its copy in the sweep folder would not do)."""
    if not isinstance(spec_or_path, (str, Path)):  # a dict or Spec: no file to name
        return "the same sweep() call"
    return f"duckling sweep {shlex.quote(str(spec_or_path))} --out {shlex.quote(str(out))}"


def _gpus(spec: Spec) -> float:
    ray = _ray()

    if spec.gpus is not None:
        return spec.gpus
    return DEFAULT_GPUS if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _execute(spec, out, manifest, todo, address, progress, max_retries, callbacks, resume="the same command"):
    ray = _ray()

    started = start_ray(address)
    try:
        gpus = _gpus(spec)
        task = ray.remote(_run_task).options(num_cpus=spec.cpus, num_gpus=gpus, max_retries=0)
        actor = ray.remote(Steps).options(num_cpus=0).remote()  # a light process: no torch
        data = [ray.put(d) if d is not None and not isinstance(d, str) else d
                for d in (spec.dataset, spec.eval_dataset)]
        entries = {e["name"]: e for e in manifest["runs"]}
        board = Board(spec, out, manifest, todo, progress)

        def submit(run):
            e = entries[run.name]
            e.update(status="queued", attempts=e.get("attempts", 0) + 1, error=None)
            job = {"name": run.name, "path": str(out / run.name), "config": run.cfg.to_dict(),
                   "mapping": spec.mapping, "threads": spec.threads}
            return task.remote(job, *data, actor, callbacks)

        refs = {submit(r): r for r in todo}
        tries = {r.name: 0 for r in todo}
        _write_manifest(out, manifest)
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=REPORT_EVERY_S)
                board.steps(ray.get(actor.get.remote()))
                for ref in ready:
                    run = refs.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died (killed, out of memory)
                        res = {"name": run.name, "status": "failed", "retry": True,
                               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                    entry = entries[run.name]
                    entry.update({k: v for k, v in res.items() if k not in ("name", "retry", "skipped")})
                    if res["status"] == "failed" and res.get("retry") and tries[run.name] < max_retries:
                        tries[run.name] += 1
                        board.event(run.name, "retrying", res.get("error"))
                        refs[submit(run)] = run
                    else:
                        board.event(run.name, res["status"], res.get("error"), res)
                    _write_manifest(out, manifest)
        except KeyboardInterrupt:
            _cancel(refs, entries, board, out)
            _write_manifest(out, manifest)
            board.close()
            print(f"Sweep interrupted. Every run keeps its recording and checkpoints; resume with {resume}.",
                  flush=True)
            raise
        board.close()
    finally:
        if started:
            ray.shutdown()


def _cancel(refs: dict, entries: dict, board, out: Path) -> None:
    """Ctrl-C: interrupt every task (their train() saves what it can) and wait for them briefly. A run
    that never started (nothing in its folder) is ``pending`` again; one that did is ``interrupted``."""
    ray = _ray()

    for ref in refs:
        ray.cancel(ref)
    try:
        ray.wait(list(refs), num_returns=len(refs), timeout=60)
    except KeyboardInterrupt:
        pass
    for ref, run in refs.items():
        status = "pending" if run_state(out / run.name) == "fresh" else "interrupted"
        entries[run.name]["status"] = status
        if status == "pending":  # queued, never started: not an attempt
            entries[run.name]["attempts"] = max(0, entries[run.name].get("attempts", 1) - 1)
        board.event(run.name, status, None)
