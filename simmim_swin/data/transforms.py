"""Image transforms for SimMIM: the pretraining crop (decoding JPEGs at reduced size), a fixed eval view,
normalisation on the device, and the way back to pixels.

Loaders hand out uint8 images (B, 3, H, W): a quarter of the bytes of float32 through worker queues, pinned
memory and the host-to-device copy. `normalize_images` turns them into ImageNet-normalised floats on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _check_img_size(img_size: int) -> None:
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise ValueError(f"img_size={img_size!r} must be a positive integer number of pixels, e.g. 192")


def sample_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, crop width, crop height) for an image of width x height.

    The same algorithm as torchvision's `RandomResizedCrop.get_params` (ten tries of area in `scale` and log-uniform
    aspect ratio in `ratio`, then a centre crop clipped to `ratio`), written out because get_params needs the
    decoded image and draws from the global RNG only: here the box is known before decoding (so the decoder can
    pick a reduced JPEG scale) and the draws can come from a worker's own `generator`.
    """
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


class PretrainCrop:
    """SimMIM's augmentation, PIL image -> uint8 tensor (3, img_size, img_size): RandomResizedCrop (bilinear,
    antialiased, as torchvision and the SimMIM reference), then an optional horizontal flip.

    Give it a lazily opened image (`Image.open` without `.load()`): a JPEG is then decoded by PIL's draft mode at
    the smallest DCT scale (1/2, 1/4, 1/8) at which the crop box still covers at least img_size x img_size
    pixels, so the crop is never upsampled from fewer pixels than a full decode would give, only decoded with
    less work. Already-decoded images and other formats are cropped from full resolution.
    Randomness comes from `generator`, or from torch's global RNG when None (what SeededSamples seeds per sample).
    """

    def __init__(
        self,
        img_size: int,
        crop_scale: Sequence[float] = (0.67, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        draft: bool = True,
    ) -> None:
        _check_img_size(img_size)
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(
                f"crop_scale={list(crop_scale)} must be [min, max] with 0 < min <= max <= 1, e.g. [0.67, 1.0]"
            )
        if len(crop_ratio) != 2 or not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(
                f"crop_ratio={list(crop_ratio)} must be [min, max] with 0 < min <= max, e.g. [0.75, 1.333]"
            )
        self.img_size = img_size
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.crop_ratio = tuple(float(r) for r in crop_ratio)
        self.hflip = hflip
        self.draft = draft

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        width, height = img.size
        left, top, w, h = sample_crop_box(width, height, self.crop_scale, self.crop_ratio, generator)
        flip = self.hflip and torch.rand(1, generator=generator).item() < 0.5
        if self.draft and img.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEGs from cameras
            # the full image at a size where the crop box is still >= img_size on both sides; PIL picks the
            # largest power-of-two reduction that keeps the image at least this large (a no-op once loaded)
            factor = self.img_size / min(w, h)
            if factor <= 0.5 and img.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor))):
                sx, sy = img.size[0] / width, img.size[1] / height
                left, top = min(round(left * sx), img.size[0] - 1), min(round(top * sy), img.size[1] - 1)
                w, h = min(max(1, round(w * sx)), img.size[0] - left), min(max(1, round(h * sy)), img.size[1] - top)
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # H, W, 3 -> 3, H, W (a view)
        # torch's antialiased bilinear resize on uint8 (what torchvision's tensor transforms use): the same
        # result as PIL's resize to within a few grey levels, at about a quarter of the time
        out = TF.resized_crop(pixels, top, left, h, w, [self.img_size, self.img_size], antialias=True)
        return out.flip(-1) if flip else out  # 3, img_size, img_size

    def __repr__(self) -> str:
        return (
            f"PretrainCrop(img_size={self.img_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"hflip={self.hflip}, draft={self.draft})"
        )


def build_pretrain_transform(
    img_size: int,
    crop_scale: Sequence[float] = (0.67, 1.0),
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> PretrainCrop:
    """SimMIM augmentation: PIL image -> uint8 tensor (3, img_size, img_size); normalise on the device."""
    return PretrainCrop(img_size, crop_scale=crop_scale, crop_ratio=crop_ratio, hflip=hflip)


def build_eval_transform(img_size: int, normalize: bool = True) -> ImageTransform:
    """Deterministic view: resize the shorter side to img_size and centre crop -> (3, img_size, img_size).

    normalize=True gives ImageNet-normalised floats (what image panels take); False gives uint8, like the loaders.
    """
    _check_img_size(img_size)
    steps: list[Callable] = [T.Resize(img_size), T.CenterCrop(img_size)]
    if normalize:
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    else:
        steps.append(T.PILToTensor())
    return T.Compose([T.Lambda(_to_rgb), *steps])


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 normalised with the ImageNet mean / std, on the images' device.

    Float input is taken as already normalised and returned unchanged.
    """
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1) * 255.0
    return (images.float() - mean) / std


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Normalised images (N, 3, H, W) or (3, H, W) -> uint8 numpy (N, H, W, 3) or (H, W, 3), clamped to [0, 255].

    wandb and PIL both want uint8: a float array in [0, 1] shows up black in wandb (docs/reference.md, known pitfalls).
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
