"""Dataset build speed vs bare tiktoken, and peak memory of a ~2 GB build.

    python benchmarks/tokenize.py [--quick] [--ratio-mb 100] [--scale-gb 2.0] [--rounds 3] [--num-proc N]

1. ratio: one text file (shared TinyStories stories resampled, or generated stories on a fresh
   clone) is tokenized by (a) a bare ``encode_ordinary_batch`` loop over the stories, already in
   memory, with num_threads = cores, and (b) ``build_dataset`` end to end (read, encode on encoder
   threads, map to compact ids, pack, write Arrow, save_to_disk, dead-id check). Each is timed
   --rounds times, alternating, and the fastest of each is kept, so load from other processes hits
   both; CPU seconds are compared too, as a load-insensitive cross-check.
2. scale: a ~2 GB corpus file is built by ``duckling build`` in a subprocess whose process tree
   is polled with psutil; the peak of the summed RSS is reported.
"""
from __future__ import annotations

import os
import sys

# This file's name shadows the stdlib's `tokenize` (numpy imports it): drop its folder from the path first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
if not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")

from duckling import CompactTokenizer  # noqa: E402
from duckling.data.build import EOT_TEXT, _batches, build_dataset, iter_stories, resolve_source  # noqa: E402
from duckling.data.vocab import get_encoding  # noqa: E402


def seed_stories() -> list[str]:
    train = SHARED / "data/tinystories/train"
    if train.is_dir() and any(train.glob("*.txt")):
        return list(iter_stories(resolve_source(train)))
    rng = random.Random(0)
    words = "the a little dog cat girl boy park ball tree happy sad big red saw played ran said mom".split()
    return [f"Once upon a time, {' '.join(rng.choices(words, k=rng.randint(50, 250)))}." for _ in range(2000)]


def make_corpus(path: Path, stories: list[str], n_bytes: float, seed: int = 0) -> int:
    """Resample stories (with replacement) into a file of about n_bytes; returns its size."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_bytes:
            block = "".join(f"{s}\n{EOT_TEXT}\n" for s in rng.choices(stories, k=1000))
            f.write(block)
            written += len(block.encode())
    return path.stat().st_size


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def bare_loop(batches: list[list[str]], threads: int) -> tuple[float, float]:
    """(wall s, cpu s) of encode_ordinary_batch over every story (text already in memory)."""
    enc = get_encoding()
    t0, c0 = time.perf_counter(), _cpu()
    for b in batches:
        enc.encode_ordinary_batch(b, num_threads=threads)
    return time.perf_counter() - t0, _cpu() - c0


def pipeline(path: Path, tok, out: Path, num_proc: int) -> tuple[float, float]:
    """(wall s, cpu s) of build_dataset end to end: read, encode, map, pack, write, save, check."""
    t0, c0 = time.perf_counter(), _cpu()
    with contextlib.redirect_stdout(io.StringIO()):
        build_dataset(path, tok, out, num_proc=num_proc, force=True, progress=False)
    return time.perf_counter() - t0, _cpu() - c0


def peak_rss_build(path: Path, out: Path, mapping: Path, num_proc: int) -> tuple[float, float, float]:
    """(peak summed RSS of the build's process tree in GB, peak of one process in GB, seconds)."""
    import psutil

    cmd = [sys.executable, "-m", "duckling.cli", "build", "--data", str(path), "--out", str(out),
           "--mapping", str(mapping), "--force", "--num-proc", str(num_proc)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [ps, *ps.children(recursive=True)]]
        except psutil.Error:
            continue
        peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"build failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return peak_sum / 1e9, peak_one / 1e9, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small corpora; finishes in under a minute")
    ap.add_argument("--ratio-mb", type=float, default=None, help="text for the ratio (default 100, quick 12)")
    ap.add_argument("--scale-gb", type=float, default=None, help="corpus for peak RSS (default 2.0, quick 0.05)")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating")
    a = ap.parse_args()
    ratio_mb = a.ratio_mb or (12 if a.quick else 100)
    scale_gb = a.scale_gb or (0.05 if a.quick else 2.0)
    mapping = REPO / "token_mapping.json"
    tok = CompactTokenizer.from_file(mapping)
    stories = seed_stories()
    with tempfile.TemporaryDirectory(prefix="duckling-tokbench-") as tmp:
        tmp = Path(tmp)
        size = make_corpus(tmp / "ratio.txt", stories, ratio_mb * 1e6)
        batches = list(_batches(iter_stories(resolve_source(tmp / "ratio.txt"))))
        raw, built = [], []
        for r in range(a.rounds):  # alternate (and swap the order) so background load hits both
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                if which == 0:
                    raw.append(bare_loop(batches, a.num_proc))
                else:
                    built.append(pipeline(tmp / "ratio.txt", tok, tmp / "ds", a.num_proc))
        del batches
        mb = size / 1e6
        raw_wall, build_wall = min(t for t, _ in raw), min(t for t, _ in built)
        raw_cpu, build_cpu = min(c for _, c in raw), min(c for _, c in built)
        print(f"cores: {a.num_proc}  ratio text: {mb:.1f} MB  rounds: {a.rounds} (best of each kept)")
        print(f"raw_tiktoken_mb_per_s: {mb / raw_wall:.2f}  (wall {', '.join(f'{t:.1f}s' for t, _ in raw)})")
        print(f"build_mb_per_s: {mb / build_wall:.2f}  (wall {', '.join(f'{t:.1f}s' for t, _ in built)})")
        print(f"build_vs_raw_cpu_ratio: {raw_cpu / build_cpu:.3f}  (CPU s per MB, raw/build: less sensitive to load)")
        print(f"build_vs_raw_tiktoken_ratio: {raw_wall / build_wall:.3f}")
        (tmp / "ratio.txt").unlink()
        size = make_corpus(tmp / "scale.txt", stories, scale_gb * 1e9, seed=1)
        peak, one, secs = peak_rss_build(tmp / "scale.txt", tmp / "scale_ds", mapping, a.num_proc)
        print(f"scale corpus: {size / 1e9:.2f} GB, built in {secs:.0f}s ({size / 1e6 / secs:.1f} MB/s)")
        print(f"scale_peak_rss_one_process_gb: {one:.2f}")
        print(f"scale_peak_rss_gb: {peak:.2f}")


if __name__ == "__main__":
    main()
