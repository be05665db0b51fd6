"""Map-style SimMIM datasets: MaskedImages of an ImageCollection (scikit-image's photos, a folder, Fashion-MNIST)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from simmim_swin.config import DEFAULT_MAX_IMAGE_PIXELS, DataConfig
from simmim_swin.data.fashion_mnist import FashionMNIST
from simmim_swin.data.images import BadSample, ImageSource, close_source, describe_error, open_source
from simmim_swin.data.transforms import ImageTransform, PretrainCrop

log = logging.getLogger(__name__)

# The colour photographs shipped inside the scikit-image wheel (skimage/data); none needs a download.
PHOTO_FILES: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",  # skimage.data.immunohistochemistry()
    "retina.jpg",
    "motorcycle_left.png",  # skimage.data.stereo_motorcycle() left / right views
    "motorcycle_right.png",
)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".npy"})

MAP_STYLE_SOURCES: tuple[str, ...] = ("photos", "folder", "fashion_mnist")  # shards stream: data/stream.py

MaskFn = Callable[[], torch.Tensor]


def skimage_data_dir() -> Path:
    """The folder of data files shipped inside the installed scikit-image package (skimage/data)."""
    import skimage.data  # imported here: only source=photos needs scikit-image

    # not skimage.data.data_dir: that is pooch's download cache, empty until something is fetched
    return Path(skimage.data.__file__).parent


class ImageCollection(Protocol):
    """Numbered images: what every image source offers and what MaskedImages, the panels and subsets read."""

    num_images: int  # distinct images

    def load_image(self, k: int) -> ImageSource:
        """The k-th image: a PIL image (shared: not to be modified in place) or a (C, H, W) array."""


def transform_image(images: ImageCollection, k: int, transform: ImageTransform) -> torch.Tensor | BadSample:
    """transform(image k), its file closed afterwards; a BadSample naming the file if it cannot be read."""
    try:
        source = images.load_image(k)
        try:
            return transform(source)
        finally:
            close_source(source)
    except Exception as e:  # the bad-data policy: any failure to read an image skips and counts it
        paths = getattr(images, "paths", None)
        return BadSample(str(paths[k]) if paths is not None else f"image {k} of {images!r}", describe_error(e))


class MaskedImages(Dataset):
    """SimMIM samples: item i is (transform(image i % num_images), mask) or a BadSample; samples_per_epoch of them."""

    def __init__(
        self, images: ImageCollection, transform: ImageTransform, mask_generator: MaskFn,
        samples_per_epoch: int | None = None,
    ) -> None:  # fmt: skip
        self.images = images
        self.transform = transform
        self.mask_generator = mask_generator
        self.num_images = images.num_images
        self.load_image = images.load_image  # the panels and ImageSubset read the distinct images
        self.samples_per_epoch = samples_per_epoch or images.num_images

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        image = transform_image(self.images, index % self.num_images, self.transform)
        return image if isinstance(image, BadSample) else (image, self.mask_generator())

    def __repr__(self) -> str:
        per_epoch = f", {self.samples_per_epoch} samples per epoch" if len(self) != self.num_images else ""
        return f"{self.images!r}{per_epoch}"


class ImageList:
    """A fixed list of RGB PIL images, e.g. the bundled photographs or the first images of a shard set."""

    def __init__(self, images: list[Image.Image], name: str = "images") -> None:
        self.images = images
        self.name = name
        self.num_images = len(images)

    def load_image(self, k: int) -> Image.Image:
        """The k-th image itself: a copy per sample cost 17 % of a photo crop's time (PIL's transforms copy anyway)."""
        return self.images[k]

    def __repr__(self) -> str:
        return f"ImageList({self.name}, num_images={self.num_images})"


def load_photos() -> ImageList:
    """The real photographs bundled with scikit-image, decoded once (about 15 MB in memory)."""
    data_dir = skimage_data_dir()
    missing = [name for name in PHOTO_FILES if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"scikit-image's bundled photos {missing} are not in {data_dir}; reinstall scikit-image "
            "(pip install --force-reinstall scikit-image) or use data.source=folder"
        )
    return ImageList([Image.open(data_dir / name).convert("RGB") for name in PHOTO_FILES], "scikit-image photos")


def find_images(root: str | Path) -> list[Path]:
    """All image files under `root`, recursively, sorted; extensions matched case-insensitively."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory; set data.root to one")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(
            f"image folder {str(root)!r} holds no images (looked recursively for {sorted(IMAGE_EXTENSIONS)})"
        )
    return files


