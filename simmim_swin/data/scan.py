"""Reading a whole image folder or shard set up front, split by file or shard over a pool of processes: what
`simmim-swin check-data` and `simmim-swin stats` do."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simmim_swin.data.datasets import find_images
from simmim_swin.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageSource,
    close_source,
    describe_error,
    describe_source,
    open_source,
    source_channels,
    source_depth,
    to_tensor,
)
from simmim_swin.data.shards import IMAGE_MEMBER_KEYS, pool_map, resolve_urls
from simmim_swin.data.stream import BadSampleLog, iter_shard_samples, open_image
from simmim_swin.progress import Progress


def scan_units(path: str | Path) -> tuple[str, list[str]]:
    """('folder', image files) or ('shards', shard URLs) for a folder, an index .json, a brace pattern or a tar."""
    path_str = str(path)
    if Path(path_str).is_dir():
        return "folder", [str(p) for p in find_images(path_str)]
    if path_str.endswith(".json") or ".tar" in path_str:
        urls, _ = resolve_urls(path_str, what="PATH")
        return "shards", urls
    raise ValueError(f"{path_str} is neither an image folder nor a shard index (.json) or .tar shards")


def _sources(unit: str, kind: str, max_pixels: int | None) -> Iterator[tuple[str, str, ImageSource | Exception]]:
    """(name, extension, opened image or the error) for each image of a unit: a file, or every sample of a shard."""
    if kind == "folder":
        try:
            yield unit, Path(unit).suffix, open_source(unit, max_pixels=max_pixels)
        except Exception as e:  # any failure to open is what check-data reports
            yield unit, Path(unit).suffix, e
        return
    log = BadSampleLog(quiet=True)  # unreadable tars are reported below
    for sample in iter_shard_samples([unit], log):
        if sample is None:
            continue
        name = f"{unit}#{sample.get('__key__')}"
        ext = next((key for key in IMAGE_MEMBER_KEYS if key in sample), "")
        try:
            yield name, ext, open_image(sample, max_pixels)
        except Exception as e:
            yield name, ext, e
    if log.total:
        yield unit, "", ValueError(f"{log.total} unreadable part(s) of the shard (truncated or not a tar)")


@dataclass
class Moments:
    """Per-channel pixel count, mean and sum of squared deviations (raw units, float64)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel."""
        return np.sqrt(self.m2 / self.count)

    @classmethod
    def of(cls, pixels: torch.Tensor) -> Moments:
        """The moments of one image (C, H, W)."""
        x = pixels.to(torch.float64).flatten(1)  # C, H*W
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        return cls(np.full(x.shape[0], float(x.shape[1])), mean.numpy(), m2.numpy())

    def combine(self, other: Moments | None) -> Moments:
        """Both sets of pixels together (Chan et al.'s parallel update: stable for millions of pixels)."""
        if other is None:
            return self
        if other.mean.shape != self.mean.shape:
            raise ValueError(
                f"images with {self.mean.shape[0]} and {other.mean.shape[0]} channels; pass --in-chans N to read "
                "every image with N channels"
            )
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        return Moments(count, mean, self.m2 + other.m2 + delta**2 * self.count * other.count / count)


@dataclass
class UnitReport:
    """What one file or shard (or all of them) held: image kinds with counts, bad images with reasons, moments."""

    kinds: Counter[str] = field(default_factory=Counter)
    bad: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0
    moments: Moments | None = None
    bands: Counter[int] = field(default_factory=Counter)  # images per band count as stored (palette: 3)
    depths: Counter[str] = field(default_factory=Counter)  # images per bit depth ('8-bit int', '32-bit float')

    def add(self, other: UnitReport) -> None:
        """Merge another report into this one."""
        self.kinds.update(other.kinds)
        self.bands.update(other.bands)
        self.depths.update(other.depths)
        self.bad.extend(other.bad)
        self.images += other.images
        if other.moments is not None:
            self.moments = other.moments.combine(self.moments)

    def mixture_warnings(self, in_chans: int | None) -> list[str]:
        """What a run would do silently to a set that mixes bit depths (or, read as stored, band counts)."""
        lines = []
        if len(self.depths) > 1:
            lines.append(
                f"the images mix bit depths ({_counts(self.depths)}): a run normalises all of them with one "
                "data.mean / data.std, so they reach the model on different scales; convert them to one depth"
            )
        if len(self.bands) > 1 and in_chans is None:
            lines.append(
                f"the images mix band counts ({_counts(self.bands, ' band')}): a run reads each with model.in_chans "
                "channels (grey repeated to 3, 8-bit colour to grey for 1, alpha dropped for 3; others refused); "
                "check them with --in-chans N"
            )
        return lines


def _counts(counts: Counter, unit: str = "") -> str:
    """'8-bit int: 10, 16-bit int: 2' or '3 bands: 10, 1 band: 2', most frequent first."""
    return ", ".join(f"{key}{unit}{'s' if unit and key != 1 else ''}: {n}" for key, n in counts.most_common())


def check_unit(args: tuple[str, str, int | None, int | None, bool]) -> UnitReport:
    """Decode every image of a unit completely; with `moments`, per-channel statistics in raw units."""
    unit, kind, max_pixels, in_chans, moments = args
    report = UnitReport()
    for name, ext, source in _sources(unit, kind, max_pixels):
        if isinstance(source, Exception):
            report.bad.append((name, describe_error(source)))
            continue
        try:
            kind_name = describe_source(source, ext)
            bands, depth = source_channels(source), source_depth(source)
            pixels = to_tensor(source, in_chans or bands)  # decodes everything: truncation shows here
        except Exception as e:
            report.bad.append((name, describe_error(e)))
            continue
        finally:
            close_source(source)
        report.kinds[kind_name] += 1
        report.bands[bands] += 1
        report.depths[depth] += 1
        report.images += 1
        if moments:
            report.moments = Moments.of(pixels).combine(report.moments)
    return report


def scan(
    units: list[str], kind: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, in_chans: int | None = None,
    moments: bool = False, workers: int = 0, desc: str = "scan",
) -> UnitReport:  # fmt: skip
    """All units read by a pool of `workers` processes (0: one per CPU), merged into one report."""
    total = UnitReport()
    tasks = [(unit, kind, max_pixels, in_chans, moments) for unit in units]
    with closing(Progress(len(units), f"{desc} ({kind})", every=max(1, len(units) // 20))) as progress:
        for report in pool_map(check_unit, tasks, workers, ordered=False):
            total.add(report)
            progress.update()
    return total
