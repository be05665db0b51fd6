"""Transforms, datasets and the deterministic loader of simmim_swin.data."""

from __future__ import annotations

import gzip
import io
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms as T

from simmim_swin.config import DataConfig, FinetuneDataConfig
from simmim_swin.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTO_FILES,
    BadSample,
    ImageFiles,
    MaskedImages,
    PretrainCrop,
    SeededSampler,
    build_eval_transform,
    build_pretrain_data,
    build_pretrain_dataset,
    build_pretrain_loader,
    denormalize,
    load_photos,
    make_fixed_batch,
    normalize_images,
    sample_crop_box,
)
from simmim_swin.data.classification import build_val_dataset
from simmim_swin.data.datasets import ImageList
from simmim_swin.data.fashion_mnist import FASHION_MNIST_DIR, FashionMNIST
from simmim_swin.data.transforms import EvalView
from simmim_swin.masking import MaskGenerator

IMG = 32
MASK_PATCH = 8
PATCH = 4
RATIO = 0.6


@pytest.fixture(scope="module")
def mask_generator() -> MaskGenerator:
    return MaskGenerator(IMG, MASK_PATCH, PATCH, RATIO)


@pytest.fixture(scope="module")
def photos(mask_generator: MaskGenerator) -> MaskedImages:
    return MaskedImages(load_photos(), PretrainCrop(IMG), mask_generator, samples_per_epoch=36)


def _noise_image(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """An RGB image of uniform noise, size = (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


class _IndexDataset(torch.utils.data.Dataset):
    """Item i -> (i, a draw from torch's global RNG): shows both the order and the per-sample seeding."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.rand(())


# ----------------------------------------------------------------------------------------------- transforms


def test_pretrain_transform_gives_uint8_and_normalize_images_matches_torchvision() -> None:
    rgb = (200, 100, 50)
    out = PretrainCrop(IMG)(Image.new("RGB", (90, 70), rgb))
    assert out.shape == (3, IMG, IMG) and out.dtype == torch.uint8
    # a flat colour survives any crop, so every pixel must be exactly that colour
    assert torch.equal(out, torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand_as(out))
    normalised = normalize_images(out[None])
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(normalised[0], expected.view(3, 1, 1).expand_as(out), atol=1e-5, rtol=0)
    # the same numbers as torchvision's ToTensor + Normalize on a real image
    img = _noise_image(4)
    reference = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))
    torch.testing.assert_close(normalize_images(T.PILToTensor()(img)), reference, atol=1e-5, rtol=0)
    assert normalize_images(reference) is reference  # floats are taken as normalised already


def test_pretrain_transform_is_random_and_follows_torch_rng() -> None:
    transform = PretrainCrop(IMG)
    img = _noise_image(0)
    torch.manual_seed(1)
    a, b = transform(img), transform(img)
    torch.manual_seed(1)
    assert not torch.equal(a, b)
    assert torch.equal(transform(img), a)


def test_pretrain_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        PretrainCrop(IMG, crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="crop_ratio"):
        PretrainCrop(IMG, crop_ratio=(4 / 3, 3 / 4))
    with pytest.raises(ValueError, match="img_size"):
        PretrainCrop(0)


def test_eval_transform_is_a_deterministic_centre_crop() -> None:
    # 90 x 60 px: blue in the middle, red in the outer 12 columns on each side. Shorter side 60 -> 32 scales
    # the width to 48 and the centre crop keeps resized columns 8..40 = original 15..75: only blue remains.
    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, :12] = pixels[:, 78:] = (255, 0, 0)
    img = Image.fromarray(pixels)
    transform = build_eval_transform(IMG)
    out = transform(img)
    assert out.shape == (3, IMG, IMG)
    assert torch.equal(out, transform(img))
    np.testing.assert_array_equal(denormalize(out), np.broadcast_to(np.array([0, 0, 255], np.uint8), (IMG, IMG, 3)))


def test_denormalize_inverts_normalisation_and_clamps() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    out = denormalize(normalised)
    assert out.dtype == np.uint8 and out.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(out, pixels)
    np.testing.assert_array_equal(denormalize(normalised[0]), pixels[0])
    extremes = denormalize(torch.stack([torch.full((3, 2, 2), -100.0), torch.full((3, 2, 2), 100.0)]))
    assert extremes[0].max() == 0 and extremes[1].min() == 255
    with pytest.raises(ValueError, match="shape"):
        denormalize(torch.zeros(2, 1, 8, 8))


