"""Labelled images for fine-tuning: class folders or Fashion-MNIST, a class-balanced subset, timm's transforms."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import Compose

from simmim_swin.config import AugmentConfig, FinetuneDataConfig
from simmim_swin.data.datasets import transform_image
from simmim_swin.data.fashion_mnist import FASHION_MNIST_DIR, FashionMNIST
from simmim_swin.data.images import EIGHT_BIT_MODES, BadSample, ImageSource, close_source, open_source
from simmim_swin.data.transforms import EvalView, ImageTransform, Normalizer, PretrainCrop, build_eval_transform


def build_train_transform(img_size: int, augment: AugmentConfig) -> ImageTransform:
    """timm's training transform: PIL image -> augmented, normalised tensor (3, img_size, img_size)."""
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(augment.crop_scale),
        ratio=tuple(augment.crop_ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.rand_augment or None,
        interpolation=str(augment.interpolation),
        re_prob=augment.reprob,
        re_mode=augment.remode,
        re_count=augment.recount,
    )
    _patch_posterize(transform)
    return transform


def _posterize_keep_zero_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else timm_posterize(img, bits_to_keep)


def _patch_posterize(transform: Callable) -> None:
    # with increasing magnitudes (`inc1`, the Swin recipe) a magnitude of 10 (~2 % of m9-mstd0.5 draws) asks timm
    # for 0 bits, which Pillow 13's ImageOps.posterize rejects mid-epoch; older Pillow gave a black image, as here
    for step in getattr(transform, "transforms", ()):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is timm_posterize:
                    op.aug_fn = _posterize_keep_zero_bits


def balanced_subset(targets: Sequence[int], num_images: int, seed: int) -> list[int]:
    """`num_images` indices drawn without replacement, as evenly over the classes as they allow, fixed by `seed`."""
    if num_images > len(targets):
        raise ValueError(f"data.num_labelled={num_images} exceeds the {len(targets)} labelled training images")
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    per_class = [rng.permutation(np.flatnonzero(targets == c)).tolist() for c in np.unique(targets)]
    # round-robin over the classes: the k-th image of every class before the (k+1)-th of any
    order = sorted((rank, c) for c, indices in enumerate(per_class) for rank in range(len(indices)))
    return sorted(per_class[c][rank] for rank, c in order[:num_images])


