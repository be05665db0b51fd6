"""Streaming webdataset shards for training: resampled shards split by rank and worker, a shuffle buffer,
decoding and masks in the workers, a fixed number of batches per epoch, and bad samples skipped and counted."""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from simmim_swin.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadSample,
    ImageSource,
    close_source,
    describe_error,
    open_source,
)
from simmim_swin.data.loader import derive_seed
from simmim_swin.data.shards import IMAGE_MEMBER_KEYS
from simmim_swin.data.transforms import EvalView, PretrainCrop
from simmim_swin.distributed import DistInfo, LoaderWorkerInit, all_reduce_sum_

log = logging.getLogger(__name__)

SampleFn = Callable[[dict[str, Any], torch.Generator], tuple[torch.Tensor, ...]]
LOG_FIRST_BAD = 10  # each worker logs its first bad samples one line each...
LOG_BAD_EVERY = 100  # ...then one line per this many


def assign_shards(urls: list[str], slot: int, num_slots: int) -> list[str]:
    """The shards of one (rank, worker) slot: every num_slots-th, so slots never share a shard."""
    # fewer shards than slots: every slot resamples all of them (seeded differently); an empty worker would leave
    # its rank short of batches (docs/reference.md, known pitfalls)
    if len(urls) < num_slots:
        return list(urls)
    return urls[slot::num_slots]


class Batch(NamedTuple):
    """What the shard loader yields: tensors, plus the bad samples the worker skipped since its previous batch."""

    data: tuple[torch.Tensor, ...]  # e.g. images (B, C, H, W), masks (B, h, w) uint8; empty: a report of bad samples
    num_bad: int
    bad_shards: tuple[str, ...]  # the shard (or, for image folders, the file) of each bad sample
    bad_reasons: tuple[str, ...] = ()  # image folders: why each file could not be read


def collate_good(items: list[Any]) -> Batch:
    """default_collate over the good samples of a map-style batch; images.BadSample markers are dropped and counted."""
    bad = [item for item in items if isinstance(item, BadSample)]
    good = [item for item in items if not isinstance(item, BadSample)]
    data = tuple(default_collate(good)) if good else ()
    return Batch(data, len(bad), tuple(b.path for b in bad), tuple(b.reason for b in bad))


@dataclass
class BadSampleLog:
    """A worker's record of skipped samples: counts, the shards they came from, rate-limited log lines."""

    where: str = ""
    quiet: bool = False  # count only: the caller reports the bad samples itself
    total: int = 0
    pending: list[str] = field(default_factory=list)  # shards of bad samples not yet handed to the main process
    current_url: str = ""

    def record(self, url: str, key: str | None, reason: object) -> None:
        """Count one bad sample (or empty / unreadable shard); log it within the rate limit."""
        self.total += 1
        self.pending.append(url)
        if not self.quiet and (self.total <= LOG_FIRST_BAD or self.total % LOG_BAD_EVERY == 0):
            what = f"sample {key!r}" if key else "shard"
            reason = reason if isinstance(reason, str) else describe_error(reason)
            log.warning(f"skipping bad {what} in {url}: {reason} [{self.total} bad{self.where}]")

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler: record and continue (its warn_and_continue sleeps 0.5 s per error)."""
        self.record(self.current_url, None, exn)
        return True

    def take(self) -> tuple[int, tuple[str, ...]]:
        """(count, shards) of the bad samples since the last call."""
        pending, self.pending = tuple(self.pending), []
        return len(pending), pending


def iter_shard_samples(urls: Iterable[str], log: BadSampleLog) -> Iterator[dict[str, Any] | None]:
    """Raw samples (dicts of member bytes plus __key__ / __url__) of each shard in turn; None after a shard that
    gave none (missing, unreadable, empty), so that a consumer regains control even when every shard is bad."""
    for url in urls:
        log.current_url = url
        bad_before, count = log.total, 0
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=log.handler):
            count += 1
            yield sample
        if count == 0:
            if log.total == bad_before:
                log.record(url, None, "empty shard: no samples")
            yield None


def open_image(sample: dict[str, Any], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """The sample's image member: a lazily opened PIL image, or a (C, H, W) array for npy / tif members;
    ValueError if it has none, ImageTooLargeError above `max_pixels`."""
    for ext in IMAGE_MEMBER_KEYS:
        if ext in sample:
            return open_source(sample[ext], ext, max_pixels=max_pixels)
    members = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"no image member (has {members}; expected one of {list(IMAGE_MEMBER_KEYS)})")


@dataclass
class PretrainSample:
    """Raw sample -> (image (C, S, S) uint8 or float32, token mask uint8), both drawn from the worker's generator."""

    transform: PretrainCrop | EvalView
    mask_generator: Callable[..., torch.Tensor]
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        source = open_image(sample, self.max_pixels)
        try:
            image = self.transform(source, generator=generator)
        finally:
            close_source(source)
        return image, self.mask_generator(generator=generator)


