"""`simmim-swin make-shards`: write webdataset tar shards and their index from an image folder or Fashion-MNIST."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing

from .check_data import add_decode_options

DESCRIPTION = """\
Write webdataset tar shards for `simmim-pretrain data=shards`.

Each sample is the image file's own bytes (never re-encoded; Fashion-MNIST's raw pixels are stored as PNG):
8-bit or 16-bit PNG / TIFF, float or multi-band TIFF, multi-band .npy (C, H, W) arrays are all kept as they are.
Its key is the path relative to the folder, without extension (two files with one key, x.jpg and x.png, are
refused before anything is written) and, with --labels, its integer class goes in a `.cls` member. A shard is
closed at --max-count samples or --max-size bytes. Next to the shards, OUT/NAME.json lists every shard with its
sample count, the total and the image member types: pass it as data.urls.

Every image is decoded completely first (in --workers processes), as a run reads it: files a run would skip as bad
samples (unreadable, truncated, over --max-image-pixels, NaN or infinite values) are left out and named.

The set is written into a temporary folder inside OUT and moved into place when complete, so a failed run never
touches an existing set; the temporary folder of a run that was killed is removed by the next run. OUT may
hold other sets (train and val); a set of the same NAME is refused unless --overwrite, which replaces all of its
files.

Write at least as many shards as there will be ranks x data-loader workers, since each worker reads its own
subset of the shards (ImageNet-1K at 1000 images of ~110 kB per shard gives 1282 shards).
"""

EPILOG = """\
examples:
  simmim-swin make-shards /data/imagenet/train --out /data/in1k_shards --name train --labels
  simmim-swin make-shards --source fashion-mnist --split train --out shards/fmnist --name train
  simmim-pretrain data=shards data.urls=/data/in1k_shards/train.json data.val_urls=/data/in1k_shards/val.json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser(
        "make-shards",
        help="write webdataset tar shards (+ an index) from an image folder or Fashion-MNIST",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", nargs="?", help="image folder, searched recursively (with --source folder)")
    p.add_argument(
        "--source",
        choices=("folder", "fashion-mnist"),
        default="folder",
        help="folder (default) or fashion-mnist (Debian's dataset-fashion-mnist in /usr/share/datasets)",
    )
    p.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split (default train)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--name", default="train", help="shard name prefix: OUT/NAME-000000.tar, index OUT/NAME.json")
    p.add_argument(
        "--labels", action="store_true", help="store the class (first-level sub-folder, sorted) as .cls (folders)"
    )
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    p.add_argument("--log-every", type=int, default=5000, help="a progress line every N images when not on a terminal")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set OUT/NAME (all of its files)")
    add_decode_options(p, in_chans_help=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Write the shards and the index; print where they are."""
    from ..data.datasets import describe_unread, unread_files
    from ..data.shards import fashion_mnist_samples, folder_samples, write_shards  # torch: loaded here
    from ..progress import Progress

    skipped: list[str] = []
    if args.source == "fashion-mnist":
        if args.folder:
            raise ValueError(f"--source fashion-mnist reads no folder, but {args.folder!r} was given; drop it")
        total, samples, classes = fashion_mnist_samples(args.split)  # FileNotFoundError says how to install
        source = f"fashion-mnist {args.split}"
    else:
        if not args.folder:
            raise ValueError("give the image folder to shard (or --source fashion-mnist)")
        total, samples, classes = folder_samples(
            args.folder, labels=args.labels, skipped=skipped, max_pixels=args.max_image_pixels, workers=args.workers
        )
        source = f"folder {args.folder}"
        unread = unread_files(args.folder)
        if unread:
            print(f"note: {describe_unread(unread)}", file=sys.stderr)
    with closing(Progress(total, f"make-shards {args.name}", every=args.log_every)) as progress:
        index_path = write_shards(
            samples,
            args.out,
            name=args.name,
            max_count=args.max_count,
            max_size=args.max_size,
            classes=classes,
            source=source,
            on_sample=progress.update,
            overwrite=args.overwrite,
        )
    for line in skipped[:20]:
        print(f"skipped (a run would skip it): {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more files that do not decode", file=sys.stderr)
    index = json.loads(index_path.read_text())
    labels = f", {len(classes)} classes" if classes else ""
    print(
        f"wrote {index['total']} samples{labels} in {len(index['shards'])} shards to {args.out}"
        f"{f' ({len(skipped)} unreadable files skipped)' if skipped else ''}; index: {index_path}"
    )
