"""`simmim-swin`: plain tools around runs and checkpoints (no Hydra here); one module per sub-command."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from .errors import command_errors

# each module has add_parser(subparsers) registering a sub-command whose `func(args)` runs it
COMMAND_MODULES = ("inspect", "reconstruct", "plot", "make_shards", "export", "check_data", "stats")


def build_parser() -> argparse.ArgumentParser:
    """The `simmim-swin` argument parser with one sub-command per tool."""
    parser = argparse.ArgumentParser(
        prog="simmim-swin",
        description="Tools for simmim-swin runs and checkpoints. Pretraining itself is `simmim-pretrain`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    with command_errors():
        args.func(args)


if __name__ == "__main__":
    main()
