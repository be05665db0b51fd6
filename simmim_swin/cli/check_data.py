"""`simmim-swin check-data`: read a whole image folder or shard set up front and list what would be skipped."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_MAX_IMAGE_PIXELS

EPILOG = """\
examples:
  simmim-swin check-data /data/tiles                      # every image file under the folder
  simmim-swin check-data /data/tiles --in-chans 4         # also: does every image give 4 channels?
  simmim-swin check-data /data/shards/train.json          # every sample of a shard set
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser(
        "check-data",
        help="decode every image of a folder or shard set in parallel; list unreadable files and the formats found",
        description="Decode every image completely (as training would) in a pool of processes; print the image "
        "kinds found (format, mode, bands, bit depth) and every file a run would skip as a bad sample (unreadable, "
        "truncated, too large, NaN or infinite values, a band count that does not fit --in-chans); warn about a set "
        "that mixes bit depths or band counts, and name the files that are not read (other extensions). "
        "Exits 1 when any file is bad.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="image folder, shard index .json, or shard .tar / brace pattern")
    add_decode_options(p, in_chans_help="check that each image gives this many channels")
    p.set_defaults(func=run)


def add_decode_options(p: argparse.ArgumentParser, in_chans_help: str | None) -> None:
    """--in-chans (with in_chans_help), --max-image-pixels and --workers: how the tools decode, as a run would."""
    if in_chans_help:
        p.add_argument("--in-chans", type=int, default=None, help=in_chans_help)
    p.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"larger images are bad (skipped), as data.max_image_pixels (default {DEFAULT_MAX_IMAGE_PIXELS})",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=0, help="processes decoding the images (default: one per CPU)")


def run(args: argparse.Namespace) -> None:
    """Scan and print the report; exit status 1 when any image is bad."""
    from ..data.datasets import describe_unread, unread_files
    from ..data.scan import scan, scan_units  # torch: loaded only when the command runs

    kind, units = scan_units(args.path)
    report = scan(units, kind, args.max_image_pixels, args.in_chans, workers=args.workers, desc="check-data")
    print(f"{report.images} readable images in {args.path}:")
    for name, count in sorted(report.kinds.items(), key=lambda item: -item[1]):
        print(f"  {count:8d}  {name}")
    unread = unread_files(args.path) if kind == "folder" else []
    if unread:
        print(f"note: {describe_unread(unread)}")
    for line in report.mixture_warnings(args.in_chans):
        print(f"warning: {line}")
    if not report.bad:
        print("no bad files")
        return
    print(f"{len(report.bad)} bad (a run skips and counts them as bad samples):")
    for name, reason in sorted(report.bad):
        print(f"  {name}: {reason}")
    raise SystemExit(1)
