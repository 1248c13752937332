"""Sweeps on a real multi-node Ray cluster started by this module (issue 22), and the storage they land in.

Fast tests: ``duckling.storage`` on a local folder and on fsspec's memory:// (the code path of a remote
store), and a run folder mirrored, verified and judged complete or not.

Slow tests (one cluster for the module): a head and a second node started with ``ray start``, each with
its own temp folder and node-local scratch ($DUCKLING_SCRATCH); the second node runs in its own mount
namespace with a private tmpfs over the driver's --out parent, so it truly has no shared disk for it.
The storage is a file:// URI. Only the processes this module started are stopped (their process groups).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duckling.errors import DucklingError
from duckling.storage import Storage, as_local, local_path

pytestmark = pytest.mark.xdist_group("cluster")  # its module fixtures are built once, on one worker


# ---------------------------------------------------------------- fast: storage and the mirror
@pytest.mark.parametrize("kind", ["file", "memory"])
def test_storage_roundtrip(tmp_path, kind):
    uri = f"file://{tmp_path}/st" if kind == "file" else f"memory://duckling-test-{os.getpid()}"
    st = Storage(uri)
    assert (st.local is not None) == (kind == "file")
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    st.put_file(src, "run/recording/W.00000.blk")
    st.write_bytes("run/run_info.json", '{"a": 1}')
    assert st.files("run") == {"recording/W.00000.blk": 25600, "run_info.json": 8}
    assert st.read_range("run/recording/W.00000.blk", 255, 3) == bytes([255, 0, 1])
    from duckling.storage import file_sha256

    assert st.sha256("run/recording/W.00000.blk") == file_sha256(src)
    got = st.download("run", tmp_path / "down")
    assert (got / "recording" / "W.00000.blk").read_bytes() == src.read_bytes()
    st.remove("run/run_info.json")
    assert st.files("run") == {"recording/W.00000.blk": 25600} and st.files("nothing") == {}
    st.remove_tree("run")
    assert st.files("run") == {}
    assert not list(tmp_path.rglob("*.tmp"))


def test_local_path_and_as_local(tmp_path):
    assert local_path(f"file://{tmp_path}") == tmp_path and local_path(str(tmp_path)) == tmp_path
    assert local_path("s3://bucket/x") is None and as_local(f"file://{tmp_path}/a") == tmp_path / "a"
    with pytest.raises(DucklingError, match="remote storage URI"):
        as_local("s3://bucket/sweep")


def test_mirror_verifies_before_complete_and_drops_deleted_files(tmp_path):
    from duckling.sweeps import upload

    run = tmp_path / "scratch" / "r"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run / "recording").mkdir()
    (run / "recording" / "W.00000.blk").write_bytes(b"x" * 100)
    (run / ".lock").write_text("")
    (run / "run_info.json.tmp").write_text("half")
    st = Storage(f"file://{tmp_path}/storage")
    m = upload.Mirror(run, st, "r")
    assert m.blocks() == 1 and set(st.files("r")) == {"recording/W.00000.blk"}
    assert upload.stored_state(st, "r") == "restart"
    m.checkpoint()
    assert set(st.files("r")) == {"recording/W.00000.blk", "checkpoint-2/trainer_state.json"}
    assert upload.stored_state(st, "r") == "resumable"
    shutil.rmtree(run / "checkpoint-2")  # the Trainer dropped an old checkpoint: the storage follows
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "trainer_state.json").write_text("{}")
    rec = m.finish({"global_step": 4})
    assert set(st.files("r")) == {"recording/W.00000.blk", "checkpoint-4/trainer_state.json", "upload.json"}
    assert rec["complete"] and upload.stored_state(st, "r") == "complete"
    # a file cut short in the storage: no longer complete (sizes), and finish() refuses (checksums)
    blk = tmp_path / "storage" / "r" / "recording" / "W.00000.blk"
    blk.write_bytes(b"x" * 99)
    assert upload.stored_state(st, "r") == "resumable"
    blk.write_bytes(b"y" * 100)  # same size, other bytes
    m.sent.clear()
    m.push = lambda only=None: (0, 0)  # as if the upload had been lost on its way: the check must see it
    with pytest.raises(upload.UploadError, match="W.00000.blk \\(checksum differs\\)"):
        m.finish({})


# ---------------------------------------------------------------- slow: a real two-node cluster
STEPS = 24
BASE = {"train.max_steps": STEPS, "train.save_steps": 4, "train.logging_steps": 4, "model.n_layer": 1,
        "model.n_positions": 64, "model.n_embd": 32, "model.n_inner": 64, "train.compile": False,
        "record.probe_every": 4}
HEALTH = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
          "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
          "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a test cluster on one machine: no token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block` process (and everything it starts), stopped by its own pids."""

    def __init__(self, args: list[str], env: dict, log: Path, prefix: list[str] = (), tag: str = ""):
        self.tag = tag  # its own temp folder: in the command line of every process it starts
        self.log = open(log, "w")
        self.proc = subprocess.Popen([*prefix, str(Path(sys.executable).parent / "ray"), "start", "--block", *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig=signal.SIGKILL) -> None:
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in psutil.process_iter(["cmdline"]):  # any of its processes that lost their parent
            if self.tag and p not in procs and any(self.tag in a for a in p.info["cmdline"] or []):
                procs.append(p)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:  # what a SIGTERM did not stop in 5 s (Ray's processes can take 30)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=30)
        self.proc.wait(timeout=30)
        self.log.close()


def _slow_callback(seconds: float):
    from transformers import TrainerCallback

    class SlowSteps(TrainerCallback):  # a local class: Ray pickles it by value
        def on_step_end(self, args, state, control, **kw):
            time.sleep(seconds)  # time for the test to act mid-run; no result depends on it

    return SlowSteps()


def test_a_ray_that_cannot_start_is_a_clear_error(monkeypatch):
    """Ray raises a bare Exception when its processes miss their start-up time (an overloaded machine)."""
    ray = pytest.importorskip("ray")
    from duckling.sweeps import cluster

    tries = []

    def slow_start(*a, **k):
        tries.append(1)
        raise Exception("The current node timed out during startup.")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_start)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(DucklingError, match="could not start or join a local Ray instance.*rerun the same command"):
        cluster.start_ray(None)
    assert len(tries) == 3  # a local start is tried three times before it is reported


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok) -> str:
    from corpus import make_stories, write_corpus

    from duckling.data.build import build_dataset

    root = tmp_path_factory.mktemp("clusterdata")
    write_corpus(root / "train.txt", make_stories(120, seed=0))
    build_dataset(root / "train.txt", tok, root / "train", seq_len=64, progress=False)
    return str(root / "train")


