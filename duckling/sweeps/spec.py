"""Sweep specs: read, validate and expand a spec into runs, before anything trains.

A spec is a TOML file (or the same shape as a dict)::

    dataset = "tokenized_dataset"          # paths relative to the spec file
    eval_dataset = "valid_dataset"         # optional
    mapping = "token_mapping.json"         # optional: default token_mapping.json beside the spec, else ./
    [base]                                 # dotted config overrides shared by every run
    "train.max_steps" = 2000
    [grid]                                 # the cross product of these lists
    "train.weight_decay" = [0.0, 0.01, 0.1]
    seeds = [0, 1, 2]                      # train.seed of each grid point (default: the base seed)
    [resources]                            # per run
    cpus = 1                               # also the run's torch threads (train.threads)
    gpus = 0.25                            # fractional: several runs share one GPU
    fuse = "auto"                          # fused groups: "auto" (CUDA: up to 32 runs; CPU/MPS: off), "off", or K

Every run's config is built with ``DucklingConfig().override(...)``, so a bad name or value is
refused with the config's own message, for the whole sweep, before any run starts.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from duckling.config import RENAMED, DucklingConfig
from duckling.errors import DucklingError
from duckling.recording import budget

TOP_KEYS = ("dataset", "eval_dataset", "mapping", "base", "grid", "resources")
RESOURCE_KEYS = ("cpus", "gpus", "fuse")
DEFAULT_GPUS = 0.25  # per run when the cluster has GPUs and the spec says nothing: 4 runs per GPU
# The most runs one spec may expand to. Counted as the product of the list lengths before anything is
# expanded, so a 9.6M-run grid is refused at once. Why 10,000: every run is a whole recorded training
# run with its own folder; expanding and validating 10,000 configs takes seconds (about 1.5 ms each on
# a busy 2-core machine), sweep.json then holds ~3 MB and is rewritten at each run's end, and the
# study, the largest sweep here, has 54 runs. A bigger grid is a mistake or several sweeps.
MAX_RUNS = 10_000


@dataclass
class Run:
    """One grid point x seed: its folder name, the swept values, and the validated config."""

    name: str
    point: dict  # {dotted name: value} of the swept fields (train.seed excluded)
    seed: int
    cfg: DucklingConfig

    @property
    def overrides(self) -> dict:
        return {**self.point, "train.seed": self.seed}


@dataclass
class Spec:
    """A validated spec: resolved inputs, overrides, the grid and per-run resources."""

    dataset: object  # absolute path (str) or a (N, T) integer array
    eval_dataset: object = None
    mapping: str | None = None
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)  # {dotted name: [values]}, seeds excluded
    seeds: list = field(default_factory=list)
    cpus: float = 1.0
    gpus: float | None = None  # None = decide from the cluster (DEFAULT_GPUS if it has GPUs, else 0)
    fuse: object = "auto"  # "auto" | "off" | K: runs of one shape trained as one fused model (training/fused.py)
    source_text: str | None = None  # the TOML text, when read from a file
    runs: list = field(default_factory=list)

    def identity(self) -> dict:
        """What the runs compute (not how they are scheduled): a sweep folder belongs to one identity."""
        return {"dataset": _describe(self.dataset), "eval_dataset": _describe(self.eval_dataset),
                "mapping": self.mapping, "base": self.base, "grid": self.grid, "seeds": self.seeds}

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def _describe(data):
    """A JSON-able identity of an input: its path, or the shape and hash of an in-memory array."""
    if data is None or isinstance(data, str):
        return data
    a = np.ascontiguousarray(data)
    return {"array_shape": list(a.shape), "dtype": str(a.dtype), "sha1": hashlib.sha1(a.view(np.uint8)).hexdigest()}


def _input(value, root: Path, key: str, required: bool):
    if value is None:
        if required:
            raise DucklingError(f"The sweep spec has no {key!r}: give the tokenized dataset folder to train on "
                                f"({key} = \"tokenized_dataset\", relative to the spec file; build it with "
                                "`duckling build`).")
        return None
    if isinstance(value, (str, Path)):
        path = (root / Path(value).expanduser()).resolve()
        if not path.is_dir():
            raise DucklingError(f"The sweep spec's {key} {str(value)!r} is not a folder ({path} does not exist). "
                                "Paths in a spec file are relative to the spec file; build a dataset with "
                                "`duckling build`.")
        return str(path)
    arr = np.asarray(value)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DucklingError(f"The sweep spec's {key} must be a dataset folder or a (rows, tokens) integer "
                            f"array, not {type(value).__name__} of shape {getattr(arr, 'shape', None)}.")
    return arr


def _mapping(value, root: Path) -> str | None:
    if value is not None:
        path = (root / Path(value).expanduser()).resolve()
        if not path.is_file():
            raise DucklingError(f"The sweep spec's mapping {str(value)!r} is not a file ({path}).")
        return str(path)
    for cand in (root / "token_mapping.json", Path.cwd() / "token_mapping.json"):
        if cand.is_file():
            return str(cand.resolve())
    return None


def _number(value, key: str, lo_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (lo_open and value == 0):
        raise DucklingError(f"[resources] {key} = {value!r} is not valid: it must be a number "
                            f"{'> 0' if lo_open else '>= 0'} (per run; fractions share a device).")
    return float(value)


def check_fuse(value):
    """``[resources] fuse``: "auto", "off" or a group size K >= 1 (the message of training.fused.plan_groups,
    checked here without importing torch)."""
    if value in ("auto", "off") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise DucklingError(f"[resources] fuse = {value!r} is not valid: use \"auto\" (fused groups on a GPU, off on "
                        "CPU), \"off\" (one run per task) or a group size K >= 1 (up to K runs of one shape "
                        "trained as one fused model).")


def _check_names(section: str, table: dict) -> None:
    names = set(DucklingConfig.field_names()) | set(RENAMED)
    for key in table:
        if key not in names:
            try:
                DucklingConfig().override({key: 0})
            except DucklingError as e:  # the config's own "Unknown config field ... Did you mean" message
                raise DucklingError(f"[{section}]: {e}") from None


def _fmt(value) -> str:
    """A swept value as it appears in a run name: short, readable, filesystem-safe."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = repr(value) if value != int(value) or abs(value) >= 1e16 else str(int(value))
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+\-]", "-", text)


