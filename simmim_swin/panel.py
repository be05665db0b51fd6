"""Reconstruction panels: one PNG row per image, original | masked input | reconstruction pasted into the original.

The tiles are laid out by torchvision's make_grid (a white gutter around and between them) under a strip with the
column titles. 8-bit RGB with ImageNet statistics is shown as it is (denormalize); any other data through a
BandDisplay: three chosen bands (or one in grey), each stretched per image between percentiles of the original.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from simmim_swin.data.transforms import denormalize
from simmim_swin.files import atomic_write

GUTTER_PX = 4  # white space around and between tiles
TITLE_PX = 16  # white strip above the grid holding the column titles
COLUMN_TITLES = ("original", "masked", "reconstruction")
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
    return 3 * tile_w + 4 * GUTTER_PX, TITLE_PX + num_rows * tile_h + (num_rows + 1) * GUTTER_PX


def tile_box(row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel box of one tile in the panel of images of height x width."""
    scale = tile_scale(height, width)
    tile_h, tile_w = height * scale, width * scale
    top = TITLE_PX + GUTTER_PX + row * (tile_h + GUTTER_PX)
    left = GUTTER_PX + col * (tile_w + GUTTER_PX)
    return top, left, top + tile_h, left + tile_w


def make_panel_tiles(
    images: torch.Tensor, masks: torch.Tensor, reconstructions: torch.Tensor, patch_size: int,
    display: BandDisplay | None = None,
) -> np.ndarray:  # fmt: skip
    """uint8 tiles (B, 3 columns, H, W, 3): original, masked input (grey where masked), original with its
    masked pixels replaced by the reconstruction; inputs are normalised images and token masks (B, H/p, W/p).
    display=None shows ImageNet-normalised RGB as it is; a BandDisplay shows any channel count."""
    if images.dim() != 4 or (display is None and images.shape[1] != 3):
        raise ValueError(f"images must be (B, 3, H, W) (or pass a BandDisplay), got {tuple(images.shape)}")
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"reconstructions {tuple(reconstructions.shape)} must match images {tuple(images.shape)}; "
            "map the model output to image space first (SimMIM.target_to_image)"
        )
    b, _, h, w = images.shape
    if masks.shape != (b, h // patch_size, w // patch_size) or h % patch_size or w % patch_size:
        raise ValueError(
            f"masks {tuple(masks.shape)} must be token masks (B, H/p, W/p) = {(b, h // patch_size, w // patch_size)} "
            f"for images {tuple(images.shape)} and patch_size={patch_size}"
        )
    images = images.detach().float().cpu()
    reconstructions = reconstructions.detach().float().cpu()
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
    return np.stack([original, masked, pasted], axis=1)  # B, 3, H, W, 3


def save_reconstruction_panel(
    path: str | os.PathLike, images: torch.Tensor, masks: torch.Tensor, reconstructions: torch.Tensor, patch_size: int,
    display: BandDisplay | None = None,
) -> Path:  # fmt: skip
    """Write the panel PNG atomically (temp file, then os.replace) and return its path.

    Args:
        images: normalised images (B, C, H, W).
        masks: token masks (B, H/patch_size, W/patch_size), 1 = masked.
        reconstructions: the model's reconstruction in normalised image space (B, C, H, W).
        patch_size: the encoder's patch size in pixels.
        display: how channels become RGB (BandDisplay); None: ImageNet-normalised RGB shown as it is.
    """
    tiles = make_panel_tiles(images, masks, reconstructions, patch_size, display)
    num_rows, _, h, w, _ = tiles.shape
    scale = tile_scale(h, w)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=2).repeat(scale, axis=3)
    # B, 3 columns, H, W, 3 -> B*3, 3, H, W: make_grid fills rows of three tiles
    grid = make_grid(
        torch.from_numpy(tiles).flatten(0, 1).permute(0, 3, 1, 2), nrow=3, padding=GUTTER_PX, pad_value=255
    )
    grid = grid.permute(1, 2, 0).numpy()  # H_grid, W_grid, 3
    canvas = Image.new("RGB", (grid.shape[1], TITLE_PX + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (0, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, title in enumerate(COLUMN_TITLES):
        _, left, _, right = tile_box(0, col, h, w)
        draw.text(((left + right) // 2, TITLE_PX // 2), title, fill="black", font=font, anchor="mm")
    return atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def build_display(in_chans: int, default_statistics: bool, bands: list[int] | None = None) -> BandDisplay | None:
    """None (show as it is) for 3 channels with ImageNet statistics and default bands; else a BandDisplay."""
    if in_chans == 3 and default_statistics and bands in (None, [0, 1, 2]):
        return None
    return BandDisplay(None if bands is None else list(bands))