def _folders(data_cfg: FinetuneDataConfig) -> tuple[tuple[Path, str], tuple[Path, str]]:
    """(training folder, the setting naming it for messages), (validation folder, its setting)."""
    root, name = Path(data_cfg.root), f"data.root={data_cfg.root}"
    if data_cfg.val_root:
        return (root, name), (Path(data_cfg.val_root), f"data.val_root={data_cfg.val_root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return (root / "train", f"train/ of {name}"), (root / "val", f"val/ of {name}")
    raise ValueError(
        f"no validation images: set data.val_root, or give data.root={root} with train/ and val/ sub-folders"
    )


def keeps_raw_values(data_cfg: FinetuneDataConfig, in_chans: int) -> bool:
    """Whether images keep the files' values (crop / flip, normalised on the device) instead of timm's RGB pipeline."""
    return in_chans != 3 or data_cfg.mean is not None


class CheckedImageFolder(ImageFolder):
    """The `role` ('training' / 'validation') class folders of torchvision's ImageFolder plus .npy, any depth and
    band count; an unreadable file gives a BadSample."""

    def __init__(self, data_cfg: FinetuneDataConfig, role: str, transform: ImageTransform, raw: bool) -> None:
        folders = _folders(data_cfg)
        folder, key = folders[role == "validation"]
        if not folder.is_dir():
            raise FileNotFoundError(f"the {role} image folder {folder} ({key}) does not exist")
        try:
            super().__init__(
                str(folder), transform, is_valid_file=lambda p: p.lower().endswith((*IMG_EXTENSIONS, ".npy"))
            )
        except FileNotFoundError as e:  # torchvision: no class sub-folder, or no image file in any of them
            raise ValueError(
                f"the {role} folder {folder} ({key}) holds no images in class sub-folders ({e}); it needs one "
                "sub-folder of images per class"
            ) from e
        if role == "training" and len(self.classes) < 2:
            raise ValueError(
                f"the training folder ({key}) has one class sub-folder, {self.classes[0]!r}: a classifier of one "
                "class scores 100 % whatever it learns; give one sub-folder of images per class (at least two)"
            )
        train_root = folders[0][0]
        if role == "validation" and train_root.is_dir():
            train_classes = sorted(entry.name for entry in train_root.iterdir() if entry.is_dir())
            if train_classes != self.classes:
                raise ValueError(
                    f"the validation folder {folder} ({key}) has classes {self.classes[:10]} but the training "
                    f"folder {train_root} has {train_classes[:10]}; both need the same class sub-folders"
                )
        self.raw, self.max_pixels = raw, data_cfg.max_image_pixels
        self.paths = [path for path, _ in self.samples]
        self.num_images = len(self.paths)

    def load_image(self, k: int) -> ImageSource:
        """The k-th file: opened lazily when raw, else decoded to 8-bit RGB (ValueError for other depths)."""
        source = open_source(self.paths[k], max_pixels=self.max_pixels)
        if self.raw:
            return source
        try:
            if not isinstance(source, Image.Image) or source.mode not in EIGHT_BIT_MODES:
                raise ValueError(
                    "a 16-bit, float or multi-band image: set data.mean and data.std (`simmim-swin stats PATH`) so "
                    "that it is read as it is instead of through the 8-bit RGB augmentation"
                )
            return source.convert("RGB")
        finally:
            close_source(source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadSample:
        image = transform_image(self, index, self.transform)
        return image if isinstance(image, BadSample) else (image, self.targets[index])


def split_labelled(targets: Sequence[int], indices: Sequence[int], val_fraction: float, seed: int) -> tuple[
    list[int], list[int]
]:  # fmt: skip
    """(training, held-out) parts of `indices`: round(val_fraction * n) of each class's n images held out."""
    if val_fraction <= 0:
        return sorted(indices), []
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the subset drawn by `seed` is not reused
    indices = np.asarray(sorted(indices))
    labels = np.asarray(targets)[indices]
    held_out: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(indices[labels == c])
        count = min(len(members) - 1, max(1, round(val_fraction * len(members))))  # one at least, never all
        held_out += members[:count].tolist()
    train = sorted(set(indices.tolist()) - set(held_out))
    return train, sorted(held_out)


def labelled_split(data_cfg: FinetuneDataConfig, targets: Sequence[int]) -> tuple[list[int], list[int]]:
    """(training, held-out) indices: data.val_fraction of the num_labelled subset (every image if null), by class."""
    picked = (
        balanced_subset(targets, data_cfg.num_labelled, data_cfg.subset_seed)
        if data_cfg.num_labelled is not None
        else range(len(targets))
    )
    return split_labelled(targets, picked, data_cfg.val_fraction, data_cfg.subset_seed)


def _labelled_source(data_cfg: FinetuneDataConfig, transform: ImageTransform, raw: bool) -> Dataset:
    """The labelled training images (Fashion-MNIST's train split or the training class folders) through `transform`."""
    if data_cfg.source == "fashion_mnist":
        return FashionMNIST("train", transform, data_cfg.root or FASHION_MNIST_DIR)
    return CheckedImageFolder(data_cfg, "training", transform, raw)


def _eval_transform(data_cfg: FinetuneDataConfig, img_size: int, interpolation: str, in_chans: int) -> ImageTransform:
    """Resize + centre crop, normalised floats: timm's for 8-bit RGB, our own view for raw values."""
    if keeps_raw_values(data_cfg, in_chans):  # normalised here, so that evaluation takes these floats as they are
        return Compose([EvalView(img_size, in_chans, data_cfg.crop_pct), Normalizer(data_cfg.mean, data_cfg.std)])
    return build_eval_transform(img_size, crop_pct=data_cfg.crop_pct, interpolation=str(interpolation))


def build_train_dataset(
    data_cfg: FinetuneDataConfig, img_size: int, augment: AugmentConfig, in_chans: int = 3
) -> tuple[Dataset, list[str]]:
    """(training set with its augmentation, class names): the labelled_split training part."""
    raw = keeps_raw_values(data_cfg, in_chans)
    if raw:  # crop and flip only: timm's colour operations are defined for 8-bit RGB
        unused = [f"augment.{name}" for name, on in (
            ("rand_augment", bool(augment.rand_augment)), ("color_jitter", augment.color_jitter > 0),
            ("reprob", augment.reprob > 0),
        ) if on]  # fmt: skip
        if unused:
            warnings.warn(
                f"{', '.join(unused)} not applied: images keep their raw values (model.in_chans={in_chans} or "
                "data.mean set), which get random crops and flips only; set them to null / 0 to silence this",
                stacklevel=2,
            )
        transform = PretrainCrop(img_size, augment.crop_scale, augment.crop_ratio, augment.hflip > 0, in_chans=in_chans)
    else:
        transform = build_train_transform(img_size, augment)
    dataset = _labelled_source(data_cfg, transform, raw)
    classes = list(dataset.classes)
    if data_cfg.num_labelled is not None or data_cfg.val_fraction > 0:
        dataset = Subset(dataset, labelled_split(data_cfg, dataset.targets)[0])
    return dataset, classes


def build_labelled_eval_dataset(
    data_cfg: FinetuneDataConfig, img_size: int, part: str, interpolation: str = "bicubic", in_chans: int = 3
) -> Dataset:
    """One part ("train" or "held_out") of labelled_split's images with the evaluation transform (no augmentation)."""
    dataset = _labelled_source(
        data_cfg, _eval_transform(data_cfg, img_size, interpolation, in_chans), keeps_raw_values(data_cfg, in_chans)
    )
    train, held_out = labelled_split(data_cfg, dataset.targets)
    return Subset(dataset, {"train": train, "held_out": held_out}[part])


def build_val_dataset(
    data_cfg: FinetuneDataConfig, img_size: int, interpolation: str = "bicubic", in_chans: int = 3
) -> tuple[Dataset, list[str]]:
    """(validation set with the evaluation transform, class names); Fashion-MNIST's test split for that source."""
    transform = _eval_transform(data_cfg, img_size, interpolation, in_chans)
    if data_cfg.source == "fashion_mnist":
        dataset = FashionMNIST("test", transform, data_cfg.root or FASHION_MNIST_DIR)
        return dataset, list(dataset.classes)
    dataset = CheckedImageFolder(data_cfg, "validation", transform, keeps_raw_values(data_cfg, in_chans))
    return dataset, list(dataset.classes)
