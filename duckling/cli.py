"""The ``duckling`` command: every subcommand's handler (the arguments are built in ``cli_args.py``).

Flags that set config fields are generated from the field metadata in ``config.py`` (default and help
included), and ``--set section.field=VALUE`` reaches every field; both go through
``DucklingConfig.override``, so the CLI, the notebooks and the sweep engine share one set of checks.
Heavy modules are imported inside the handlers, so ``duckling --help`` does not import torch.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from duckling import config as C
from duckling.cli_args import DEPRECATED_FLAGS, build_parser
from duckling.errors import DucklingError
from duckling.quickstart import format_headline
from duckling.sweeps.progress import text_table


# ---------------------------------------------------------------- handlers
def _abs(path) -> str:
    return str(Path(path).expanduser().resolve())


def cli_vocab(args) -> int:
    """``duckling vocab``: count GPT-2 tokens over a corpus, write the mapping, print coverage."""
    from duckling.data.build import count_tokens, describe_source, resolve_source
    from duckling.data.vocab import CompactTokenizer, min_vocab_for_coverage

    out = Path(args.out)
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise DucklingError(f"--out {_abs(out)}: {above} is a file, not a folder, so nothing can be written under "
                            "it. Give a path in an existing folder, such as my_mapping.json.")
    if out.exists() and not args.force:
        raise DucklingError(f"{_abs(out)} already exists; the committed mapping defines the experiment's "
                            "vocabulary. Write to another --out, or pass --force to overwrite it.")
    if out.is_dir():
        raise DucklingError(f"--out {_abs(out)} is a folder; give a file path such as my_mapping.json.")
    source = resolve_source(args.data)
    stats: dict = {}
    counts = count_tokens(source, num_proc=args.num_proc, progress=True, max_stories=args.max_stories, stats=stats)
    prov = {"corpus": args.name or describe_source(source), "source": describe_source(source),
            "n_stories": stats["n_stories"], "n_tokens": int(counts.sum()), "text_sha256": stats["sha256"]}
    if args.max_stories:
        prov["max_stories"] = args.max_stories
    tok = CompactTokenizer.from_counts(counts, prov)
    tok.save(out)
    print(f"wrote {out}: {len(tok)} ids ({tok.n_live} live, {tok.n_dead} dead), hash {tok.hash[:16]}")
    print(f"corpus: {prov['n_stories']:,} stories, {prov['n_tokens']:,} tokens, "
          f"{tok.provenance['distinct_tokens']:,} distinct GPT-2 tokens")
    print(f"live coverage: {tok.provenance['coverage']:.4%}")
    for c in (0.9, 0.95, 0.99, 0.995, 0.999):
        print(f"  {c:.1%} coverage needs the {min_vocab_for_coverage(counts, c):,} most frequent tokens")
    return 0


def cli_build(args) -> int:
    """``duckling build``: tokenize and pack a corpus into a tokenized dataset folder."""
    from duckling.data.build import build_dataset

    mapping = args.mapping
    if not Path(mapping).is_file() and args.data == "sample" and mapping == C.DataConfig().mapping_path:
        import tempfile

        from duckling.quickstart import _write_mapping  # the bundled copy of the committed mapping
        from duckling.data.vocab import CompactTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            mapping = CompactTokenizer.from_file(_write_mapping(Path(tmp) / "token_mapping.json"))
        print("using the bundled copy of the committed token_mapping.json")
    elif not Path(mapping).is_file():
        raise DucklingError(f"Token mapping {_abs(args.mapping)} not found. Use the committed "
                            "token_mapping.json (run from the repository root) or pass --mapping PATH.")
    build_dataset(args.data, mapping, args.out, seq_len=args.seq_len, split=args.split,
                  max_stories=args.max_stories, num_proc=args.num_proc, force=args.force)
    return 0


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, eq, raw = item.partition("=")
        if not eq or not name.strip():
            raise DucklingError(f"--set {item!r}: expected NAME=VALUE with a dotted config name, "
                                "e.g. --set train.weight_decay=0.1.")
        out[name.strip()] = C.parse_value(raw.strip())
    return out


def train_overrides(args) -> dict:
    """{dotted name: value} from the shorthand flags, the deprecated flags and --set (last wins)."""
    out = {}
    for key, raw in vars(args).items():
        if key.startswith("set:") and raw is not None:
            name = key[4:]
            value = C.parse_value(raw)
            if name == "train.compile" and isinstance(raw, str) and raw.lower() in ("on", "off"):
                value = raw.lower() == "on"
            out[name] = value
    for key, (old, name, new) in DEPRECATED_FLAGS.items():
        if getattr(args, key, None) is not None:
            print(f"duckling train: {old} is deprecated, use {new} ({name}); it stops working in the next "
                  "release.", file=sys.stderr)
            out[name] = C.parse_value(getattr(args, key))
    if args.no_record:
        out["record.enabled"] = False
    if args.untied:
        out["model.tie_word_embeddings"] = False
    if args.allow_eval_overlap:
        out["train.allow_eval_overlap"] = True
    out.update(_parse_sets(args.set))
    return out


def cli_train(args) -> int:
    """``duckling train``: the run's stored config on --resume, else the defaults, plus the overrides."""
    from duckling.training.train import train

    run = Path(args.run)
    overrides = train_overrides(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated flags were reported above
        if args.resume:
            if not run.is_dir():
                raise DucklingError(f"--resume: the run folder {_abs(run)} does not exist. Check the path, or "
                                    "drop --resume to start a new run there.")
            stored = run / "config.json"
            if not stored.is_file():
                raise DucklingError(f"--resume: {_abs(run)} is not a Duckling run folder (no config.json).")
            try:
                base = C.DucklingConfig.from_dict(json.loads(stored.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DucklingError(f"--resume: {_abs(stored)} is not valid JSON ({e}); the run's config was "
                                    "edited or damaged. Restore it, or start a new run.")
            cfg = base.override(overrides)
        else:
            cfg = C.DucklingConfig().override(overrides)
    mapping = run / "token_mapping.json" if args.resume and (run / "token_mapping.json").is_file() \
        else cfg.data.mapping_path
    result = train(cfg, dataset=cfg.data.dataset_dir, run_dir=run, eval_dataset=args.eval_dataset,
                   resume=args.resume, tokenizer=mapping)
    _, losses = result.losses()
    _, held_out = result.eval_losses()
    last = f", loss {losses[-1]:.3f}" if len(losses) else ""
    last += f", held-out loss {held_out[-1]:.3f}" if len(held_out) else ""
    speed = f"{result.steps_per_s:.1f} steps/s" if result.steps_per_s == result.steps_per_s else "no steps to train"
    print(f"trained {run} to step {result.global_step}{last}, {speed} ({result.device}, {result.precision})")
    return 0


def cli_generate(args) -> int:
    """``duckling generate --run DIR "prompt"``: print the prompt and its continuation."""
    from duckling.training.generate import generate
    from duckling.training.run_folder import load_run

    g = C.GenerateConfig(**{k[len("set:generate."):]: C.parse_value(v) for k, v in vars(args).items()
                            if k.startswith("set:generate.") and v is not None}, sample=args.sample)
    model, tok, _ = load_run(args.run)
    if tok is None:
        raise DucklingError(f"{_abs(args.run)} has no token_mapping.json, so prompts cannot be encoded.")
    print(args.prompt + generate(model, tok, args.prompt, gen=g))
    return 0


def cli_report(args) -> int:
    """``duckling report RUN [--out DIR]``: the figures and summary.json, and the headline numbers with
    what each one says (as the quickstart prints them)."""
    import contextlib

    from duckling.analysis.report import report
    from duckling.files import folder_lock

    from duckling.storage import as_local, local_path

    remote = local_path(args.run) is None  # a run in a storage: read from there, the report written here
    if remote and not args.out:
        raise DucklingError(f"{args.run} is in a storage, which `duckling report` only reads: pass --out a local "
                            "folder for the figures and summary.json.")
    args.run, args.out = args.run if remote else str(as_local(args.run)), args.out and str(as_local(args.out))
    mp = args.max_points
    if mp < 0:
        raise DucklingError(f"--max-points must be >= 0 (0 = every recorded step), not {mp}.")
    out = Path(args.out) if args.out else Path(args.run) / "report"
    run = Path(args.run)
    into_run = not remote and run.is_dir() and (run / "config.json").is_file() and run.resolve() in (out.resolve(), *out.resolve().parents)
    with folder_lock(run) if into_run else contextlib.nullcontext():  # writing into the run: its one writer
        S = report(args.run, args.out, mp)
    print(f"wrote {len(S['figures'])} figures and summary.json to {out}")
    print("\n".join(format_headline(S)))
    return 0


def cli_compact(args) -> int:
    from duckling.recording.compact import compact

    r = compact(args.run)
    if r["recovered"]:
        print(f"{r['run']}: {r['recovered']}")
    if r["upgraded_from"] is None:
        print(f"{r['run']}: the recording is already in today's layout ({r['steps']:,} steps, "
              f"{r['snapshots']:,} snapshots){'' if r['recovered'] else '; nothing to do'}.")
        return 0
    print(f"upgraded {r['run']} from {r['upgraded_from']}: {r['steps']:,} steps, {r['snapshots']:,} snapshots, "
          f"{r['bytes_before'] / 1e9:.3f} GB -> {r['bytes_after'] / 1e9:.3f} GB "
          f"({r['compression_ratio']:.2f}x, verified) in {r['seconds']:.1f} s")
    return 0


def cli_verify(args) -> int:
    """``duckling verify RUN``: exit 0 with one line when the recording is whole, else 1 and every problem."""
    from duckling.recording.repair import verify

    problems, summary = verify(args.run)
    if not problems:
        print(summary)
        return 0
    print(f"{args.run}: the recording is not whole ({len(problems)} problem{'s' * (len(problems) > 1)}):", file=sys.stderr)
    print("\n".join(f"- {p}" for p in problems), file=sys.stderr)
    return 1


def cli_quickstart(args) -> int:
    from duckling.quickstart import format_summary, quickstart

    print(format_summary(quickstart(args.out, steps=args.steps)))
    return 0


def cli_sweep(args) -> int:
    from duckling.sweeps.engine import MANIFEST, sweep

    if args.max_retries < 0:
        raise DucklingError(f"--max-retries must be >= 0, not {args.max_retries}.")
    if (args.out is None) == (args.storage is None):
        raise DucklingError("Give the sweep one place: --out DIR (this machine, or a disk every node of the cluster "
                            "mounts) or --storage URI (a cluster whose nodes have their own disks).")
    table = sweep(args.spec, args.out, storage=args.storage, address=args.address, max_retries=args.max_retries,
                  dry_run=args.dry_run, progress=not args.no_progress)
    cols = {c: h for c, h in (("name", "run"), ("status", "status"), ("group", "fused group"), ("on_disk", "on disk"),
                              ("global_step", "step"),
                              ("loss", "loss"), ("eval_loss", "held-out loss")) if c in table.columns}
    print(text_table(table.to_dict("records"), cols))  # "-": no value yet (a run not trained)
    bad = table[table["status"] == "failed"] if "status" in table.columns else table.iloc[:0]
    if len(bad):
        where = Path(args.out).resolve() / MANIFEST if args.out else None
        lines = [f"  {r['name']}: {((r.get('error') or 'unknown error').strip().splitlines() or ['?'])[-1][:200]}"
                 for r in bad.to_dict("records")]
        print(f"{len(bad)} run(s) failed:\n" + "\n".join(lines) +
              (f"\nWhole errors: {where}." if where is not None and where.is_file() else
               f"\nWhole errors: {args.storage}/{MANIFEST}." if args.storage else "") +
              " Run the same command again to retry them.", file=sys.stderr)
    return 1 if len(bad) else 0


def cli_compare(args) -> int:
    """``duckling compare OUT``: a short table here; every column in OUT/compare.csv and compare.md. Exit 1
    when a run that should be there is broken or missing (everything else is still written); runs the
    sweep has not finished (pending, failed, ...) are listed but are the sweep's business: exit 0."""
    from duckling.sweeps.compare import compare, short_table, unhealthy

    from duckling.storage import as_local, local_path

    remote = local_path(args.out) is None  # a sweep in a storage: read from there, the table written to --out
    if remote and not args.into:
        raise DucklingError(f"{args.out} is in a storage, which `duckling compare` only reads: pass --out a local "
                            "folder for the table, the figures and the runs' reports.")
    args.out = args.out if remote else str(as_local(args.out))
    into = str(as_local(args.into)) if args.into else None
    table = compare(args.out, into=into, refresh_reports=args.refresh_reports)
    print(short_table(table))
    files = table.attrs.get("files", [])
    print(f"every column ({len(table.columns)}), the mean over seeds with 95% intervals and the differences: "
          f"{Path(into or args.out) / 'compare.md'} and compare.csv; figures: "
          f"{', '.join(f for f in files if f.endswith('.png')) or 'none yet'}")
    bad = unhealthy(table)
    if bad:
        print(f"duckling compare: {len(bad)} run(s) broken or missing (listed above): the table and figures "
              "hold the other runs only. Fix or rerun them (`duckling sweep SPEC --out OUT` retrains what is "
              "missing; `duckling report RUN` shows a broken run's error), then compare again.", file=sys.stderr)
        return 1
    return 0


HANDLERS = {"vocab": cli_vocab, "build": cli_build, "train": cli_train, "generate": cli_generate,
            "report": cli_report, "compact": cli_compact, "verify": cli_verify, "quickstart": cli_quickstart, "sweep": cli_sweep, "compare": cli_compare}


def _paths_from_env() -> None:
    """Relative TIKTOKEN_CACHE_DIR / DUCKLING_DATA resolve against the directory they were set in."""
    for var in ("TIKTOKEN_CACHE_DIR", "DUCKLING_DATA"):
        v = os.environ.get(var)
        if v and v != "sample" and not os.path.isabs(v):
            os.environ[var] = _abs(v)


_NEGATIVE = re.compile(r"-\d*\.?\d+(e[-+]?\d+)?$", re.I)


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-4`` -> ``--lr=-1e-4``: argparse would read -1e-4 as an option, and the config must
    see the value to say what is wrong with it."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _parse(argv: list[str]):
    """The parsed arguments; an unknown flag is refused by its command's parser (its usage, not the top
    level's), with the command's closest flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.commands[args.command]
        flags = [f for a in sub._actions for f in a.option_strings]
        close = sorted({m for x in extra if x.startswith("-")
                        for m in difflib.get_close_matches(x.split("=")[0], flags, n=2, cutoff=0.75)})
        hint = f"did you mean {' or '.join(close)}?" if close else f"`duckling {args.command} --help` lists them"
        sub.error(f"unrecognized arguments: {' '.join(extra)} ({hint})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(_glue_negative_values(sys.argv[1:] if argv is None else list(argv)))
    _paths_from_env()
    try:
        result = HANDLERS[args.command](args)
    except DucklingError as e:
        print(f"duckling {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `duckling ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:  # RunInterrupted carries how to resume
        print(f"duckling {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