def unread_files(root: str | Path) -> list[Path]:
    """The files under `root` that find_images leaves out (other extensions: .gif, .txt, ...), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() not in IMAGE_EXTENSIONS and p.is_file())


def describe_unread(files: list[Path], limit: int = 5) -> str:
    """'3 files that are not read (extensions .gif: 2, .txt: 1), e.g. a/b.gif, c.txt'."""
    extensions = Counter(path.suffix.lower() or "(none)" for path in files)
    ordered = ", ".join(f"{ext}: {n}" for ext, n in extensions.most_common())
    shown = ", ".join(str(p) for p in files[:limit]) + (", ..." if len(files) > limit else "")
    return (
        f"{len(files)} file{'s' if len(files) != 1 else ''} not read (extensions {ordered}), e.g. {shown}; "
        f"images are read from {', '.join(sorted(IMAGE_EXTENSIONS))} files only"
    )


class ImageFiles:
    """Every image file under `root` (recursively, sorted), opened on access: any bit depth and band count."""

    def __init__(self, root: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.root = Path(root)
        self.paths = find_images(self.root)
        self.max_pixels = max_pixels
        self.num_images = len(self.paths)

    def load_image(self, k: int) -> ImageSource:
        """The k-th file, opened lazily (a JPEG can then be decoded at reduced size): PIL image or (C, H, W) array."""
        return open_source(self.paths[k], max_pixels=self.max_pixels)

    def __repr__(self) -> str:
        return f"ImageFiles(root={str(self.root)!r}, num_images={self.num_images})"


def build_pretrain_transform(data_cfg: DataConfig, img_size: int, in_chans: int = 3) -> PretrainCrop:
    """SimMIM's augmentation as `data_cfg` sets it: image -> (in_chans, img_size, img_size), raw values."""
    return PretrainCrop(img_size, data_cfg.crop_scale, data_cfg.crop_ratio, data_cfg.hflip, in_chans=in_chans)


def build_pretrain_dataset(data_cfg: DataConfig, img_size: int, mask_generator: MaskFn, in_chans: int = 3) -> Dataset:
    """The map-style pretraining dataset named by `data_cfg.source`, with the SimMIM augmentation."""
    transform = build_pretrain_transform(data_cfg, img_size, in_chans)
    if data_cfg.source == "photos":
        return MaskedImages(load_photos(), transform, mask_generator, samples_per_epoch=data_cfg.samples_per_epoch)
    if data_cfg.source == "fashion_mnist":
        images: ImageCollection = FashionMNIST(str(data_cfg.split))
    else:
        images = ImageFiles(data_cfg.root, max_pixels=data_cfg.max_image_pixels)
        unread = unread_files(data_cfg.root)
        if unread:  # a .gif or a .txt beside the images is left out: say so rather than skip it silently
            log.info(f"note: {describe_unread(unread)}")
    dataset = MaskedImages(images, transform, mask_generator)
    return dataset if data_cfg.num_images is None else ImageSubset(dataset, data_cfg.num_images)


class ImageSubset(Subset):
    """`num_images` images of a pretraining dataset: the first of a seed-0 permutation, in the dataset's order."""

    def __init__(self, dataset: MaskedImages, num_images: int) -> None:
        total = len(dataset)
        if not 1 <= num_images <= total:
            raise ValueError(
                f"data.num_images={num_images} must lie in [1, {total}]: {dataset!r} holds {total} images; lower it "
                "or set data.num_images=null for all of them"
            )
        # not run.seed: every run sees the same images, and a smaller subset lies inside a larger one (data scaling)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:num_images]
        super().__init__(dataset, sorted(order.tolist()))
        self.num_images = num_images

    def load_image(self, k: int) -> ImageSource:
        """The k-th image of the subset, decoded as the wrapped dataset decodes it."""
        return self.dataset.load_image(self.indices[k])

    def __repr__(self) -> str:
        return f"ImageSubset({self.dataset!r}, num_images={self.num_images})"