# ----------------------------------------------------------------------------------------------- datasets


def test_photo_crops_are_distinct_with_masks_of_the_right_shape(photos: MaskedImages) -> None:
    assert photos.num_images == len(PHOTO_FILES) and len(photos) == 36
    first = photos.load_image(0)
    assert first.mode == "RGB" and min(first.size) >= 256  # a real photograph, not a thumbnail
    assert photos.load_image(0) is first  # lent, not copied per sample
    torch.manual_seed(0)
    samples = [photos[i] for i in range(2 * photos.num_images)]
    images = torch.stack([s[0] for s in samples])
    assert images.shape == (2 * photos.num_images, 3, IMG, IMG)
    # sample i and i + num_images come from the same photo but are different random crops
    for i in range(photos.num_images):
        assert not torch.equal(images[i], images[i + photos.num_images])
    num_mask_patches = (IMG // MASK_PATCH) ** 2
    scale = MASK_PATCH // PATCH
    for _, mask in samples:
        assert mask.shape == (IMG // PATCH, IMG // PATCH) and mask.dtype == torch.uint8
        assert int(mask[::scale, ::scale].sum()) == math.ceil(num_mask_patches * RATIO)
        assert int(mask.sum()) == math.ceil(num_mask_patches * RATIO) * scale**2


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    _noise_image(0).save(root / "b.png")
    _noise_image(1).save(root / "sub" / "A.JPG")
    Image.fromarray(np.full((40, 50), 77, dtype=np.uint8)).save(root / "sub" / "deeper" / "grey.Png")  # mode L
    _noise_image(3).convert("RGBA").save(root / "sub" / "deeper" / "rgba.TIFF")
    (root / "notes.txt").write_text("not an image")
    (root / "dir.png").mkdir()  # a directory with an image-like name is not an image
    return root


def test_image_folder_finds_images_recursively(image_folder, mask_generator: MaskGenerator) -> None:
    ds = MaskedImages(ImageFiles(image_folder), PretrainCrop(IMG), mask_generator)
    names = [p.relative_to(image_folder).as_posix() for p in ds.images.paths]
    assert names == ["b.png", "sub/A.JPG", "sub/deeper/grey.Png", "sub/deeper/rgba.TIFF"]
    assert len(ds) == ds.num_images == 4
    for k in range(len(ds)):
        image, mask = ds[k]
        assert image.shape == (3, IMG, IMG) and image.dtype == torch.uint8
        assert mask.shape == (IMG // PATCH, IMG // PATCH)
    assert ds.load_image(2).mode == "L"  # the file as it is; the transform makes the model's channels
    assert np.all(ds[2][0].numpy() == 77)  # greyscale expanded to three equal channels


def test_image_folder_errors_name_the_folder(tmp_path, mask_generator: MaskGenerator) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images") as err:
        MaskedImages(ImageFiles(empty), PretrainCrop(IMG), mask_generator)
    assert str(empty) in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        MaskedImages(ImageFiles(tmp_path / "missing"), PretrainCrop(IMG), mask_generator)


def test_image_folder_corrupt_file_is_a_bad_sample_naming_the_file(tmp_path, mask_generator: MaskGenerator) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    ds = MaskedImages(ImageFiles(tmp_path), PretrainCrop(IMG), mask_generator)
    bad = ds[0]
    assert isinstance(bad, BadSample) and bad.path.endswith("broken.jpg") and "UnidentifiedImageError" in bad.reason


def test_build_pretrain_dataset_sources(image_folder, mask_generator: MaskGenerator, caplog) -> None:
    caplog.set_level(logging.INFO, logger="simmim_swin")
    photos = build_pretrain_dataset(DataConfig(source="photos", samples_per_epoch=20), IMG, mask_generator)
    assert isinstance(photos, MaskedImages) and photos.num_images == len(PHOTO_FILES) and len(photos) == 20
    folder = build_pretrain_dataset(DataConfig(source="folder", root=str(image_folder)), IMG, mask_generator)
    assert isinstance(folder.images, ImageFiles) and len(folder) == 4
    assert "1 file not read (extensions .txt: 1), e.g. " in caplog.text  # notes.txt is named, not skipped silently
    assert folder[0][0].shape == (3, IMG, IMG)
    # an unknown data.source and source=folder without data.root are refused at the door: test_validate.py


# ----------------------------------------------------------------------------------------------- loader


def _first_batch(dataset, num_workers: int, seed: int = 0, epoch: int = 0):
    return next(iter(build_pretrain_loader(dataset, batch_size=8, num_workers=num_workers, seed=seed, epoch=epoch)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_is_deterministic_in_seed_and_epoch(photos: MaskedImages, num_workers: int) -> None:
    images, masks = _first_batch(photos, num_workers)
    assert images.shape == (8, 3, IMG, IMG) and masks.shape == (8, IMG // PATCH, IMG // PATCH)
    torch.manual_seed(123)  # the global RNG must not matter
    again_images, again_masks = _first_batch(photos, num_workers)
    assert torch.equal(images, again_images) and torch.equal(masks, again_masks)
    other_epoch, _ = _first_batch(photos, num_workers, epoch=1)
    other_seed, _ = _first_batch(photos, num_workers, seed=1)
    assert not torch.equal(images, other_epoch)
    assert not torch.equal(images, other_seed)


def test_loader_batches_do_not_depend_on_num_workers(photos: MaskedImages) -> None:
    in_process = _first_batch(photos, 0, seed=5, epoch=3)
    with_workers = _first_batch(photos, 2, seed=5, epoch=3)
    assert torch.equal(in_process[0], with_workers[0]) and torch.equal(in_process[1], with_workers[1])


class _ThreeRngDataset(_IndexDataset):
    """Item i -> (i, one draw each from torch's, python's and numpy's global RNGs)."""

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.tensor([torch.rand(()).item(), random.random(), np.random.random()], dtype=torch.float64)


def test_every_global_rng_is_seeded_per_sample_alike_in_and_out_of_workers() -> None:
    def draws(num_workers: int) -> list:
        loader = build_pretrain_loader(_ThreeRngDataset(12), batch_size=4, num_workers=num_workers, seed=2)
        return [(idx.tolist(), rand.tolist()) for idx, rand in loader]

    in_process = draws(0)
    assert in_process == draws(2) and len({tuple(r) for _, rand in in_process for r in rand}) == 12


def test_loader_order_and_global_rng() -> None:
    loader = build_pretrain_loader(_IndexDataset(20), batch_size=4, num_workers=0, seed=0, epoch=0)
    assert len(loader) == 5
    state = torch.get_rng_state()
    first = [(int(i), float(r)) for idx, rand in loader for i, r in zip(idx, rand)]
    assert torch.equal(torch.get_rng_state(), state)  # the training process's RNG stream is untouched
    assert sorted(i for i, _ in first) == list(range(20))
    assert [i for i, _ in first] != list(range(20))
    assert len({r for _, r in first}) == 20  # each sample has its own seed
    second = [(int(i), float(r)) for idx, rand in loader for i, r in zip(idx, rand)]
    assert second != first  # iterating the same loader again draws a fresh order and fresh seeds


def test_one_loader_serves_every_epoch_and_caps_each_pass() -> None:
    def passes(loader, n):
        return [[(idx.tolist(), rand.tolist()) for idx, rand in loader] for _ in range(n)]

    common = dict(batch_size=4, num_workers=0, seed=3)
    second_pass = passes(build_pretrain_loader(_IndexDataset(20), epoch=1, skip_batches=2, **common), 2)[1]
    assert second_pass == passes(build_pretrain_loader(_IndexDataset(20), epoch=2, **common), 1)[0]
    capped = passes(build_pretrain_loader(_IndexDataset(20), epoch=0, batches_per_epoch=3, **common), 2)
    assert [len(p) for p in capped] == [3, 3] and capped[0] != capped[1]


def test_loader_drop_last_and_too_small_dataset() -> None:
    assert len(build_pretrain_loader(_IndexDataset(10), batch_size=4, num_workers=0, seed=0)) == 2
    assert len(build_pretrain_loader(_IndexDataset(10), batch_size=4, num_workers=0, seed=0, drop_last=False)) == 3
    with pytest.raises(ValueError, match=r"gives 3 samples.*one batch of 4"):
        build_pretrain_loader(_IndexDataset(3), batch_size=4, num_workers=0, seed=0)


def test_loader_skip_batches_resumes_mid_epoch() -> None:
    def batches(**kwargs):
        loader = build_pretrain_loader(_IndexDataset(20), batch_size=4, num_workers=0, seed=3, epoch=1, **kwargs)
        return [(idx.tolist(), rand.tolist()) for idx, rand in loader]

    full = batches()
    assert batches(skip_batches=2) == full[2:]
    assert batches(skip_batches=5) == []
    with pytest.raises(ValueError, match="skip_batches=6"):
        batches(skip_batches=6)


def test_sampler_splits_ranks_disjointly() -> None:
    parts = [list(SeededSampler(10, seed=0, epoch=2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    indices = [i for p in parts for i, _ in p]
    seeds = [s for p in parts for _, s in p]
    assert len(set(indices)) == 9 and len(set(seeds)) == 9
    assert all(type(v) is int for v in indices + seeds)
    assert list(SeededSampler(10, seed=0, epoch=2, rank=1, world_size=3, skip=1)) == parts[1][1:]
    with pytest.raises(ValueError, match="rank"):
        SeededSampler(10, seed=0, epoch=0, rank=3, world_size=3)


def test_make_fixed_batch_is_deterministic(photos: MaskedImages, mask_generator: MaskGenerator) -> None:
    n = photos.num_images + 2  # more than there are photos: cycles
    images, masks = make_fixed_batch(photos, n, IMG, mask_generator, seed=0)
    assert images.shape == (n, 3, IMG, IMG) and images.dtype == torch.uint8  # raw: normalised on the device
    assert masks.shape == (n, IMG // PATCH, IMG // PATCH) and masks.dtype == torch.uint8
    torch.manual_seed(99)
    images2, masks2 = make_fixed_batch(photos, n, IMG, mask_generator, seed=0)
    assert torch.equal(images, images2) and torch.equal(masks, masks2)
    assert torch.equal(images[0], images[photos.num_images]) and not torch.equal(images[0], images[1])
    assert torch.equal(images[0], build_eval_transform(IMG, normalize=False)(photos.load_image(0)))
    _, other_masks = make_fixed_batch(photos, n, IMG, mask_generator, seed=1)
    assert not torch.equal(masks, other_masks)


def test_make_fixed_batch_of_8_bit_and_float_images_is_float_with_the_8_bit_values_kept(mask_generator) -> None:
    grey = np.full((3, 40, 40), 1000.5, dtype=np.float32)
    mixed = ImageList([Image.new("RGB", (40, 40), (10, 20, 30))], "mixed")
    mixed.load_image = lambda k: mixed.images[0] if k == 0 else grey
    mixed.num_images = 2
    images, _ = make_fixed_batch(mixed, 3, IMG, mask_generator, seed=0)
    assert images.dtype == torch.float32 and images[[0, 2], :, 0, 0].tolist() == [[10, 20, 30]] * 2
    assert torch.equal(images[1], EvalView(IMG)(grey))


# ----------------------------------------------------------------------------------------------- crop and draft


def test_crop_box_is_torchvisions_random_resized_crop():
    img = Image.new("RGB", (500, 375))
    for seed in range(50):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(img, (0.67, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert sample_crop_box(500, 375, (0.67, 1.0), (3 / 4, 4 / 3)) == (left, top, w, h)
    # an impossible ratio falls back to a centred crop of the whole height, clipped to the allowed ratio
    assert sample_crop_box(400, 100, (0.99, 1.0), (1.0, 1.0)) == (150, 0, 100, 100)


def _jpeg(size: tuple[int, int]) -> bytes:
    photo = Image.fromarray(skimage.data.chelsea()).resize(size, Image.BICUBIC)  # a real, smooth photograph
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_large_jpegs_are_decoded_at_reduced_size_with_the_same_crop():
    data = _jpeg((1000, 750))
    lazy = Image.open(io.BytesIO(data))
    drafted = PretrainCrop(192)(lazy, generator=torch.Generator().manual_seed(5))
    # crops of this photo are >= 613 px a side, >= 2 x 192: the decoder ran at half scale
    assert lazy.size == (500, 375)

    def full_decode(seed: int) -> torch.Tensor:
        crop = PretrainCrop(192, draft=False)
        return crop(Image.open(io.BytesIO(data)), generator=torch.Generator().manual_seed(seed)).float()

    same = (drafted.float() - full_decode(5)).abs().mean()
    other = (drafted.float() - full_decode(6)).abs().mean()
    assert drafted.dtype == torch.uint8 and drafted.shape == (3, 192, 192)
    # the same region as a full decode, within a few grey levels (measured: 2.1 against 32 for another crop)
    assert same < 4.0 and other > 5 * same


def test_jpegs_are_decoded_in_full_when_the_crop_needs_it():
    lazy = Image.open(io.BytesIO(_jpeg((500, 375))))
    PretrainCrop(192)(lazy, generator=torch.Generator().manual_seed(0))  # crops of 300-375 px < 2 x 192
    assert lazy.size == (500, 375)


# ----------------------------------------------------------------------------------------------- fashion-mnist


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="no dataset-fashion-mnist")
def test_fashion_mnist_dataset_gives_rgb_crops_at_the_model_size(mask_generator: MaskGenerator) -> None:
    ds = build_pretrain_dataset(DataConfig(source="fashion_mnist", split="test"), IMG, mask_generator)
    assert isinstance(ds.images, FashionMNIST) and len(ds) == ds.num_images == 10000
    grey = ds.load_image(0)
    assert grey.mode == "RGB" and grey.size == (28, 28)
    pixels = np.asarray(grey)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    image, mask = ds[0]
    assert image.shape == (3, IMG, IMG) and image.dtype == torch.uint8 and mask.shape == (IMG // PATCH,) * 2


def _write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file of uint8 data (magic 0x800 + ndim, one big-endian uint32 per dimension)."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_pretraining_and_classification_read_fashion_mnist_through_one_reader(
    tmp_path: Path, mask_generator: MaskGenerator
) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)), np.array([3, 1, 4, 1, 5, 9])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    plain = FashionMNIST("test", root=tmp_path)
    assert plain.num_images == len(plain) == 6 and plain.targets == labels.tolist()
    image, label = plain[2]
    assert image.mode == "RGB" and label == 4
    assert (np.asarray(image) == images[2][..., None].astype(np.uint8)).all()  # grey in all three channels
    assert repr(plain) == "FashionMNIST(split='test', num_images=6)"

    transform = build_eval_transform(IMG)
    mim = MaskedImages(plain, transform, mask_generator)
    assert repr(mim) == "FashionMNIST(split='test', num_images=6)"
    crop, mask = mim[2]
    assert torch.equal(crop, transform(plain.load_image(2))) and mask.shape == (IMG // PATCH,) * 2

    val, classes = build_val_dataset(FinetuneDataConfig(source="fashion_mnist", root=str(tmp_path)), IMG)
    assert isinstance(val, FashionMNIST) and classes[4] == "Coat" and val[2][1] == 4
    assert val[2][0].shape == (3, IMG, IMG)


# ----------------------------------------------------------------------------------------------- run data


def test_map_style_run_data_gives_whole_steps_per_epoch_and_resumes_exactly(mask_generator: MaskGenerator):
    cfg = DataConfig(source="photos", samples_per_epoch=44, batch_size=4, num_workers=0)
    data = build_pretrain_data(cfg, IMG, mask_generator, seed=1, accum_steps=2)
    assert data.steps_per_epoch == 5  # 11 batches of 4 make 5 optimizer steps of 2 micro-batches; 1 left over
    assert data.panel_source.num_images == len(PHOTO_FILES) and data.val_batches == []
    stream = data.batches(0)
    full = [next(stream) for _ in range(14)]  # 7 steps: all of epoch 0 and two steps of epoch 1
    images, masks = full[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, IMG, IMG) and masks.shape == (4, 8, 8)
    resumed = data.batches(3)  # resume at step 3 of epoch 0
    for expected in full[6:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_close_source_closes_a_lazily_opened_file_and_leaves_in_memory_images_usable(tmp_path) -> None:
    from simmim_swin.data.images import close_source

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    lazy = Image.open(tmp_path / "a.png")  # not decoded yet: holds its file
    fp = lazy.fp
    close_source(lazy)
    assert fp.closed
    in_memory = Image.new("RGB", (8, 8), (4, 5, 6))
    close_source(in_memory)
    assert in_memory.getpixel((0, 0)) == (4, 5, 6)  # still usable: an ImageList's images are shared
