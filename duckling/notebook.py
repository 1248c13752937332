"""What only the notebooks in ``notebooks/`` need: paths that work from any working directory,
display defaults, a one-line machine description, a few plot and result helpers.

Everything else a notebook does is a call into the package: ``DucklingConfig().override(OVERRIDES)``
for the config (every default lives in ``duckling/config.py``), ``duckling.data.build`` for counting,
packing and loading, ``duckling.training.train`` for training, ``duckling.analysis.plots`` for the dead-token figures.
Tables are pandas DataFrames.

Paths: a notebook's kernel may start in ``notebooks/`` (jupyter lab, ``papermill --cwd notebooks``),
at the repo root, or in any folder of the repo holding a copied notebook. ``path()`` turns a
parameter into a path that works from there: an absolute path stays; a relative one is taken from
the kernel's working directory if it starts with ``..`` or exists there, else from the repo root
(where new files and folders go). Paths come back relative to the working directory, so nothing
a notebook prints names a folder of the machine it ran on; error messages name absolute paths.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from duckling.analysis.plots import DPI
from duckling.config import TrainConfig
from duckling.errors import DucklingError
from duckling.files import write_json
from duckling.training.trainer import pick_device

FIGSIZE = (6, 3.5)  # inline figures of 600 x 350 px (at plots.DPI) keep a committed notebook small


# ---------------------------------------------------------------- set-up and paths
def _cell(v) -> str:
    """A float as a table shows it: 4 significant digits, thousands separators, large values whole."""
    return "nan" if not np.isfinite(v) else f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def setup(seed: int = 0, dpi: int = DPI) -> None:
    """Quiet, reproducible notebook defaults: small inline figures, 4-digit floats in DataFrames,
    seeded numpy/torch, warnings without file paths, no per-call transformers chatter."""
    import warnings

    # The default format starts with the warning's source file: an absolute path of this machine.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{cat.__name__}: {msg}\n"
    # tqdm falls back to text bars without ipywidgets; that is fine, the warning about it is noise.
    warnings.filterwarnings("ignore", message="IProgress not found")
    import matplotlib as mpl
    import pandas as pd
    import torch
    from transformers.utils import logging as hf_logging

    mpl.rcParams.update({"figure.dpi": dpi, "savefig.dpi": dpi, "figure.figsize": FIGSIZE})
    pd.set_option("display.float_format", _cell)
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


def path(p, default=None, must_exist: bool = False) -> Path | None:
    """A notebook parameter as a usable path (see the module docstring); None -> ``default``
    (typically the config's value, e.g. ``cfg.data.dataset_dir``), and None if both are None.
    Idempotent: a path it returned comes back unchanged. ``must_exist``: a DucklingError naming
    the absolute paths looked at when neither exists."""
    if p is None:
        if default is None:
            return None
        p = default
    p = Path(p).expanduser()
    root = repo_root()
    if p.is_absolute() or root is None or p.parts[0] == ".." or p.exists():
        found = p  # as written: absolute, or relative to the working directory
    else:
        found = _display((root / p).resolve())
    if must_exist and not found.exists():
        looked = sorted({str(Path(os.getcwd(), p).resolve()), str(Path(os.getcwd(), found).resolve())})
        raise DucklingError(f"{str(p)!r} not found: looked for {' and '.join(looked)}. Relative paths are "
                            "taken from the notebook's folder when they start with '..' or exist there, else "
                            "from the repo root.")
    return found


def source(data) -> Path | str | None:
    """A ``DATA`` parameter for ``duckling.data.build``: None ($DUCKLING_DATA, else the hub) and ``"sample"``
    (the text bundled with the package) pass through; anything else is a text file or folder that
    must exist (``path``)."""
    if data is None or (isinstance(data, str) and data == "sample"):
        return data
    return path(data, must_exist=True)


def new_run_dir(name: str, run_dir=None) -> Path:
    """``run_dir`` if given (it must not hold a run yet: train() refuses to overwrite one), else a
    fresh ``runs/<name>-<YYYYmmdd-HHMMSS>`` under the repo root, so re-running never collides."""
    if run_dir is not None:
        return path(run_dir)
    return path(None, default=Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def machine(device: str | None = None) -> str:
    """One line naming the hardware a notebook ran on, for its provenance (device None = the config's)."""
    import torch

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


# ---------------------------------------------------------------- results
def final_loss(result, key: str = "loss") -> float:
    """The last logged ``loss`` (mean over the last logging window) or ``eval_loss`` of a
    TrainResult; NaN when none was logged (a run shorter than ``logging_steps``)."""
    values = result.losses(key)[1]
    return float(values[-1]) if len(values) else float("nan")


def logged(run_dir, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a quantity the Trainer logged in a finished run folder (a sweep's run):
    ``loss`` (training, mean over each logging window) or ``eval_loss``, from final/trainer_state.json."""
    state = Path(run_dir) / "final" / "trainer_state.json"
    if not state.is_file():
        raise DucklingError(f"{state.resolve()} not found: the run has not finished. Run (or resume) it first.")
    pts = [(h["step"], h[key]) for h in json.loads(state.read_text())["log_history"] if key in h]
    return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)


# ---------------------------------------------------------------- figures and files
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


def _jsonable(x):
    if hasattr(x, "to_dict") and hasattr(x, "columns"):  # a DataFrame: its rows
        return _jsonable(x.to_dict("records"))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()  # (non-finite floats become null in write_json)
    if isinstance(x, Path):
        return x.as_posix()
    return x


def save_json(file, obj) -> Path:
    """Write ``obj`` (numpy values, DataFrames as lists of rows, paths and NaN allowed: NaN becomes
    null) as JSON; returns the path."""
    file = path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, _jsonable(obj))
    return file
