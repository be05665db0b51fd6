"""Reconstruction panels: one PNG row per image, original | masked input | reconstruction pasted into the original."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim_swin.data.transforms import denormalize

GUTTER_PX = 4  # white space between tiles
MIN_TILE_PX = 128  # smaller tiles are enlarged (nearest neighbour) by an integer factor
MASK_GREY = 128  # masked patches in the input column


def tile_scale(height: int, width: int) -> int:
    """Integer nearest-neighbour enlargement that makes the shorter tile side at least MIN_TILE_PX."""
    return max(1, math.ceil(MIN_TILE_PX / min(height, width)))


def panel_size(num_rows: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of the panel for `num_rows` images of height x width."""
    scale = tile_scale(height, width)
    tile_h, tile_w = height * scale, width * scale
    return 3 * tile_w + 2 * GUTTER_PX, num_rows * tile_h + (num_rows - 1) * GUTTER_PX


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
    tile_h, tile_w = h * scale, w * scale
    width, height = panel_size(num_rows, h, w)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for row in range(num_rows):
        top = row * (tile_h + GUTTER_PX)
        for col in range(3):
            left = col * (tile_w + GUTTER_PX)
            canvas[top : top + tile_h, left : left + tile_w] = tiles[row, col]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a reader (wandb, a browser, a sync job) never sees a half-written file
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(canvas).save(f, format="PNG")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
