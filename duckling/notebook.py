"""What the notebooks in ``notebooks/`` share: paths, config overrides, data preparation, timing,
small loss plots and result files. Notebooks stay short; anything one needs twice lives here.

Paths: a notebook's kernel may start in ``notebooks/`` (jupyter lab, ``papermill --cwd notebooks``),
at the repo root, or in any folder of the repo holding a copied notebook. ``path()`` turns a
parameter into a path that works from there: an absolute path stays; a relative one is taken from
the kernel's working directory if it starts with ``..`` or exists there, else from the repo root
(where new files and folders go). Paths come back relative to the working directory, so nothing
a notebook prints names a folder of the machine it ran on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .config import DataConfig, DucklingConfig
from .errors import DucklingError

FIGSIZE = (6, 3.5)
DPI = 90  # inline figures of ~540 x 315 px keep a committed notebook small


# ---------------------------------------------------------------- set-up and paths
def setup(seed: int = 0, dpi: int = DPI) -> None:
    """Quiet, reproducible notebook defaults: small inline figures, seeded numpy/torch, warnings
    without file paths, no per-call transformers chatter."""
    import warnings

    # The default format starts with the warning's source file: an absolute path of this machine.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{cat.__name__}: {msg}\n"
    # tqdm falls back to text bars without ipywidgets; that is fine, the warning about it is noise.
    warnings.filterwarnings("ignore", message="IProgress not found")
    import matplotlib as mpl
    import torch
    from transformers.utils import logging as hf_logging

    mpl.rcParams.update({"figure.dpi": dpi, "savefig.dpi": dpi, "figure.figsize": FIGSIZE})
    np.random.seed(seed)
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()


def repo_root(start=None) -> Path | None:
    """The Duckling checkout holding ``start`` (default: the working directory), else the one the
    ``duckling`` package was imported from, else None (an installed package outside a checkout)."""
    def is_root(p: Path) -> bool:
        return (p / "pyproject.toml").is_file() and (p / "duckling" / "__init__.py").is_file()

    here = Path(start or os.getcwd()).resolve()
    for p in (here, *here.parents):
        if is_root(p):
            return p
    pkg = Path(__file__).resolve().parents[1]
    return pkg if is_root(pkg) else None


def _display(p: Path) -> Path:
    """``p`` (absolute) relative to the working directory, so that printing it names no machine folder."""
    try:
        return Path(os.path.relpath(p, os.getcwd()))
    except ValueError:  # another drive on Windows
        return p


def path(p, default=None) -> Path | None:
    """A notebook parameter as a usable path (see the module docstring); None -> ``default``,
    and None if both are None. Idempotent: a path it returned comes back unchanged."""
    if p is None:
        if default is None:
            return None
        p = default
    p = Path(p).expanduser()
    root = repo_root()
    if p.is_absolute() or root is None or p.parts[0] == ".." or p.exists():
        return p  # as written: absolute, or relative to the working directory
    return _display((root / p).resolve())


def new_run_dir(name: str, run_dir=None) -> Path:
    """``run_dir`` if given (it must not hold a run yet: train() refuses to overwrite one), else a
    fresh ``runs/<name>-<YYYYmmdd-HHMMSS>`` under the repo root, so re-running never collides."""
    if run_dir is not None:
        return path(run_dir)
    return path(None, default=Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def machine(device: str | None = None) -> str:
    """One line naming the hardware a notebook ran on, for its provenance (device None = the config's)."""
    import torch

    from .config import TrainConfig
    from .train import pick_device

    dev = pick_device(device or TrainConfig().device)
    if dev == "cuda":
        name = torch.cuda.get_device_name()
    elif dev == "mps":
        name = f"Apple GPU (MPS), {platform.machine()}"
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return (f"{dev}: {name}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, {platform.system()}")


# ---------------------------------------------------------------- config overrides
def make_config(*, model=None, data=None, train=None, record=None, context=None, steps=None,
                device=None) -> DucklingConfig:
    """DucklingConfig defaults with overrides: dicts per section (None values are ignored), plus
    shortcuts ``context`` (model context and packed row length together), ``steps`` and ``device``.
    A misspelt field is a DucklingError that lists the valid ones."""
    base = DucklingConfig()
    train = {**(train or {}), "max_steps": steps, "device": device}
    model, data = dict(model or {}), dict(data or {})
    if context is not None:
        model["n_positions"], data["seq_len"] = context, context
    parts = {}
    for name, over in (("model", model), ("data", data), ("train", train), ("record", record or {})):
        section = getattr(base, name)
        over = {k: v for k, v in over.items() if v is not None}
        valid = {f.name for f in dataclasses.fields(section)}
        bad = sorted(set(over) - valid)
        if bad:
            raise DucklingError(f"Unknown {name} setting(s) {bad}. Valid {name} settings: {sorted(valid)} "
                                f"(see duckling/config.py).")
        parts[name] = dataclasses.replace(section, **over)
    cfg = DucklingConfig(**parts)
    if cfg.data.seq_len > cfg.model.n_positions:
        raise DucklingError(f"data.seq_len {cfg.data.seq_len} exceeds the model context "
                            f"{cfg.model.n_positions}: set both with context=N.")
    return cfg


def overrides(cfg: DucklingConfig) -> dict:
    """``{"section.field": value}`` for every setting of ``cfg`` that differs from the defaults."""
    base, new = DucklingConfig().to_dict(), cfg.to_dict()
    return {f"{s}.{k}": v for s in new for k, v in new[s].items() if base[s].get(k) != v}


# ---------------------------------------------------------------- data
def load_tokenizer(mapping=None):
    """The token mapping at ``mapping`` (default: the committed ``token_mapping.json``)."""
    from .vocab import CompactTokenizer

    return CompactTokenizer.from_file(path(mapping, DataConfig().mapping_path))


def build_mapping(data=None, out=None, max_stories: int | None = None):
    """Count GPT-2 tokens over ``data`` and build a compact mapping from the counts (as
    ``duckling vocab`` does); saved to ``out`` when given. Returns (tokenizer, counts (50257,))."""
    from .data import count_tokens, describe_source, resolve_source
    from .vocab import CompactTokenizer

    source = resolve_source(path(data))
    stats: dict = {}
    counts = count_tokens(source, max_stories=max_stories, stats=stats)
    prov = {"corpus": describe_source(source), "source": describe_source(source), "n_stories": stats["n_stories"],
            "n_tokens": int(counts.sum()), "text_sha256": stats["sha256"]}
    if max_stories:
        prov["max_stories"] = max_stories
    tok = CompactTokenizer.from_counts(counts, prov)
    if out is not None:
        out = path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(out)
    return tok, counts


def prepare_data(data=None, *, seq_len: int | None = None, dataset_dir=None, mapping=None,
                 max_stories: int | None = None, split: str = "train", progress: bool = False):
    """(tokenizer, dataset folder): load the token mapping (default: the committed one) and build
    the tokenized dataset unless it is already up to date (``build_dataset`` is idempotent).

    data: a text file or folder; None = $DUCKLING_DATA, else the hub's TinyStories."""
    from .data import build_dataset

    defaults = DataConfig()
    tok = load_tokenizer(mapping)
    out = path(dataset_dir, defaults.dataset_dir)
    build_dataset(path(data), tok, out, seq_len=seq_len or defaults.seq_len, split=split,
                  max_stories=max_stories, progress=progress)
    return tok, out


def text_rows(data, tok, seq_len: int | None = None, max_rows: int | None = None,
              split: str = "validation") -> np.ndarray | None:
    """Held-out text as packed (N, seq_len) uint16 rows in memory (for ``train(eval_dataset=)``);
    None when ``data`` is None. Stories are encoded like ``build_dataset`` does (EOT after each)."""
    if data is None:
        return None
    from .data import encode_stream, iter_stories, resolve_source

    seq_len = seq_len or DataConfig().seq_len
    need = None if max_rows is None else max_rows * seq_len
    parts, n = [], 0
    for ids in encode_stream(iter_stories(resolve_source(path(data), split)), tok.lut, num_proc=1):
        parts.append(ids)
        n += len(ids)
        if need is not None and n >= need:
            break
    flat = np.concatenate(parts)
    rows = len(flat) // seq_len if need is None else min(len(flat) // seq_len, max_rows)
    if rows == 0:
        raise DucklingError(f"The held-out text holds {len(flat)} tokens, fewer than one {seq_len}-token row.")
    return flat[: rows * seq_len].reshape(rows, seq_len)  # (N, T)


# ---------------------------------------------------------------- timing
def _time_budget_class():
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stops training after ``seconds`` of wall-clock and notes when each step ended.

        ``seconds_at(steps)``: seconds since training began at those steps; ``steps_per_s``: over
        all steps but the first (warm-up). Two device syncs per run, none per step."""

        def __init__(self, seconds: float | None):
            self.seconds, self.device = seconds, "cpu"
            self.t0, self.steps, self.times = None, [], []

        def _sync(self):
            import torch

            if self.device == "cuda":
                torch.cuda.synchronize()
            elif self.device == "mps":
                torch.mps.synchronize()

        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                self.device = next(model.parameters()).device.type
            self.t0, self.steps, self.times = time.perf_counter(), [], []

        def on_step_end(self, args, state, control, **kw):
            first = not self.times
            over = self.seconds is not None and time.perf_counter() - self.t0 >= self.seconds
            if first or over or state.global_step >= state.max_steps:
                self._sync()
            self.steps.append(state.global_step)
            self.times.append(time.perf_counter() - self.t0)
            if over:
                control.should_training_stop = True

        def seconds_at(self, steps) -> np.ndarray:
            return np.interp(np.asarray(steps, float), self.steps, self.times)

        @property
        def steps_per_s(self) -> float:
            if len(self.times) < 2:
                return float("nan")
            return (self.steps[-1] - self.steps[0]) / (self.times[-1] - self.times[0])

    return TimeBudget


def time_budget(seconds: float | None = None):
    """A TrainerCallback for ``train(callbacks=[...])``: per-step wall-clock, and an optional stop
    after ``seconds`` (a sweep that gives every setting the same time)."""
    return _time_budget_class()(seconds)


def final_loss(result, key: str = "loss") -> float:
    """The last logged ``loss`` (mean over the last logging window) or ``eval_loss`` of a
    TrainResult; NaN when none was logged (a run shorter than ``logging_steps``)."""
    values = result.losses(key)[1]
    return float(values[-1]) if len(values) else float("nan")


# ---------------------------------------------------------------- figures and results
def plot_curves(curves: dict, xlabel: str = "training step", ylabel: str = "training loss",
                title: str = "", logx: bool = False, logy: bool = False, hline=None, ax=None):
    """Line plot of ``{label: (x, y)}``; ``hline=(y, label)`` draws a reference level. Returns the
    Figure (drawn into ``ax`` when given, for side-by-side panels)."""
    from matplotlib.figure import Figure

    fig = ax.figure if ax is not None else Figure(figsize=FIGSIZE, layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    for label, (x, y) in curves.items():
        ax.plot(x, y, lw=1.2, marker="o" if len(x) < 12 else None, ms=3, label=str(label))
    if hline is not None:
        ax.axhline(hline[0], color="black", ls="--", lw=0.8, label=hline[1])
    ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if logx else "linear", yscale="log" if logy else "linear")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def panels(n: int = 2):
    """A Figure of ``n`` side-by-side axes at the notebooks' size: (fig, axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0] * (1 + 0.5 * (n - 1)), FIGSIZE[1]), layout="constrained")
    return fig, fig.subplots(1, n)


def smooth(y, k: int) -> np.ndarray:
    """Centred moving average over ``k`` values (no lag on a falling curve); the window shrinks
    symmetrically near both ends, so the first and last values are kept as they are."""
    y = np.asarray(y, np.float64)
    c = np.cumsum(np.r_[0.0, y])
    i = np.arange(len(y))
    h = np.minimum(max(1, int(k)) // 2, np.minimum(i, len(y) - 1 - i))  # half-width at each point
    return (c[i + h + 1] - c[i - h]) / (2 * h + 1)


class Table:
    """A list of dicts shown as a table: HTML in a notebook, aligned text elsewhere (no pandas).

    Floats are shown with ``digits`` significant digits; ``rows`` keeps the raw values."""

    def __init__(self, rows: list[dict], digits: int = 4):
        self.rows, self.digits = [dict(r) for r in rows], digits
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r))

    def _cell(self, v) -> str:
        if isinstance(v, (float, np.floating)):
            return "nan" if not np.isfinite(v) else f"{v:,.{self.digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    def _grid(self) -> list[list[str]]:
        return [[self._cell(r.get(c)) for c in self.columns] for r in self.rows]

    def __repr__(self) -> str:
        grid = [list(map(str, self.columns))] + self._grid()
        width = [max(len(row[j]) for row in grid) for j in range(len(self.columns))]
        return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, width)) for row in grid)

    def _repr_html_(self) -> str:
        from html import escape

        head = "".join(f"<th>{escape(str(c))}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in row) + "</tr>" for row in self._grid())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Path):
        return x.as_posix()
    return x


def save_json(file, obj) -> Path:
    """Write ``obj`` (numpy values, paths and NaN allowed: NaN becomes null) as JSON; returns the path."""
    file = path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    os.replace(tmp, file)
    return file
