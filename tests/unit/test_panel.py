"""The reconstruction panel PNG: layout, masking, pasting and atomic writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.data import denormalize
from simmim_swin.masking import MaskGenerator
from simmim_swin.panel import GUTTER_PX, MASK_GREY, TITLE_PX, panel_size, save_reconstruction_panel, tile_box

PATCH = 4


def _batch(num_images: int, img_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised noise images (B, 3, H, W) and SimMIM token masks (B, H/4, W/4)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, img_size, img_size, generator=g)
    mask_generator = MaskGenerator(img_size, 8, PATCH, 0.5)
    masks = torch.stack([mask_generator(generator=g) for _ in range(num_images)])
    return images, masks


def _tiles(path, num_rows: int, img_size: int) -> np.ndarray:
    """Read the PNG back as (rows, 3 columns, tile, tile, 3), checking the gutters are white on the way."""
    with Image.open(path) as img:
        png = np.asarray(img.convert("RGB"))
    boxes = [[tile_box(r, c, img_size, img_size) for c in range(3)] for r in range(num_rows)]
    tiles = np.stack([[png[t:b, lft:rgt] for t, lft, b, rgt in row] for row in boxes])
    gutters = png[TITLE_PX:].copy()
    for row in boxes:
        for t, lft, b, rgt in row:
            gutters[t - TITLE_PX : b - TITLE_PX, lft:rgt] = 255
    assert np.all(gutters == 255)
    return tiles


def test_panel_layout_upscales_small_tiles(tmp_path) -> None:
    images, masks = _batch(3, 32)
    path = save_reconstruction_panel(tmp_path / "panel.png", images, masks, images, patch_size=PATCH)
    assert path == tmp_path / "panel.png" and path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        # 32 px tiles are enlarged 4x to 128; 3 columns and 4 gutters across; the titles, 3 rows and 4 gutters down
        assert png.size == (3 * 128 + 4 * GUTTER_PX, TITLE_PX + 3 * 128 + 4 * GUTTER_PX) == panel_size(3, 32, 32)
        assert tile_box(2, 2, 32, 32) == (TITLE_PX + 3 * GUTTER_PX + 2 * 128, 3 * GUTTER_PX + 2 * 128) + (
            TITLE_PX + 3 * GUTTER_PX + 3 * 128,
            3 * GUTTER_PX + 3 * 128,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["panel.png"]  # no temporary file left behind


def test_panel_keeps_large_tiles_at_their_size(tmp_path) -> None:
    images, masks = _batch(2, 160)
    path = save_reconstruction_panel(tmp_path / "nested" / "dir" / "p.png", images, masks, images, PATCH)
    with Image.open(path) as png:
        assert png.size == (3 * 160 + 4 * GUTTER_PX, TITLE_PX + 2 * 160 + 3 * GUTTER_PX)


def test_panel_columns(tmp_path) -> None:
    images, masks = _batch(2, 32)
    path = save_reconstruction_panel(tmp_path / "perfect.png", images, masks, images.clone(), PATCH)
    tiles = _tiles(path, 2, 32)
    original, masked, reconstructed = tiles[:, 0], tiles[:, 1], tiles[:, 2]
    # the original column is the input image, upscaled by pixel repetition
    expected = denormalize(images).repeat(4, axis=1).repeat(4, axis=2)
    np.testing.assert_array_equal(original, expected)
    # a perfect reconstruction reproduces the original column exactly
    np.testing.assert_array_equal(reconstructed, original)
    # the masked column is grey exactly where the token mask (upsampled by patch and by 4 for display) is 1
    pixel_mask = masks.bool().repeat_interleave(PATCH * 4, 1).repeat_interleave(PATCH * 4, 2).numpy()
    assert np.all(masked[pixel_mask] == MASK_GREY)
    np.testing.assert_array_equal(masked[~pixel_mask], original[~pixel_mask])
    assert abs(masked.std() - original.std()) > 10  # half grey: far less spread than noise


def test_panel_pastes_reconstruction_only_on_masked_pixels(tmp_path) -> None:
    images, masks = _batch(2, 32)
    reconstructions = torch.full_like(images, 5.0)  # saturates to white once denormalised
    path = save_reconstruction_panel(tmp_path / "paste.png", images, masks, reconstructions, PATCH)
    tiles = _tiles(path, 2, 32)
    pixel_mask = masks.bool().repeat_interleave(PATCH * 4, 1).repeat_interleave(PATCH * 4, 2).numpy()
    assert np.all(tiles[:, 2][pixel_mask] == 255)
    np.testing.assert_array_equal(tiles[:, 2][~pixel_mask], tiles[:, 0][~pixel_mask])


def test_panel_titles_each_column(tmp_path) -> None:
    images, masks = _batch(1, 32)
    with_titles = save_reconstruction_panel(tmp_path / "t.png", images, masks, images, PATCH)
    with Image.open(with_titles) as img:
        strip = np.asarray(img.convert("RGB"))[:TITLE_PX]
    dark = strip.min(axis=-1) < 128  # title text is black on the white strip
    for col in range(3):
        _, left, _, right = tile_box(0, col, 32, 32)
        assert dark[:, left:right].sum() > 20, f"no title above column {col}"
    assert not dark[:, :GUTTER_PX].any()  # text stays over its column
    # the three titles differ: "original", "masked", "reconstruction"
    columns = [dark[:, tile_box(0, c, 32, 32)[1] : tile_box(0, c, 32, 32)[3]] for c in range(3)]
    assert columns[0].sum() != columns[1].sum() != columns[2].sum()


def test_panel_rejects_mismatched_inputs(tmp_path) -> None:
    images, masks = _batch(2, 32)
    with pytest.raises(ValueError, match="token masks"):
        save_reconstruction_panel(tmp_path / "a.png", images, masks[:, :4, :4], images, PATCH)
    with pytest.raises(ValueError, match="must match images"):
        save_reconstruction_panel(tmp_path / "b.png", images, masks, images[:, :, :16], PATCH)
    with pytest.raises(ValueError, match="token masks"):
        save_reconstruction_panel(tmp_path / "c.png", images, masks, images, patch_size=8)
    assert not list(tmp_path.iterdir())