_REPORTED: set[str] = set()  # files this process has already named


def collate_good_only(items: list[Any]) -> tuple[torch.Tensor, ...]:
    """collate_good for evaluation: the good samples' data; each bad file is named once per process."""
    batch = collate_good(items)
    for path, reason in zip(batch.bad_shards, batch.bad_reasons):
        if path not in _REPORTED:
            _REPORTED.add(path)
            log.warning(f"skipping unreadable evaluation image {path}: {reason}")
    if not batch.data:
        raise ValueError(f"every image of an evaluation batch is unreadable, e.g. {batch.bad_shards[0]}")
    return batch.data


@dataclass
class ShardStream(IterableDataset):
    """An endless resampled stream of shards cut into epochs of exactly `batches_per_epoch` batches per rank.

    Each iteration is the next epoch (keep the DataLoader's workers persistent). The workers of a rank share out its
    batches round robin, as the DataLoader collects them, so no rank ever waits for another's missing batch.

    Args:
        sample_fn: raw sample dict, torch.Generator -> tuple of tensors; raising means "bad sample".
        resume_step: the optimizer step the run (re)started at; part of every seed, so a resumed run draws a new
            order instead of replaying epoch 0.
        shuffle_buffer: raw samples held per worker for shuffling (0 or 1: none).
    """

    urls: list[str]
    sample_fn: SampleFn
    batch_size: int
    batches_per_epoch: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    start_epoch: int = 0
    skip_batches: int = 0
    resume_step: int = 0
    shuffle_buffer: int = 2000
    _iteration: int = field(default=0, init=False)  # per worker copy: persistent workers keep it across epochs

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start_epoch + self._iteration
        num_batches = self.batches_per_epoch - (self.skip_batches if self._iteration == 0 else 0)
        self._iteration += 1
        # the DataLoader takes one batch from each worker in turn: worker w makes every num_workers-th batch
        quota = len(range(worker, num_batches, num_workers))
        if quota == 0:
            return
        # every draw from (seed, rank, worker, epoch, resume_step), never from time as webdataset's resampling does
        seed = derive_seed(self.seed, self.rank, worker, epoch, self.resume_step)
        shard_rng, shuffle_rng = random.Random(derive_seed(seed, 0)), random.Random(derive_seed(seed, 1))
        generator = torch.Generator().manual_seed(derive_seed(seed, 2))  # crops, flips, masks
        shards = assign_shards(self.urls, self.rank * num_workers + worker, self.world_size * num_workers)
        log = BadSampleLog(where=f" on rank {self.rank} worker {worker}")
        # resampling with replacement: an endless stream; the epoch ends by count, never by running dry
        samples: Iterator = iter_shard_samples((shard_rng.choice(shards) for _ in itertools.count()), log)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=shuffle_rng)(samples)
        items: list[tuple[torch.Tensor, ...]] = []
        for sample in samples:
            if sample is not None:
                try:
                    items.append(self.sample_fn(sample, generator))
                except Exception as e:  # the bad-data policy: any failure to decode skips and counts the sample
                    log.record(sample.get("__url__", log.current_url), sample.get("__key__"), e)
            if len(items) == self.batch_size:
                yield Batch(tuple(default_collate(items)), *log.take())
                items = []
                quota -= 1
                if quota == 0:
                    return
            elif len(log.pending) >= self.batch_size:
                yield Batch((), *log.take())  # a report, so the main process can stop a run of bad data


def build_shard_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """DataLoader over a ShardStream: batches made in the workers, persistent workers, optional pinned memory."""
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        collate_fn=_as_is,  # not default_convert: it would turn the Batch's tuples into lists
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # persistent workers keep their ShardStream copy, whose iteration count is the epoch
        persistent_workers=num_workers > 0,
        worker_init_fn=LoaderWorkerInit(),  # workers leave stopping to the main process and die with it
    )


