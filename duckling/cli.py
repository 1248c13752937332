"""The ``duckling`` command: vocab | build | train | generate | report.

Each subcommand's handler lives next to the code it drives (``cli_<name>(args)`` in its module)
and is imported lazily, so ``duckling --help`` does not import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DucklingError

# subcommand -> (module, handler)
HANDLERS = {
    "vocab": ("duckling.vocab", "cli_vocab"),
    "build": ("duckling.data", "cli_build"),
    "train": ("duckling.train", "cli_train"),
    "generate": ("duckling.train", "cli_generate"),
    "report": ("duckling.report", "cli_report"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duckling", description="Duckling II: build the compact-vocab dataset, "
                                "train with per-step W recording, report on dead tokens, generate.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("vocab", help="count GPT-2 tokens over a corpus and write token_mapping.json")
    s.add_argument("--data", help="text file or folder of .txt files (default: $DUCKLING_DATA, else the hub)")
    s.add_argument("--out", default="token_mapping.json")
    s.add_argument("--max-stories", type=int, default=None, help="use only the first N stories")
    s.add_argument("--name", default=None, help="corpus name recorded in the mapping's provenance")
    s.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all cores)")

    s = sub.add_parser("build", help="tokenize and pack a corpus into tokenized_dataset/")
    s.add_argument("--data", help="text file or folder of .txt files (default: $DUCKLING_DATA, else the hub)")
    s.add_argument("--out", default="tokenized_dataset")
    s.add_argument("--mapping", default="token_mapping.json")
    s.add_argument("--split", default="train", help="hub split (ignored for local files)")
    s.add_argument("--max-stories", type=int, default=None, help="use only the first N stories")
    s.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    s.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all cores)")

    s = sub.add_parser("train", help="train a Duckling and record W at every step")
    s.add_argument("--dataset", default="tokenized_dataset")
    s.add_argument("--run", required=True, help="run folder (created; must be empty unless --resume)")
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--record-every", type=int, default=None, help="snapshot stride (default 1)")
    s.add_argument("--precision", choices=["bf16", "float32", "mixed"], default=None,
                   help="recording precision (default bf16)")
    s.add_argument("--no-record", action="store_true", help="train without recording W")
    s.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    s.add_argument("--device", default=None, help="cuda | mps | cpu (default: auto)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--n-layer", type=int, default=None)
    s.add_argument("--untied", action="store_true", help="untied input/output embeddings (control)")
    s.add_argument("--eval-dataset", default=None, help="tokenized validation set for eval loss")
    s.add_argument("--eval-steps", type=int, default=None,
                   help="evaluate every N steps (default: once, at the end, when --eval-dataset is given)")
    s.add_argument("--budget-gb", type=float, default=None)
    s.add_argument("--train-precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="training precision: auto = bf16 mixed where the device has native bf16")
    s.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="torch.compile the model (default auto: on CUDA only)")
    s.add_argument("--mapping", default=None, help="token mapping (default token_mapping.json)")

    s = sub.add_parser("generate", help="generate text from a trained run")
    s.add_argument("--run", required=True)
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=60)
    s.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("report", help="write every dead-token figure and summary.json for a run")
    s.add_argument("run", help="run folder")
    s.add_argument("--out", default=None, help="default: RUN/report")
    s.add_argument("--max-points", type=int, default=None,
                   help="snapshot steps evaluated per curve (default: analysis.MAX_POINTS; 0 = every recorded step)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, handler = HANDLERS[args.command]
    try:
        result = getattr(importlib.import_module(module), handler)(args)
    except DucklingError as e:
        print(f"duckling {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"duckling {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
