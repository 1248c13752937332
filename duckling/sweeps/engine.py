"""Sweeps on Ray: every grid point x seed of a spec is one Ray task that runs an ordinary
``duckling.training.train.train`` (sweeps/task.py) into the sweep folder's ``<name>/`` (readable by
``report``, ``Recording``, ``generate``).

    from duckling.sweeps.engine import sweep
    runs = sweep("sweeps/wd.toml", "sweeps/wd")          # local Ray on this machine
    runs = sweep("sweeps/wd.toml", "sweeps/wd", address="auto")   # a Ray cluster whose nodes share the disk
    runs = sweep("sweeps/wd.toml", storage="s3://bucket/wd", address="auto")  # nodes with their own disks

With ``out`` the runs write straight to the sweep folder (this machine, or a disk every node
mounts: a probe task per node checks that before anything is submitted). With ``storage`` each run
trains in its node's scratch and is uploaded to the storage as it goes, verified at the end
(sweeps/upload.py). A task returns only a small dict, so no artifact goes through Ray's object
store. The sweep folder holds ``spec.toml`` (a copy of the spec file), ``sweep.json`` (the spec's
identity and one entry per run: name, overrides, status, attempts, node) and the run folders;
everything in sweep.json can be rebuilt from the run folders.

Runs that share a shape are fused (``[resources] fuse``, default "auto": on a GPU up to
training.fused.AUTO_K runs, off on CPU): a fused group is one Ray task, with one run's resources,
that trains its runs as one model (training/fused.py) into their ordinary run folders; the manifest
keeps one entry per run (``group``: the fused group's number). Only runs that stand at the same step
(fresh, or the same last checkpoint) fuse. With ``storage`` runs are not fused.

Running the same sweep again skips complete runs, resumes interrupted ones from their last
checkpoint and retries failed ones. Whether a run resumes is decided inside its task from its folder,
so a task that Ray retries, or that the next driver submits, picks up where the folder stands. One
driver runs a sweep folder at a time (its lock), and a sweep's runs stop with their driver
(cluster.watch_driver): statuses that only a live driver makes true (queued, running) are read again
from the run folders by the next one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import uuid
from pathlib import Path

from duckling.errors import DucklingError
from duckling.files import FolderBusy, folder_lock, holder
from duckling.sweeps.cluster import _ray, check_resources, check_setup, start_ray
from duckling.sweeps.place import MANIFEST, SPEC_COPY, Place
from duckling.sweeps.progress import Board, Steps, data_lines
from duckling.sweeps.spec import DEFAULT_GPUS, Spec, check_disk, load_spec
from duckling.sweeps.task import REPORT_EVERY_S, RunCrashed, run_phase, run_state, run_task

__all__ = ["MANIFEST", "SPEC_COPY", "read_manifest", "run_state", "start_ray", "sweep"]
FORMAT = 1
LIVE = ("queued", "running")  # statuses that are true only while the driver that wrote them runs


def read_manifest(out) -> dict:
    """The sweep folder's ``sweep.json`` (a folder or a storage URI): {"identity", "runs": [...]}."""
    return Place(storage=out).read_manifest()


