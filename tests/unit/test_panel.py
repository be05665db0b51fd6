"""The reconstruction panel PNG: layout, masking, pasting and atomic writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.data import denormalize
from simmim_swin.figures import (
    GUTTER_PX,
    MASK_GREY,
    NUM_COLUMNS,
    ROW_LABEL_PX,
    TITLE_PX,
    make_panel_tiles,
    panel_size,
    save_reconstruction_panel,
    tile_box,
)
from simmim_swin.masking import MaskGenerator
from simmim_swin.models import build_simmim

PATCH = 4


def _batch(num_images: int, img_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised noise images (B, 3, H, W) and SimMIM token masks (B, H/4, W/4)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, img_size, img_size, generator=g)
    mask_generator = MaskGenerator(img_size, 8, PATCH, 0.5)
    masks = torch.stack([mask_generator(generator=g) for _ in range(num_images)])
    return images, masks


def _tiles(path, num_rows: int, img_size: int) -> np.ndarray:
    """Read the PNG back as (rows, 4 columns, tile, tile, 3), checking the gutters are white on the way."""
    with Image.open(path) as img:
        png = np.asarray(img.convert("RGB"))
    boxes = [[tile_box(r, c, img_size, img_size) for c in range(NUM_COLUMNS)] for r in range(num_rows)]
    tiles = np.stack([[png[t:b, lft:rgt] for t, lft, b, rgt in row] for row in boxes])
    gutters = png[TITLE_PX:].copy()
    for row in boxes:
        t = row[0][0]
        gutters[t - TITLE_PX - ROW_LABEL_PX : t - TITLE_PX, :] = 255  # the row's label strip holds text
        for t, lft, b, rgt in row:
            gutters[t - TITLE_PX : b - TITLE_PX, lft:rgt] = 255
    assert np.all(gutters == 255)
    return tiles


def test_panel_layout_upscales_small_tiles(tmp_path) -> None:
    images, masks = _batch(3, 32)
    path = save_reconstruction_panel(tmp_path / "panel.png", *make_panel_tiles(images, masks, images, patch_size=PATCH))
    assert path == tmp_path / "panel.png" and path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        # 32 px tiles are enlarged 4x to 128; 4 columns and 5 gutters across; the titles, 3 labelled rows and 4
        # gutters down
        height = TITLE_PX + 3 * (ROW_LABEL_PX + 128) + 4 * GUTTER_PX
        assert png.size == (4 * 128 + 5 * GUTTER_PX, height) == panel_size(3, 32, 32)
        top = TITLE_PX + 3 * GUTTER_PX + 3 * ROW_LABEL_PX + 2 * 128
        assert tile_box(2, 2, 32, 32) == (top, 3 * GUTTER_PX + 2 * 128, top + 128, 3 * GUTTER_PX + 3 * 128)
    assert [p.name for p in tmp_path.iterdir()] == ["panel.png"]  # no temporary file left behind


def test_panel_keeps_large_tiles_at_their_size(tmp_path) -> None:
    images, masks = _batch(2, 160)
    path = save_reconstruction_panel(
        tmp_path / "nested" / "dir" / "p.png", *make_panel_tiles(images, masks, images, PATCH)
    )
    with Image.open(path) as png:
        assert png.size == (4 * 160 + 5 * GUTTER_PX, TITLE_PX + 2 * (ROW_LABEL_PX + 160) + 3 * GUTTER_PX)


def test_panel_columns(tmp_path) -> None:
    images, masks = _batch(2, 32)
    path = save_reconstruction_panel(tmp_path / "perfect.png", *make_panel_tiles(images, masks, images.clone(), PATCH))
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
    path = save_reconstruction_panel(tmp_path / "paste.png", *make_panel_tiles(images, masks, reconstructions, PATCH))
    tiles = _tiles(path, 2, 32)
    pixel_mask = masks.bool().repeat_interleave(PATCH * 4, 1).repeat_interleave(PATCH * 4, 2).numpy()
    assert np.all(tiles[:, 2][pixel_mask] == 255)
    np.testing.assert_array_equal(tiles[:, 2][~pixel_mask], tiles[:, 0][~pixel_mask])


def test_panel_titles_each_column(tmp_path) -> None:
    images, masks = _batch(1, 32)
    with_titles = save_reconstruction_panel(tmp_path / "t.png", *make_panel_tiles(images, masks, images, PATCH))
    with Image.open(with_titles) as img:
        strip = np.asarray(img.convert("RGB"))[:TITLE_PX]
    dark = strip.min(axis=-1) < 128  # title text is black on the white strip
    for col in range(NUM_COLUMNS):
        _, left, _, right = tile_box(0, col, 32, 32)
        assert dark[:, left:right].sum() > 20, f"no title above column {col}"
    assert not dark[:, :GUTTER_PX].any()  # text stays over its column
    # the titles differ: "original", "masked", "reconstruction", "|error| 0-2"
    columns = [dark[:, tile_box(0, c, 32, 32)[1] : tile_box(0, c, 32, 32)[3]].sum() for c in range(NUM_COLUMNS)]
    assert len(set(columns)) == NUM_COLUMNS


def test_panel_rejects_mismatched_inputs(tmp_path) -> None:
    images, masks = _batch(2, 32)
    with pytest.raises(ValueError, match="token masks"):
        save_reconstruction_panel(tmp_path / "a.png", *make_panel_tiles(images, masks[:, :4, :4], images, PATCH))
    with pytest.raises(ValueError, match="must match images"):
        save_reconstruction_panel(tmp_path / "b.png", *make_panel_tiles(images, masks, images[:, :, :16], PATCH))
    with pytest.raises(ValueError, match="token masks"):
        save_reconstruction_panel(tmp_path / "c.png", *make_panel_tiles(images, masks, images, patch_size=8))
    assert not list(tmp_path.iterdir())


def test_error_column_and_row_losses(tmp_path) -> None:
    images, masks = _batch(2, 32)
    perfect, labels = make_panel_tiles(images, masks, images.clone(), PATCH)
    assert perfect[:, 3].max() <= 4  # a perfect reconstruction has no error anywhere: the error column is (near) black
    assert all(label.startswith("masked L1: model 0.000 | zeros ") for label in labels)
    zero_tiles, zero_labels = make_panel_tiles(images, masks, torch.zeros_like(images), PATCH)
    pixel_mask = masks.bool().repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).numpy()
    assert zero_tiles[:, 3][pixel_mask].mean() > 50 and not zero_tiles[:, 3][~pixel_mask].any()
    # predicting zeros scores exactly the zeros baseline
    for label in zero_labels:
        model_loss, zeros_loss = (float(part.split()[-1]) for part in label.split("|"))
        assert model_loss == zeros_loss > 0.5


def _square_on_grey(img_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A red 16x16 square on a grey image, normalised, and a token mask hiding exactly the square."""
    from simmim_swin.data import normalize_images

    pixels = torch.full((1, 3, img_size, img_size), 128, dtype=torch.uint8)
    pixels[:, 0, 24:40, 24:40], pixels[:, 1:, 24:40, 24:40] = 230, 20
    mask = torch.zeros(1, img_size // PATCH, img_size // PATCH)
    mask[:, 24 // PATCH : 40 // PATCH, 24 // PATCH : 40 // PATCH] = 1
    return normalize_images(pixels), mask


@pytest.mark.parametrize("predictor", ["zeros", "untrained"])
def test_panel_does_not_show_what_the_model_did_not_predict(tmp_path, predictor) -> None:
    """The hidden red square must not appear in the reconstruction column of a model that cannot know it."""
    torch.manual_seed(0)
    images, mask = _square_on_grey()
    model = build_simmim("pico", img_size=64, window_size=4, drop_path_rate=0.0, norm_target=47).eval()
    with torch.no_grad():
        _, prediction = model(images, mask)
    if predictor == "zeros":
        prediction = torch.zeros_like(prediction)
    reconstruction = model.target_to_image(images, prediction, mask)
    tiles, _ = make_panel_tiles(images, mask, reconstruction, PATCH, prediction, model.target(images))
    square = (slice(24, 40), slice(24, 40))
    shown, original = tiles[0, 2][square].astype(float), tiles[0, 0][square].astype(float)
    # the original square is red (230, 20, 20); what is shown there stays near the visible grey (128)
    assert np.abs(shown - original).mean() > 60
    assert np.abs(shown - 128).mean() < 40
    # de-normalising with the statistics of the whole neighbourhood, the hidden square leaks into the picture
    from simmim_swin.models.simmim import _local_mean_var

    mean, _ = _local_mean_var(images, 47)
    leaked = tiles_from(torch.where(mask.bool().repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2), mean, images))
    assert np.abs(leaked[square].astype(float) - 128).mean() > np.abs(shown - 128).mean()


def tiles_from(images: torch.Tensor) -> np.ndarray:
    return denormalize(images)[0]
