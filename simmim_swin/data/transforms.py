"""Image transforms for SimMIM: the pretraining crop (decoding JPEGs at reduced size), a fixed eval view,
normalisation on the device, and the way back to pixels.

Loaders hand out images (B, C, H, W) as the files hold them: uint8 for 8-bit files (a quarter of the bytes of
float32 through worker queues, pinned memory and the host-to-device copy), float32 in the files' own units for
16-bit and float files. `Normalizer` maps them to the model's input on the device with data.mean / data.std
(ImageNet's by default, for 8-bit RGB).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from simmim_swin.data.images import EIGHT_BIT_MODES, ImageSource, source_size, to_tensor

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

ImageTransform = Callable[[ImageSource], torch.Tensor]


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
    """SimMIM's augmentation, image -> tensor (in_chans, img_size, img_size), uint8 for 8-bit files and float32
    otherwise: RandomResizedCrop (bilinear, antialiased, as torchvision and the SimMIM reference), then an
    optional horizontal flip. The image is a PIL image or a (C, H, W) array (images.open_source).

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
        in_chans: int = 3,
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
        self.in_chans = in_chans

    def __call__(self, img: ImageSource, generator: torch.Generator | None = None) -> torch.Tensor:
        width, height = source_size(img)
        left, top, w, h = sample_crop_box(width, height, self.crop_scale, self.crop_ratio, generator)
        flip = self.hflip and torch.rand(1, generator=generator).item() < 0.5
        jpeg = isinstance(img, Image.Image) and img.format in ("JPEG", "MPO")  # MPO: multi-picture JPEGs
        if self.draft and jpeg and self.in_chans == 3:
            # the full image at a size where the crop box is still >= img_size on both sides; PIL picks the
            # largest power-of-two reduction that keeps the image at least this large (a no-op once loaded)
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

    def __repr__(self) -> str:
        return (
            f"PretrainCrop(img_size={self.img_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"hflip={self.hflip}, draft={self.draft}, in_chans={self.in_chans})"
        )


class EvalView:
    """Deterministic view of any image: resize the shorter side to img_size / crop_pct (antialiased bilinear) and
    centre crop img_size -> (in_chans, img_size, img_size), raw values (uint8 for 8-bit files, float32 otherwise).

    8-bit images with 3 channels take exactly the PIL path of build_eval_transform(normalize=False)."""

    def __init__(self, img_size: int, in_chans: int = 3, crop_pct: float = 1.0) -> None:
        self.rgb = build_eval_transform(img_size, normalize=False, crop_pct=crop_pct)  # checks img_size, crop_pct
        self.img_size, self.in_chans, self.crop_pct = img_size, in_chans, crop_pct

    def __call__(self, img: ImageSource, generator: torch.Generator | None = None) -> torch.Tensor:
        # `generator` is unused (the view draws nothing): taken so that the view can stand where PretrainCrop does
        if isinstance(img, Image.Image) and self.in_chans == 3 and img.mode in EIGHT_BIT_MODES:
            return self.rgb(img)
        pixels = to_tensor(img, self.in_chans)
        pixels = TF.resize(pixels, [math.floor(self.img_size / self.crop_pct)], antialias=True)
        return TF.center_crop(pixels, [self.img_size, self.img_size])  # C, img_size, img_size


def build_eval_transform(
    img_size: int, normalize: bool = True, crop_pct: float = 1.0, interpolation: str = "bilinear"
) -> ImageTransform:
    """timm's deterministic view of an image as RGB: resize the shorter side to floor(img_size / crop_pct) and centre
    crop img_size -> (3, img_size, img_size) (crop_pct 0.875: the 224-of-256 protocol).

    normalize=True gives ImageNet-normalised floats (what image panels and classifiers take); False gives uint8,
    like the loaders.
    """
    _check_img_size(img_size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]; 0.875 is the 224-of-256 protocol")
    view = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, normalize=normalize
    )
    return T.Compose([T.Lambda(_to_rgb), *view.transforms])


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


class Normalizer:
    """Raw images (B, C, H, W) -> (raw - mean) / std per channel, float32, on the images' device.

    mean / std are in the files' own units (data.mean / data.std, e.g. from `simmim-swin stats`). Without them
    uint8 images are taken as 8-bit RGB and get ImageNet's statistics (normalize_images); float images, which
    come from 16-bit or float files, then raise: their units are unknown.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("data.mean and data.std go together: set both (simmim-swin stats prints them) or neither")
        self.mean = None if mean is None else torch.tensor([float(m) for m in mean]).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor([float(s) for s in std]).view(-1, 1, 1)

    @property
    def is_default(self) -> bool:
        """ImageNet statistics for 8-bit RGB (no data.mean / data.std given)."""
        return self.mean is None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            if images.dtype != torch.uint8:
                raise ValueError(
                    "the images are 16-bit or float, but data.mean / data.std are not set: ImageNet's 8-bit statistics "
                    "do not apply; run `simmim-swin stats PATH` and pass the data.mean=[...] data.std=[...] it prints"
                )
            return normalize_images(images)
        if images.shape[-3] != self.mean.shape[0]:
            raise ValueError(
                f"data.mean / data.std have {self.mean.shape[0]} values but the images have {images.shape[-3]} "
                "channels; give one value per channel (model.in_chans)"
            )
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images back to raw units (float32, on the CPU)."""
        x = images.detach().float().cpu()
        if self.mean is None:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
            return x * std + mean
        return x * self.std + self.mean


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
