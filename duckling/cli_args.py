"""The ``duckling`` command's arguments: every subcommand's parser, with the flags generated from
``config.py``'s field metadata (``duckling.cli`` holds the handlers)."""
from __future__ import annotations

import argparse

from duckling import config as C
from duckling.analysis.metrics import MAX_POINTS
from duckling.quickstart import DEFAULT_STEPS

# Fields whose shorthand flag appears on `duckling train` (the rest are reachable with --set).
TRAIN_SECTIONS = ("model", "data", "train", "record")
# Deprecated flags (one release): flag -> dotted name.
DEPRECATED_FLAGS = {"train_precision": ("--train-precision", "train.compute_dtype", "--compute-dtype"),
                    "precision": ("--precision", "record.dtype", "--record-dtype")}


def _flag_fields(cls) -> list:
    import dataclasses

    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _add_field_flags(parser, prefix: str, cls) -> None:
    """One ``--flag`` per field with a ``flag`` in its metadata: help shows the default and range."""
    for f in _flag_fields(cls):
        m = f.metadata
        parser.add_argument(f"--{m['flag']}", dest=f"set:{prefix}.{f.name}", default=None, metavar="VALUE",
                            help=f"{m['help']} [{prefix}.{f.name}; default {f.default!r}; {C._range(m)}]")


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {s!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, not {v}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = C.DataConfig()
    p = argparse.ArgumentParser(prog="duckling", allow_abbrev=False, description=(
        "Duckling II: build the compact-vocabulary dataset, train with per-step W recording, report on "
        "dead tokens, generate, and run sweeps. `duckling COMMAND --help` lists a command's options."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser
    sub.add_parser = lambda *a, **kw: add(*a, allow_abbrev=False, **kw)  # a typo of a flag is an error, not a prefix

    s = sub.add_parser("vocab", help="count GPT-2 tokens over a corpus and write token_mapping.json")
    s.add_argument("--data", help="text file or folder of .txt files, or 'sample' (default: $DUCKLING_DATA, else the hub)")
    s.add_argument("--out", default=d.mapping_path, help=f"mapping file to write (default {d.mapping_path})")
    s.add_argument("--max-stories", type=_positive_int("--max-stories"), default=None, help="use only the first N stories")
    s.add_argument("--name", default=None, help="corpus name recorded in the mapping's provenance")
    s.add_argument("--num-proc", type=_positive_int("--num-proc"), default=None, help="worker processes (default: all cores)")
    s.add_argument("--force", action="store_true", help="overwrite an existing mapping file")

    s = sub.add_parser("build", help="tokenize and pack a corpus into a dataset folder")
    s.add_argument("--data", help="text file or folder of .txt files, or 'sample' (default: $DUCKLING_DATA, else the hub)")
    s.add_argument("--out", default=d.dataset_dir, help=f"dataset folder (default {d.dataset_dir})")
    s.add_argument("--mapping", default=d.mapping_path, help=f"token mapping (default {d.mapping_path})")
    s.add_argument("--split", default=d.split, help=f"which split to build (default {d.split}): the hub's split, or "
                   "for local text the subfolder of --data named for it (train/, validation/ or valid/, test/); a "
                   "plain text file or folder given with --data is the split named")
    s.add_argument("--seq-len", type=_positive_int("--seq-len"), default=C.ModelConfig().n_positions,
                   help=f"tokens per row = the model's context (default {C.ModelConfig().n_positions})")
    s.add_argument("--max-stories", type=_positive_int("--max-stories"), default=None, help="use only the first N stories")
    s.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    s.add_argument("--num-proc", type=_positive_int("--num-proc"), default=None, help="worker processes (default: all cores)")

    s = sub.add_parser("train", help="train a Duckling and record W at every step",
                       description="Train a Duckling into a new run folder (or --resume one). Every config "
                       "field can be set with --set section.field=VALUE (repeatable); the common ones have "
                       "the shorthand flags below. Values are TOML scalars: 1e-4, 4, true, \"text\".")
    s.add_argument("--run", required=True, help="run folder: created (must not exist or be empty) unless --resume")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override any config field by its dotted name, e.g. --set train.weight_decay=0.1")
    s.add_argument("--resume", action="store_true", help="continue the run folder from its last checkpoint")
    s.add_argument("--eval-dataset", default=None, help="tokenized validation set for the held-out loss (refused "
                   "when it shares rows with the training set)")
    s.add_argument("--allow-eval-overlap", action="store_true",
                   help="accept an --eval-dataset that shares rows with the training set [train.allow_eval_overlap=true]")
    s.add_argument("--no-record", action="store_true", help="train without recording W [record.enabled=false]")
    s.add_argument("--untied", action="store_true",
                   help="untied input/output embeddings, the control [model.tie_word_embeddings=false]")
    for section in TRAIN_SECTIONS:
        _add_field_flags(s, section, C.SECTIONS[section])
    s.add_argument("--train-precision", dest="train_precision", default=None, help=argparse.SUPPRESS)
    s.add_argument("--precision", dest="precision", default=None, help=argparse.SUPPRESS)

    s = sub.add_parser("generate", help="generate text from a trained run")
    s.add_argument("--run", required=True, help="run folder")
    s.add_argument("prompt", help="text to continue")
    s.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    _add_field_flags(s, "generate", C.GenerateConfig)

    s = sub.add_parser("report", help="write every dead-token figure and summary.json for a run")
    s.add_argument("run", help="run folder, or a run in a storage (fsspec URI: s3://bucket/sweep/RUN), read block by block")
    s.add_argument("--out", default=None, help="default: RUN/report (required for a run in a storage: a local folder)")
    s.add_argument("--max-points", type=int, default=MAX_POINTS,
                   help=f"snapshot steps evaluated per curve, evenly spaced (default {MAX_POINTS}; 0 = every "
                   "recorded step)")
    s = sub.add_parser("compact", help="finish a compaction a kill or a full disk interrupted, or upgrade an older recording "
                       "(format 1, early format 2) to today's layout; in place, verified")
    s.add_argument("run", help="run folder (or its recording/ folder)")

    s = sub.add_parser("verify", help="check a whole recording: its files against its manifest, every checksum, meta.json")
    s.add_argument("run", help="run folder (or its recording/ folder)")

    s = sub.add_parser("quickstart", help="offline first run: the bundled sample, a short recorded run, its report")
    s.add_argument("--out", default="runs/quickstart", help="folder for the dataset, run and report (default runs/quickstart)")
    s.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help=f"training steps (default {DEFAULT_STEPS:,}: ~75 s on 2 CPU cores)")

    s = sub.add_parser("sweep", help="train every grid point x seed of a TOML spec on Ray (local by default)")
    s.add_argument("spec", help="sweep spec (TOML; see sweeps/)")
    s.add_argument("--out", default=None, help="sweep folder: one run folder per grid point x seed, plus sweep.json "
                   "(this machine, or a disk every node of the cluster mounts)")
    s.add_argument("--storage", default=None, metavar="URI", help="instead of --out on a cluster whose nodes have "
                   "their own disks: a folder every node mounts or an fsspec URI (file:///..., s3://bucket/prefix); "
                   "runs train in node-local scratch ($DUCKLING_SCRATCH) and are uploaded there, verified")
    s.add_argument("--address", default=None, help="Ray cluster address ('auto', host:port); default $RAY_ADDRESS, "
                   "else a local Ray on this machine")
    s.add_argument("--max-retries", type=int, default=1, help="restarts of a crashed run within this call (default 1)")
    s.add_argument("--dry-run", action="store_true", help="validate the spec and show the plan; train nothing")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (run state changes are still printed)")

    s = sub.add_parser("compare", help="table, means over seeds with 95%% t intervals, differences and figures "
                       "across the runs of a sweep folder (exit 1 when a run is broken or missing)")
    s.add_argument("out", help="sweep folder, or a sweep in a storage (the fsspec URI given to `duckling sweep --storage`)")
    s.add_argument("--out", dest="into", default=None, metavar="DIR", help="for a sweep in a storage (required then): "
                   "the local folder that receives the table, figures and each run's report (the storage is only "
                   "read); default: the sweep folder itself")
    s.add_argument("--refresh-reports", action="store_true", help="recompute every run's report")
    p.commands = sub.choices  # {command: its parser}: cli._parse refuses an unknown flag with the command's own
    return p
