"""``duckling quickstart``: the whole pipeline on the bundled sample, offline, in ~75 s on 2 CPU cores.

It builds the 500-story TinyStories sample (duckling/sample/) into 512-token rows with the committed
vocabulary, trains the default Duckling for 1,000 steps with W recorded after every step,
writes the dead-token report, and prints a summary with the commands for the full run. Nothing is
downloaded: the sample, a copy of token_mapping.json and GPT-2's BPE file ship inside the package.

    OUT/token_mapping.json    the committed mapping (from duckling/sample/token_mapping.json.gz)
    OUT/dataset/              the sample's tokenized rows (duckling build)
    OUT/run/                  the run and its every-step recording (duckling train)
    OUT/run/report/           the figures and summary.json (duckling report)
    OUT/quickstart.json       the summary below; its presence marks a finished quickstart
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

from duckling.config import DucklingConfig
from duckling.data.build import build_dataset
from duckling.data.vocab import CompactTokenizer
from duckling.errors import DucklingError
from duckling.files import write_atomic, write_json
from duckling.recording.budget import recording_bytes

# Sized for ~75 s on 2 CPU cores: on this project's idle 2-core AMD EPYC, a fresh clone ran it in 75 s
# wall, 68 s of it training at 15.1 steps/s with every-step recording (docs/benchmarks.md); at the ~8 steps/s of
# a slower or busier 2-core machine, ~2 min. The recording (format 2: compressed bf16 W + float32 row
# scalars) takes a few hundred MB for 1,000 steps (2,695-3,769 snapshots per GB at 300-2,000 steps in
# docs/benchmarks.md); the summary prints its real size. Before it starts, the run's disk check
# reserves the uncompressed bound, duckling.recording.budget.recording_bytes (~2.26 GB for 1,000 steps).
DEFAULT_STEPS = 1000
SUMMARY_FILE = "quickstart.json"
BUNDLED_MAPPING = Path(__file__).parent / "sample" / "token_mapping.json.gz"  # == the repo's token_mapping.json

# The report's headline numbers (duckling.analysis.report summary keys), with what each one says.
HEADLINE = {
    "dead_norm_over_null": "mean dead-row norm / its pure-weight-decay value (1 = dead rows only decay)",
    "dead_mean_pairwise_cosine": "mean cosine between dead rows (0 = unrelated directions)",
    "drift_cosine_to_neg_mean_hidden": "cosine of the mean dead-row displacement with -(mean final hidden state)",
    "drift_cosine_to_neg_mean_live": "cosine of the mean dead-row displacement with -(mean live row)",
    "detect_auroc_norm": "AUROC of -||w|| for dead vs live rows (0.5 = chance, < 0.5: dead rows are larger)",
    "dead_output_mass": "softmax probability the model puts on all dead tokens together",
}
FULL_STEPS = 10_000


def _disk_check_gb(steps: int) -> float:
    """What the disk check reserves for the recording of a default run of ``steps`` steps (GB): its
    uncompressed bound (duckling.recording.budget.recording_bytes), not what the recording will take."""
    cfg = DucklingConfig()
    return recording_bytes(cfg.record, steps, (cfg.model.vocab_size, cfg.model.n_embd)) / 1e9


# Measured: 1.97 GB for the 10,001 snapshots of a default 10K-step run (docs/results/cpu_10k/recording_stats.json).
FULL_RUN_GB = 1.97
FULL_RUN = [
    "duckling build --out tokenized_dataset      # TinyStories from the hub (or --data PATH for local text)",
    f"duckling train --dataset tokenized_dataset --run runs/main --max-steps {FULL_STEPS}   # ~{FULL_RUN_GB:.0f} GB "
    f"of recording; the disk check wants ~{_disk_check_gb(FULL_STEPS):.0f} GB free (it counts the recording uncompressed)",
    "duckling report runs/main",
]


def quickstart_config(steps: int, out: Path):
    """The default config, shortened to ``steps`` (the linear lr decay reaches 0 at the last step)."""
    return DucklingConfig().override({
        "train.max_steps": steps,
        "train.logging_steps": max(1, steps // 60),  # ~60 points on the loss curve
        "train.save_steps": steps + 1,  # no resume checkpoint: a quickstart is rerun, not resumed
        "record.probe_every": max(1, steps // 30),  # ~30 points on the dead-output-mass curve
        "data.source": "sample",
        "data.mapping_path": str(out / "token_mapping.json"),
        "data.dataset_dir": str(out / "dataset"),
    })


def _write_mapping(path: Path) -> Path:
    """Unpack the bundled copy of token_mapping.json to ``path`` (atomically)."""
    try:
        write_atomic(path, gzip.decompress(BUNDLED_MAPPING.read_bytes()))
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DucklingError(f"Could not unpack the bundled token mapping {str(BUNDLED_MAPPING)!r} into {str(path)!r} "
                            f"({e}). Check that the folder is writable, or reinstall duckling (pip install -e .).") from e
    return path


def _finished(out: Path, steps: int | None) -> dict | None:
    """The summary of a finished quickstart in ``out``, None for a new/empty folder; refuses anything else."""
    done = out / SUMMARY_FILE
    if done.is_file():
        try:
            old = json.loads(done.read_text())
            old_steps = int(old["steps"])
        except (ValueError, KeyError, TypeError) as e:
            raise DucklingError(f"{str(done)!r} is unreadable ({type(e).__name__}); delete {str(out)!r} "
                                "to run the quickstart again there, or pass another --out.") from e
        if steps is not None and steps != old_steps:
            raise DucklingError(
                f"{str(out)!r} already holds a finished {old_steps}-step quickstart. To train {steps} steps, pass "
                f"a new folder (--out {out}-{steps}) or delete this one.")
        return old
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DucklingError(
            f"{str(out)!r} exists and holds no finished quickstart (no {SUMMARY_FILE}): an interrupted quickstart, "
            "or something else. The quickstart only writes into a new or empty folder: pass another --out, or "
            "delete that folder if it is an interrupted quickstart.")
    return None


def quickstart(out="runs/quickstart", steps: int | None = None, progress: bool = True) -> dict:
    """Build the bundled sample, train ``steps`` (default DEFAULT_STEPS) with every-step recording,
    write the report; return the summary (also saved as OUT/quickstart.json).

    A folder that already holds a finished quickstart is not trained again: its summary comes back
    with ``reused=True`` (a different ``steps`` there is refused: pass a new ``out``)."""
    # torch and matplotlib: only for a quickstart that runs (`duckling build` imports this module too)
    from duckling.analysis.report import report
    from duckling.training.train import train

    out = Path(out)
    old = _finished(out, steps)
    if old is not None:
        return {**old, "reused": True}
    steps = DEFAULT_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DucklingError(f"--steps must be a positive whole number of training steps, not {steps!r}.")
    cfg = quickstart_config(steps, out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tok = CompactTokenizer.from_file(_write_mapping(out / "token_mapping.json"))
    built = build_dataset("sample", tok, cfg.data.dataset_dir, progress=progress)
    t1 = time.perf_counter()
    result = train(cfg, dataset=cfg.data.dataset_dir, run_dir=out / "run", tokenizer=tok, progress=progress)
    t2 = time.perf_counter()
    S = report(out / "run")
    t3 = time.perf_counter()

    losses = [(e["step"], e["loss"]) for e in result.log_history if "loss" in e]
    report_dir = out / "run" / "report"
    summary = {
        "out": str(out), "dataset_dir": cfg.data.dataset_dir, "run_dir": str(out / "run"),
        "report_dir": str(report_dir),
        "steps": result.global_step, "recorded_steps": S["n_snapshots"], "device": result.device,
        "steps_per_s": result.steps_per_s,
        "recording_bytes": sum(f.stat().st_size for f in (out / "run" / "recording").iterdir()),
        "seconds": {"build": round(t1 - t0, 1), "train": round(t2 - t1, 1), "report": round(t3 - t2, 1),
                    "total": round(t3 - t0, 1)},
        "data": {k: built[k] for k in ("source", "n_stories", "n_rows", "n_tokens", "unk_fraction")},
        "loss": {"first_logged_step": losses[0][0] if losses else None,
                 "first_logged": losses[0][1] if losses else None,
                 "final": S.get("final_train_loss")},
        "headline": {k: S.get(k) for k in HEADLINE},
        "figures": [str(report_dir / f) for f in S["figures"]],
        "full_run": FULL_RUN,
        "reused": False,
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def format_headline(S: dict) -> list[str]:
    """A report summary's headline numbers (HEADLINE), rounded, each with what it says; and its final
    losses when it has them (``duckling report`` and the quickstart print these lines)."""
    lines = []
    loss = ", ".join(f"{what} {_fmt(S[k])}" for k, what in (("final_train_loss", "training"),
                                                            ("final_eval_loss", "held-out")) if S.get(k) is not None)
    if loss:
        lines.append(f"loss at the last logged step: {loss}")
    lines.append("dead tokens at the last step:")
    lines += [f"  {k} = {_fmt(S.get(k))}   ({what})" for k, what in HEADLINE.items()]
    return lines


def format_summary(d: dict) -> str:
    """The summary as the few lines ``duckling quickstart`` prints."""
    lines = []
    if d.get("reused"):
        lines.append(f"{d['out']} already holds a finished quickstart (pass --out NEW to train again):")
    data, loss, sec = d["data"], d["loss"], d["seconds"]
    lines += [
        f"data: {data['n_stories']:,} bundled TinyStories stories -> {data['n_rows']:,} rows of 512 tokens "
        f"(unk {data['unk_fraction']:.2%}, no dead ids)",
        f"trained {d['steps']:,} steps on {d['device']} in {sec['train']:.0f} s ({_fmt(d['steps_per_s'])} steps/s), "
        f"W recorded after every step ({d['recorded_steps']:,} snapshots, {d['recording_bytes'] / 1e9:.2f} GB); "
        f"total {sec['total']:.0f} s",
        f"loss: {_fmt(loss['first_logged'])} at step {_fmt(loss['first_logged_step'])} -> {_fmt(loss['final'])} "
        f"at step {d['steps']}",
        *format_headline(d["headline"]),
        f"figures ({len(d['figures'])} PNGs) and summary.json: {d['report_dir']}",
        "This was a short run on a small sample. The full run (needs the Hugging Face hub or local text):",
        *(f"  {c}" for c in d["full_run"]),
    ]
    return "\n".join(lines)
