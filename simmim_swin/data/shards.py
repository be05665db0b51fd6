"""Webdataset tar shards: writing them from an image folder or Fashion-MNIST, the index file, and URL lists.

A sample is `<key>.<ext>` (the image file's own bytes) plus `<key>.cls` (the class as ASCII) when the source has
labels; `<name>.json` next to the shards lists each shard's sample count, so a loader knows the size without reading.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from simmim_swin.data.datasets import find_images
from simmim_swin.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from simmim_swin.data.images import DEFAULT_MAX_IMAGE_PIXELS, describe_error, verify_image
from simmim_swin.distributed import process_alive
from simmim_swin.files import atomic_write

INDEX_FORMAT = "simmim-swin-shards/1"
# image member extensions the loaders read, in order of preference when a sample holds several
IMAGE_MEMBER_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "npy")
_EXTENSION_ALIASES = {"jpeg": "jpg", "tiff": "tif"}
log = logging.getLogger(__name__)


@dataclass
class ShardSample:
    """One sample to write: a unique key (no dots), encoded image bytes, their extension, an optional class."""

    key: str
    image: bytes
    ext: str
    label: int | None = None


def folder_samples(
    root: str | Path, labels: bool = False, skipped: list[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, workers: int = 1,
) -> tuple[int, Iterator[ShardSample], list[str] | None]:  # fmt: skip
    """(number of files, samples, class names) for every image under `root`, bytes as stored on disk.

    With labels=True the class is the first-level sub-folder (sorted names -> 0, 1, ...), as torchvision's
    ImageFolder. Every file is decoded completely first (by `workers` processes; 0: one per CPU); one that a run
    would skip is left out and appended to `skipped` as 'path: reason'.
    """
    root = Path(root)
    paths = find_images(root)
    classes = None
    if labels:
        loose = [p.name for p in paths if p.parent == root]
        if loose:
            raise ValueError(
                f"--labels takes the class from the sub-folder, but {len(loose)} images lie directly in {root} "
                f"(e.g. {loose[0]}); move them into class folders or drop --labels"
            )
        classes = sorted({p.relative_to(root).parts[0] for p in paths})
    class_index = {name: i for i, name in enumerate(classes or [])}
    # webdataset splits a member name at the first dot of its base name: dots in the key must go
    keys = [path.relative_to(root).with_suffix("").as_posix().replace(".", "_") for path in paths]
    _check_unique_keys(keys, paths)

    def generate() -> Iterator[ShardSample]:
        verified = pool_map(read_verified, [(path, max_pixels) for path in paths], workers)  # in the keys' order
        for path, key, (data, error) in zip(paths, keys, verified):
            if data is None:
                if skipped is not None:
                    skipped.append(f"{path}: {error}")
                continue
            ext = path.suffix.lower().lstrip(".")
            label = class_index[path.relative_to(root).parts[0]] if labels else None
            yield ShardSample(key, data, _EXTENSION_ALIASES.get(ext, ext), label)

    return len(paths), generate(), classes


def read_verified(args: tuple[Path, int | None]) -> tuple[bytes | None, str]:
    """(the file's bytes, "") if it decodes completely as a run reads it, else (None, why not)."""
    path, max_pixels = args
    try:
        data = path.read_bytes()
        verify_image(data, path.suffix, max_pixels)
    except Exception as e:  # several types for unreadable files; all mean "a run would skip it"
        return None, describe_error(e)
    return data, ""


def pool_map(fn: Callable[[Any], Any], tasks: list[Any], workers: int, ordered: bool = True) -> Iterator[Any]:
    """fn of each task by a pool of `workers` processes (0: one per CPU, 1: in this one), in the tasks' order or
    (ordered=False) as they finish."""
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    if workers == 1:  # in this process: no pool to start
        yield from map(fn, tasks)
        return
    # spawn: the workers never inherit the caller's threads or open files
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        imap = pool.imap if ordered else pool.imap_unordered
        yield from imap(fn, tasks, chunksize=max(1, min(64, len(tasks) // (workers * 8))))


def _check_unique_keys(keys: list[str], paths: list[Path]) -> None:
    # before any file is read or written: x.jpg and x.png, a.b.png and a_b.png
    seen: dict[str, Path] = {}
    clashes = []
    for key, path in zip(keys, paths):
        if key in seen:
            clashes.append(f"{seen[key]} and {path} -> {key!r}")
        seen.setdefault(key, path)
    if clashes:
        more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        raise ValueError(
            f"{len(clashes)} pairs of files map to one sample key: {'; '.join(clashes[:5])}{more}. Rename or move "
            "one of each pair; nothing was written"
        )


def fashion_mnist_samples(split: str, root: str | Path | None = None) -> tuple[int, Iterator[ShardSample], list[str]]:
    """(count, samples, class names) of a Fashion-MNIST split, each 28x28 grey image encoded as PNG (lossless)."""
    images, labels = load_fashion_mnist(split) if root is None else load_fashion_mnist(split, root)

    def generate() -> Iterator[ShardSample]:
        for i, (pixels, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")  # 2-D uint8 -> mode L
            yield ShardSample(f"{split}_{i:06d}", buffer.getvalue(), "png", int(label))

    return len(images), generate(), list(FASHION_MNIST_CLASSES)


def write_shards(
    samples: Iterable[ShardSample],
    out_dir: str | Path,
    name: str = "train",
    max_count: int = 10000,
    max_size: float = 1e9,
    classes: list[str] | None = None,
    source: str = "",
    on_sample: Callable[[], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `samples` to out_dir/<name>-000000.tar, ... and the index out_dir/<name>.json; returns the index path.

    A shard is closed once it holds `max_count` samples or `max_size` bytes. The set is written into a temporary
    folder and moved into place once complete, so a failure leaves an existing set untouched; an existing set of
    that name is refused unless `overwrite`, which replaces all of its files.
    """
    if max_count < 1 or max_size <= 0:
        raise ValueError(f"max_count={max_count} and max_size={max_size} must be positive")
    out_dir = Path(out_dir)
    old = [p for p in [out_dir / f"{name}.json"] if p.exists()] + sorted(out_dir.glob(f"{name}-*.tar"))
    if old and not overwrite:
        raise ValueError(
            f"{out_dir} already holds the shard set {name!r} ({len(old)} files, e.g. {old[0].name}); pass "
            "--overwrite to replace the whole set, or choose another --out or --name"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(out_dir, name):
        log.info(f"removed {stale}, left by a make-shards run that did not finish")
    # same filesystem: renames are moves; the host and process id in the name tell a later run whether it is stale
    prefix = f".{name}.partial-{socket.gethostname()}-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        counts: dict[str, int] = {}  # samples per shard file name
        members: set[str] = set()
        keys: set[str] = set()
        pattern = str(staging / f"{name}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0, encoder=False) as writer:
            for sample in samples:
                if sample.key in keys:
                    raise ValueError(f"two samples map to the key {sample.key!r}; rename one of the files")
                keys.add(sample.key)
                record = {"__key__": sample.key, sample.ext: sample.image}
                if sample.label is not None:
                    record["cls"] = str(sample.label).encode("ascii")
                writer.write(record)
                members.add(sample.ext)
                shard = Path(writer.fname).name
                counts[shard] = counts.get(shard, 0) + 1
                if on_sample is not None:
                    on_sample()
        if not counts:
            raise ValueError(f"no samples to write to {out_dir}")
        index = {
            "format": INDEX_FORMAT,
            "source": source,
            "total": sum(counts.values()),
            "classes": classes,
            "image_members": sorted(members),  # e.g. ["jpg"], ["npy"], ["png", "tif"]
            "shards": [{"name": shard, "count": count, "bytes": (staging / shard).stat().st_size}
                       for shard, count in counts.items()],
        }  # fmt: skip
        for path in old:  # the index first: no reader ever pairs the old index with new shards
            path.unlink()
        for shard in counts:
            (staging / shard).replace(out_dir / shard)
        index_path = out_dir / f"{name}.json"
        atomic_write(index_path, json.dumps(index, indent=1) + "\n")  # a reader never sees a half-written index
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index_path


def remove_stale_staging(out_dir: str | Path, name: str) -> list[Path]:
    """Remove the temporary folders of set `name` that killed runs left in out_dir; returns them."""
    # stale: the process in `.NAME.partial-HOST-PID-XXXX` no longer runs on this host (other hosts' are left alone),
    # or the name has no process id (written before the id was added)
    pattern = re.compile(rf"\.{re.escape(name)}\.partial-(?:(?P<host>.+)-(?P<pid>\d+)-)?[^-]+")
    removed = []
    for folder in sorted(Path(out_dir).glob(f".{name}.partial-*")):
        match = pattern.fullmatch(folder.name)
        if not match or not folder.is_dir():
            continue
        if match["pid"] is not None and (match["host"] != socket.gethostname() or process_alive(int(match["pid"]))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def read_index(path: str | Path) -> dict[str, Any]:
    """The index JSON written by write_shards, with each shard's `url` resolved next to the index file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard index {str(path)!r} does not exist; write one with `simmim-swin make-shards`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"shard index {path} is not valid JSON ({e}); write it again with `simmim-swin make-shards --overwrite`"
        ) from e
    shards = index.get("shards") if isinstance(index, dict) else None
    if not shards or not isinstance(shards, list) or index.get("format") != INDEX_FORMAT:  # an empty set included
        raise ValueError(f"{path} is not a shard index written by `simmim-swin make-shards` (format {INDEX_FORMAT})")
    for shard in shards:
        shard["url"] = str(path.parent / shard["name"])
    return index


def resolve_urls(urls: str | list[str] | None, what: str = "data.urls") -> tuple[list[str], int | None]:
    """(shard URLs, total samples if known) from an index .json, a brace pattern, `a::b` lists, or a list."""
    if not urls:
        raise ValueError(f"{what} is empty; set it to the index written by make-shards, e.g. {what}=shards/train.json")
    items = [urls] if isinstance(urls, str) else list(urls)
    if len(items) == 1 and items[0].endswith(".json") and "://" not in items[0]:
        index = read_index(items[0])
        return [s["url"] for s in index["shards"]], int(index["total"])
    expanded = [url for item in items for url in wds.shardlists.expand_urls(item)]
    # local paths must exist (a typo fails here, not in a worker); `pipe:` and URL schemes are passed through
    missing = [u for u in expanded if not u.startswith("pipe:") and "://" not in u and not Path(u).is_file()]
    if missing:
        raise ValueError(
            f"{what}: {len(missing)} of {len(expanded)} shards do not exist, e.g. {missing[0]!r}; check the path "
            "(brace patterns must be quoted on the command line: \"data.urls='/d/train-{000000..000009}.tar'\")"
        )
    return expanded, None
