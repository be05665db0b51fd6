"""Image transforms for SimMIM: the pretraining augmentation, a fixed eval view, and the way back to pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _check_img_size(img_size: int) -> None:
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise ValueError(f"img_size={img_size!r} must be a positive integer number of pixels, e.g. 192")


def build_pretrain_transform(
    img_size: int,
    crop_scale: Sequence[float] = (0.67, 1.0),
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> ImageTransform:
    """SimMIM augmentation: PIL RGB image -> normalised float tensor (3, img_size, img_size).

    RandomResizedCrop (bilinear, torchvision's default, as in the SimMIM reference), optional horizontal flip,
    ImageNet normalisation. Randomness comes from torch's global RNG (what the loader seeds per sample).
    """
    _check_img_size(img_size)
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"crop_scale={list(crop_scale)} must be [min, max] with 0 < min <= max <= 1, e.g. [0.67, 1.0]")
    if len(crop_ratio) != 2 or not 0.0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"crop_ratio={list(crop_ratio)} must be [min, max] with 0 < min <= max, e.g. [0.75, 1.333]")
    steps: list[Callable] = [
        T.RandomResizedCrop(img_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio)),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def build_eval_transform(img_size: int) -> ImageTransform:
    """Deterministic view: resize the shorter side to img_size, centre crop, normalise -> (3, img_size, img_size)."""
    _check_img_size(img_size)
    return T.Compose(
        [
            T.Resize(img_size),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Normalised images (N, 3, H, W) or (3, H, W) -> uint8 numpy (N, H, W, 3) or (H, W, 3), clamped to [0, 255].

    wandb and PIL both want uint8: a float array in [0, 1] shows up black in wandb (see PITFALLS.md).
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    x = images.detach().to(device="cpu", dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x * std + mean).clamp(0.0, 1.0)
    # round rather than truncate so that ToTensor -> Normalize -> denormalize gives back the same bytes
    x = (x * 255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()  # ..., H, W, 3
