"""The recording's layout (docs/recording.md): the files and meta.json keys of today's format, checked
before they are trusted; the recording dtype's parts and bf16 bits. numpy only."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from duckling.config import RECORD_DTYPES, VOCAB_SIZE, ModelConfig
from duckling.errors import DucklingError
from duckling.recording.manifest import NAME as MANIFEST, Manifest
from duckling.recording.streams import Stream

FORMAT = 2  # meta.json's format_version of today's layout (format 1 is read by v1.py)
SUBDIR = "recording"
SHAPE = (VOCAB_SIZE, ModelConfig.n_embd)  # W: (V, d)
FIELDS = ("norm", "update_norm", "grad_norm", "adam_v")  # per-row scalars, in record order
PROBE_COLUMNS = ("step", "dead_mass", "max_dead_prob")
KNOWN_MATRICES = ("wte", "lm_head")
BLOCK_STEPS = 64  # records per block: 64 gives 95% of 256's ratio and decodes 4x faster
GROUP_ROWS = 16  # rows of W per zstd frame: a trajectory of a few rows decodes only their groups.
# Measured on a real run (docs/recording.md): 16 rows keep 98.6% of 64 rows' ratio and decode a
# 16-row trajectory 3x faster.
DEAD_GROUP_ROWS = 1  # dead rows get a frame each: their trajectories are what the research reads.
# Measured (docs/recording.md): 1-row frames cost the dead rows 10-19% of their ratio, and a 16-row
# dead trajectory decodes 16x fewer bytes.
# Every key of today's meta.json (docs/recording.md lists them); the reader requires each one.
META_KEYS = ("format_version", "matrices", "shape", "dtype", "every", "n_live", "n_dead", "fields",
             "probe_columns", "block_steps", "group_rows", "dead_group_rows", "segment_steps", "status")
LAYOUT_KEYS = ("block_steps", "group_rows", "dead_group_rows", "segment_steps")


# --- bf16 as raw uint16 bits -------------------------------------------------------------------
def put_values(out: np.ndarray, stored: np.ndarray, ext: str) -> None:
    """out (float32, same shape) = the stored values: bf16 bits (ext "u16") widened exactly into
    float32's high half in one pass, or float32 as is."""
    if ext == "u16":
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = stored


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest even, like torch) and return the raw uint16 bits."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a NaN (the rounding could carry it into inf)
        rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    """Raw bf16 bits (uint16) -> float32, exactly."""
    u = np.asarray(u, dtype=np.uint16)
    out = np.empty(u.shape, np.float32)
    put_values(out, u, "u16")
    return out


def snapshot_parts(dtype: str, n_rows: int, n_live: int) -> list[tuple[str, slice, type]]:
    """How one snapshot of a (n_rows, d) matrix is split into streams: [(ext, row slice, dtype)]."""
    if dtype == "bf16":
        return [("u16", slice(0, n_rows), np.uint16)]
    if dtype == "float32":
        return [("f32", slice(0, n_rows), np.float32)]
    if dtype == "mixed":  # live rows bf16, dead rows float32
        return [("u16", slice(0, n_live), np.uint16), ("f32", slice(n_live, n_rows), np.float32)]
    raise DucklingError(f"unknown recording dtype {dtype!r}: use one of {', '.join(RECORD_DTYPES)}.")