def _as_is(batch: Batch) -> Batch:
    return batch


class BadDataError(ValueError):
    """Too many bad samples: the message names the fraction, the limit and the shards."""


class BadDataMonitor:
    """Main-process sum of good and bad samples over all workers; stops the run above `max_bad_fraction`.

    The fraction is bad / max(samples read, check_after), so a few bad samples early on never stop a run. With
    world_size > 1 the check waits for `reduce`, which every rank calls at the same step, so all ranks stop together.
    `name_files=True` (image folders) logs each bad file once, with the reason.
    """

    def __init__(
        self, max_bad_fraction: float, check_after: int = 1000, world_size: int = 1, name_files: bool = False
    ) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.check_after = max(1, check_after)
        self.world_size = world_size
        self.name_files = name_files
        self.num_good = 0
        self.num_bad = 0
        self.bad_shards: Counter[str] = Counter()

    def update(self, batch: Batch) -> None:
        """Add one batch's counts; raises BadDataError once the limit is exceeded (in one process)."""
        self.num_good += int(batch.data[0].shape[0]) if batch.data else 0
        self.num_bad += batch.num_bad
        if self.name_files:
            for path, reason in zip(batch.bad_shards, batch.bad_reasons):
                if path not in self.bad_shards:
                    log.warning(f"skipping unreadable image {path}: {reason}")
        self.bad_shards.update(batch.bad_shards)
        if self.num_good == 0 and self.num_bad >= self.check_after:  # nothing good at all: never wait for it
            self._stop(self.num_bad, self.num_bad, nothing_good=True)
        if self.world_size == 1:
            self.check(self.num_bad, self.num_good + self.num_bad)

    def check(self, num_bad: int, num_seen: int) -> None:
        """Raise BadDataError if `num_bad` of `num_seen` samples (all ranks together) is above the limit."""
        if num_bad and num_bad > self.max_bad_fraction * max(num_seen, self.check_after):
            self._stop(num_bad, num_seen, nothing_good=False)

    def reduce(self, info: DistInfo, device: torch.device) -> int:
        """The bad samples of all ranks so far (an all-reduce: call it at the same step on every rank), after
        checking the fraction over all ranks, so that every rank takes the same decision."""
        counts = torch.tensor([float(self.num_bad), float(self.num_good)], device=device)  # NCCL: device tensors
        num_bad, num_good = (int(v) for v in all_reduce_sum_(counts, info).tolist())
        self.check(num_bad, num_bad + num_good)
        return num_bad

    def _stop(self, num_bad: int, num_seen: int, nothing_good: bool) -> None:
        worst = ", ".join(f"{url} ({n})" for url, n in self.bad_shards.most_common(10))
        more = len(self.bad_shards) - 10
        where = "file" if self.name_files else "shard"
        limit = "and not one good sample" if nothing_good else f"above data.max_bad_fraction={self.max_bad_fraction}"
        ranks = " (all ranks)" if self.world_size > 1 else ""
        raise BadDataError(
            f"stopping: {num_bad} of {num_seen} samples read{ranks} were bad (corrupt, not an image, too large or an "
            f"empty shard), {limit}. Bad samples per {where}{' on this rank' if ranks else ''}: {worst or 'none'}"
            + (f" and {more} more" if more > 0 else "")
            + ". Fix or remove those files (simmim-swin check-data PATH lists them all), or raise "
            "data.max_bad_fraction."
        )


def read_samples(
    urls: Iterable[str], num_samples: int, sample_fn: SampleFn, seed: int = 0, log: BadSampleLog | None = None
) -> list[tuple[Any, ...]]:
    """The first `num_samples` good samples of the shards in order, through `sample_fn` (bad ones are logged)."""
    log = log or BadSampleLog(where=" while reading a fixed set")
    generator = torch.Generator().manual_seed(seed)
    out: list[tuple[Any, ...]] = []
    for sample in iter_shard_samples(urls, log):
        if len(out) >= num_samples:
            break
        if sample is None:
            continue
        try:
            out.append(sample_fn(sample, generator))
        except Exception as e:  # same policy as training: skip and count
            log.record(sample.get("__url__", log.current_url), sample.get("__key__"), e)
    return out