def check_out(out: Path) -> Path:
    """``--out`` must be a folder or not exist yet, under folders (not files) that can be written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise DucklingError(f"The sweep folder {out} cannot be made: {p} is a file, not a folder. Give "
                                    "--out a folder that does not exist yet (or an existing sweep folder).")
            if not os.access(p, os.W_OK | os.X_OK):
                raise DucklingError(f"The sweep folder {out} cannot be written: {p} is not writable by this user. "
                                    "Give --out a folder you can write.")
            break
    return out


@contextlib.contextmanager
def driver_lock(place: Place):
    """One driver per sweep folder: ``.lock`` held while the sweep runs (the kernel drops it when the
    driver dies, kill -9 included, so a live lock means a live driver). A remote storage has no lock."""
    if place.local is None:
        yield
        return
    place.local.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(place.local):
            yield
    except FolderBusy as e:
        raise DucklingError(f"{place} is being run by another sweep driver ({e.holder}). A sweep folder has one "
                            "driver: wait for it to finish or stop it (Ctrl-C), then run the command again.") from None


def _open_folder(spec: Spec, place: Place, dry_run: bool) -> dict:
    """The manifest of the sweep folder: created for a new sweep, checked against the spec for an old one.

    A status that only a live driver can make true (queued, running) is read again from the run's
    folder when no driver holds the sweep: a run left by a driver that died is ``interrupted`` (it
    has files) or ``pending`` (it never started)."""
    ident = json.loads(json.dumps(spec.identity(), default=str))
    if place.has_manifest():
        old = place.read_manifest()
        if old.get("identity") != ident:
            diff = [k for k in ident if old.get("identity", {}).get(k) != ident[k]]
            raise DucklingError(
                f"{place} holds a sweep started from another spec (it differs in: {', '.join(diff) or 'format'}). "
                "A sweep folder belongs to one spec: run this spec with a new --out, or run the original spec "
                f"again to finish that sweep (its copy is {place.storage.url(SPEC_COPY)}).")
        if bool(old.get("storage")) != place.uploads:
            raise DucklingError(f"{place} holds a sweep run {'with' if old.get('storage') else 'without'} --storage: "
                                f"run it again the same way ({'--storage' if old.get('storage') else '--out'} {place}).")
        by_name, sweep_id = {r["name"]: r for r in old["runs"]}, old.get("sweep_id")
    elif place.foreign():
        raise DucklingError(f"{place} is not empty and holds no {MANIFEST}: it is not a sweep folder. Choose a new "
                            "--out folder for the sweep.")
    else:
        by_name, sweep_id = {}, None
    live = place.local is not None and place.local.is_dir() and holder(place.local) is not None
    runs = []
    for r in spec.runs:
        old = by_name.get(r.name, {})
        status = old.get("status", "pending")
        if status in LIVE and not live:
            status = "pending" if place.state(r.name) == "fresh" else "interrupted"
        runs.append({"name": r.name, "overrides": r.overrides, "point": r.point, "seed": r.seed,
                     "path": r.name, "status": status,
                     "attempts": old.get("attempts", 0), "error": old.get("error"),
                     **{k: old[k] for k in ("global_step", "steps_per_s", "loss", "eval_loss", "host", "node_id")
                        if k in old}})
    manifest = {"format": FORMAT, "identity": ident, "swept": list(spec.grid), "runs": runs,
                "storage": place.storage.uri if place.uploads else None,
                "sweep_id": sweep_id or uuid.uuid4().hex[:12]}  # names the runs' scratch folders on the nodes
    if not dry_run:
        place.write_spec(spec.source_text)
        place.write_manifest(manifest)
    return manifest


def _table(place: Place, manifest: dict):
    import pandas as pd

    rows = []
    fused = any(r.get("group") is not None for r in manifest["runs"])
    for r in manifest["runs"]:
        rows.append({"name": r["name"], **r["point"], "seed": r["seed"], "status": r["status"],
                     **({"group": r.get("group")} if fused else {}),
                     "on_disk": r.get("state_on_disk"),
                     "path": place.run_path(r["path"]), "overrides": r["overrides"], "attempts": r["attempts"],
                     **{k: r.get(k) for k in ("global_step", "steps_per_s", "loss", "eval_loss", "error", "host")}})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the sweep
def sweep(spec_or_path, out=None, *, storage=None, address: str | None = None, progress: bool = True,
          max_retries: int = 1, dry_run: bool = False, callbacks=()):
    """Run every grid point x seed of a spec as a Ray task; returns a DataFrame with one row per run
    (name, the swept values, seed, status, path, overrides, attempts, global_step, steps_per_s, loss,
    eval_loss, error, host).

    spec_or_path: a TOML spec file or a dict of the same shape (sweep_spec.py documents it; a dict
      may give ``dataset`` / ``eval_dataset`` as (N, T) arrays). Everything is validated, and the
      disk needed by the whole sweep checked, before any run starts.
    out: the sweep folder, written in place (this machine, or a disk every node of the cluster shares).
    storage: instead of ``out``, a storage location (a folder every node mounts, or an fsspec URI
      such as file:///shared/wd or s3://bucket/wd): runs train in node-local scratch
      ($DUCKLING_SCRATCH) and are uploaded there (sweeps/upload.py).
    address: a Ray cluster ("auto", "ray://host:10001", host:port); default $RAY_ADDRESS, else a local Ray.
    max_retries: Ray starts a run whose worker or node dies, or that crashes, again (resuming its last
      checkpoint) up to this many times in this call (the task's ``max_retries`` and
      ``retry_exceptions``); a bad-input error (DucklingError) is not retried. Running the sweep
      again retries every failed run.
    dry_run: validate and return the plan (with each run's state on disk) without starting Ray.
    callbacks: TrainerCallbacks added to every run (pickled to the workers).
    Ctrl-C cancels the runs (each keeps its recording and checkpoints) and raises KeyboardInterrupt;
    running the same command again resumes them.
    """
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    if out is not None and storage is None:
        out = check_out(Path(out).expanduser().resolve())
    elif storage is not None and out is None and Place(storage=storage).local is not None:
        check_out(Place(storage=storage).local)
    place = Place(out=out, storage=storage)
    fuse_for(spec, place)  # a fused sweep cannot use --storage: said before anything starts
    if dry_run:
        return _plan(spec, place, True, progress)
    _ray()  # Ray is an extra: say so before the sweep folder is made
    if place.foreign():
        _open_folder(spec, place, dry_run=True)  # its message, before anything is made
    with driver_lock(place):
        manifest, todo = _plan(spec, place, False, progress, raw=True)
        if todo:
            _execute(spec, place, manifest, todo, address, progress, max_retries, list(callbacks),
                     _resume_command(spec_or_path, place))
    return _table(place, manifest)


def _plan(spec: Spec, place: Place, dry_run: bool, progress: bool, raw: bool = False):
    """The manifest with each run's state on disk, and the runs left to train (disk checked for them)."""
    manifest = _open_folder(spec, place, dry_run)
    entries = {e["name"]: e for e in manifest["runs"]}
    states = {r.name: place.state(r.name) for r in spec.runs}
    for r in spec.runs:
        entries[r.name]["state_on_disk"] = states[r.name]
        if states[r.name] == "complete":
            entries[r.name].update(status="complete", global_step=place.finished_step(r.name))
        elif entries[r.name]["status"] == "complete":  # said complete, but its folder does not show it
            entries[r.name]["status"] = "pending" if states[r.name] == "fresh" else "interrupted"
    todo = [r for r in spec.runs if states[r.name] != "complete"]
    check_disk(spec, place.local if not place.uploads else None, todo)
    if dry_run and progress and (lines := data_lines(spec)):
        print(lines)
    if dry_run and todo:  # the fused groups this machine's local Ray would make (a cluster: its own GPUs)
        import torch

        gpus = spec.gpus if spec.gpus is not None else DEFAULT_GPUS if torch.cuda.is_available() else 0.0
        _groups(spec, place, todo, gpus, manifest)
    if not dry_run:
        place.write_manifest(manifest)
        if progress and not todo:
            print(f"sweep {place}: all {len(spec.runs)} runs are complete; nothing to train.")
    return (manifest, todo) if raw else _table(place, manifest)


def _resume_command(spec_or_path, place: Place) -> str:
    """The command that resumes this sweep: its spec file as it was given (relative paths in a spec are
    read from the spec file's folder, so its copy in the sweep folder would not do)."""
    if not isinstance(spec_or_path, (str, Path)):  # a dict or Spec: no file to name
        return "the same sweep() call"
    where = f"--storage {shlex.quote(place.storage.uri)}" if place.uploads else f"--out {shlex.quote(str(place))}"
    return f"duckling sweep {shlex.quote(str(spec_or_path))} {where}"


def _gpus(spec: Spec) -> float:
    ray = _ray()

    if spec.gpus is not None:
        return spec.gpus
    return DEFAULT_GPUS if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def fuse_for(spec: Spec, place: Place):
    """The spec's ``fuse`` where the runs go: a storage sweep does not fuse (each run has its own
    scratch folder and upload), so an explicit group size > 1 is refused there."""
    if place.uploads:
        if isinstance(spec.fuse, int) and spec.fuse > 1:
            raise DucklingError(f"[resources] fuse = {spec.fuse} cannot be used with --storage: a storage sweep trains "
                                "each run in its own node-local scratch folder and uploads it, one run per task. Set "
                                "fuse = \"off\" (or \"auto\") for --storage, or run the sweep with --out on a folder "
                                "every node shares to fuse its runs.")
        return "off"
    return spec.fuse


def _groups(spec: Spec, place: Place, todo: list, gpus: float, manifest: dict) -> list[list]:
    """The runs left to train, as fused groups (training.fused.plan_groups), in grid order; each run's
    manifest entry gets ``group`` (the group's number, 1-based) when it is fused with others."""
    from duckling.training.fused import plan_groups

    fuse = fuse_for(spec, place)
    device = "cuda" if gpus > 0 and all(r.cfg.train.device in ("auto", "cuda") for r in todo) else "cpu"
    phases = [None if place.uploads else run_phase(place.local / r.name) for r in todo]
    groups = [[todo[i] for i in g] for g in plan_groups([r.cfg for r in todo], fuse=fuse, device=device,
                                                         phases=phases)]
    entries = {e["name"]: e for e in manifest["runs"]}
    for e in manifest["runs"]:
        e.pop("group", None)
    for k, g in enumerate((g for g in groups if len(g) > 1), 1):
        for r in g:
            entries[r.name]["group"] = k
    return groups


def _execute(spec, place: Place, manifest, todo, address, progress, max_retries, callbacks,
             resume="the same command"):
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = start_ray(address)
    try:
        gpus = _gpus(spec)
        groups = _groups(spec, place, todo, gpus, manifest)
        check_resources(ray, spec.cpus, gpus)  # before anything is submitted: Ray would wait forever
        check_setup(ray, place, spec)  # a probe per node: storage, dataset, a shared --out
        # Ray retries a run whose worker or node died, or that crashed (RunCrashed); a DucklingError
        # (bad input) is returned, not raised, so it is never retried.
        task = ray.remote(run_task).options(num_cpus=spec.cpus, num_gpus=gpus, max_retries=max_retries,
                                            retry_exceptions=[RunCrashed])
        # a light process (no torch) on the driver's node: it dies with the driver, and only then (watch_driver).
        # Hard affinity: a soft one let Ray place it on a worker node, whose death then failed every run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(Steps).options(num_cpus=0, scheduling_strategy=here).remote()
        data = [ray.put(d) if d is not None and not isinstance(d, str) else d
                for d in (spec.dataset, spec.eval_dataset)]
        entries = {e["name"]: e for e in manifest["runs"]}
        attempts0 = {r.name: entries[r.name].get("attempts", 0) for r in todo}
        board = Board(spec, place, manifest, todo, progress)
        if progress and any(len(g) > 1 for g in groups):
            print(f"sweep {place}: {len(todo)} runs to train as {len(groups)} tasks (fused groups of "
                  f"{', '.join(str(n) for n in sorted({len(g) for g in groups}, reverse=True))} runs, "
                  f"{spec.cpus:g} CPU and {gpus:g} GPU per task)", flush=True)

        def submit(group):
            jobs = []
            for run in group:
                entries[run.name].update(status="queued", error=None)
                jobs.append({"name": run.name, "path": place.run_path(run.name), "config": run.cfg.to_dict()})
            job = {**jobs[0], "mapping": spec.mapping, "threads": spec.threads, "sweep_id": manifest["sweep_id"],
                   "storage": place.storage.uri if place.uploads else None}
            if len(group) > 1:  # a fused group (sweeps/task.py trains its members as one model)
                job["members"] = jobs
            return task.remote(job, *data, actor, callbacks)

        def observe():
            """Starts (one per attempt, with the node) and steps reported by the running tasks."""
            starts, steps = ray.get(actor.starts.remote()), ray.get(actor.get.remote())
            changed = False
            for name, where in starts.items():
                e, n = entries[name], attempts0[name] + len(where)
                if e["status"] == "queued" or e.get("attempts") != n:
                    e.update(status="running" if e["status"] in LIVE else e["status"], attempts=n, **where[-1])
                    changed = True
            board.steps(steps)
            return changed

        refs = {submit(g): g for g in groups}
        place.write_manifest(manifest)
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=REPORT_EVERY_S)
                changed = observe()
                for ref in ready:
                    group = refs.pop(ref)
                    try:
                        got = ray.get(ref)
                    except ray.exceptions.RayError as e:  # retries spent: the worker or node died, or it crashed
                        got = [{"name": run.name, "status": "failed", "error": _ray_error(e)} for run in group]
                    for res in got if isinstance(got, list) else [got]:  # a fused group: one result per run
                        entries[res["name"]].update({k: v for k, v in res.items() if k not in ("name", "skipped")})
                        board.event(res["name"], res["status"], res.get("error"), res)
                    changed = True
                if changed:
                    place.write_manifest(manifest)
        except KeyboardInterrupt:
            _cancel(refs, entries, board, place)
            place.write_manifest(manifest)
            board.close()
            print(f"Sweep interrupted. Every run keeps its recording and checkpoints; resume with {resume}.",
                  flush=True)
            raise
        board.close()
    finally:
        if started:
            ray.shutdown()


def _ray_error(e) -> str:
    """A failed task's error: a crashed run's traceback, else Ray's first line (worker or node died)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, RunCrashed):
        return str(cause)
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _cancel(refs: dict, entries: dict, board, place) -> None:
    """Ctrl-C: interrupt every task (their train() saves what it can) and wait for them briefly. A run
    that never started (nothing in its folder) is ``pending`` again; one that did is ``interrupted``.
    ``refs``: {task: its run, or the list of runs of its fused group}."""
    ray = _ray()

    if not isinstance(place, Place):
        place = Place(out=place)
    for ref in refs:
        ray.cancel(ref)
    try:
        ray.wait(list(refs), num_returns=len(refs), timeout=60)
    except KeyboardInterrupt:
        pass
    for ref, runs in refs.items():
        for run in runs if isinstance(runs, list) else [runs]:
            status = "pending" if place.state(run.name) == "fresh" else "interrupted"
            entries[run.name]["status"] = status  # attempts count the starts the tasks reported
            board.event(run.name, status, None)