# --- meta.json ---------------------------------------------------------------------------------
def layout_keys(block_steps: int) -> dict:
    """meta.json's block layout for a new recording with blocks of ``block_steps`` records. Its
    "segment_steps" is half a block: the records after the anchor go in frames of that many, so a
    random snapshot decompresses the anchor and one half of its block."""
    return {"block_steps": int(block_steps), "group_rows": GROUP_ROWS, "dead_group_rows": DEAD_GROUP_ROWS,
            "segment_steps": max(1, int(block_steps) // 2)}


def new_meta(matrices, shape, n_live: int, dtype: str, every: int, block_steps: int, extra=None) -> dict:
    """Today's meta.json for a new recording (``extra``: the run's facts, informational)."""
    return {"format_version": FORMAT, "matrices": list(matrices), "shape": [int(x) for x in shape],
            "dtype": dtype, "every": int(every), "n_live": int(n_live), "n_dead": int(shape[0] - n_live),
            "fields": list(FIELDS), "probe_columns": list(PROBE_COLUMNS), **layout_keys(block_steps),
            **(extra or {}), "manifest": MANIFEST, "status": "recording"}


def rec_dir(run_dir) -> Path:
    """RUN/recording, given the run folder (or a recording folder itself: one holding meta.json)."""
    p = Path(run_dir)
    return p if (p / "meta.json").exists() else p / SUBDIR


def read_meta(root: Path) -> dict:
    """meta.json as a dict. The previous release named the dtype "precision": read as "dtype"."""
    if not (root / "meta.json").exists():
        raise DucklingError(f"no recording at {root} (meta.json missing). Pass a run folder that was "
                            f"trained with recording enabled.")
    if not stat.S_ISREG(os.stat(root / "meta.json").st_mode):  # (a FIFO would block the read)
        raise DucklingError(f"{root}/meta.json is not a regular file; restore the run's original meta.json.")
    return parse_meta(root, (root / "meta.json").read_bytes())


def parse_meta(root, raw: bytes) -> dict:
    """meta.json's bytes as a dict (read_meta; remote.py reads them from a storage)."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DucklingError(f"{root}/meta.json is not valid JSON ({e}); restore it from a copy.") from None
    if not isinstance(meta, dict):
        raise DucklingError(f"{root}/meta.json is not a recording description (a JSON object); restore it.")
    if "format_version" in meta and type(meta["format_version"]) is not int:
        raise DucklingError(f"{root}/meta.json is not a valid recording description (format_version "
                            f"{meta['format_version']!r}: expected an integer). It was edited or damaged; restore it "
                            f"from the run's original meta.json.")
    if "dtype" not in meta and "precision" in meta:
        meta["dtype"] = meta.pop("precision")
    return meta


def older_layout(meta: dict) -> str | None:
    """What older layout ``meta`` describes ("format 1", "an early format-2 layout"), None if today's."""
    if meta.get("format_version") == 1:
        return "format 1"
    if meta.get("format_version") == FORMAT and any(k not in meta for k in LAYOUT_KEYS[1:]):  # not in the first ones
        return "an early format-2 layout"
    return None


def _bad(root, what: str) -> DucklingError:
    return DucklingError(f"{root}/meta.json is not a valid recording description ({what}). It was "
                         f"edited or damaged; restore it from the run's original meta.json.")


def check_meta(root, meta: dict, required=META_KEYS) -> None:
    """Refuse metadata that would make the reader open the wrong files or the wrong shapes: every key
    of ``required`` present, each one valid."""
    for key in required:
        if key not in meta:
            raise DucklingError(f"{root}/meta.json has no {key!r}: every key of a recording's meta.json is "
                                f"required (docs/recording.md). It was edited or damaged; restore it from the "
                                f"run's original meta.json.")
    mats = meta["matrices"]
    if not isinstance(mats, list) or not mats or len(set(mats)) != len(mats) \
            or any(m not in KNOWN_MATRICES for m in mats):
        raise _bad(root, f"matrices {mats!r}: expected distinct names from {KNOWN_MATRICES}")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int and x > 0 for x in shape)):
        raise _bad(root, f"shape {shape!r}: expected [V, d] positive integers")
    n_live = meta["n_live"]
    if type(n_live) is not int or not 0 <= n_live <= shape[0]:
        raise _bad(root, f"n_live {n_live!r}: expected an integer in 0..{shape[0]}")
    if meta["dtype"] not in RECORD_DTYPES:
        raise _bad(root, f"dtype {meta['dtype']!r}: expected one of {RECORD_DTYPES}")
    for key, want in (("n_dead", shape[0] - n_live), ("fields", list(FIELDS)), ("probe_columns", list(PROBE_COLUMNS))):
        if key in required and meta[key] != want:
            raise _bad(root, f"{key} {meta[key]!r}: expected {want!r}")
    for key in ("every", *LAYOUT_KEYS):
        if key in required and (type(meta[key]) is not int or meta[key] < 1):
            raise _bad(root, f"{key} {meta[key]!r}: expected a positive integer")


def _row_widths(rows: slice, n_live: int, d: int, group: int, dead_group: int) -> list[int]:
    """Column group sizes of a stream holding rows ``rows`` of W: live rows in groups of ``group``
    rows, dead rows (ids >= n_live) in groups of ``dead_group``."""
    out = []
    for lo, hi, g in ((rows.start, min(rows.stop, n_live), group), (max(rows.start, n_live), rows.stop, dead_group)):
        out += [min(g, hi - r) * d for r in range(lo, hi, g)]
    return out


def make_streams(root, meta: dict, stream=Stream, manifest: Manifest | None = None) -> tuple[dict, Stream, Stream]:
    """({(matrix, ext): snapshot stream}, scalars stream, probe stream) of a checked meta.json; ``stream``
    and ``manifest``: remote.py's, for a recording in a storage."""
    V, d = meta["shape"]
    B, n_m, G = meta["block_steps"], len(meta["matrices"]), meta["group_rows"]
    parts = snapshot_parts(meta["dtype"], V, meta["n_live"])
    widths = {ext: _row_widths(sl, meta["n_live"], d, G, meta["dead_group_rows"]) for ext, sl, _ in parts}
    man = manifest if manifest is not None else Manifest(root, expected=meta.get("manifest") == MANIFEST)  # one per recording, shared by its streams
    snaps = {(m, ext): stream(root, f"{m}.{ext}", (sl.stop - sl.start) * d, dt, widths[ext], B,
                              meta["segment_steps"], manifest=man)
             for m in meta["matrices"] for ext, sl, dt in parts}
    scalars = stream(root, "scalars", n_m * 4 * V + d + 1, np.float32, [V] * (4 * n_m) + [d + 1], B,
                     manifest=man, positional=True)
    probe = stream(root, "probe", 2, np.float32, [2], B, manifest=man)
    return snaps, scalars, probe
