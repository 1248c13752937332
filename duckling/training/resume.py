"""What a resume proves before it continues a run: that it is the same run.

- **The recording reaches the checkpoint in every stream** (each W part, the per-row scalars, the
  probe): a stream that stops short, or has a hole, is refused with the steps that are missing and the
  newest checkpoint that the recording does cover. Resuming past a hole would leave a permanent gap.
- **The same computation**: the config (``run_folder.check_run_dir``), and the values the "how"
  fields resolve to here: device, training arithmetic, torch.compile mode and, on CPU, the thread
  count (measured: 1 and 2 threads give different weights after 6 steps, equal ones when repeated).
- **The same data**: the fingerprint of the training rows, and of the evaluation rows, recorded in
  run_info.json when the run started (``duckling.data.rows.rows_fingerprint``).
- **A finished run's recording is finished**: a run killed during its close-time compaction is
  compacted (and marked complete) by the resume, before the run is marked complete.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from duckling.config import DucklingConfig
from duckling.errors import DucklingError
from duckling.files import checkpoints, write_json

# the values a run resolved at its start that must not change on resume: (run_info key, what it is, the flag)
SAME_COMPUTATION = (("device", "the device", "--device"), ("precision", "the training arithmetic", "--compute-dtype"),
                    ("compile", "the torch.compile mode", "--compile"))


def _ranges(steps: np.ndarray, most: int = 4) -> str:
    """'16..31, 40, 48..63' (the first ``most`` runs of consecutive steps, then how many more)."""
    if len(steps) == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(steps) != 1) + 1
    runs = [(int(r[0]), int(r[-1])) for r in np.split(steps, breaks)]
    text = ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs[:most])
    return text + (f" and {len(runs) - most} more ranges" if len(runs) > most else "")


def expected_steps(kind: str, k: int, every: int, probe_every: int, max_steps: int) -> np.ndarray:
    """The steps 0..k a stream of a run recorded up to step k holds (WRecorder's rules): the scalars
    every step; W every ``every`` steps and at max_steps; the probe every ``probe_every`` steps."""
    if kind == "scalars":
        return np.arange(k + 1)
    if kind == "probe":
        return np.arange(0, k + 1, probe_every) if probe_every else np.zeros(0, np.int64)
    snaps = np.arange(0, k + 1, every)
    return np.append(snaps, k) if k >= max_steps and k % every else snaps


def check_recording_reaches(run_dir: Path, cfg: DucklingConfig, ckpt: Path, k: int) -> None:
    """Refuse a resume at step k unless every stream of the recording reaches the last step it should
    hold up to k (``duckling.recording.repair.stream_ends``, which also refuses a missing, foreign or
    misplaced chunk); name the missing steps and the newest checkpoint the recording covers."""
    from duckling.recording.repair import stream_ends

    if not cfg.record.enabled:
        return
    where = Path(run_dir).resolve()
    if not (Path(run_dir) / "recording" / "meta.json").is_file():
        raise DucklingError(f"Cannot resume {where}: its recording is missing (no recording/meta.json) although the "
                            "run records W. Restore the recording folder, or start the run again in a new folder.")
    try:
        ends = stream_ends(run_dir)
    except DucklingError as e:
        raise DucklingError(f"Cannot resume {where} from {ckpt.name}: its recording cannot be checked ({e})") from e
    gaps, first_missing = [], None
    for name, end in ends.items():
        kind = "scalars" if name == "scalars" else "probe" if name == "probe" else "snapshot"
        want = expected_steps(kind, k, cfg.record.every, cfg.record.probe_every, cfg.train.max_steps)
        missing = want[want > (-1 if end is None else end)]
        if len(missing):
            gaps.append(f"{name} ends at {'no step' if end is None else f'step {end}'}, lacks steps {_ranges(missing)}")
            first_missing = int(missing[0]) if first_missing is None else min(first_missing, int(missing[0]))
    if not gaps:
        return
    older = [c for c in checkpoints(run_dir) if int(c.name.split("-")[-1]) < first_missing]
    if older:
        fix = (f"restore the missing files, or resume from {older[-1].name}, the newest checkpoint the recording "
               f"covers: move the checkpoint folders after it out of {where} and run --resume again (the recording "
               "is cut back to that step)")
    else:
        fix = "restore the missing files, or start the run again in a new folder (no checkpoint precedes the gap)"
    raise DucklingError(f"Cannot resume {where} from {ckpt.name}: the recording does not reach step {k} in every "
                        f"stream ({'; '.join(gaps)}), so the resumed run would leave a permanent gap. To continue, "
                        f"{fix}.")


def _latest(old_info: dict) -> dict:
    """The run's values as its last start (or resume) resolved them."""
    resumed = old_info.get("resumed") or [{}]
    return {**old_info, **(resumed[-1] if isinstance(resumed[-1], dict) else {})}


def check_same_run(run_dir: Path, old_info: dict, info: dict) -> None:
    """Refuse a resume whose resolved device, arithmetic, compile mode or (CPU) thread count, or whose
    training / evaluation rows, differ from what the run recorded (runs from before a value was
    recorded are not checked for it)."""
    where = Path(run_dir).resolve()
    was = _latest(old_info)
    diff = [f"{what}: run has {was[key]!r}, now {info[key]!r} ({flag})" for key, what, flag in SAME_COMPUTATION
            if key in was and key in info and was[key] != info[key]]
    if "threads" in was and info.get("device") == "cpu" == was.get("device") and was["threads"] != info["threads"]:
        diff.append(f"CPU threads: run has {was['threads']}, now {info['threads']} (--threads {was['threads']}: the "
                    "thread count changes how sums are split, so later steps would differ in the last bits)")
    if diff:
        raise DucklingError(f"Cannot resume {where}: this machine or these flags would compute it differently "
                            f"({'; '.join(diff)}). A resumed run must compute exactly what the original would have: "
                            "pass the run's values, or start a new run in another folder.")
    if "dataset_fingerprint" not in old_info:  # a run from before fingerprints were recorded
        return
    for key, what, flag in (("dataset_fingerprint", "training dataset", "--dataset"),
                            ("eval_dataset_fingerprint", "evaluation dataset", "--eval-dataset")):
        old, new = old_info.get(key), info.get(key)
        if old == new:
            continue
        if old is None:
            raise DucklingError(f"Cannot resume {where} with an {what}: the run was started without one, so "
                                f"its held-out losses would begin mid-run. Resume without {flag}, or start a "
                                "new run with it.")
        if new is None:
            raise DucklingError(f"Cannot resume {where} without its {what}: the run was started with one "
                                f"({old['rows']:,} rows). Pass the same {flag} again.")
        raise DucklingError(
            f"Cannot resume {where}: the {what} is not the one the run started on (then {old['rows']:,} rows "
            f"of {old['seq_len']} tokens, sha256 {old['sha256'][:12]}; now {new['rows']:,} rows of "
            f"{new['seq_len']}, {new['sha256'][:12]}): it was rebuilt or replaced, so the resumed steps would "
            f"train on other rows. Pass the run's own {what} ({flag}), or start a new run on this one.")


def finish_recording(run_dir: Path, k: int) -> list[str]:
    """Finish the recording of a finished run (step k = max_steps) whose close a kill or a full disk
    interrupted: raw chunks left, a ``.tmp`` block, meta status not ``complete``. Every chunk is
    compacted (``duckling.recording.repair.finish_compaction``), then meta.json says complete. The
    caller holds the run's lock. Returns what was done (empty: nothing to finish)."""
    from duckling.recording.layout import read_meta
    from duckling.recording.repair import finish_compaction

    root = Path(run_dir) / "recording"
    meta = read_meta(root)
    done = finish_compaction(root, upto=k, tails=True)
    if done or meta.get("status") != "complete" or meta.get("last_step") != k:
        write_json(root / "meta.json", {**read_meta(root), "status": "complete", "last_step": k})
        done.append("marked the recording complete")
    return done


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint was saved at (its trainer_state.json), or a DucklingError naming the file."""
    import json

    path = Path(ckpt) / "trainer_state.json"
    try:
        step = json.loads(path.read_text())["global_step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"global_step {step!r}")
        return step
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DucklingError(_damaged(path, e)) from e


def _damaged(path: Path, e: BaseException) -> str:
    ckpt = path.parent
    done = checkpoints(ckpt.parent)
    older = [c.name for c in done[:done.index(ckpt)]] if ckpt in done else []
    then = (f"resume again from {older[-1]}, the checkpoint before it" if older else
            "start the run again in a new folder (no earlier checkpoint is left)")
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return (f"The checkpoint file {path.resolve()} is damaged ({type(e).__name__}{': ' + detail if detail else ''}), "
            f"so {ckpt.name} cannot be resumed. Move the folder {ckpt.name} out of {ckpt.parent.resolve()} and "
            f"{then}.")


def check_checkpoint(ckpt: Path) -> None:
    """Read every file the Trainer will load from ``ckpt`` (the weights with safetensors, the optimizer,
    scheduler and RNG states with torch.load): a truncated or garbage file is a DucklingError naming it,
    not a traceback from inside the Trainer."""
    import torch
    from safetensors.torch import load_file

    checkpoint_step(ckpt)
    weights = Path(ckpt) / "model.safetensors"
    if not weights.is_file():
        raise DucklingError(_damaged(weights, FileNotFoundError("the file is missing")))
    try:
        load_file(weights, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, or OSError
        raise DucklingError(_damaged(weights, e)) from e
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        path = Path(ckpt) / name
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a damaged zip or pickle: RuntimeError, EOFError, UnpicklingError...
            raise DucklingError(_damaged(path, e)) from e
