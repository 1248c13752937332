"""How tests/data/golden/ was made: tiny recordings in every layout duckling has written, and the
values they must read back as (expected.npz).

The recordings were written ONCE, by the writer of commit ae43a52 (the last release that could still
write format 1 and the early format-2 layouts), and committed; today's reader must keep reading them
(tests/test_recording.py) and `duckling compact` must upgrade them (tests/test_recording_v2.py). To
regenerate them (only if the expected values themselves must change), run this script against that
commit's package:

    git worktree add /tmp/duckling-ae43a52 ae43a52
    PYTHONPATH=/tmp/duckling-ae43a52 python tests/data/make_golden.py tests/data/golden

Layouts (docs/recording.md, "Older recordings"):
- v1/            format 1: raw files, chunk_steps snapshots per file
- v2_first/      the first format-2 layout: meta.json has block_steps only (64-row groups, no segments)
- v2_groups16/   the second: group_rows 16 (still no dead_group_rows, no segment_steps)
- v2/            today's layout (group_rows, dead_group_rows, segment_steps), as the previous release
                 wrote it (its meta.json names the recording dtype "precision")
All four hold the same data: 2 matrices (wte, lm_head) of shape (V, d) = (40, 4) with 32 live rows,
stored "mixed" (live rows bf16, dead rows float32), steps 0..12, a snapshot every 2nd step, a probe
every 3rd step, lr NaN at step 0 (as the recorder writes it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

V, D, N_LIVE, STEPS, EVERY, BLOCK = 40, 4, 32, 13, 2, 4
MATRICES = ("wte", "lm_head")


def data():
    """Every input of the recordings, from a fixed seed: {step: (W per matrix, rows, hidden, lr)}."""
    rng = np.random.default_rng(24)
    W = {m: rng.standard_normal((V, D)).astype(np.float32) for m in MATRICES}
    out = []
    for s in range(STEPS):
        W = {m: (w + 1e-2 * rng.standard_normal((V, D))).astype(np.float32) for m, w in W.items()}
        rows = {m: rng.standard_normal((4, V)).astype(np.float32) for m in MATRICES}
        hidden = rng.standard_normal(D).astype(np.float32)
        out.append((W, rows, hidden, np.float32("nan") if s == 0 else np.float32(1e-3 * s)))
    return out


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bf16, widened back to float32 (what a bf16 part reads as)."""
    b = x.astype(np.float32).view(np.uint32)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def write(run_dir: Path, **layout) -> None:
    from duckling.recording.writer import RecordingWriter

    w = RecordingWriter(run_dir, shape=(V, D), n_live=N_LIVE, precision="mixed", every=EVERY,
                        matrices=MATRICES, background=False, **layout)
    for s, (W, rows, hidden, lr) in enumerate(data()):
        w.append_step(s, rows, hidden_mean=hidden, lr=float(lr), snapshot=W if s % EVERY == 0 else None)
        if s % 3 == 0:
            w.append_probe(s, 0.01 * s, 0.001 * s)
    w.close("complete")


def expected() -> dict:
    d = data()
    snap_steps = np.arange(0, STEPS, EVERY)
    out = {"steps": snap_steps, "scalar_steps": np.arange(STEPS),
           "hidden_mean": np.stack([x[2] for x in d]), "lr": np.array([x[3] for x in d], np.float32),
           "probe": np.array([[s, 0.01 * s, 0.001 * s] for s in range(0, STEPS, 3)], np.float32)}
    for m in MATRICES:
        snaps = np.stack([d[s][0][m] for s in snap_steps])
        snaps[:, :N_LIVE] = bf16(snaps[:, :N_LIVE])
        out[f"snapshot_{m}"] = snaps
        out[f"rows_{m}"] = np.stack([d[s][1][m] for s in range(STEPS)])  # (steps, 4 fields, V)
    return out


def main(dest: Path) -> None:
    import duckling.recording.writer as writer

    dest.mkdir(parents=True, exist_ok=True)
    write(dest / "v1", format_version=1, chunk_steps=3)
    write(dest / "v2", block_steps=BLOCK)
    real = writer.layout_keys
    for name, keys in (("v2_first", ("block_steps",)), ("v2_groups16", ("block_steps", "group_rows"))):
        writer.layout_keys = lambda b, keys=keys: {k: v for k, v in real(b).items() if k in keys}
        write(dest / name, block_steps=BLOCK)
    writer.layout_keys = real
    np.savez(dest / "expected.npz", **expected())
    for p in dest.rglob("writer.lock"):
        p.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "golden"))
