"""Deterministic data loading for map-style pretraining datasets, and the fixed batch shown in image panels.

Every sample's randomness (crop, flip, mask) comes from its own seed, drawn together with the shuffle order
from one torch.Generator seeded by (seed, epoch). So a batch depends on the seed, the epoch and the rank only:
not on num_workers, not on which worker runs it, and not on whatever else used the process's global RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from simmim_swin.data.datasets import ImageCollection, transform_image
from simmim_swin.data.images import BadSample
from simmim_swin.data.transforms import EvalView
from simmim_swin.distributed import LoaderWorkerInit

_MAX_SAMPLE_SEED = 2**62  # torch and python take seeds this large; numpy's legacy seeding gets them mod 2**32


def derive_seed(*values: int) -> int:
    """A 62-bit seed that is a hash of all `values`: neighbouring tuples give unrelated streams (seed + epoch would
    equate (0, 1) and (1, 0))."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0]
    return int(state) % _MAX_SAMPLE_SEED


def make_epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU torch.Generator whose state is a function of (seed, epoch) alone."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative integers")
    return torch.Generator().manual_seed(derive_seed(seed, epoch))


def check_rank(rank: int, world_size: int) -> None:
    """ValueError unless 0 <= rank < world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields (index, sample_seed) in a shuffled order drawn from (seed, epoch); each pass is the next epoch.

    With world_size > 1 every rank draws the same permutation and takes every world_size-th position starting
    at its rank, truncated so all ranks see the same number of samples (at most `samples_per_epoch` each).
    `skip` drops this rank's first samples of the first pass without loading them (resuming mid-epoch). Because
    the order is a function of (seed, epoch) and not of how many passes came before, one DataLoader (with
    persistent workers) serves the whole run, and a resumed run sees exactly the samples an uninterrupted one would.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip: int = 0,
        samples_per_epoch: int | None = None,
    ) -> None:
        check_rank(rank, world_size)
        make_epoch_generator(seed, epoch)  # checks seed and epoch
        self.num_samples = num_samples
        self.seed, self.epoch = seed, epoch
        self.rank = rank
        self.world_size = world_size
        self.per_rank = min(num_samples // world_size, samples_per_epoch or num_samples)
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip={skip} must lie in [0, {self.per_rank}], the samples per process in an epoch")
        self.skip = skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # the DataLoader calls this in the main process once per pass: advance the epoch here, not in the workers
        generator = make_epoch_generator(self.seed, self.epoch)
        skip, self.skip, self.epoch = self.skip, 0, self.epoch + 1
        order = torch.randperm(self.num_samples, generator=generator)
        # seeds are indexed by position in the global order, so ranks never share a sample seed
        seeds = torch.randint(0, _MAX_SAMPLE_SEED, (self.num_samples,), generator=generator)
        start = self.rank + skip * self.world_size
        for pos in range(start, self.per_rank * self.world_size, self.world_size):
            yield int(order[pos]), int(seeds[pos])


class SeededSamples(Dataset):
    """Wraps a map-style dataset: item (index, seed) runs dataset[index] with torch, python and numpy RNGs seeded.

    The caller's RNG states are restored afterwards, so with num_workers=0 the training process's random
    streams (dropout, drop path) are left untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        # devices=[]: only the CPU generator is forked; transforms and masks run on the CPU
        with torch.random.fork_rng(devices=[]):
            # not torch.manual_seed: that would also reseed CUDA, outside what fork_rng restores
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EvalShard(Dataset):
    """Rank `rank`'s share of an evaluation set: items rank, rank + world_size, ..., padded to an even length.

    Every rank gets ceil(N / world_size) items, so under FSDP all ranks run the same number of forwards (each
    one a collective); the padding repeats a real image with the label -1, which evaluate_classifier ignores.
    With world_size 1 it is the whole set, in order.
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

    Yields what the dataset's items collate to, e.g. (images (B, 3, H, W), masks (B, h, w)), shuffled and
    augmented deterministically from (seed, epoch). With world_size > 1 each rank gets a disjoint share of one
    permutation. `skip_batches` starts the first pass that many batches in, without loading them, and yields
    exactly the batches an uninterrupted run would have; `batches_per_epoch` caps every pass (whole optimizer
    steps only, so no remainder spills into the next epoch). Workers persist across passes.
    Workers need no seeding of their own: torch seeds torch, `random` and numpy in each worker from the loader
    generator already (torch.utils.data._utils.worker), and the per-sample seeds override them anyway; their
    worker_init_fn only ties them to the main process (distributed.LoaderWorkerInit).
    collate_fn=stream.collate_good makes it yield Batch tuples that carry the bad samples dropped from each batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 loads in the main process)")
    check_rank(rank, world_size)
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
        # the DataLoader draws its workers' base seed from a generator on every iter(): one of its own, from
        # (seed, epoch), so that the draw never consumes the process's global torch RNG
        generator=make_epoch_generator(seed, epoch),
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
    """The same images and masks every call: the first `num_images` readable images (cycled if fewer).

    Args:
        dataset: any datasets.ImageCollection; images that fail to load are passed over.
        mask_generator: called as mask_generator(generator=g), e.g. a MaskGenerator.

    Returns:
        images (N, in_chans, img_size, img_size) in raw units (uint8 for 8-bit files, else float32) through the
        deterministic eval view; masks (N, h, w) uint8.
    """
    if num_images <= 0:
        raise ValueError(f"num_images={num_images} must be positive")
    if dataset.num_images <= 0:
        raise ValueError(f"{dataset!r} has no images to show")
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
    images = torch.stack([found[k % len(found)].float() for k in range(num_images)])
    if all(image.dtype == torch.uint8 for image in found):
        images = images.to(torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.stack([mask_generator(generator=generator) for _ in range(num_images)]).to(torch.uint8)
    return images, masks  # N, C, H, W and N, h, w
