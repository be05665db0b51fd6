"""The streaming shard loader: rank/worker splitting, exact batches per epoch, seeding and resume, bad data."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.data import (
    BadDataError,
    BadDataMonitor,
    BadSampleLog,
    Batch,
    PretrainCrop,
    PretrainSample,
    ShardSample,
    ShardStream,
    build_shard_loader,
    iter_shard_samples,
    read_index,
    write_shards,
)
from simmim_swin.data.stream import LOG_FIRST_BAD, assign_shards
from simmim_swin.masking import MaskGenerator

IMG = 32
NUM_SHARDS = 8
PER_SHARD = 6


def _png(value: int, size: int = 40) -> bytes:
    """A PNG whose pixels are all `value` (so a crop of it tells which sample it was)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory) -> list[str]:
    """8 shards x 6 samples; sample j of shard i is a flat image of grey value 6i + j."""
    out = tmp_path_factory.mktemp("shards")
    samples = (ShardSample(f"s{i}_{j}", _png(PER_SHARD * i + j), "png") for i in range(NUM_SHARDS)
               for j in range(PER_SHARD))  # fmt: skip
    index = read_index(write_shards(samples, out, max_count=PER_SHARD))
    return [s["url"] for s in index["shards"]]


def source_of(sample: dict, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A sample_fn that reports where a sample came from: (shard index, worker id, grey value)."""
    number = re.search(r"-(\d+)\.tar$", sample["__url__"])
    shard = int(number.group(1)) if number else -1
    info = torch.utils.data.get_worker_info()
    with Image.open(io.BytesIO(sample["png"])) as img:
        value = img.getpixel((0, 0))[0]
    return torch.tensor(shard), torch.tensor(info.id if info else 0), torch.tensor(value)


def _epochs(stream: ShardStream, num_workers: int, num_epochs: int) -> list[list[Batch]]:
    loader = build_shard_loader(stream, num_workers)
    return [list(loader) for _ in range(num_epochs)]


def test_two_ranks_two_workers_read_disjoint_shards_and_the_same_number_of_batches(shard_urls):
    seen: dict[tuple[int, int], set[int]] = {}
    for rank in range(2):
        stream = ShardStream(shard_urls, source_of, batch_size=4, batches_per_epoch=5, seed=0, rank=rank,
                             world_size=2, shuffle_buffer=8)  # fmt: skip
        for epoch in _epochs(stream, num_workers=2, num_epochs=2):
            assert len(epoch) == 5  # exactly the configured batches, every rank, every epoch
            for batch in epoch:
                shards, workers, _ = batch.data
                assert batch.num_bad == 0 and shards.shape == (4,)
                assert len(set(workers.tolist())) == 1  # a batch is made by one worker
                seen.setdefault((rank, int(workers[0])), set()).update(shards.tolist())
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    slots = list(seen.values())
    for a in range(4):
        for b in range(a + 1, 4):
            assert not slots[a] & slots[b], seen  # no two (rank, worker) slots share a shard
    assert set().union(*slots) == set(range(NUM_SHARDS))


def test_fewer_shards_than_workers_still_fill_every_rank(shard_urls):
    assert assign_shards(shard_urls[:3], slot=5, num_slots=8) == shard_urls[:3]
    stream = ShardStream(shard_urls[:1], source_of, batch_size=4, batches_per_epoch=3, shuffle_buffer=0)
    (epoch,) = _epochs(stream, num_workers=2, num_epochs=1)
    assert len(epoch) == 3 and {int(b.data[1][0]) for b in epoch} == {0, 1}


def _values(stream: ShardStream, num_workers: int = 2, num_epochs: int = 2) -> list[list[list[int]]]:
    return [[b.data[2].tolist() for b in epoch] for epoch in _epochs(stream, num_workers, num_epochs)]


def test_same_seed_same_batches_other_seed_epoch_or_resume_step_differ(shard_urls):
    def stream(**kwargs) -> ShardStream:
        return ShardStream(shard_urls, source_of, batch_size=4, batches_per_epoch=4, shuffle_buffer=10, **kwargs)

    first = _values(stream(seed=3))
    assert first == _values(stream(seed=3))  # same seed: same batches, whatever the global RNG did
    assert first[0] != first[1]  # each epoch draws a new order
    assert first != _values(stream(seed=4))
    # a run resumed at step 2 of epoch 0 takes the rest of that epoch in a new order: no replay of the first run
    resumed = _values(stream(seed=3, skip_batches=2, resume_step=2))
    assert [len(e) for e in resumed] == [2, 4]
    assert resumed[0] != first[0][2:] and resumed[1] != first[1]


def test_pretrain_samples_are_uint8_crops_with_masks(shard_urls):
    mask_generator = MaskGenerator(IMG, 8, 4, 0.6)
    sample_fn = PretrainSample(PretrainCrop(IMG), mask_generator)
    stream = ShardStream(shard_urls, sample_fn, batch_size=4, batches_per_epoch=2, shuffle_buffer=0)
    (epoch,) = _epochs(stream, num_workers=0, num_epochs=1)
    images, masks = epoch[0].data
    assert images.shape == (4, 3, IMG, IMG) and images.dtype == torch.uint8
    assert masks.shape == (4, IMG // 4, IMG // 4) and masks.dtype == torch.uint8
    assert all(int(m[::2, ::2].sum()) == 10 for m in masks)  # ceil(16 * 0.6) of 16 mask patches
    # flat images: each crop is one grey value that names its source sample
    assert all(int(img.min()) == int(img.max()) < NUM_SHARDS * PER_SHARD for img in images)


# ------------------------------------------------------------------------------------------------ bad data


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_corrupt_truncated_and_non_image_samples_are_skipped_and_counted(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(jpeg, format="JPEG")
    url = _write_tar(tmp_path / "mixed.tar", [
        ("g0.png", _png(10)),
        ("bad1.jpg", b"\xff\xd8 this is not a jpeg"),  # corrupt
        ("g1.png", _png(11)),
        ("bad2.txt", b"a caption but no image"),  # a sample that is not an image
        ("g2.png", _png(12)),
        ("bad3.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]),  # truncated image
        ("g3.png", _png(13)),
    ])  # fmt: skip
    stream = ShardStream([url], source_of, batch_size=4, batches_per_epoch=1, shuffle_buffer=0)
    (epoch,) = _epochs(stream, num_workers=0, num_epochs=1)
    (batch,) = epoch
    assert sorted(batch.data[2].tolist()) == [10, 11, 12, 13]
    assert batch.num_bad == 3 and batch.bad_shards == (url,) * 3


def _noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_empty_missing_and_truncated_shards_are_counted_and_logged(tmp_path, caplog):
    empty = _write_tar(tmp_path / "empty.tar", [])
    pngs = [_noise_png(i) for i in range(4)]
    full = _write_tar(tmp_path / "full.tar", [(f"k{i}.png", data) for i, data in enumerate(pngs)])
    truncated = tmp_path / "truncated.tar"
    first_member = 512 + -(-len(pngs[0]) // 512) * 512  # header + data padded to 512-byte blocks
    truncated.write_bytes(Path(full).read_bytes()[: first_member + 512 + 100])  # cut inside the second image
    log = BadSampleLog()
    samples = list(iter_shard_samples([empty, str(tmp_path / "missing.tar"), str(truncated), full], log))
    good = [s["__key__"] for s in samples if s is not None and "png" in s]
    assert good == ["k0", "k0", "k1", "k2", "k3"]  # the truncated shard's intact first sample, then all of full
    assert samples[:2] == [None, None]  # a marker after each shard that gave nothing
    assert log.pending[:2] == [empty, str(tmp_path / "missing.tar")]
    assert str(truncated) in log.pending[2:]
    err = caplog.text
    assert f"skipping bad shard in {empty}: empty shard" in err and "missing.tar" in err


def test_bad_sample_log_is_rate_limited(caplog):
    log = BadSampleLog()
    for i in range(250):
        log.record("shard.tar", f"k{i}", ValueError("broken"))
    lines = caplog.messages
    assert len(lines) == LOG_FIRST_BAD + 2  # the first ten, then the 100th and the 200th
    assert lines[0] == "skipping bad sample 'k0' in shard.tar: ValueError: broken [1 bad]"
    assert log.take() == (250, ("shard.tar",) * 250) and log.take() == (0, ())


def _batch(num_good: int, bad_shards: tuple[str, ...] = ()) -> Batch:
    data = (torch.zeros(num_good, 3, 2, 2, dtype=torch.uint8),) if num_good else ()
    return Batch(data, len(bad_shards), bad_shards)


def test_bad_fraction_limit_stops_with_a_message_naming_the_shards():
    monitor = BadDataMonitor(max_bad_fraction=0.1, check_after=40)
    monitor.update(_batch(8, ("a.tar",) * 3))  # 3 bad of 11 read: within 0.1 * max(11, 40) = 4
    monitor.update(_batch(8, ("b.tar",)))  # 4 of 20: still within (early stragglers never stop a run)
    with pytest.raises(BadDataError, match=r"5 of 29 samples read were bad.*max_bad_fraction=0\.1") as err:
        monitor.update(_batch(8, ("b.tar",)))
    assert "a.tar (3), b.tar (2)" in str(err.value)
    large = BadDataMonitor(max_bad_fraction=0.1, check_after=1)
    for _ in range(10):
        large.update(_batch(90, ("c.tar",) * 10))  # exactly 10%: not above the limit
    assert (large.num_good, large.num_bad) == (900, 100)


def test_a_stream_of_only_bad_data_stops_instead_of_hanging(tmp_path):
    urls = [_write_tar(tmp_path / f"junk{i}.tar", [(f"k{j}.jpg", b"junk") for j in range(3)]) for i in range(2)]
    urls.append(_write_tar(tmp_path / "empty.tar", []))
    stream = ShardStream(urls, source_of, batch_size=4, batches_per_epoch=2, shuffle_buffer=0)
    monitor = BadDataMonitor(max_bad_fraction=1.0, check_after=20)  # even with no fraction limit
    with pytest.raises(BadDataError, match="junk0.tar") as err:
        for batch in build_shard_loader(stream, num_workers=2):
            assert not batch.data  # reports only: nothing good was read
            monitor.update(batch)
    assert monitor.num_good == 0 and monitor.num_bad >= 20 and "empty.tar" in str(err.value)


def test_panel_images_of_shards_keep_the_runs_max_image_pixels(tmp_path):
    from simmim_swin.config import DataConfig
    from simmim_swin.data import build_pretrain_data

    samples = [ShardSample("big", _png(7, size=40), "png"), ShardSample("a", _png(1, 8), "png"),
               ShardSample("b", _png(2, 8), "png")]  # fmt: skip
    index = write_shards(samples, tmp_path)
    cfg = DataConfig(source="shards", urls=str(index), max_image_pixels=100, batch_size=1, num_workers=0)
    data = build_pretrain_data(cfg, IMG, MaskGenerator(IMG, 8, 4, 0.6), seed=0, num_panel_images=2)
    # the 40 x 40 image is over the limit, as in training: the panels show the next two
    panel = [data.panel_source.load_image(k) for k in range(data.panel_source.num_images)]
    assert [(img.size, img.getpixel((0, 0))) for img in panel] == [((8, 8), (1, 1, 1)), ((8, 8), (2, 2, 2))]
