"""Shared test set-up: offline tiktoken cache, the shared TinyStories text when present, and the
``slow`` marker: ``python -m pytest -q -m "not slow"`` is the fast tier (no notebook runs, no Ray
sweep, no quickstart, no kill/restart subprocesses, no torch.compile); ``python -m pytest -q`` runs
everything."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

_cache = SHARED / "tiktoken-cache"
if not os.environ.get("TIKTOKEN_CACHE_DIR") and _cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one torch/OpenMP thread each, here and
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # in every process they start (spinning threads on a busy
    os.environ.setdefault("MKL_NUM_THREADS", "1")  # machine made steps ~20x slower: test_notebooks.one_thread)


def pytest_configure(config):
    if config.getoption("dist", default="no") == "loadgroup" and not os.environ.get("PYTEST_XDIST_WORKER"):
        _check_loadgroup_works()
    config.addinivalue_line("markers", "slow: seconds or more each (notebooks, Ray sweeps, the quickstart, "
                            "kill/restart subprocesses, compiled graphs); deselect with -m \"not slow\"")


def _check_loadgroup_works():
    """pytest-xdist (3.8) groups tests for ``--dist loadgroup`` by renaming each item's ``_nodeid``; pytest
    9.2 keeps the id elsewhere, and the groups are then silently ignored (the Ray modules' fixtures were
    built on both workers and two test clusters ran at once). Stop instead."""
    import inspect

    from _pytest.nodes import Node

    if "_nodeid" not in inspect.getsource(Node.nodeid.fget):
        raise pytest.UsageError(f"--dist loadgroup does not group tests with pytest {pytest.__version__} and this "
                                "pytest-xdist: install the dev extra's versions (pip install -e '.[dev]', pytest<9.2).")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tok(repo_root):
    """The committed compact tokenizer; skipped only where tiktoken's gpt2 files cannot be had."""
    from duckling.errors import DucklingError
    from duckling.data.vocab import CompactTokenizer, get_encoding

    try:
        get_encoding()
    except DucklingError as e:  # offline, with no tiktoken cache
        pytest.skip(str(e))
    return CompactTokenizer.from_file(repo_root / "token_mapping.json")
