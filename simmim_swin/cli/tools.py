"""`simmim-swin`: plain tools around runs and checkpoints (no Hydra here); one module per sub-command, which imports
torch only inside the function that runs it, so that `simmim-swin --help` (and a mistyped option) answers at once."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..progress import command_logging
from .errors import command_errors

# each module has add_parser(subparsers) registering a sub-command whose `func(args)` runs it
COMMAND_MODULES = ("inspect", "reconstruct", "plot", "make_shards", "export", "check_data", "stats")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, a sub-command's options anywhere among its positionals (`export RUN --format hf DIR`):
    argparse offers intermixed parsing only without sub-commands, so the chosen sub-command's parser does it."""
    parser = argparse.ArgumentParser(
        prog="simmim-swin",
        description="Tools for simmim-swin runs and checkpoints. Pretraining itself is `simmim-pretrain`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices:
        return parser.parse_args(argv)  # --help, a missing or unknown command: argparse's own answer
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    from PIL import Image

    args = parse_args(argv)
    pixel_limit = Image.MAX_IMAGE_PIXELS  # a tool's --max-image-pixels sets PIL's process-wide limit: only for it
    try:
        with command_logging(messages=sys.stderr), command_errors():  # stdout: the tools' results
            args.func(args)
    finally:
        Image.MAX_IMAGE_PIXELS = pixel_limit


if __name__ == "__main__":
    main()
