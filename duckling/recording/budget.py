"""The disk a run needs, in one place: its recording (an upper bound), its checkpoints and final model,
and the check that refuses a run before its first step when they do not fit ``record.budget_gb`` or
the free disk. Constant memory whatever the number of steps; numpy only.

The parameter count comes from the model itself (``duckling.training.model.n_params``): the callers in
training and sweeps pass it in, since recording never imports training."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from duckling.config import N_LIVE, DucklingConfig
from duckling.errors import DucklingError
from duckling.recording.layout import BLOCK_STEPS, FIELDS, SHAPE, snapshot_parts

RAW_TRAILER = 16  # bytes after each raw record (step, crc32, magic)
BLOCK_SLACK = 1.01  # the scratch of one compaction: its block, bounded with room to spare
FRAME_BYTES = 32  # at most per zstd frame besides its data: magic, header, checksum, one block header
GROUP_BYTES = 4 * FRAME_BYTES + 64  # per column group of a block: its frames (anchor, 2 ranges) + JSON


def n_snapshot_steps(start: int, end: int, every: int) -> int:
    """How many snapshot steps lie in (start, end]: multiples of ``every``, plus the last step ``end``
    (arithmetic, constant memory whatever the number of steps)."""
    if end <= start:
        return 0
    return end // every - start // every + (end % every != 0)


def _block_overhead(n_blocks: int, n_groups: int, payload_bytes: int, block_steps: int) -> int:
    """Upper bound of what n_blocks blocks add to their records' bytes: incompressible data is stored
    raw by zstd (+3 bytes per 128 KB), each frame adds at most FRAME_BYTES, each block its header."""
    return n_blocks * (n_groups * GROUP_BYTES + block_steps * 24 + 512) + 3 * (payload_bytes // 131072 + n_blocks)


def recording_bytes(record_cfg, n_steps: int, shape=SHAPE, n_live: int = N_LIVE,
                    n_matrices: int = 1, start_step: int = 0, every: int | None = None,
                    block_steps: int = BLOCK_STEPS, scratch: bool = True) -> int:
    """Bytes a recording of steps ``start_step..n_steps`` can add to disk (step 0 included if start
    is 0), constant memory. An upper bound: every record counted raw (compression's ratio is unknown
    before the run) plus the most a block can add to its records (frame and header bytes, as if every
    row were its own column group and nothing compressed), plus the scratch of the largest compaction
    (a block is written next to its raw chunk before the chunk is deleted; one at a time) at
    ``BLOCK_SLACK`` x its raw size (``scratch=False``: the bound of the finished recording)."""
    n_rows, d = shape
    every = every or record_cfg.every
    n_snap = n_snapshot_steps(start_step, n_steps, every) + (start_step == 0)
    n_scalar = n_steps - start_step + (start_step == 0)
    per_snap = sum((sl.stop - sl.start) * d * np.dtype(dt).itemsize
                   for _, sl, dt in snapshot_parts(record_cfg.dtype, n_rows, n_live)) + RAW_TRAILER
    per_scalar = n_matrices * len(FIELDS) * n_rows * 4 + d * 4 + 4 + RAW_TRAILER  # rows + hidden + lr
    n_probe = (n_scalar // record_cfg.probe_every + 1) if record_cfg.probe_every else 0
    scratch = 0 if not scratch else BLOCK_SLACK * max(min(block_steps, n_snap) * n_matrices * per_snap,  # one compaction at a time
                                min(block_steps, n_scalar) * per_scalar) + 65536
    blocks = lambda n: -(-n // block_steps)  # noqa: E731
    framing = (_block_overhead(blocks(n_snap) * n_matrices, n_rows, n_snap * n_matrices * per_snap, block_steps)
               + _block_overhead(blocks(n_scalar), 4 * n_matrices + 1, n_scalar * per_scalar, block_steps)
               + _block_overhead(blocks(n_probe), 1, n_probe * 8, block_steps))
    return int(n_snap * n_matrices * per_snap + n_scalar * per_scalar + n_probe * (8 + RAW_TRAILER) + framing + scratch)


def model_files_bytes(cfg: DucklingConfig, n_params: int) -> int:
    """Checkpoints (weights + Adam's two moments, float32, + scheduler/rng/state files; the Trainer
    saves before it rotates, so save_total_limit + 1 at a time) and final/ (the weights)."""
    ckpt = 12 * n_params + (1 << 20)
    n_ckpt = min(cfg.train.save_total_limit + 1, cfg.train.max_steps // cfg.train.save_steps + 1)
    return n_ckpt * ckpt + 4 * n_params + (1 << 20)


def n_matrices(cfg: DucklingConfig) -> int:
    """Matrices a run records: W, plus the output matrix when the embeddings are untied."""
    return 1 if cfg.model.tie_word_embeddings else 2


def run_bytes(cfg: DucklingConfig, n_params: int, n_live: int = N_LIVE) -> int:
    """Disk a whole run needs: its recording (if enabled) plus checkpoints and final/."""
    rec = 0
    if cfg.record.enabled:
        rec = recording_bytes(cfg.record, cfg.train.max_steps, shape=(cfg.model.vocab_size, cfg.model.n_embd),
                              n_live=n_live, n_matrices=n_matrices(cfg))
    return rec + model_files_bytes(cfg, n_params)


def free_bytes(path) -> int:
    """Free bytes on the disk that holds ``path`` (or would hold it: its first existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_budget(run_dir, record_cfg, n_steps: int, shape=SHAPE, n_live: int = N_LIVE,
                 n_matrices: int = 1, start_step: int = 0, extra_bytes: int = 0) -> int:
    """Refuse (DucklingError) a recording that exceeds ``record_cfg.budget_gb`` or the free disk.

    ``extra_bytes``: what else the run writes (checkpoints, the final model), counted against both.
    Returns the bytes needed. The error names the bytes and the smallest stride that fits.
    Constant memory, O(log n_steps) time.
    """
    args = dict(shape=shape, n_live=n_live, n_matrices=n_matrices, start_step=start_step)
    need = recording_bytes(record_cfg, n_steps, **args) + extra_bytes  # + checkpoints and final model
    budget = int(record_cfg.budget_gb * 1e9)
    free = free_bytes(run_dir)
    limit = min(budget, free)
    if need <= limit:
        return need
    what = f"the budget of {record_cfg.budget_gb:g} GB (RecordConfig.budget_gb / --budget-gb)" \
        if budget <= free else f"the free disk space at {run_dir} ({free / 1e9:.2f} GB)"
    fits = lambda k: recording_bytes(record_cfg, n_steps, every=k, **args) + extra_bytes <= limit  # noqa: E731
    lo, hi = record_cfg.every, max(n_steps, 1)  # smallest stride that fits (bytes fall as k grows)
    stride = None
    if fits(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        stride = lo
    hint = (f"record every {stride}th step (--record-every {stride}, RecordConfig.every) or train "
            f"fewer steps" if stride else "train fewer steps (the per-step scalars alone do not fit)")
    raise DucklingError(
        f"recording {n_steps - start_step} steps as {record_cfg.dtype} every {record_cfg.every} step(s) "
        f"needs {need / 1e9:.2f} GB ({need} bytes), more than {what}. To fit, {hint}, use a smaller "
        f"record dtype (--record-dtype), or raise the budget / free disk space.")


def check_run_disk(run_dir, cfg: DucklingConfig, n_params: int, start: int = 0, record: bool = True,
                   shape=None, n_live: int = N_LIVE) -> int:
    """A whole run's disk (recording + checkpoints + final model) against record.budget_gb and the free
    disk; without recording, the checkpoints and the final model against the free disk. Returns the
    bytes needed."""
    extra = model_files_bytes(cfg, n_params)
    if record:
        return check_budget(run_dir, cfg.record, cfg.train.max_steps,
                            shape=shape or (cfg.model.vocab_size, cfg.model.n_embd), n_live=n_live,
                            n_matrices=n_matrices(cfg), start_step=start, extra_bytes=extra)
    free = free_bytes(run_dir)
    if extra > free:
        raise DucklingError(f"Checkpoints and the final model need {extra / 1e9:.2f} GB but {Path(run_dir).resolve()} "
                            f"has {free / 1e9:.2f} GB free. Free disk space or lower train.save_total_limit.")
    return extra
