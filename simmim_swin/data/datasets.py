"""Map-style datasets for SimMIM pretraining: bundled scikit-image photographs, image folders, Fashion-MNIST.

Every sample is (augmented image (C, H, W), token mask (H/p, W/p) uint8); labels are not used. Images keep the
files' values (uint8 for 8-bit files, float32 otherwise) and are normalised on the device (transforms.Normalizer).
An image folder's unreadable file comes back as an images.BadSample, which stream.collate_good drops and
counts. Webdataset shards stream through data/stream.py instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from simmim_swin.config import DataConfig
from simmim_swin.data.fashion_mnist import FASHION_MNIST_DIR, FashionMNIST
from simmim_swin.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadSample, ImageSource, close_source, open_source
from simmim_swin.data.transforms import ImageTransform, build_pretrain_transform

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


def _load_rgb(path: Path) -> Image.Image:
    """Decode one image file to an RGB PIL image, naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise OSError(f"cannot read image {path}: {e}") from e


def skimage_data_dir() -> Path:
    """The folder of data files shipped inside the installed scikit-image package (skimage/data)."""
    import skimage.data  # imported here: only source=photos needs scikit-image

    # not skimage.data.data_dir: that is pooch's download cache, empty until something is fetched
    return Path(skimage.data.__file__).parent


class PhotoCrops(Dataset):
    """Random crops of the real photographs bundled with scikit-image; an epoch is `samples_per_epoch` crops.

    The photos are decoded once (about 15 MB in memory); sample i uses photo i % num_images, and the random
    crop / flip / mask make every sample different.
    """

    def __init__(self, transform: ImageTransform, mask_generator: MaskFn, samples_per_epoch: int) -> None:
        data_dir = skimage_data_dir()
        missing = [name for name in PHOTO_FILES if not (data_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"scikit-image's bundled photos {missing} are not in {data_dir}; reinstall scikit-image "
                "(pip install --force-reinstall scikit-image) or use data.source=folder"
            )
        self.paths = [data_dir / name for name in PHOTO_FILES]
        self.photos = [_load_rgb(p) for p in self.paths]
        self.transform = transform
        self.mask_generator = mask_generator
        self.samples_per_epoch = samples_per_epoch

    @property
    def num_images(self) -> int:
        """Number of distinct photographs."""
        return len(self.photos)

    def load_image(self, k: int) -> Image.Image:
        """The k-th distinct photograph as an RGB PIL image (a copy: callers may modify it)."""
        return self.photos[k].copy()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.photos[index % len(self.photos)]), self.mask_generator()

    def __repr__(self) -> str:
        return f"PhotoCrops(num_images={self.num_images}, samples_per_epoch={self.samples_per_epoch})"


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
    extensions: dict[str, int] = {}
    for path in files:
        extensions[path.suffix.lower() or "(none)"] = extensions.get(path.suffix.lower() or "(none)", 0) + 1
    ordered = ", ".join(f"{ext}: {n}" for ext, n in sorted(extensions.items(), key=lambda item: -item[1]))
    shown = ", ".join(str(p) for p in files[:limit]) + (", ..." if len(files) > limit else "")
    return (
        f"{len(files)} file{'s' if len(files) != 1 else ''} not read (extensions {ordered}), e.g. {shown}; "
        f"images are read from {', '.join(sorted(IMAGE_EXTENSIONS))} files only"
    )