def run_name(point: dict, seed: int) -> str:
    """``{"train.weight_decay": 0.1}``, seed 0 -> ``weight_decay=0.1__seed=0`` (the field's last part,
    or the whole dotted name when two swept fields share it)."""
    short = [n.split(".")[-1] for n in point]
    keys = [s if short.count(s) == 1 else n for s, n in zip(short, point)]
    return "__".join([f"{k}={_fmt(v)}" for k, v in zip(keys, point.values())] + [f"seed={seed}"])


def load_spec(spec_or_path) -> Spec:
    """Read and validate a spec (TOML path or dict) and expand it into ``Spec.runs``.

    Raises DucklingError, before anything runs, for: unknown top-level keys or config fields, a
    missing dataset, an empty grid or an empty or non-list grid value, a field both in [base] and
    [grid], bad resources, and any run whose config the config's own checks refuse."""
    text = None
    if isinstance(spec_or_path, dict):
        raw, root = spec_or_path, Path.cwd()
    else:
        path = Path(spec_or_path)
        if not path.is_file():
            raise DucklingError(f"Sweep spec {str(path)!r} not found. A spec is a TOML file; copy one from sweeps/.")
        text = path.read_text(encoding="utf-8")
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise DucklingError(f"Sweep spec {str(path)!r} is not valid TOML: {e}. Dotted names need quotes: "
                                "\"train.weight_decay\" = [0.0, 0.1].") from None
        root = path.resolve().parent
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise DucklingError(f"Unknown sweep spec key(s) {', '.join(map(repr, unknown))}: a spec has "
                            f"{', '.join(TOP_KEYS)}. Config fields go under [base] or [grid] as dotted names.")
    for key in ("base", "grid", "resources"):
        if not isinstance(raw.get(key, {}), dict):
            raise DucklingError(f"[{key}] of a sweep spec must be a table of dotted names, not {raw[key]!r}.")
    base, grid = dict(raw.get("base", {})), dict(raw.get("grid", {}))
    res = dict(raw.get("resources", {}))
    seeds = grid.pop("seeds", None)

    if not grid and seeds is None:
        raise DucklingError("The sweep spec's [grid] is empty: list at least one field's values, e.g. "
                            "\"train.weight_decay\" = [0.0, 0.1], or seeds = [0, 1, 2].")
    for key, values in [*grid.items(), *([("seeds", seeds)] if seeds is not None else [])]:
        if not isinstance(values, list):
            raise DucklingError(f"[grid] {key} = {values!r} must be a list of values, e.g. {key} = [{values!r}] "
                                "(a single value belongs in [base]).")
        if not values:
            raise DucklingError(f"[grid] {key} is an empty list: give at least one value, or remove it.")
        if len({json.dumps(v) for v in values}) != len(values):
            raise DucklingError(f"[grid] {key} = {values!r} lists a value twice.")
    if "train.seed" in grid:
        raise DucklingError("Sweep seeds with [grid] seeds = [0, 1, ...], not \"train.seed\".")
    _check_names("base", base)
    _check_names("grid", grid)
    both = sorted(set(base) & set(grid))
    if both:
        raise DucklingError(f"{', '.join(both)} is set in both [base] and [grid]: keep it in one of them.")
    bad = sorted(set(res) - set(RESOURCE_KEYS))
    if bad:
        raise DucklingError(f"Unknown [resources] key(s) {', '.join(map(repr, bad))}: use cpus and gpus (per run "
                            "or fused group) and fuse.")

    try:
        base_cfg = DucklingConfig().override(base)
    except DucklingError as e:
        raise DucklingError(f"[base]: {e}") from None
    if seeds is None:
        seeds = [base_cfg.train.seed]
    cpus = _number(res.get("cpus", 1), "cpus", lo_open=True)
    gpus = None if "gpus" not in res else _number(res["gpus"], "gpus", lo_open=False)
    if gpus is not None and gpus > 1 and gpus != int(gpus):
        raise DucklingError(f"[resources] gpus = {gpus} is not valid: use a fraction (<= 1) to share a GPU, or "
                            "a whole number of GPUs.")
    n_runs = math.prod(len(v) for v in grid.values()) * len(seeds)
    if n_runs > MAX_RUNS:
        sizes = " x ".join(f"{len(v):,} {k}" for k, v in [*grid.items(), ("seeds", seeds)])
        raise DucklingError(f"The sweep spec's grid has {n_runs:,} runs ({sizes}); a sweep holds at most "
                            f"{MAX_RUNS:,}. Sweep fewer values (or seeds), or split the grid into several specs, "
                            "each with its own --out.")
    spec = Spec(dataset=_input(raw.get("dataset"), root, "dataset", required=True),
                eval_dataset=_input(raw.get("eval_dataset"), root, "eval_dataset", required=False),
                mapping=_mapping(raw.get("mapping"), root), base=base, grid=grid, seeds=list(seeds),
                cpus=cpus, gpus=gpus, fuse=check_fuse(res.get("fuse", "auto")), source_text=text)
    spec.runs = _expand(spec)
    return spec


