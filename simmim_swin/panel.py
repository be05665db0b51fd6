"""Reconstruction panels: one PNG row per image, original | masked input | reconstruction pasted into the original.

The tiles are laid out by torchvision's make_grid (a white gutter around and between them) under a strip with the
column titles.
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
    images: torch.Tensor, masks: torch.Tensor, reconstructions: torch.Tensor, patch_size: int
) -> np.ndarray:
    """uint8 tiles (B, 3 columns, H, W, 3): original, masked input (grey where masked), original with its
    masked pixels replaced by the reconstruction; inputs are normalised images and token masks (B, H/p, W/p)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
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
    original = denormalize(images)  # B, H, W, 3
    masked = original.copy()
    masked[pixel_mask[:, 0].numpy()] = MASK_GREY
    pasted = denormalize(torch.where(pixel_mask, reconstructions, images))
    return np.stack([original, masked, pasted], axis=1)  # B, 3, H, W, 3


def save_reconstruction_panel(
    path: str | os.PathLike, images: torch.Tensor, masks: torch.Tensor, reconstructions: torch.Tensor, patch_size: int
) -> Path:
    """Write the panel PNG atomically (temp file, then os.replace) and return its path.

    Args:
        images: normalised images (B, 3, H, W).
        masks: token masks (B, H/patch_size, W/patch_size), 1 = masked.
        reconstructions: the model's reconstruction in normalised image space (B, 3, H, W).
        patch_size: the encoder's patch size in pixels.
    """
    tiles = make_panel_tiles(images, masks, reconstructions, patch_size)
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