class ImageFolderMIM(Dataset):
    """Every image file under `root` (recursively, sorted), decoded on access; one epoch = each file once.

    A file that cannot be read (corrupt, truncated, over `max_pixels`, wrong band count) gives an images.BadSample
    naming it instead of an exception, so one bad file never ends a run (stream.collate_good drops and counts it).
    """

    def __init__(
        self, root: str | Path, transform: ImageTransform, mask_generator: MaskFn,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.paths = find_images(self.root)
        self.transform = transform
        self.mask_generator = mask_generator
        self.max_pixels = max_pixels

    @property
    def num_images(self) -> int:
        """Number of image files."""
        return len(self.paths)

    def load_image(self, k: int) -> ImageSource:
        """The k-th image file (sorted order), decoded: a PIL image or a (C, H, W) array."""
        source = open_source(self.paths[k], max_pixels=self.max_pixels)
        if isinstance(source, Image.Image):
            source.load()
        return source

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        path = self.paths[index]
        try:
            # opened lazily: the transform decodes a JPEG at reduced size when its crop allows (draft mode)
            source = open_source(path, max_pixels=self.max_pixels)
            try:
                image = self.transform(source)
            finally:
                close_source(source)
        except Exception as e:  # the bad-data policy: any failure to read a file skips and counts it
            return BadSample.of(path, e)
        return image, self.mask_generator()

    def __repr__(self) -> str:
        return f"ImageFolderMIM(root={str(self.root)!r}, num_images={self.num_images})"


class FashionMNISTMIM(FashionMNIST):
    """Fashion-MNIST for pretraining: (transform(image), mask) per image, labels unused; one epoch = the whole
    split (60k train, 10k test)."""

    def __init__(
        self, split: str, transform: ImageTransform, mask_generator: MaskFn, root: str | Path = FASHION_MNIST_DIR
    ) -> None:
        super().__init__(split, transform, root)
        self.mask_generator = mask_generator

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.load_image(index)), self.mask_generator()


class ImageList:
    """A fixed list of RGB PIL images with the `num_images` / `load_image` interface of the datasets above
    (what make_fixed_batch takes), e.g. the first images of a shard set."""

    def __init__(self, images: list[Image.Image], name: str = "images") -> None:
        self.images = images
        self.name = name

    @property
    def num_images(self) -> int:
        """Number of images."""
        return len(self.images)

    def load_image(self, k: int) -> Image.Image:
        """The k-th image (a copy: callers may modify it)."""
        return self.images[k].copy()

    def __repr__(self) -> str:
        return f"ImageList({self.name}, num_images={self.num_images})"


def build_pretrain_dataset(data_cfg: DataConfig, img_size: int, mask_generator: MaskFn, in_chans: int = 3) -> Dataset:
    """The map-style pretraining dataset named by `data_cfg.source`, with the SimMIM augmentation at `img_size`
    giving `in_chans` channels (data_cfg.source photos, folder or fashion_mnist; shards stream, see
    build_pretrain_data)."""
    transform = build_pretrain_transform(
        img_size,
        crop_scale=data_cfg.crop_scale,
        crop_ratio=data_cfg.crop_ratio,
        hflip=data_cfg.hflip,
        in_chans=in_chans,
    )
    if data_cfg.source == "photos":
        return PhotoCrops(transform, mask_generator, samples_per_epoch=data_cfg.samples_per_epoch)
    if data_cfg.source == "fashion_mnist":
        dataset = FashionMNISTMIM(str(data_cfg.split), transform, mask_generator)
    else:
        dataset = ImageFolderMIM(data_cfg.root, transform, mask_generator, max_pixels=data_cfg.max_image_pixels)
    return dataset if data_cfg.num_images is None else ImageSubset(dataset, data_cfg.num_images)


class ImageSubset(Subset):
    """`num_images` images of a pretraining dataset: the first of a seed-0 permutation, in the dataset's order.

    The permutation does not depend on run.seed or num_images, so every run with the same num_images sees the same
    images and a smaller subset lies inside a larger one (what a study of the unlabelled set's size needs). torch's
    Subset indexes; this adds the `num_images` / `load_image` interface the panels read.
    """

    def __init__(self, dataset: ImageFolderMIM | FashionMNISTMIM, num_images: int) -> None:
        total = len(dataset)
        if not 1 <= num_images <= total:
            raise ValueError(
                f"data.num_images={num_images} must lie in [1, {total}]: {dataset!r} holds {total} images; lower it "
                "or set data.num_images=null for all of them"
            )
        order = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:num_images]
        super().__init__(dataset, sorted(order.tolist()))

    @property
    def num_images(self) -> int:
        """Number of images in the subset."""
        return len(self.indices)

    def load_image(self, k: int) -> ImageSource:
        """The k-th image of the subset, decoded as the wrapped dataset decodes it."""
        return self.dataset.load_image(self.indices[k])

    def __repr__(self) -> str:
        return f"ImageSubset({self.dataset!r}, num_images={self.num_images})"
