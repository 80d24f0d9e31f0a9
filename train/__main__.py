"""Command line of the training package: ``python -m train <command> ...``.

Each subcommand is one ``_add_<command>`` function that declares its arguments and sets ``handler``;
the handler imports what it needs when it runs, so a light command (``synth``) never pays for torch or
the data loaders, and ``--help`` is instant. To add a command (``fit``, ``evaluate``, ``calibrate``),
write its ``_add_...`` and ``_run_...`` pair and list the former in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

# The type of ``add_subparsers()``'s result is private to argparse; the alias keeps signatures readable.
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _run_synth(args: argparse.Namespace) -> int:
    from train.synthetic import generate

    started = time.perf_counter()
    paths = generate(
        args.out,
        args.n,
        args.seed,
        image_size=args.image_size,
        valid_fraction=args.valid_fraction,
        prevalence=args.prevalence,
        progress=args.progress,
    )
    elapsed_s = time.perf_counter() - started
    print(
        f"synth: wrote {paths.n_train} train + {paths.n_valid} valid images of {args.image_size} px "
        f"to {paths.root} ({paths.train_csv.name}, {paths.valid_csv.name}) in {elapsed_s:.1f} s"
    )
    return 0


def _add_synth(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic dataset in CheXpert-v1.0-small's layout",
        description="Write a synthetic CheXpert-layout dataset (CSVs, PNG films, per-pixel label maps).",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (CSV paths start with its name)")
    parser.add_argument("--n", type=int, required=True, help="number of patients, one frontal image each")
    parser.add_argument("--seed", type=int, required=True, help="seed: the same seed writes the same bytes")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="fraction of patients in valid.csv")
    parser.add_argument("--prevalence", type=float, default=0.3, help="probability that a finding is positive")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.set_defaults(handler=_run_synth)


_COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (_add_synth,)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` parser with one subparser per entry of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(prog="python -m train", description="Train, evaluate and calibrate models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen subcommand and return its exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
