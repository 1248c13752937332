"""What a sweep checks about its Ray cluster, and how its runs stay tied to their driver.

- ``check_resources``: before anything is submitted, some alive node must be able to hold one run
  (its [resources] cpus and gpus); otherwise Ray would queue the tasks forever without a word.
- ``watch_driver``: a thread in every run's task that asks the driver's progress actor if it is still
  there. A non-detached actor dies with the process that created it, so when the driver dies
  (kill -9 included) the next call fails and the run stops as on Ctrl-C: a checkpoint at its last
  complete step, then the task ends. On a local Ray the workers also die with the driver (Ray tears
  its instance down); on a cluster (--address) this is what stops them, on every node.
- ``probe_nodes``: one small task pinned to each alive node that says what that node sees (its host,
  its scratch folder, the storage, the dataset, the driver's --out); the engine refuses a set-up
  where some node cannot reach what its runs need, before any run starts.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from duckling.errors import DucklingError

WATCH_EVERY_S = 2.0  # how often a run asks whether its driver still lives
PROBE_TIMEOUT_S = 300.0  # a node's probe must answer within this (a fresh worker on a busy node is slow)
ENV_VARS = ("TIKTOKEN_CACHE_DIR", "HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "DUCKLING_DATA")


def _ray():
    """The ray module; without it (Ray is the optional [sweep] extra) a one-line error naming the install."""
    try:
        import ray
    except ImportError:
        raise DucklingError("Sweeps run on Ray, which is not installed: pip install 'duckling[sweep]' "
                            "(in a checkout: pip install -e '.[sweep]').") from None
    return ray


def runtime_env() -> dict:
    """The driver's environment that a run needs on every node (Ray's ``runtime_env``): the tokenizer
    cache and the Hugging Face settings, when set here."""
    env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
    return {"env_vars": env} if env else {}


def start_ray(address: str | None = None) -> bool:
    """Connect to Ray: ``address`` / $RAY_ADDRESS (e.g. "auto" for a running cluster, with this
    machine's ``runtime_env()`` for its nodes), else a fresh local instance with every CPU of this
    machine, no dashboard and no worker log forwarding. Returns True when this call started (or
    connected) Ray, False when it was already up: a sweep leaves a Ray it did not start running, so
    several sweeps in one session (a notebook's) share one."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kw = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
              logging_level=logging.ERROR)
    if address != "local" and runtime_env():
        kw["runtime_env"] = runtime_env()
    if address == "local":  # a fresh instance: all CPUs, runs at normal priority (Ray's default nices workers to 15)
        kw.update(num_cpus=os.cpu_count(), _system_config={"worker_niceness": 0})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence Ray's future-default warning
    try:
        for attempt in range(3 if address == "local" else 1):  # a local start can miss Ray's fixed 30 s on a
            try:                                                # loaded machine: try again after tidying up
                ray.init(address=address, **kw)
                break
            except ConnectionError:
                raise
            except Exception:  # noqa: BLE001 - Ray's start-up timeout is a bare Exception
                ray.shutdown()
                if attempt == 2 or address != "local":
                    raise
    except ConnectionError as e:
        raise DucklingError(f"Cannot connect to a Ray cluster at {address!r} ({e}). Start one with "
                            "`ray start --head`, or leave out --address / RAY_ADDRESS for a local Ray.") from None
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its own processes start too slowly
        where = "a local Ray instance" if address == "local" else f"the Ray cluster at {address!r}"
        raise DucklingError(f"Ray could not start or join {where}: {str(e).strip() or type(e).__name__}. Ray "
                            "gives its own processes a fixed time to start, which an overloaded machine can "
                            "miss: rerun the same command when the load drops (nothing was trained, and a rerun "
                            "resumes the sweep), or start Ray once with `ray start --head` and pass "
                            "--address auto.") from None
    return True


def alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _describe(res: dict) -> str:
    gpus = res.get("GPU", 0)
    return f"{res.get('CPU', 0):g} CPU{'s' if res.get('CPU', 0) != 1 else ''} and " + \
        (f"{gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU")


def check_resources(ray, cpus: float, gpus: float) -> None:
    """Refuse resources that no alive node has (Ray would wait for such a node forever)."""
    nodes = alive_nodes(ray)
    if any(n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus for n in nodes):
        return
    largest = max((n["Resources"] for n in nodes), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    want = f"{cpus:g} CPU{'s' if cpus != 1 else ''}" + (f" and {gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else "")
    fix = []
    if cpus > largest.get("CPU", 0):
        fix.append(f"lower [resources] cpus to at most {largest.get('CPU', 0):g}")
    if gpus > largest.get("GPU", 0):
        fix.append("set [resources] gpus = 0 (train on CPU)" if not largest.get("GPU", 0)
                   else f"lower [resources] gpus to at most {largest.get('GPU', 0):g}")
    raise DucklingError(
        f"No node of the Ray cluster can run one run of this sweep: each run asks for {want}, but the largest of "
        f"its {len(nodes)} node{'s' if len(nodes) != 1 else ''} has {_describe(largest)}. Nothing was submitted. "
        f"{(lambda t: t[:1].upper() + t[1:])(' and '.join(fix))} in the spec, or add a node that large to the cluster.")


def watch_driver(actor, every: float = WATCH_EVERY_S) -> threading.Event:
    """Start a daemon thread that SIGTERMs this process (train() then saves a checkpoint and stops)
    once ``actor`` (owned by the driver) is gone. Returns the event that stops the watch."""
    import concurrent.futures

    import ray

    done = threading.Event()

    def loop():
        while not done.wait(every):
            try:  # a future, not ray.get: a task blocked in ray.get lends its CPU to Ray's next task
                actor.ping.remote().future().result(timeout=max(30.0, 5 * every))
            except (concurrent.futures.TimeoutError, ray.exceptions.GetTimeoutError):  # a busy actor, not a dead one
                continue
            except ray.exceptions.RayActorError:  # the driver that owns it died
                if not done.is_set():
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            except Exception:  # noqa: BLE001 - Ray shutting down in this worker: nothing to supervise
                return

    threading.Thread(target=loop, name="duckling-driver-watch", daemon=True).start()
    return done


# ---------------------------------------------------------------- probes (one per node)
def node_info() -> dict:
    """Where this process runs: host name and Ray node id (the manifest and run_info record it)."""
    info = {"host": socket.gethostname()}
    try:
        import ray

        if ray.is_initialized():  # asking outside Ray would start a local Ray
            info["node_id"] = ray.get_runtime_context().get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
    except ImportError:
        pass
    return info


def probe(storage_uri: str | None, token: str, shared: str | None, paths: dict) -> dict:
    """Run on one node: what it sees. ``shared``: a file the driver wrote in --out (holding ``token``);
    ``paths``: {what: path} that must exist on the node (dataset, eval dataset, mapping)."""
    from duckling.sweeps.upload import check_storage_writable, scratch_root

    out = {**node_info(), "problems": []}
    try:
        out["scratch"] = str(scratch_root())
    except OSError as e:
        out["problems"].append(f"its scratch folder cannot be made ({e})")
    if storage_uri is not None:
        try:
            from duckling.storage import Storage

            check_storage_writable(Storage(storage_uri), f"{out['host']}-{token}-{os.getpid()}")
        except DucklingError as e:
            out["problems"].append(f"the storage: {e}")
    if shared is not None:
        try:
            out["shares_out"] = Path(shared).read_text() == token
        except OSError:
            out["shares_out"] = False
    for what, path in paths.items():
        if not Path(path).exists():
            out["problems"].append(f"the {what} {path} does not exist there")
    return out


def _where(info: dict) -> str:
    return f"node {info.get('node_ip') or info.get('host')} ({info.get('host')})"


def check_setup(ray, place, spec) -> list[dict]:
    """Before anything is submitted: a probe task pinned to every alive node; refuse a node that cannot
    reach the storage or the dataset, and ``--out`` on several nodes that do not share it. Returns the
    probes' answers."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes(ray)
    if len(nodes) == 1 and not place.uploads and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return []  # one machine, the driver's: it sees what the driver sees
    token = uuid.uuid4().hex
    shared = None
    if not place.uploads and len(nodes) > 1:
        shared = place.local / f".probe-{token}"
        shared.write_text(token)
    paths = {k: v for k, v in (("dataset", spec.dataset), ("eval dataset", spec.eval_dataset),
                               ("token mapping", spec.mapping)) if isinstance(v, str)}
    remote = ray.remote(probe)
    refs = {remote.options(num_cpus=0, max_retries=0,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        place.storage.uri if place.uploads else None, token, str(shared) if shared else None, paths): n for n in nodes}
    answers, deadline = [], time.monotonic() + PROBE_TIMEOUT_S
    try:
        pending = list(refs)
        while pending and time.monotonic() < deadline:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(5.0, PROBE_TIMEOUT_S))
            for ref in done:
                try:
                    answers.append(ray.get(ref))
                except ray.exceptions.RayError as e:
                    n = refs[ref]
                    answers.append({"node_ip": n.get("NodeManagerAddress"), "host": n.get("NodeManagerHostname"),
                                    "problems": [f"its probe task failed ({type(e).__name__})"]})
        for ref in pending:
            ray.cancel(ref, force=True)
            n = refs[ref]
            answers.append({"node_ip": n.get("NodeManagerAddress"), "host": n.get("NodeManagerHostname"),
                            "problems": [f"its probe task did not answer within {PROBE_TIMEOUT_S:.0f} s"]})
    finally:
        if shared is not None:
            shared.unlink(missing_ok=True)
    bad = [f"{_where(a)}: {'; '.join(a['problems'])}" for a in answers if a["problems"]]
    if bad:
        raise DucklingError(f"Not every node of the Ray cluster can run this sweep's runs: {' | '.join(bad)}. "
                            "Nothing was submitted. Put the dataset and token mapping at the same path on every "
                            "node (or on a disk they all mount), and give --storage a location every node can "
                            "write (a shared folder, or s3://... with its fsspec package installed on every node).")
    if shared is not None:
        blind = [a for a in answers if not a.get("shares_out")]
        if blind:
            raise DucklingError(
                f"--out {place} is on this machine's disk, which {len(blind)} of the cluster's {len(answers)} nodes "
                f"do not see ({', '.join(_where(a) for a in blind)}): their runs would land on their own disks, where "
                "this driver cannot read them. Nothing was submitted. Give --storage URI instead of --out (a folder "
                "every node mounts, or s3://bucket/prefix; runs then train in node-local scratch and are uploaded "
                "there), or make --out a folder that every node mounts.")
    return answers
