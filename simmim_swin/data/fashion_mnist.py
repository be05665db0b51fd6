"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: 70k real labelled 28x28 grey images, no download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from simmim_swin.data.transforms import ImageTransform

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, then one uint32 per dimension, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(f"{path} is not an IDX file of {ndim} dimension(s) of uint8 (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of the train (60k) or test (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split={split!r} is unknown; use one of {sorted(_FILES)}")
    root = Path(root)
    image_file, label_file = (root / name for name in _FILES[split])
    if not image_file.exists() or not label_file.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {root}; install it with `apt-get update && apt-get install -y "
            "dataset-fashion-mnist` (Debian's package, no download at run time)"
        )
    images, labels = _read_idx(image_file, 3), _read_idx(label_file, 1)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    return images, labels.astype(np.int64)


class FashionMNIST(Dataset):
    """A Fashion-MNIST split: (transform(image), label) items, and an ImageCollection of RGB PIL images."""

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(
        self, split: str, transform: ImageTransform | None = None, root: str | Path = FASHION_MNIST_DIR
    ) -> None:
        self.split = split
        self.images, labels = load_fashion_mnist(split, root)  # N, 28, 28 uint8 and N int64
        self.targets: list[int] = labels.tolist()
        self.transform = transform
        self.num_images = len(self.images)

    def load_image(self, k: int) -> Image.Image:
        """The k-th image of the split as an RGB PIL image."""
        return Image.fromarray(self.images[k]).convert("RGB")  # 2-D uint8 is mode L: grey in all three channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = self.load_image(index)
        return (self.transform(image) if self.transform else image), self.targets[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, num_images={self.num_images})"
