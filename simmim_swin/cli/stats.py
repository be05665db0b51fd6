"""`simmim-swin stats`: per-channel mean and std of a data set in its raw units, as data.mean / data.std overrides."""

from __future__ import annotations

import argparse
import math
import random
import sys
from typing import TYPE_CHECKING

from .check_data import add_decode_options

if TYPE_CHECKING:
    import numpy as np

    from ..data.scan import Moments

MAX_NAMED = 20  # bad images named one per line; check-data lists every one

EPILOG = """\
examples:
  simmim-swin stats /data/tiles --in-chans 4        # prints: data.mean=[...] data.std=[...]
  simmim-swin stats /data/shards/train.json --samples 5000
  simmim-swin stats --source fashion-mnist --in-chans 1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser(
        "stats",
        help="per-channel mean / std of a folder or shard set (raw units), printed as data.mean / data.std",
        description="Read a random sample of the images (whole images, raw values: 16-bit stays 16-bit) in a pool "
        "of processes and print the per-channel mean and standard deviation as the override to paste into "
        "simmim-pretrain / simmim-finetune. Unreadable images and images holding NaN or infinite values are left "
        "out and named.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", nargs="?", help="image folder, shard index .json, or shard .tar / brace pattern")
    p.add_argument("--source", choices=("path", "fashion-mnist"), default="path", help="fashion-mnist: its train split")
    p.add_argument("--samples", type=int, default=2000, help="images (folder) or about that many samples (shards)")
    p.add_argument("--seed", type=int, default=0, help="which images the sample takes")
    add_decode_options(p, in_chans_help="read every image with this many channels (model.in_chans)")
    p.set_defaults(func=run)


def format_override(moments: Moments) -> str:
    """'data.mean=[...] data.std=[...]' with six significant digits."""
    import numpy as np

    def values(array: np.ndarray) -> str:
        return "[" + ",".join(f"{float(v):.6g}" for v in array) + "]"

    return f"data.mean={values(moments.mean)} data.std={values(np.maximum(moments.std, 1e-12))}"


def fashion_mnist_moments(in_chans: int = 1, split: str = "train") -> Moments:
    """The moments of every pixel of a Fashion-MNIST split read with `in_chans` channels (grey repeated for 3)."""
    import numpy as np

    from ..data.fashion_mnist import load_fashion_mnist
    from ..data.scan import Moments

    images, _ = load_fashion_mnist(split)  # N, 28, 28 uint8
    histogram = np.bincount(images.ravel(), minlength=256).astype(np.float64)  # exact, without a float copy
    levels = np.arange(256, dtype=np.float64)
    count = histogram.sum()
    mean = (histogram * levels).sum() / count
    m2 = (histogram * (levels - mean) ** 2).sum()
    repeat = 3 if in_chans == 3 else 1
    return Moments(np.full(repeat, count), np.full(repeat, mean), np.full(repeat, m2))


def run(args: argparse.Namespace) -> None:
    """Compute and print the statistics."""
    from ..data.scan import UnitReport, check_unit, scan, scan_units  # torch: loaded only when the command runs

    if args.samples < 1:
        raise ValueError(f"--samples={args.samples} must be >= 1")
    if args.source == "fashion-mnist":
        if args.path:
            raise ValueError(f"--source fashion-mnist reads no PATH, but {args.path!r} was given; drop it")
        moments, report = fashion_mnist_moments(args.in_chans or 1), UnitReport(images=60000)
    else:
        if not args.path:
            raise ValueError("give the image folder or shard index to measure (or --source fashion-mnist)")
        kind, units = scan_units(args.path)
        rng = random.Random(args.seed)
        if kind == "folder":
            units = rng.sample(units, min(args.samples, len(units)))
        else:  # whole shards: enough of them for about --samples samples, by the first shard's size
            per_shard = max(1, check_unit((units[0], kind, args.max_image_pixels, args.in_chans, False)).images)
            units = rng.sample(units, min(len(units), math.ceil(args.samples / per_shard)))
        report = scan(units, kind, args.max_image_pixels, args.in_chans, moments=True, workers=args.workers,
                      desc="stats")  # fmt: skip
        moments = report.moments
        if moments is None:
            raise ValueError(f"no readable image in {args.path}; run `simmim-swin check-data {args.path}`")
    if report.bad:
        print(f"{len(report.bad)} images left out (unreadable, or NaN / infinite values):", file=sys.stderr)
        for name, reason in sorted(report.bad)[:MAX_NAMED]:
            print(f"  {name}: {reason}", file=sys.stderr)
        if len(report.bad) > MAX_NAMED:
            print(f"  ... and {len(report.bad) - MAX_NAMED} more (`simmim-swin check-data` lists all)", file=sys.stderr)
    for line in report.mixture_warnings(args.in_chans):
        print(f"warning: {line}", file=sys.stderr)
    channels = len(moments.mean)
    print(f"{report.images} images, {channels} channel{'s' if channels != 1 else ''}, raw units:")
    for c, (mean, std) in enumerate(zip(moments.mean, moments.std)):
        print(f"  channel {c}: mean {mean:.6g}  std {std:.6g}")
    print("override:")
    print(f"  {format_override(moments)}")
