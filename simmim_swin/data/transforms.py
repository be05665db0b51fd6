"""Image transforms: the pretraining crop, a fixed evaluation view, normalisation on the device, back to pixels.

Loaders hand out the files' values (uint8 for 8-bit files: a quarter of float32's bytes through worker queues and
the host-to-device copy); `Normalizer` maps them to the model's input on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms.v2 import RGB
from torchvision.transforms.v2 import functional as TF

from simmim_swin.data.images import EIGHT_BIT_MODES, ImageSource, to_tensor

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

ImageTransform = Callable[[ImageSource], torch.Tensor]


def sample_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, crop width, crop height) for an image of width x height."""
    # torchvision's RandomResizedCrop.get_params, written out: it needs the decoded image and draws from the global
    # RNG only; here the box is known before decoding (a reduced JPEG scale) and draws come from `generator`
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, w, h
    in_ratio = width / height  # fallback: the whole image, cropped centrally to the allowed aspect ratios
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass
class PretrainCrop:
    """SimMIM's augmentation: RandomResizedCrop (antialiased bilinear) and flip -> (in_chans, img_size, img_size)."""

    img_size: int
    crop_scale: Sequence[float] = (0.67, 1.0)
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
    hflip: bool = True
    draft: bool = True
    in_chans: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.img_size, int) or isinstance(self.img_size, bool) or self.img_size <= 0:
            raise ValueError(f"img_size={self.img_size!r} must be a positive integer number of pixels, e.g. 192")
        scale, ratio = list(self.crop_scale), list(self.crop_ratio)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop_scale={scale} must be [min, max] with 0 < min <= max <= 1, e.g. [0.67, 1.0]")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop_ratio={ratio} must be [min, max] with 0 < min <= max, e.g. [0.75, 1.333]")
        self.crop_scale, self.crop_ratio = tuple(map(float, scale)), tuple(map(float, ratio))

    def __call__(self, img: ImageSource, generator: torch.Generator | None = None) -> torch.Tensor:
        # `generator` None: torch's global RNG, which the loader seeds per sample
        width, height = img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])  # not decoded
        left, top, w, h = sample_crop_box(width, height, self.crop_scale, self.crop_ratio, generator)
        flip = self.hflip and torch.rand(1, generator=generator).item() < 0.5
        jpeg = isinstance(img, Image.Image) and img.format in ("JPEG", "MPO")  # MPO: multi-picture JPEGs
        if self.draft and jpeg and self.in_chans == 3:
            # draft: a lazily opened JPEG decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which the crop box
            # still covers img_size on both sides: less work, never fewer pixels (a no-op once loaded)
            factor = self.img_size / min(w, h)
            if factor <= 0.5 and img.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor))):
                sx, sy = img.size[0] / width, img.size[1] / height
                left, top = min(round(left * sx), img.size[0] - 1), min(round(top * sy), img.size[1] - 1)
                w, h = min(max(1, round(w * sx)), img.size[0] - left), min(max(1, round(h * sy)), img.size[1] - top)
        pixels = to_tensor(img, self.in_chans)  # C, H, W: uint8 for 8-bit files, else float32 unclipped
        # torch's antialiased bilinear resize on uint8 (what torchvision's tensor transforms use): the same
        # result as PIL's resize to within a few grey levels, at about a quarter of the time
        out = TF.resized_crop(pixels, top, left, h, w, [self.img_size, self.img_size], antialias=True)
        return out.flip(-1) if flip else out  # C, img_size, img_size


class EvalView:
    """build_eval_transform(normalize=False) for any band count and depth -> raw (in_chans, img_size, img_size)."""

    def __init__(self, img_size: int, in_chans: int = 3, crop_pct: float = 1.0) -> None:
        self.rgb = build_eval_transform(img_size, normalize=False, crop_pct=crop_pct)  # checks crop_pct
        self.img_size, self.in_chans, self.crop_pct = img_size, in_chans, crop_pct

    def __call__(self, img: ImageSource, generator: torch.Generator | None = None) -> torch.Tensor:
        # `generator`: unused, taken so that the view can stand where PretrainCrop does
        if isinstance(img, Image.Image) and self.in_chans == 3 and img.mode in EIGHT_BIT_MODES:
            return self.rgb(img)
        pixels = to_tensor(img, self.in_chans)
        pixels = TF.resize(pixels, [math.floor(self.img_size / self.crop_pct)], antialias=True)
        return TF.center_crop(pixels, [self.img_size, self.img_size])  # C, img_size, img_size


def build_eval_transform(
    img_size: int, normalize: bool = True, crop_pct: float = 1.0, interpolation: str = "bilinear"
) -> ImageTransform:
    """timm's RGB evaluation view: resize to img_size / crop_pct, centre crop img_size; ImageNet-normalised or uint8."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]; 0.875 is the 224-of-256 protocol")
    view = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, normalize=normalize
    )
    return T.Compose([RGB(), *view.transforms])


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (..., 3, H, W) -> ImageNet-normalised float32; float input is returned as it is."""
    return _IMAGENET(images) if images.dtype == torch.uint8 else images


class Normalizer:
    """Raw images (B, C, H, W) -> float32 (raw - mean) / std per channel; no data.mean / std: ImageNet's, for uint8."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if (mean is None) != (std is None):  # else ImageNet's would stand in silently for the missing one
            raise ValueError("data.mean and data.std go together: set both (simmim-swin stats prints them) or neither")
        self.is_default = mean is None
        scale = 255.0 if self.is_default else 1.0
        self.mean = torch.tensor(IMAGENET_MEAN if mean is None else mean, dtype=torch.float32).view(-1, 1, 1) * scale
        self.std = torch.tensor(IMAGENET_STD if std is None else std, dtype=torch.float32).view(-1, 1, 1) * scale

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_default and images.dtype != torch.uint8:
            raise ValueError(
                "the images are 16-bit or float, but data.mean / data.std are not set: ImageNet's 8-bit statistics "
                "do not apply; run `simmim-swin stats PATH` and pass the data.mean=[...] data.std=[...] it prints"
            )
        if images.shape[-3] != len(self.mean):
            raise ValueError(
                f"data.mean / data.std have {len(self.mean)} values but the images have {images.shape[-3]} "
                "channels; give one value per channel (model.in_chans)"
            )
        if self.mean.device != images.device:  # moved once: a copy per step would also wait for the device each time
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - self.mean) / self.std


_IMAGENET = Normalizer()  # normalize_images's, kept on the device the images come from


def denormalize(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised images (N, 3, H, W) or (3, H, W) -> uint8 (N, H, W, 3) or (H, W, 3), clamped."""
    # uint8, as wandb and PIL want: a float array in [0, 1] shows up black in wandb
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    imagenet = Normalizer()
    x = images.detach().to(device="cpu", dtype=torch.float32) * imagenet.std + imagenet.mean
    # round rather than truncate so that ToTensor -> Normalize -> denormalize gives back the same bytes
    return x.clamp(0.0, 255.0).round().to(torch.uint8).movedim(-3, -1).numpy()  # ..., H, W, 3
