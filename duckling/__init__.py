"""Duckling II: a tiny GPT-2 research platform for dead-token dynamics.

Public names are imported lazily so that ``import duckling`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CompactTokenizer": "duckling.data.vocab",
    "Recording": "duckling.recording.reader",
    "DucklingConfig": "duckling.config",
    "ModelConfig": "duckling.config",
    "DataConfig": "duckling.config",
    "TrainConfig": "duckling.config",
    "RecordConfig": "duckling.config",
    "build_model": "duckling.training.model",
    "sweep": "duckling.sweeps.engine",
    "compare": "duckling.sweeps.compare",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'duckling' has no attribute {name!r}")
