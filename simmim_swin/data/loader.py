"""Deterministic data loading for map-style datasets (a batch depends on the seed, the epoch and the rank only,
not on num_workers or the process's global RNG), and the fixed batch shown in image panels."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from simmim_swin.data.datasets import ImageCollection, transform_image
from simmim_swin.data.images import BadSample
from simmim_swin.data.transforms import EvalView
from simmim_swin.distributed import LoaderWorkerInit

_MAX_SAMPLE_SEED = 2**62  # torch and python take seeds this large; numpy's legacy seeding gets them mod 2**32


def derive_seed(*values: int) -> int:
    """A 62-bit seed that hashes all `values`: unlike seed + epoch, (0, 1) and (1, 0) give unrelated streams."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0]
    return int(state) % _MAX_SAMPLE_SEED


def check_rank(rank: int, world_size: int) -> None:
    """ValueError unless 0 <= rank < world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")


@dataclass
class SeededSampler(Sampler[tuple[int, int]]):
    """Yields (index, sample_seed) in a shuffled order drawn from (seed, epoch); each pass is the next epoch.

    Every rank draws the same permutation and takes every world_size-th position from its rank, truncated so all
    ranks see the same number of samples (at most `samples_per_epoch`). `skip` drops this rank's first samples of
    the first pass without loading them, so a resumed run sees exactly the samples an uninterrupted one would.
    """

    num_samples: int
    seed: int
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    skip: int = 0
    samples_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_rank(self.rank, self.world_size)
        self.per_rank = min(self.num_samples // self.world_size, self.samples_per_epoch or self.num_samples)

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # the DataLoader calls this in the main process once per pass: advance the epoch here, not in the workers
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        skip, self.skip, self.epoch = self.skip, 0, self.epoch + 1
        order = torch.randperm(self.num_samples, generator=generator)
        # seeds are indexed by position in the global order, so ranks never share a sample seed
        seeds = torch.randint(0, _MAX_SAMPLE_SEED, (self.num_samples,), generator=generator)
        mine = slice(self.rank + skip * self.world_size, self.per_rank * self.world_size, self.world_size)
        yield from zip(order[mine].tolist(), seeds[mine].tolist())  # one conversion, not two tensor reads per sample


class SeededSamples(Dataset):
    """Item (index, seed) runs dataset[index] with torch, python and numpy RNGs seeded, then restores them (with
    num_workers=0 the training process's dropout and drop path streams are left untouched)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:  # a worker's RNGs serve its samples only, each seeded afresh: no restore
            return self._seeded(index, seed)  # (saving and restoring the states took ~40 % of a Fashion-MNIST sample)
        py_state, np_state = random.getstate(), np.random.get_state()
        # devices=[]: only the CPU generator is forked; transforms and masks run on the CPU
        with torch.random.fork_rng(devices=[]):
            try:
                return self._seeded(index, seed)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _seeded(self, index: int, seed: int) -> Any:
        # not torch.manual_seed: that would also reseed CUDA, outside what fork_rng restores
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


class EvalShard(Dataset):
    """Rank `rank`'s share of an evaluation set: items rank, rank + world_size, ..., padded to ceil(N / world_size).

    Under FSDP every forward is a collective, so all ranks must run as many; the padding repeats a real image with
    the label -1, which evaluate_classifier ignores.
    """

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1) -> None:
        check_rank(rank, world_size)
        if len(dataset) == 0:
            raise ValueError("the evaluation set is empty: check the validation images")
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world_size))
        self.length = -(-len(dataset) // world_size)  # ceil

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> tuple[Any, int]:
        if position < len(self.indices):
            return self.dataset[self.indices[position]]
        for index in range(len(self.dataset)):  # the first readable image (unreadable ones are BadSamples)
            item = self.dataset[index]
            if not isinstance(item, BadSample):
                return item[0], -1
        raise ValueError("the evaluation set has no readable image")


def build_pretrain_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    skip_batches: int = 0,
    batches_per_epoch: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """One DataLoader for a whole run: each pass over it is one epoch, the first being `epoch`.

    Each rank gets a disjoint share of one permutation. `skip_batches` starts the first pass that many batches in,
    without loading them; `batches_per_epoch` caps every pass (whole optimizer steps, so no remainder spills into
    the next epoch). collate_fn=stream.collate_good yields Batch tuples that count the bad samples dropped.
    """
    # workers need no seeding of their own: the per-sample seeds override what torch seeds in each worker
    per_rank = len(dataset) // world_size
    if per_rank < batch_size:
        total = f" ({len(dataset)} across world_size={world_size})" if world_size > 1 else ""
        raise ValueError(
            f"the dataset gives {per_rank} samples per process{total}, fewer than one batch of {batch_size}; "
            "lower data.batch_size or add images (data.samples_per_epoch for source=photos)"
        )
    num_batches = min(per_rank // batch_size, batches_per_epoch or per_rank)
    if not 0 <= skip_batches <= num_batches:
        raise ValueError(f"skip_batches={skip_batches} must lie in [0, {num_batches}], the batches in one epoch")
    cap = batches_per_epoch * batch_size if batches_per_epoch else None
    sampler = SeededSampler(
        len(dataset), seed, epoch, rank=rank, world_size=world_size, skip=skip_batches * batch_size,
        samples_per_epoch=cap,
    )  # fmt: skip
    return DataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        # pinning needs an accelerator; without one torch only warns, so skip it
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        # the DataLoader draws its workers' base seed on every iter(): from a generator of its own, so that the
        # draw never consumes the process's global torch RNG
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch)),
        worker_init_fn=LoaderWorkerInit(),
    )


def endless(loader: Iterable[Any]) -> Iterator[Any]:
    """Every batch of every pass over `loader`, forever (one pass per epoch)."""
    while True:
        yield from loader


def make_fixed_batch(
    dataset: ImageCollection,
    num_images: int,
    img_size: int,
    mask_generator: Callable[..., torch.Tensor],
    seed: int,
    in_chans: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images and masks every call: the first `num_images` readable images (cycled if fewer), in raw
    units (uint8 for 8-bit files, else float32) through the eval view; mask_generator is called with generator=."""
    view = EvalView(img_size, in_chans)
    found: list[torch.Tensor] = []
    errors: list[str] = []
    for k in range(dataset.num_images):
        image = transform_image(dataset, k, view)  # a bad file is skipped here as in training
        if isinstance(image, BadSample):
            errors.append(image.reason)
        else:
            found.append(image)
        if len(found) == num_images:
            break
    if not found:
        raise ValueError(f"{dataset!r}: none of the images can be read, e.g. {errors[0] if errors else '?'}")
    images = torch.stack([found[k % len(found)] for k in range(num_images)])  # uint8 unless one is float32
    generator = torch.Generator().manual_seed(seed)
    masks = torch.stack([mask_generator(generator=generator) for _ in range(num_images)]).to(torch.uint8)
    return images, masks  # N, C, H, W and N, h, w
