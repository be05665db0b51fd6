"""Everything pretraining needs from the data config: a batch stream that starts at any step, the steps per
epoch, fixed validation batches and the images shown in panels; one interface for every `data.source`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from simmim_swin.config import DataConfig
from simmim_swin.data.datasets import (
    MAP_STYLE_SOURCES,
    ImageCollection,
    ImageList,
    build_pretrain_dataset,
    build_pretrain_transform,
)
from simmim_swin.data.loader import build_pretrain_loader, endless
from simmim_swin.data.shards import resolve_urls
from simmim_swin.data.stream import (
    BadDataMonitor,
    Batch,
    PretrainSample,
    ShardStream,
    build_shard_loader,
    collate_good,
    open_image,
    read_samples,
)
from simmim_swin.data.transforms import EvalView

MaskFn = Callable[..., torch.Tensor]


@dataclass
class PretrainData:
    """A pretraining run's data: `batches(start_step)` yields micro-batches (images, masks) forever, exactly
    `steps_per_epoch * accum_steps` per epoch (a batch is smaller by the bad samples dropped from it), and feeds
    `monitor` the bad-sample counts."""

    steps_per_epoch: int
    description: str
    panel_source: ImageCollection | None  # what make_fixed_batch shows
    make_batches: Callable[[int], Iterator[Batch]]
    monitor: BadDataMonitor
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Micro-batches from optimizer step `start_step` on; raises BadDataError past data.max_bad_fraction."""
        yield from monitored(self.make_batches(start_step), self.monitor)


def monitored(batches: Iterator[Batch], monitor: BadDataMonitor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The data of each Batch that has any, after adding its bad-sample counts to `monitor` (which may stop)."""
    for batch in batches:
        monitor.update(batch)
        if batch.data:
            yield batch.data


def _first_images(urls: list[str], num_images: int, name: str, max_pixels: int | None) -> ImageList:
    """The first readable images of the shards `urls` (at most `max_pixels` each, as in training), decoded, for the
    reconstruction panels."""

    def decoded(sample: dict[str, Any], generator: torch.Generator) -> tuple[Image.Image | np.ndarray]:
        source = open_image(sample, max_pixels)
        if isinstance(source, Image.Image):
            source.load()  # decoded now: the shard's bytes go away
        return (source,)

    return ImageList([item[0] for item in read_samples(urls, num_images, decoded)], name)


def build_val_batches(
    data_cfg: DataConfig, img_size: int, mask_generator: MaskFn, seed: int, in_chans: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first data.val_samples samples of data.val_urls, resized and centre-cropped,
    with masks from `seed`; batches of data.batch_size (raw images, masks). Empty without val_urls."""
    if not data_cfg.val_urls or data_cfg.val_samples <= 0:
        return []
    urls, _ = resolve_urls(data_cfg.val_urls, what="data.val_urls")
    sample_fn = PretrainSample(EvalView(img_size, in_chans), mask_generator, data_cfg.max_image_pixels)
    items = read_samples(urls, data_cfg.val_samples, sample_fn, seed=seed)
    if not items:
        raise ValueError(f"data.val_urls={data_cfg.val_urls!r} holds no readable image samples")
    size = data_cfg.batch_size
    return [tuple(default_collate(items[i : i + size])) for i in range(0, len(items), size)]  # (B,C,H,W), (B,h,w)


def build_pretrain_data(
    data_cfg: DataConfig,
    img_size: int,
    mask_generator: MaskFn,
    seed: int,
    accum_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    num_panel_images: int = 4,
    in_chans: int = 3,
) -> PretrainData:
    """The data of a pretraining run for `data_cfg.source` (photos, folder, fashion_mnist or shards), images of
    `in_chans` channels; the panels show the first validation images if there are any, else the first training ones.
    """
    val_batches = build_val_batches(data_cfg, img_size, mask_generator, seed, in_chans)
    map_style = data_cfg.source in MAP_STYLE_SOURCES
    if map_style:  # photos, folder or fashion_mnist: one seeded DataLoader that skips to any step exactly
        dataset = build_pretrain_dataset(data_cfg, img_size, mask_generator, in_chans)
        samples_per_epoch, description, panel = len(dataset), repr(dataset), dataset
        what = f"the dataset ({description})"
    else:  # shards: streamed, each rank and worker its own shards, a new order drawn on resume
        urls, index_total = resolve_urls(data_cfg.urls)
        samples_per_epoch, what = data_cfg.samples_per_epoch or index_total, "data.samples_per_epoch"
        if not samples_per_epoch:
            raise ValueError(
                "data.samples_per_epoch=0 means 'the total in the index', but data.urls is not an index file; "
                "set data.samples_per_epoch to the number of samples (or pass the index .json written by make-shards)"
            )
        transform = build_pretrain_transform(data_cfg, img_size, in_chans)
        sample_fn = PretrainSample(transform, mask_generator, data_cfg.max_image_pixels)
        description = f"{len(urls)} shards, {samples_per_epoch} samples per epoch"
        readers = world_size * max(1, data_cfg.num_workers)
        if len(urls) < readers:  # still correct, but the workers' shards overlap: say so once, at start-up
            description += f" (fewer shards than the {readers} ranks x workers: every worker reads all of them)"
        panel = None
    global_batch = data_cfg.batch_size * accum_steps * world_size
    steps_per_epoch = samples_per_epoch // global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"one optimizer step needs data.batch_size x world size x optim.accum_steps = {global_batch} samples "
            f"but {what} gives {samples_per_epoch} per epoch; lower the batch size or use more data"
        )
    if val_batches:
        val_urls, _ = resolve_urls(data_cfg.val_urls, what="data.val_urls")
        panel = _first_images(val_urls, num_panel_images, "first validation images", data_cfg.max_image_pixels)
    elif panel is None and num_panel_images:
        panel = _first_images(urls, num_panel_images, "first images", data_cfg.max_image_pixels)
        if not panel.num_images:
            raise ValueError(f"data.urls={data_cfg.urls!r}: no readable image in the shards")

    def make_batches(start_step: int) -> Iterator[Batch]:
        # one loader for the run: each pass is an epoch of whole optimizer steps; a resumed run continues its epoch
        # where it stopped without loading the batches already seen
        epoch, skip_batches = start_step // steps_per_epoch, (start_step % steps_per_epoch) * accum_steps
        if map_style:
            loader = build_pretrain_loader(
                dataset,
                batch_size=data_cfg.batch_size,
                num_workers=data_cfg.num_workers,
                seed=seed,
                epoch=epoch,
                pin_memory=pin_memory,
                rank=rank,
                world_size=world_size,
                skip_batches=skip_batches,
                batches_per_epoch=steps_per_epoch * accum_steps,
                collate_fn=collate_good,  # unreadable files are dropped from their batch and counted
            )
        else:
            stream = ShardStream(
                urls,
                sample_fn,
                batch_size=data_cfg.batch_size,
                batches_per_epoch=steps_per_epoch * accum_steps,
                seed=seed,
                rank=rank,
                world_size=world_size,
                start_epoch=epoch,
                skip_batches=skip_batches,
                resume_step=start_step,
                shuffle_buffer=data_cfg.shuffle_buffer,
            )
            loader = build_shard_loader(stream, data_cfg.num_workers, pin_memory=pin_memory)
        yield from endless(loader)

    monitor = BadDataMonitor(data_cfg.max_bad_fraction, data_cfg.bad_check_after, world_size, name_files=map_style)
    return PretrainData(steps_per_epoch, description, panel, make_batches, monitor, val_batches)