def _expand(spec: Spec) -> list[Run]:
    runs, names = [], {}
    threads = spec.threads
    for values in itertools.product(*spec.grid.values()):
        point = dict(zip(spec.grid, values))
        for seed in spec.seeds:
            name = run_name(point, seed)
            over = {**spec.base, **point, "train.seed": seed, "train.threads": threads}
            try:
                cfg = DucklingConfig().override(over)
            except DucklingError as e:
                raise DucklingError(f"Run {name}: {e}") from None
            if name in names:
                raise DucklingError(f"Runs {point} and {names[name]} get the same folder name {name!r}: "
                                    "their values differ only in characters a file name cannot hold.")
            names[name] = point
            runs.append(Run(name=name, point=point, seed=seed, cfg=cfg))
    return runs


# ---------------------------------------------------------------- disk
def run_bytes(cfg: DucklingConfig) -> int:
    """Disk a whole run needs (duckling.recording.budget.run_bytes), with the parameter count taken from
    the model (built on the meta device; torch is imported here, not when `duckling compare` loads)."""
    return budget.run_bytes(cfg, _n_params(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True, default=str)))


@functools.lru_cache(maxsize=256)
def _n_params(model_json: str) -> int:
    """Parameter count of one model config (runs of a grid share a few: each is built once)."""
    from duckling.config import ModelConfig
    from duckling.training.model import n_params

    return n_params(ModelConfig(**json.loads(model_json)))


def check_disk(spec: Spec, out: Path | None, todo: list[Run]) -> int:
    """Refuse, before any run starts, runs over their record.budget_gb or a sweep over the free disk of
    ``out`` (None: runs train in node-local scratch, whose disk each run checks itself)."""
    import tempfile

    where = out if out is not None else Path(tempfile.gettempdir())  # a node's scratch is checked again by train()
    for run in todo:
        if run.cfg.record.enabled:
            try:
                budget.check_budget(where, run.cfg.record, run.cfg.train.max_steps,
                                    shape=(run.cfg.model.vocab_size, run.cfg.model.n_embd),
                                    n_matrices=budget.n_matrices(run.cfg))
            except DucklingError as e:
                raise DucklingError(f"Run {run.name}: {e}") from None
    if out is None:  # runs train in each node's scratch (--storage): only the per-run budgets apply
        return 0
    need = sum(run_bytes(r.cfg) for r in todo)
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if need > free:
        raise DucklingError(
            f"The sweep's {len(todo)} remaining runs need about {need / 1e9:.2f} GB (recordings and checkpoints), "
            f"but {probe} has {free / 1e9:.2f} GB free. Record fewer snapshots (\"record.every\" in [base]), "
            "train fewer steps, sweep fewer values, or free disk space.")
    return need