MAPPING = str(Path(__file__).resolve().parents[1] / "token_mapping.json")


@pytest.mark.slow
def test_a_run_killed_mid_upload_resumes_elsewhere_from_the_storage(dataset, tmp_path):
    """The task body without Ray: a run trains in one scratch folder and is killed (kill -9) once a
    checkpoint is in the storage; started again with another scratch folder (another node), it resumes
    from the upload, and ends complete, verified, readable by Recording from the file:// URI."""
    from duckling.config import DucklingConfig
    from duckling.recording.reader import Recording
    from duckling.sweeps import upload
    from duckling.sweeps.task import run_task

    uri = f"file://{tmp_path / 'storage'}"
    st = Storage(uri)
    cfg = DucklingConfig().override({**BASE, "train.seed": 0, "train.threads": 1})
    job = {"name": "seed=0", "path": "", "config": cfg.to_dict(), "mapping": MAPPING, "threads": 1,
           "sweep_id": "t", "storage": uri}
    code = ("import json, sys, time\nfrom transformers import TrainerCallback\nfrom duckling.sweeps.task import run_task\n"
            "class Slow(TrainerCallback):\n    def on_step_end(self, args, state, control, **kw):\n        time.sleep(0.3)\n"
            f"run_task(json.loads(sys.argv[1]), {dataset!r}, None, None, [Slow()])\n")
    env = {**os.environ, "DUCKLING_SCRATCH": str(tmp_path / "node-a")}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while upload.stored_state(st, "seed=0") != "resumable":
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert upload.stored_state(st, "seed=0") == "resumable" and not st.exists("seed=0/final")
    os.environ["DUCKLING_SCRATCH"] = str(tmp_path / "node-b")
    try:
        res = run_task(job, dataset, None, None)
    finally:
        del os.environ["DUCKLING_SCRATCH"]
    assert res["status"] == "complete" and res["started_as"] == "resumable", res["error"]
    assert upload.stored_state(st, "seed=0") == "complete"
    assert not (tmp_path / "node-b" / "t" / "seed=0").exists()  # scratch freed once the upload is verified
    info = json.loads(st.read_bytes("seed=0/run_info.json"))
    assert len(info["resumed"]) == 1 and info["nodes"][-1]["step"] > 0 and info["global_step"] == STEPS
    r = Recording(f"{uri}/seed=0")
    assert r.steps.tolist() == list(range(STEPS + 1))
    again = run_task(job, dataset, None, None)  # complete in the storage: nothing is trained
    assert again["status"] == "complete" and again.get("skipped")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dataset):
    """A head (2 CPUs) and a second node (2 CPUs) whose mount namespace hides the driver's ``outs/``
    folder behind a private tmpfs: it shares the storage and the dataset, not the driver's disk."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("psutil")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a node with a private disk")
    if ray.is_initialized():
        ray.shutdown()
    import tempfile

    root = tmp_path_factory.mktemp("cluster")
    for d in ("head-scratch", "node-scratch", "outs", "storage"):
        (root / d).mkdir()
    short = Path(tempfile.mkdtemp(prefix="dkr", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    (short / "h").mkdir()
    (short / "n").mkdir()
    port = _free_port()
    saved = {k: os.environ.get(k) for k in HEALTH}
    os.environ.update(HEALTH)  # this process is the driver (and starts the drivers of the tests)
    env = dict(os.environ)
    head = Node(["--head", f"--port={port}", f"--temp-dir={short / 'h'}", "--num-cpus=2",
                 "--include-dashboard=false", "--disable-usage-stats", "--no-monitor", "--include-log-monitor=false"],
                {**env, "DUCKLING_SCRATCH": str(root / "head-scratch")}, root / "head.log", tag=str(short / "h"))
    nodes = [head]
    try:
        addr = f"127.0.0.1:{port}"
        _wait(lambda: "Ray runtime started" in (root / "head.log").read_text(), 120, head)
        ray.init(address=addr, log_to_driver=False, logging_level="ERROR")
        mask = f"mount -t tmpfs none {root / 'outs'} && exec \"$0\" \"$@\""
        nodes.append(Node([f"--address={addr}", f"--temp-dir={short / 'n'}", "--num-cpus=2",
                           "--disable-usage-stats", "--include-log-monitor=false"], {**env, "DUCKLING_SCRATCH": str(root / "node-scratch")},
                          root / "node.log", prefix=["unshare", "-m", "--propagation", "private", "sh", "-c", mask], tag=str(short / "n")))
        _wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 120, nodes[1])
        other = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != ray.get_runtime_context().get_node_id()][0]
        yield {"root": root, "address": addr, "head": head, "node": nodes[1], "node_id": other["NodeID"],
               "mapping": MAPPING, "dataset": dataset}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for n in reversed(nodes):
            n.kill(signal.SIGTERM)
        shutil.rmtree(short, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _wait(cond, timeout, node):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.proc.poll() is None:
        if cond():
            return
        time.sleep(0.5)
    node.log.flush()
    raise AssertionError(f"a Ray node did not come up in {timeout} s: {Path(node.log.name).read_text()[-2000:]}")


def _spec(c, seeds, **base):
    return {"dataset": c["dataset"], "mapping": c["mapping"], "base": {**BASE, **base},
            "grid": {"seeds": seeds}, "resources": {"cpus": 1}}


@pytest.mark.slow
def test_out_without_shared_disk_is_refused_before_anything_runs(cluster):
    from duckling.sweeps.engine import sweep

    c = cluster
    out = c["root"] / "outs" / "local"
    with pytest.raises(DucklingError) as err:
        sweep(_spec(c, [0]), out, address=c["address"], progress=False)
    msg = str(err.value)
    assert "do not see" in msg and "--storage" in msg and "Nothing was submitted" in msg, msg
    assert not any((out).glob("seed=*"))


@pytest.mark.slow
def test_sweep_lands_in_storage_and_survives_a_dead_node(cluster):
    """4 runs over both nodes into a file:// storage; the second node is killed once one of its runs has
    uploaded a checkpoint: that run resumes on the head from it, and every run ends complete and verified."""
    import threading

    from duckling.recording.reader import Recording
    from duckling.sweeps import upload
    from duckling.sweeps.compare import compare
    from duckling.sweeps.engine import sweep

    c = cluster
    uri = f"file://{c['root'] / 'storage' / 'four'}"
    st = Storage(uri)
    killed = {}

    def killer():  # kill the node as soon as one of its runs has a checkpoint in the storage
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            for name in {k.split("/")[0] for k in st.files()}:
                try:  # the runs write while this reads: a file that is not (or no longer) there is retried
                    info = json.loads(st.read_bytes(f"{name}/run_info.json"))
                    resumable = upload.stored_state(st, name) == "resumable"
                except (OSError, ValueError):
                    continue
                if info.get("node", {}).get("node_id") == c["node_id"] and resumable:
                    killed["run"] = name
                    c["node"].kill()
                    return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    df = sweep(_spec(c, [0, 1, 2, 3]), storage=uri, address=c["address"], progress=False, max_retries=2,
               callbacks=[_slow_callback(0.25)])
    t.join(timeout=5)
    assert killed, "no run of the second node reached a checkpoint"
    assert (df["status"] == "complete").all(), df[["name", "status", "error"]].to_string()
    for name in df["name"]:
        assert upload.stored_state(st, name) == "complete"
        rec = upload.upload_record(st, name)
        assert rec["global_step"] == STEPS and all(st.files(name)[f] == v["size"] for f, v in rec["files"].items())
    info = json.loads(st.read_bytes(f"{killed['run']}/run_info.json"))
    assert [n["node_id"] for n in info["nodes"]][0] == c["node_id"] and info["node"]["node_id"] != c["node_id"]
    assert len(info["resumed"]) == 1 and info["nodes"][-1]["step"] > 0  # resumed from its uploaded checkpoint
    manifest = json.loads(st.read_bytes("sweep.json"))
    assert all(e["host"] and e["node_id"] for e in manifest["runs"])
    r = Recording(f"{uri}/{killed['run']}")
    assert r.steps.tolist() == list(range(STEPS + 1))  # no gap where the node died
    table = compare(uri, progress=False, write=False)
    assert (table["status"] == "complete").all() and table["dead_norm_over_null"].notna().all()




@pytest.mark.slow
def test_runs_stop_with_a_killed_driver_and_the_next_driver_resumes_them(cluster):
    """kill -9 of a driver (on a cluster, --address): its run stops instead of training unsupervised,
    sweep.json's "running" is read as interrupted, and the next driver resumes the run from the storage."""
    from duckling.files import holder
    from duckling.sweeps import upload
    from duckling.sweeps.engine import sweep

    c = cluster
    uri = f"file://{c['root'] / 'storage' / 'orphan'}"
    st = Storage(uri)
    spec = _spec(c, [7])
    code = ("import time\nfrom transformers import TrainerCallback\nfrom duckling.sweeps.engine import sweep\n"
            "class SlowSteps(TrainerCallback):\n"
            "    def on_step_end(self, args, state, control, **kw):\n        time.sleep(0.5)\n"
            f"sweep({spec!r}, storage={uri!r}, address={c['address']!r}, progress=False, callbacks=[SlowSteps()])\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    name = "seed=7"
    deadline = time.monotonic() + 300
    while upload.stored_state(st, name) != "resumable":
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never uploaded a checkpoint"
        time.sleep(0.1)
    driver.kill()
    driver.wait()
    manifest = json.loads(st.read_bytes("sweep.json"))
    left = manifest["runs"][0]
    assert left["status"] in ("queued", "running")  # what the dead driver left
    scratch = c["root"] / "head-scratch" / manifest["sweep_id"] / name
    deadline = time.monotonic() + 120
    while scratch.is_dir() and holder(scratch) is not None:  # its worker: training, unsupervised?
        assert time.monotonic() < deadline, "the run kept training after its driver died"
        time.sleep(0.2)
    assert upload.stored_state(st, name) == "resumable"  # stopped mid-run, not finished
    plan = sweep(spec, storage=uri, dry_run=True, progress=False)
    assert plan["status"].tolist() == ["interrupted"]
    df = sweep(spec, storage=uri, address=c["address"], progress=False)
    assert df["status"].tolist() == ["complete"] and df["attempts"].tolist() == [left["attempts"] + 1]
    info = json.loads(st.read_bytes(f"{name}/run_info.json"))
    assert len(info["resumed"]) >= 1 and info["global_step"] == STEPS
