"""How long does `duckling report` take, relative to reading the recording once?

Synthesizes a recording (default 5,000 steps of an 8192 x 128 bf16 W) with RecordingWriter, or
reuses a complete one under --dir (a real training run's folder works too), then times
  read:   format 1: `cat` of every recording file to /dev/null. Format 2 (compressed): `cat` of every
          file plus decoding every block of every stream once (every snapshot and every per-step
          scalar back to its exact bits, in this process, the codec's two decode threads) - the cost
          of getting the recording's content into memory once, which for a compressed recording
          is no longer the cost of its bytes alone
  report: `python -m duckling.cli report RUN --out ...` (a fresh process, imports included)
both from a cold page cache (the files are evicted with posix_fadvise(DONTNEED) before each, which
needs no root), and prints report_vs_read_ratio: report time / read time. Target <= 3.

    python benchmarks/analysis.py            # 5,000 steps under /tmp (builds once, ~10 GB of disk)
    python benchmarks/analysis.py --quick    # 300 steps, well under a minute
"""
from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0], and a sibling named like a stdlib module
# (benchmarks/tokenize.py) would shadow it: import from the repo instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from duckling.config import N_LIVE, VOCAB_SIZE, DucklingConfig  # noqa: E402
from duckling.recording.reader import Recording  # noqa: E402
from duckling.recording.writer import RecordingWriter  # noqa: E402


def synthesize(run: Path, steps: int, precision: str, seed: int = 0) -> None:
    """A recording with the qualitative physics of a real run: AdamW decay on every row, a common
    drift of dead rows against a fixed mean hidden direction, random-walk updates of live rows."""
    cfg = DucklingConfig()
    cfg.train.max_steps = steps
    tr, d = cfg.train, cfg.model.n_embd
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    rng = np.random.default_rng(seed)
    W = rng.normal(0, cfg.model.initializer_range, (VOCAB_SIZE, d)).astype(np.float32)  # (V, d)
    h = rng.normal(size=d).astype(np.float32)  # mean hidden direction
    w = RecordingWriter(run, shape=W.shape, n_live=N_LIVE, dtype=precision)
    nan = np.full(VOCAB_SIZE, np.nan, np.float32)
    w.append_step(0, {"wte": np.stack([np.linalg.norm(W, axis=1), np.zeros(VOCAB_SIZE), nan, nan])},
                  snapshot={"wte": W})
    w.append_probe(0, 0.25, 1e-4)
    for t in range(1, steps + 1):
        lr = tr.learning_rate * (steps - t + 1) / steps  # linear decay, as HF's scheduler
        old = W.copy()
        W *= 1 - lr * tr.weight_decay
        W[:N_LIVE] += lr * rng.standard_normal((N_LIVE, d), np.float32)
        W[N_LIVE:] -= lr * np.sign(h + 0.3 * rng.standard_normal(d, np.float32))
        g = np.abs(rng.standard_normal(VOCAB_SIZE, np.float32)) * 1e-3
        rows = np.stack([np.linalg.norm(W, axis=1), np.linalg.norm(W - old, axis=1), g, g * g])
        hm = h + 0.1 * rng.standard_normal(d, np.float32)
        w.append_step(t, {"wte": rows}, hidden_mean=hm, lr=lr, snapshot={"wte": W})
        if t % cfg.record.probe_every == 0:
            w.append_probe(t, 0.25 * np.exp(-t / 500), 1e-3 * np.exp(-t / 500))
        if t % 500 == 0:
            print(f"  synthesized {t}/{steps} steps", flush=True)
    w.close()


def decode_everything(run: Path) -> int:
    """Format 2: decode every block (and check every raw record) of every stream once; values decoded."""
    from duckling.recording.layout import make_streams

    rec = Recording(run)
    snaps, scalars, probe = make_streams(rec.root, rec.meta)
    n = 0
    for st in [*snaps.values(), scalars, probe]:
        chunks, steps = st.scan()
        for c, (kind, k) in enumerate(chunks):
            data = st.decode_all(c)[0] if kind == "blk" else st.raw_records(c, k)[0]
            n += data.size
    return n


def evict(files) -> None:
    """Drop the files from the page cache so the next read comes from disk."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--quick", action="store_true", help="300 steps (a minute)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "float32", "mixed"])
    ap.add_argument("--dir", default=None, help="run folder (default /tmp/duckling-bench-analysis-<steps>-<precision>)")
    ap.add_argument("--warm", action="store_true", help="skip the page-cache eviction (measure warm reads)")
    ap.add_argument("--max-points", type=int, default=None,
                    help="passed to duckling report (default: its own; 0 = every recorded step)")
    a = ap.parse_args()
    steps = 300 if a.quick else a.steps
    run = Path(a.dir or f"/tmp/duckling-bench-analysis-{steps}-{a.precision}")
    try:
        ok = Recording(run).scalar_steps[-1] == steps and Recording(run).meta.get("status") == "complete"
    except Exception:
        ok = False
    if not ok:
        shutil.rmtree(run, ignore_errors=True)
        print(f"synthesizing a {steps}-step {a.precision} recording in {run}", flush=True)
        t0 = time.perf_counter()
        synthesize(run, steps, a.precision)
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        print(f"reusing the recording in {run}")
    files = sorted(p for p in (run / "recording").iterdir() if p.is_file())
    nbytes = sum(p.stat().st_size for p in files)

    if not a.warm:
        evict(files)
    fmt = Recording(run).meta["format_version"]
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    if fmt == 2:
        decode_everything(run)
    t_read = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as out:
        if not a.warm:
            evict(files)
        t0 = time.perf_counter()
        extra = [] if a.max_points is None else ["--max-points", str(a.max_points)]
        subprocess.run([sys.executable, "-m", "duckling.cli", "report", str(run), "--out", out, *extra],
                       check=True, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
        t_report = time.perf_counter() - t0
        n_png = len(list(Path(out).glob("*.png")))
    print(f"recording: {steps} steps, {a.precision}, format {fmt}, {nbytes / 1e9:.2f} GB in {len(files)} files "
          f"({'warm' if a.warm else 'cold'} page cache)")
    how = "cat + decode every block" if fmt == 2 else "cat"
    print(f"read ({how}): {t_read:.2f} s = {nbytes / 1e9 / t_read:.2f} GB/s on disk")
    print(f"duckling report{' --max-points ' + str(a.max_points) if a.max_points is not None else ''}: "
          f"{t_report:.2f} s ({n_png} figures)")
    print(f"report_vs_read_ratio: {t_report / t_read:.2f}")


if __name__ == "__main__":
    main()
