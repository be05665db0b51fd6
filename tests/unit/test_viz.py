"""Position-bias maps and their figure, the confusion matrix, metric curves and the plot tool's run labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.cli.plot import run_labels
from simmim_swin.figures import (
    BIAS_COLORMAP,
    colour_bar_box,
    confusion_matrix,
    make_position_bias_maps,
    metric_series,
    plot_metric_curves,
    position_bias_layout,
    save_confusion_matrix,
    save_position_bias_figure,
)
from simmim_swin.models import build_simmim


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB"))


def test_bias_maps_are_the_bias_the_attention_adds(tiny_encoder, randomize) -> None:
    encoder = randomize(tiny_encoder())  # windows 4, 4, 2, 1 with heads 2, 2, 4, 4
    maps = make_position_bias_maps(encoder)
    assert [s for s, _ in maps] == [0, 1, 2, 3]
    assert [tuple(m.shape) for _, m in maps] == [(2, 7, 7), (2, 7, 7), (4, 3, 3), (4, 1, 1)]
    for (stage, bias), layer in zip(maps, encoder.layers):
        attn = layer.blocks[0].attn
        heads, n = attn.num_heads, attn.window_size[0] ** 2
        # indexing the map by every token pair's offset gives exactly what the attention adds to its logits
        per_pair = bias.reshape(heads, -1)[:, attn.relative_position_index.view(-1)].view(heads, n, n)
        torch.testing.assert_close(per_pair, attn.position_bias().detach(), msg=f"stage {stage}")
        assert bias.min() > 0 and bias.max() < 16
    last = make_position_bias_maps(encoder, block=-1)
    assert not torch.equal(last[0][1], maps[0][1])  # the second block has its own CPB
    assert torch.isfinite(maps[3][1]).all()  # a 1x1 window has the single offset 0


def test_bias_maps_accept_a_simmim_model_and_reject_bad_input(tiny_encoder) -> None:
    model = build_simmim("pico", img_size=32, window_size=4)
    maps = make_position_bias_maps(model)
    assert len(maps) == 3 and maps[0][1].shape[-1] == 7
    with pytest.raises(ValueError, match="block=2 does not exist in stage 0"):
        make_position_bias_maps(tiny_encoder(), block=2)
    with pytest.raises(ValueError, match="Linear has no SwinV2 stages"):
        make_position_bias_maps(torch.nn.Linear(2, 2))


def test_bias_figure_has_one_tile_per_head_per_stage(tiny_encoder, randomize, tmp_path: Path) -> None:
    from matplotlib import colormaps

    maps = make_position_bias_maps(randomize(tiny_encoder()))
    path = save_position_bias_figure(maps, tmp_path / "bias.png", step=1234)
    png = _read_png(path)
    width, height, boxes = position_bias_layout(maps)
    assert png.shape == (height, width, 3)
    assert [len(row) for row in boxes] == [2, 2, 4, 4]
    brightest = (np.array(colormaps[BIAS_COLORMAP](1.0)[:3]) * 255).round()
    covered = np.zeros(png.shape[:2], dtype=bool)
    for (_, bias), row in zip(maps, boxes):
        _, h, w = bias.shape
        for left, top, tile_w, tile_h in row:
            tile = png[top : top + tile_h, left : left + tile_w]
            covered[top : top + tile_h, left : left + tile_w] = True
            assert not (tile == 255).all(axis=-1).any()  # coloured everywhere: no white hole in a tile
            cells = tile[:: tile_h // h, :: tile_w // w]  # one pixel per offset, (2W-1, 2W-1, 3)
            assert np.array_equal(np.repeat(np.repeat(cells, tile_h // h, 0), tile_w // w, 1), tile)
    # one colour scale for the whole figure: the largest bias of all stages is drawn in the colour map's brightest
    stage = max(range(len(maps)), key=lambda i: float(maps[i][1].max()))
    bias, row = maps[stage][1], boxes[stage]
    _, h, w = bias.shape
    head, a, b = np.unravel_index(int(bias.argmax()), tuple(bias.shape))
    left, top, tile_w, tile_h = row[head]
    assert np.abs(png[top + a * (tile_h // h), left + b * (tile_w // w)] - brightest).max() == 0  # rounded, not cut
    # the colour bar runs from the darkest to the brightest colour of the map
    left, top, bar_w, bar_h = colour_bar_box(width, height)
    covered[top : top + bar_h, left : left + bar_w] = True
    assert np.abs(png[top + bar_h // 2, left + bar_w - 1] - brightest).max() <= 1
    darkest = (np.array(colormaps[BIAS_COLORMAP](0.0)[:3]) * 255).round()
    assert np.abs(png[top + bar_h // 2, left] - darkest).max() <= 1
    # everything but the tiles, the colour bar and the text is white: tiles are separated by white gutters
    outside = png[~covered]
    assert (outside == 255).all(axis=-1).mean() > 0.9


def test_bias_figure_fixed_range_and_empty_input(tiny_encoder, tmp_path: Path) -> None:
    maps = make_position_bias_maps(tiny_encoder())
    path = save_position_bias_figure(maps, tmp_path / "nested" / "bias.png", value_range=(0.0, 16.0))
    png = _read_png(path)
    _, _, boxes = position_bias_layout(maps)
    left, top, tile_w, tile_h = boxes[0][0]
    # untrained CPB: all biases are near 16 * sigmoid(0) = 8, the middle of a fixed 0..16 scale: one flat colour
    tile = png[top : top + tile_h, left : left + tile_w].reshape(-1, 3).astype(int)
    assert np.abs(tile - tile[0]).max() <= 3
    assert [p.name for p in path.parent.iterdir()] == ["bias.png"]  # written atomically: no temporary file left
    with pytest.raises(ValueError, match="no bias maps"):
        save_position_bias_figure([], tmp_path / "empty.png")


def test_confusion_matrix_counts() -> None:
    targets = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 2, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 3]])
    assert torch.equal(confusion_matrix(preds, targets, 3), expected)
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5 + 0.1 * torch.randn(9, 3)
    assert torch.equal(confusion_matrix(logits, targets, 3), expected)
    assert torch.equal(confusion_matrix(preds, targets, 3, check=False), expected)
    assert confusion_matrix(preds, targets, 4).shape == (4, 4) and confusion_matrix(preds, targets, 4).sum() == 9
    halves = confusion_matrix(preds[:4], targets[:4], 3) + confusion_matrix(preds[4:], targets[4:], 3)
    assert torch.equal(halves, expected)  # batches (or ranks) add up
    with pytest.raises(ValueError, match=r"targets hold classes outside \[0, 2\)"):
        confusion_matrix(preds.clamp(max=1), targets, 2)
    with pytest.raises(ValueError, match="must be indices"):
        confusion_matrix(preds[:5], targets, 3)


@pytest.mark.slow
def test_save_confusion_matrix_png(tmp_path: Path) -> None:
    confusion = torch.tensor([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
    path = save_confusion_matrix(confusion, ["cat", "dog", "bird"], tmp_path / "confusion.png")
    png = _read_png(path)
    assert png.shape == (500, 620, 3)  # the smallest figure: 5 in high (+ 1.2 in for the colour bar) at 100 dpi
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 10  # cells, text and a colour bar, not a blank canvas
    many = torch.randint(0, 50, (100, 100))
    big = _read_png(save_confusion_matrix(many, [str(i) for i in range(100)], tmp_path / "big.png"))
    assert big.shape == (2000, 2120, 3)  # grows with the classes up to 20 in
    assert len(np.unique(big.reshape(-1, 3), axis=0)) > 10
    with pytest.raises(ValueError, match="one class name per row, got 2 names"):
        save_confusion_matrix(confusion, ["cat", "dog"], tmp_path / "bad.png")


def test_metric_series_sorts_and_keeps_the_last_value_of_a_repeated_step() -> None:
    records = [
        {"step": 10, "loss": 1.0},
        {"step": 20, "loss": 0.9, "lr": 1e-3},
        {"step": 30, "loss": float("nan")},
        {"step": 20, "loss": 0.8},  # a resumed run logs step 20 again
        {"step": 5, "val_loss": 2.0},
    ]
    steps, values = metric_series(records, "loss")
    assert steps.tolist() == [10, 20] and values.tolist() == [1.0, 0.8]
    assert metric_series(records, "top1")[0].size == 0


def test_plot_metric_curves_writes_a_png(tmp_path: Path) -> None:
    pretrain = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "images_per_sec": 100.0} for s in range(1, 50)]
    finetune = [{"step": s, "loss": 2.0 / s, "lr": 1e-4} for s in range(1, 50)]
    finetune += [{"step": s, "val_loss": 1.0 / s, "val_top1": 50.0 + s, "val_top5": 80.0 + s / 4} for s in (10, 40)]
    path = plot_metric_curves({"pretrain": pretrain, "finetune": finetune}, tmp_path / "curves.png")
    png = _read_png(path)
    assert png.shape[1] == 1500  # three panels across at 100 dpi
    assert png.shape[0] > 600  # two rows: loss, val loss, lr / throughput, top-1, top-5
    with pytest.raises(ValueError, match="none of the runs"):
        plot_metric_curves({"empty": [{"step": 1, "other": 1.0}]}, tmp_path / "none.png")


def test_plot_metric_curves_draws_the_values(tmp_path: Path) -> None:
    def run(loss) -> list[dict]:
        return [{"step": s, "loss": loss(s), "lr": 1e-3 * s, "images_per_sec": 100.0 + s} for s in range(1, 50)]

    falling = _read_png(plot_metric_curves({"a": run(lambda s: 1.0 / s)}, tmp_path / "falling.png"))
    again = _read_png(plot_metric_curves({"a": run(lambda s: 1.0 / s)}, tmp_path / "again.png"))
    rising = _read_png(plot_metric_curves({"a": run(lambda s: 0.02 * s)}, tmp_path / "rising.png"))
    assert falling.shape == rising.shape and falling.shape[1] == 1500  # one row: loss | lr | throughput
    np.testing.assert_array_equal(falling, again)  # the same values draw the same picture
    third = falling.shape[1] // 3
    # only the training-loss panel (left) changes with the loss values; lr and throughput are drawn the same
    assert (falling[:, :third] != rising[:, :third]).any(axis=-1).sum() > 200
    np.testing.assert_array_equal(falling[:, third:], rising[:, third:])


def test_run_labels_are_unique(tmp_path: Path) -> None:
    a, b = tmp_path / "sweep1" / "tiny", tmp_path / "sweep2" / "tiny"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("")
    assert run_labels([a, tmp_path / "sweep1"]) == ["tiny", "sweep1"]
    assert run_labels([a, b / "metrics.jsonl"]) == ["sweep1/tiny", "sweep2/tiny"]
    with pytest.raises(ValueError, match="the same run is given twice"):
        run_labels([a, a])
