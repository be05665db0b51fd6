"""Reconstruction panels: one PNG row per image, original | masked input | reconstruction | error on the masked
patches, each row labelled with the model's masked-patch loss next to that of predicting zeros.

The tiles sit on a white canvas (a gutter around and between them) under a strip with the column titles; a label
strip above each row holds its losses (torchvision's make_grid cannot interleave such row strips, hence the
hand layout). The error column is |prediction - target| in the target space (the per-pixel-normalised target
with norm_target on), mean over channels, on one fixed colour scale 0 .. ERROR_MAX for every panel; visible
pixels are black. 8-bit RGB with ImageNet statistics is shown as it is (denormalize); any other data through a
BandDisplay: three chosen bands (or one in grey), each stretched per image between percentiles of the original.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from simmim_swin.data.transforms import denormalize
from simmim_swin.files import atomic_write

GUTTER_PX = 4  # white space around and between tiles
TITLE_PX = 16  # white strip above the grid holding the column titles
ROW_LABEL_PX = 14  # white strip above each row holding its losses
ERROR_MAX = 2.0  # the error column's colour scale is 0 .. this (target units)
ERROR_COLORMAP = "magma"
COLUMN_TITLES = ("original", "masked", "reconstruction", f"|error| 0-{ERROR_MAX:g}")
NUM_COLUMNS = len(COLUMN_TITLES)
MIN_TILE_PX = 128  # smaller tiles are enlarged (nearest neighbour) by an integer factor
MASK_GREY = 128  # masked patches in the input column


class BandDisplay:
    """Normalised images (B, C, H, W) -> uint8 (B, H, W, 3) for display: `bands` (three as RGB, one as grey; default
    the first three, or band 0 when there are fewer than three), each stretched linearly per image between the
    `low` and `high` percentiles of the reference image, so the original and its reconstruction share one scale."""

    def __init__(self, bands: list[int] | None = None, low: float = 1.0, high: float = 99.0) -> None:
        if bands is not None and len(bands) not in (1, 3):
            raise ValueError(f"bands={bands}: give three bands (red, green, blue) or one")
        self.bands, self.low, self.high = bands, low, high

    def select(self, images: torch.Tensor) -> torch.Tensor:
        """The displayed bands (B, 1 or 3, H, W) as float32 on the CPU."""
        bands = self.bands or ([0, 1, 2] if images.shape[1] >= 3 else [0])
        if max(bands) >= images.shape[1]:
            raise ValueError(f"panel bands {bands} but the images have {images.shape[1]} channels")
        return images.detach().float().cpu()[:, bands]

    def ranges(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and band (B, k, 1, 1): the low and high percentiles of `reference`."""
        x = self.select(reference).flatten(2)  # B, k, H*W
        q = torch.tensor([self.low / 100, self.high / 100])
        lo, hi = torch.quantile(x, q, dim=2)  # each B, k
        return lo[..., None, None], torch.maximum(hi, lo + 1e-6)[..., None, None]

    def __call__(self, images: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> np.ndarray:
        x = ((self.select(images) - lo) / (hi - lo)).clamp(0.0, 1.0)
        x = (x * 255.0).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey
        return x.movedim(1, -1).numpy().copy()  # B, H, W, 3


def tile_scale(height: int, width: int) -> int:
    """Integer nearest-neighbour enlargement that makes the shorter tile side at least MIN_TILE_PX."""
    return max(1, math.ceil(MIN_TILE_PX / min(height, width)))


def panel_size(num_rows: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of the panel for `num_rows` images of height x width."""
    scale = tile_scale(height, width)
    tile_h, tile_w = height * scale, width * scale
    return (
        NUM_COLUMNS * tile_w + (NUM_COLUMNS + 1) * GUTTER_PX,
        TITLE_PX + GUTTER_PX + num_rows * (ROW_LABEL_PX + tile_h + GUTTER_PX),
    )


def tile_box(row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel box of one tile in the panel of images of height x width."""
    scale = tile_scale(height, width)
    tile_h, tile_w = height * scale, width * scale
    top = TITLE_PX + GUTTER_PX + row * (ROW_LABEL_PX + tile_h + GUTTER_PX) + ROW_LABEL_PX
    left = GUTTER_PX + col * (tile_w + GUTTER_PX)
    return top, left, top + tile_h, left + tile_w


def masked_l1_per_image(predictions: torch.Tensor, targets: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss of each image (B,): L1 summed over masked pixels and channels / masked pixels / channels."""
    l1 = (predictions.float() - targets.float()).abs() * pixel_mask  # B, C, H, W
    return l1.sum(dim=(1, 2, 3)) / (pixel_mask.sum(dim=(1, 2, 3)) + 1e-5) / predictions.shape[1]


def _check_shapes(
    images: torch.Tensor, masks: torch.Tensor, patch_size: int, rgb: bool, **same: torch.Tensor
) -> None:
    if images.dim() != 4 or (rgb and images.shape[1] != 3):
        raise ValueError(f"images must be (B, 3, H, W) (or pass a BandDisplay), got {tuple(images.shape)}")
    for name, tensor in same.items():
        if tensor.shape != images.shape:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} must match images {tuple(images.shape)}; "
                "map the model output to image space first (SimMIM.target_to_image)"
            )
    b, _, h, w = images.shape
    if masks.shape != (b, h // patch_size, w // patch_size) or h % patch_size or w % patch_size:
        raise ValueError(
            f"masks {tuple(masks.shape)} must be token masks (B, H/p, W/p) = {(b, h // patch_size, w // patch_size)} "
            f"for images {tuple(images.shape)} and patch_size={patch_size}"
        )


def make_panel_tiles(
    images: torch.Tensor,
    masks: torch.Tensor,
    reconstructions: torch.Tensor,
    patch_size: int,
    predictions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    display: BandDisplay | None = None,
) -> tuple[np.ndarray, list[str]]:
    """uint8 tiles (B, 4 columns, H, W, 3) and one label per row.

    Columns: original, masked input (grey where masked), original with its masked pixels replaced by the
    reconstruction, |predictions - targets| on the masked pixels. Inputs are normalised images, token masks
    (B, H/p, W/p) and the reconstructions in image space; predictions / targets are the model's output and its
    target in the target space (default: the reconstructions and the images, which is the target space when
    norm_target is off). display=None shows ImageNet-normalised RGB as it is; a BandDisplay any channel count.
    """
    predictions = reconstructions if predictions is None else predictions
    targets = images if targets is None else targets
    same = dict(reconstructions=reconstructions, predictions=predictions, targets=targets)
    _check_shapes(images, masks, patch_size, rgb=display is None, **same)
    from matplotlib import colormaps

    images, reconstructions = images.detach().float().cpu(), reconstructions.detach().float().cpu()
    predictions, targets = predictions.detach().float().cpu(), targets.detach().float().cpu()
    # B, H/p, W/p -> B, 1, H, W: each token covers patch_size x patch_size pixels
    pixel_mask = masks.detach().cpu().bool().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    pixel_mask = pixel_mask.unsqueeze(1)
    merged = torch.where(pixel_mask, reconstructions, images)
    if display is None:
        original, pasted = denormalize(images), denormalize(merged)  # B, H, W, 3
    else:
        lo, hi = display.ranges(images)
        original, pasted = display(images, lo, hi), display(merged, lo, hi)
    masked = original.copy()
    masked[pixel_mask[:, 0].numpy()] = MASK_GREY
    error = ((predictions - targets).abs().mean(dim=1) * pixel_mask[:, 0]).numpy()  # B, H, W
    error_rgb = (colormaps[ERROR_COLORMAP](np.clip(error / ERROR_MAX, 0.0, 1.0))[..., :3] * 255).round()
    error_rgb[~pixel_mask[:, 0].numpy()] = 0
    model_loss = masked_l1_per_image(predictions, targets, pixel_mask.float())
    zeros_loss = masked_l1_per_image(torch.zeros_like(targets), targets, pixel_mask.float())
    labels = [f"masked L1: model {m:.3f} | zeros {z:.3f}" for m, z in zip(model_loss.tolist(), zeros_loss.tolist())]
    return np.stack([original, masked, pasted, error_rgb.astype(np.uint8)], axis=1), labels  # B, 4, H, W, 3


def save_reconstruction_panel(
    path: str | os.PathLike,
    images: torch.Tensor,
    masks: torch.Tensor,
    reconstructions: torch.Tensor,
    patch_size: int,
    predictions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    display: BandDisplay | None = None,
) -> Path:
    """Write the panel PNG atomically (temp file, then os.replace) and return its path.

    Args:
        images: normalised images (B, C, H, W).
        masks: token masks (B, H/patch_size, W/patch_size), 1 = masked.
        reconstructions: the model's reconstruction in normalised image space (B, C, H, W).
        patch_size: the encoder's patch size in pixels.
        predictions, targets: the model's output and its target in the target space (SimMIM.target), for the error
            column and the losses; default the reconstructions and the images.
        display: how channels become RGB (BandDisplay); None: ImageNet-normalised RGB shown as it is.
    """
    tiles, labels = make_panel_tiles(images, masks, reconstructions, patch_size, predictions, targets, display)
    num_rows, _, h, w, _ = tiles.shape
    scale = tile_scale(h, w)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=2).repeat(scale, axis=3)
    canvas = Image.new("RGB", panel_size(num_rows, h, w), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row in range(num_rows):
        for col in range(NUM_COLUMNS):
            top, left, _, _ = tile_box(row, col, h, w)
            canvas.paste(Image.fromarray(tiles[row, col]), (left, top))
        top, left, _, _ = tile_box(row, 0, h, w)
        draw.text((left, top - ROW_LABEL_PX // 2), f"{row}: {labels[row]}", fill="black", font=font, anchor="lm")
    for col, title in enumerate(COLUMN_TITLES):
        _, left, _, right = tile_box(0, col, h, w)
        draw.text(((left + right) // 2, TITLE_PX // 2), title, fill="black", font=font, anchor="mm")
    return atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def build_display(in_chans: int, default_statistics: bool, bands: list[int] | None = None) -> BandDisplay | None:
    """None (show as it is) for 3 channels with ImageNet statistics and default bands; else a BandDisplay."""
    if in_chans == 3 and default_statistics and bands in (None, [0, 1, 2]):
        return None
    return BandDisplay(None if bands is None else list(bands))
