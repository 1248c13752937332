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
from duckling.files import checkpoints

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


def stream_steps(run_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{stream name: (kind, every step it holds)} of a run's recording, read from the files (block
    headers and raw trailers; nothing is written)."""
    from duckling.recording.layout import check_meta, make_streams, older_layout, read_meta

    root = Path(run_dir) / "recording"
    if not (root / "meta.json").is_file():
        raise DucklingError(f"Cannot resume {Path(run_dir).resolve()}: its recording is missing ({root} holds no "
                            "meta.json) although the run records W. Restore the recording folder, or start the run "
                            "again in a new folder.")
    meta = read_meta(root)
    if older_layout(meta):
        raise DucklingError(f"Cannot resume {Path(run_dir).resolve()}: its recording is {older_layout(meta)}, "
                            f"written by an earlier duckling. Upgrade it in place with `duckling compact {run_dir}` "
                            "(lossless, verified), then resume.")
    check_meta(root, meta)
    snaps, scalars, probe = make_streams(root, meta)
    out = {st.name: ("snapshot", st.scan()[1]) for st in snaps.values()}
    out[scalars.name] = ("scalars", scalars.scan()[1])
    out[probe.name] = ("probe", probe.scan()[1])
    return out


def check_recording_reaches(run_dir: Path, cfg: DucklingConfig, ckpt: Path, k: int) -> None:
    """Refuse a resume at step k unless every stream of the recording holds every step it should up
    to k; name the missing steps and the newest checkpoint the recording covers."""
    if not cfg.record.enabled:
        return
    where = Path(run_dir).resolve()
    try:
        streams = stream_steps(run_dir)
    except DucklingError as e:
        if str(e).startswith("Cannot resume"):
            raise
        raise DucklingError(f"Cannot resume {where}: its recording cannot be read ({e})") from e
    gaps, first_missing = [], None
    for name, (kind, have) in streams.items():
        want = expected_steps(kind, k, cfg.record.every, cfg.record.probe_every, cfg.train.max_steps)
        missing = np.setdiff1d(want, have)
        if len(missing):
            gaps.append(f"{name} lacks steps {_ranges(missing)}")
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


def finish_recording(run_dir: Path, k: int) -> bool:
    """Finish the recording of a finished run whose close was interrupted (raw chunks left, a
    ``.tmp`` block, meta status not complete): opened for appending at step k (its last) and closed, which
    compacts every chunk and marks it complete. Returns whether there was anything to finish."""
    from duckling.recording.layout import read_meta
    from duckling.recording.writer import RecordingWriter

    root = Path(run_dir) / "recording"
    if not (root / "meta.json").is_file():
        return False
    meta = read_meta(root)
    if meta.get("status") == "complete" and not any(root.glob("*.raw")) and not any(root.glob("*.tmp")):
        return False
    w = RecordingWriter(run_dir, shape=tuple(meta["shape"]), n_live=meta["n_live"], dtype=meta["dtype"],
                        every=meta["every"], matrices=tuple(meta["matrices"]), resume_step=k,
                        block_steps=meta["block_steps"], defer=True)
    w.close("complete")
    return True


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
