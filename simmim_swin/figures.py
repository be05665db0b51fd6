"""Every picture of a run as a PNG written atomically: reconstruction panels, position-bias maps, the confusion matrix
and metric curves. matplotlib is imported where it draws (headless Agg, no pyplot): importing this stays cheap."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data.transforms import denormalize
from .files import atomic_write
from .models.simmim import LOSS_EPS, upsample_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100  # pixels per inch of every figure: the pixel layouts below divide by it
FONT_PT = 7  # text in the panels' and bias maps' strips (about 10 px high at DPI)


def _figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg(Figure(figsize=(width_in, height_in), dpi=DPI, facecolor="white")).figure


class _Canvas:
    """A width x height pixel figure addressed from its top-left corner (make_grid cannot interleave text strips)."""

    def __init__(self, width: int, height: int) -> None:
        self.fig, self.width, self.height = _figure(width / DPI, height / DPI), width, height

    def paste(self, pixels: np.ndarray, left: int, top: int, scale: int = 1) -> None:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)  # enlarged, nearest neighbour
        self.fig.figimage(pixels, xo=left, yo=self.height - top - pixels.shape[0], origin="upper")

    def text(self, x: float, y: float, text: str, **kwargs: Any) -> None:
        self.fig.text(x / self.width, 1 - y / self.height, text, fontsize=FONT_PT, color="black", **kwargs)


def _colour(colormap: str, values: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) of `values` in 0..1 (outside: the end colours), rounded: bytes=True truncates, a shade off."""
    from matplotlib import colormaps

    return (colormaps[colormap](values)[..., :3] * 255).round().astype(np.uint8)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # the canvas is white: no transparency to keep
    return atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


# reconstruction panels ------------------------------------------------------------------------------------------------

GUTTER_PX = 4  # white space around and between tiles
TITLE_PX = 16  # white strip above the grid holding the column titles (the bias figure's title)
ROW_LABEL_PX = 14  # white strip above each row holding its losses
ERROR_MAX = 2.0  # the error column's colour scale is 0 .. this (target units)
ERROR_COLORMAP = "magma"
COLUMN_TITLES = ("original", "masked", "reconstruction", f"|error| 0-{ERROR_MAX:g}")
NUM_COLUMNS = len(COLUMN_TITLES)
MIN_TILE_PX = 128  # smaller tiles are enlarged (nearest neighbour) by an integer factor
MASK_GREY = 128  # masked patches in the input column


class BandDisplay:
    """Normalised images (B, C, H, W) -> uint8 (B, H, W, 3): `bands` (three as RGB, one as grey; default the first
    three, else band 0), each stretched per image between the `low` and `high` percentiles of a reference image."""

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


def tile_box(row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel box of one tile in the panel of images of height x width."""
    scale = max(1, math.ceil(MIN_TILE_PX / min(height, width)))  # the shorter side at least MIN_TILE_PX
    tile_h, tile_w = height * scale, width * scale
    top = TITLE_PX + GUTTER_PX + row * (ROW_LABEL_PX + tile_h + GUTTER_PX) + ROW_LABEL_PX
    left = GUTTER_PX + col * (tile_w + GUTTER_PX)
    return top, left, top + tile_h, left + tile_w


def panel_size(num_rows: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of the panel for `num_rows` images of height x width."""
    _, _, bottom, right = tile_box(num_rows - 1, NUM_COLUMNS - 1, height, width)
    return right + GUTTER_PX, bottom + GUTTER_PX


def make_panel_tiles(
    images: torch.Tensor,
    masks: torch.Tensor,
    reconstructions: torch.Tensor,
    patch_size: int,
    predictions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    display: BandDisplay | None = None,
) -> tuple[np.ndarray, list[str]]:
    """uint8 tiles (B, 4, H, W, 3): original | masked (grey) | reconstruction pasted in | |error| on the masked
    pixels (0 .. ERROR_MAX); and per row the masked L1 of the model and of zeros.

    Args:
        masks: token masks (B, H/patch_size, W/patch_size), 1 = masked.
        predictions, targets: the model's output and target in SimMIM.target's space; default the reconstructions
            and the images.
        display: how channels become RGB; None: ImageNet-normalised RGB shown as it is.
    """
    predictions = reconstructions if predictions is None else predictions
    targets = images if targets is None else targets
    if images.dim() != 4 or (display is None and images.shape[1] != 3):
        raise ValueError(f"images must be (B, 3, H, W) (or pass a BandDisplay), got {tuple(images.shape)}")
    for name, tensor in dict(reconstructions=reconstructions, predictions=predictions, targets=targets).items():
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
    images, reconstructions = images.detach().float().cpu(), reconstructions.detach().float().cpu()
    predictions, targets = predictions.detach().float().cpu(), targets.detach().float().cpu()
    pixel_mask = upsample_mask(masks.detach().cpu().bool(), patch_size)  # B, 1, H, W
    merged = torch.where(pixel_mask, reconstructions, images)
    if display is None:
        original, pasted = denormalize(images), denormalize(merged)  # B, H, W, 3
    else:
        lo, hi = display.ranges(images)
        original, pasted = display(images, lo, hi), display(merged, lo, hi)
    masked = original.copy()
    masked[pixel_mask[:, 0].numpy()] = MASK_GREY
    l1 = (predictions - targets).abs() * pixel_mask  # B, C, H, W
    error_rgb = _colour(ERROR_COLORMAP, l1.mean(dim=1).numpy() / ERROR_MAX)  # B, H, W, 3
    error_rgb[~pixel_mask[:, 0].numpy()] = 0
    # SimMIM's loss per image: L1 summed over masked pixels and channels / (masked pixels + eps) / channels
    masked_values = (pixel_mask.sum(dim=(1, 2, 3)) + LOSS_EPS) * targets.shape[1]
    model_loss = l1.sum(dim=(1, 2, 3)) / masked_values
    zeros_loss = (targets.abs() * pixel_mask).sum(dim=(1, 2, 3)) / masked_values
    labels = [f"masked L1: model {m:.3f} | zeros {z:.3f}" for m, z in zip(model_loss.tolist(), zeros_loss.tolist())]
    return np.stack([original, masked, pasted, error_rgb], axis=1), labels  # B, 4, H, W, 3


def save_reconstruction_panel(path: str | os.PathLike, tiles: np.ndarray, labels: Sequence[str]) -> Path:
    """PNG of make_panel_tiles' tiles and labels (written atomically): column titles on top, each row's losses above."""
    num_rows, _, h, w, _ = tiles.shape
    canvas = _Canvas(*panel_size(num_rows, h, w))
    for row in range(num_rows):
        for col in range(NUM_COLUMNS):
            top, left, bottom, _ = tile_box(row, col, h, w)
            canvas.paste(tiles[row, col], left, top, (bottom - top) // h)
        top, left, _, _ = tile_box(row, 0, h, w)
        canvas.text(left, top - ROW_LABEL_PX / 2, f"{row}: {labels[row]}", ha="left", va="center")
    for col, title in enumerate(COLUMN_TITLES):
        _, left, _, right = tile_box(0, col, h, w)
        canvas.text((left + right) / 2, TITLE_PX / 2, title, ha="center", va="center")
    return _save(canvas.fig, path)


def build_display(in_chans: int, default_statistics: bool, bands: list[int] | None = None) -> BandDisplay | None:
    """None (show as it is) for 3 channels with ImageNet statistics and default bands; else a BandDisplay."""
    if in_chans == 3 and default_statistics and bands in (None, [0, 1, 2]):
        return None
    return BandDisplay(None if bands is None else list(bands))


# position bias --------------------------------------------------------------------------------------------------------

BIAS_MIN_TILE_PX = 64  # a (2W-1)^2 map is enlarged (nearest neighbour) by an integer factor to at least this
BIAS_MARGIN_PX = 6  # white border around the figure
BIAS_LABEL_PX = 18  # text band above each stage's row of tiles
BIAS_COLORBAR_PX = 12  # height of the colour bar under the rows
BIAS_MIN_WIDTH_PX = 420  # room for the row labels when a stage has few heads
BIAS_COLORMAP = "viridis"


@torch.no_grad()
def make_position_bias_maps(model: nn.Module, block: int = 0) -> list[tuple[int, torch.Tensor]]:
    """16 * sigmoid(CPB) of block `block` (-1: the last) of each stage of an unwrapped SwinV2 or SimMIM model:
    [(stage, (heads, 2Wh-1, 2Ww-1))], entry [a, b] the bias of offset (a - (Wh-1), b - (Ww-1)), the centre offset 0."""
    encoder = getattr(model, "encoder", model)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no SwinV2 stages (.layers); pass the encoder or the SimMIM model")
    maps = []
    for stage_index, stage in enumerate(layers):
        if not -len(stage.blocks) <= block < len(stage.blocks):
            raise ValueError(f"block={block} does not exist in stage {stage_index}, which has {len(stage.blocks)}")
        attn = stage.blocks[block].attn
        table = attn.relative_coords_table[0]  # 2Wh-1, 2Ww-1, 2 (timm's buffer has a leading 1)
        weight = attn.cpb_mlp[0].weight
        with torch.autocast(table.device.type, enabled=False):  # the picture in fp32 even inside an autocast loop
            bias = 16 * torch.sigmoid(attn.cpb_mlp(table.to(weight.dtype)).float())  # 2Wh-1, 2Ww-1, heads
        maps.append((stage_index, bias.permute(2, 0, 1).cpu()))  # heads, 2Wh-1, 2Ww-1
    return maps


def position_bias_layout(maps: Sequence[tuple[int, torch.Tensor]]) -> tuple[int, int, list[list[tuple]]]:
    """(width, height, boxes) of the bias figure; boxes[row][head] = (left, top, width, height) of a tile."""
    rows, top = [], BIAS_MARGIN_PX + TITLE_PX
    width = BIAS_MIN_WIDTH_PX
    for _, bias in maps:
        heads, h, w = bias.shape
        scale = max(1, math.ceil(BIAS_MIN_TILE_PX / max(h, w)))
        tile_h, tile_w = h * scale, w * scale
        top += BIAS_LABEL_PX
        rows.append([(BIAS_MARGIN_PX + k * (tile_w + GUTTER_PX), top, tile_w, tile_h) for k in range(heads)])
        width = max(width, 2 * BIAS_MARGIN_PX + heads * tile_w + (heads - 1) * GUTTER_PX)
        top += tile_h + GUTTER_PX
    height = top + BIAS_COLORBAR_PX + BIAS_LABEL_PX + BIAS_MARGIN_PX
    return width, height, rows


def colour_bar_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the colour bar in a bias figure of width x height."""
    top = height - BIAS_MARGIN_PX - BIAS_LABEL_PX - BIAS_COLORBAR_PX
    return BIAS_MARGIN_PX, top, width - 2 * BIAS_MARGIN_PX, BIAS_COLORBAR_PX


def save_position_bias_figure(
    maps: Sequence[tuple[int, torch.Tensor]],
    path: str | os.PathLike,
    value_range: tuple[float, float] | None = None,
    step: int | None = None,
) -> Path:
    """PNG of make_position_bias_maps' maps: a row per stage, a tile per head, one colour scale and bar, the step.

    Args:
        value_range: the colour scale, e.g. (0, 16) to compare runs; None spans the maps' own min..max over every
            stage (a barely trained model shows as nearly flat, as it is).
    """
    if not maps:
        raise ValueError("no bias maps to draw; make them with make_position_bias_maps(encoder)")
    if value_range is None:
        value_range = (min(float(b.min()) for _, b in maps), max(float(b.max()) for _, b in maps))
    low, high = value_range
    width, height, boxes = position_bias_layout(maps)
    canvas = _Canvas(width, height)
    at_step = f" at step {step}" if step is not None else ""
    canvas.text(BIAS_MARGIN_PX, BIAS_MARGIN_PX, f"position bias 16*sigmoid(CPB){at_step}", va="top")
    for (stage_index, bias), row in zip(maps, boxes):
        values = bias.detach().float().numpy()  # heads, h, w
        tiles = _colour(BIAS_COLORMAP, (values - low) / max(high - low, 1e-6))  # heads, h, w, 3
        heads, h, w = values.shape
        label = (
            f"stage {stage_index} | window {(h + 1) // 2}x{(w + 1) // 2} | {heads} head{'s' if heads != 1 else ''} | "
            f"{values.min():.2f} .. {values.max():.2f}"
        )
        canvas.text(BIAS_MARGIN_PX, row[0][1] - BIAS_LABEL_PX / 2, label, va="center")
        for tile, (left, top, _, tile_h) in zip(tiles, row):
            canvas.paste(tile, left, top, tile_h // h)
    left, top, bar_w, bar_h = colour_bar_box(width, height)
    bar = _colour(BIAS_COLORMAP, np.linspace(0.0, 1.0, bar_w)[None])  # 1, bar_w, 3
    canvas.paste(bar.repeat(bar_h, axis=0), left, top)
    canvas.text(left, top + bar_h + 2, f"{low:.3f}", va="top")
    canvas.text(left + bar_w, top + bar_h + 2, f"{high:.3f}", ha="right", va="top")
    return _save(canvas.fig, path)


# confusion matrix -----------------------------------------------------------------------------------------------------


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int, check: bool = True) -> torch.Tensor:
    """int64 counts (num_classes, num_classes) on the inputs' device, rows true and columns predicted classes, of
    class indices or logits `preds`; check=False skips the range check (a device sync) inside an evaluation loop."""
    if preds.dim() == 2:
        preds = preds.argmax(dim=1)
    if preds.dim() != 1 or targets.dim() != 1 or preds.shape != targets.shape:
        raise ValueError(
            f"preds {tuple(preds.shape)} must be indices (N,) or logits (N, C) for targets (N,), "
            f"got targets {tuple(targets.shape)}"
        )
    preds, targets = preds.long(), targets.long()
    for name, t in (("preds", preds), ("targets", targets)) if check else ():
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} hold classes outside [0, {num_classes}): min {t.min()}, max {t.max()}")
    counts = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def save_confusion_matrix(
    confusion: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """PNG of a confusion matrix: cells coloured by the fraction of their true class, counts written in them
    (up to 30 classes), class names on the axes (up to 60 classes)."""
    counts = confusion.detach().cpu().long().numpy()
    num_classes = counts.shape[0]
    if counts.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(
            f"confusion {tuple(counts.shape)} must be square with one class name per row, got {len(class_names)} names"
        )
    total = int(counts.sum())
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # recall per true class

    side = float(np.clip(0.45 * num_classes + 2.5, 5.0, 20.0))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num_classes <= 30:
        for i in range(num_classes):
            for j in range(num_classes):
                color = "white" if fractions[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=8)
    if num_classes <= 60:
        ax.set_xticks(range(num_classes), labels=list(class_names), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(num_classes), labels=list(class_names), fontsize=8)
    ax.set(xlabel="predicted", ylabel="true")
    accuracy = np.trace(counts) / max(total, 1)
    ax.set_title(title or f"confusion matrix: {total} samples, top-1 {100 * accuracy:.2f}%")
    fig.tight_layout()
    return _save(fig, path)


# metric curves --------------------------------------------------------------------------------------------------------

# (title, metric keys tried in order, y-axis label); a panel is drawn when any run has one of its keys
CURVE_PANELS = (
    ("training loss", ("loss", "train_loss"), "loss"),
    ("validation loss", ("val_loss",), "loss"),
    ("learning rate", ("lr",), "lr"),
    ("throughput", ("images_per_sec",), "images / s"),
    ("validation top-1", ("val_top1", "top1", "val_acc1", "acc1"), "accuracy (%)"),
    ("validation top-5", ("val_top5", "top5", "val_acc5", "acc5"), "accuracy (%)"),
    ("probe kNN top-1 (last stage)", ("probe_knn_top1",), "accuracy (%)"),
    ("probe kNN top-1 (last two stages)", ("probe_knn_top1_last2",), "accuracy (%)"),
    ("probe linear top-1", ("probe_linear_top1",), "accuracy (%)"),
    ("data wait", ("data_wait_frac",), "fraction of step time"),
    ("GPU memory", ("gpu_mem_peak_gib",), "peak GiB"),
)


def metric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[record["step"]] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def plot_metric_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """PNG with one panel per metric in CURVE_PANELS that some run has; runs: {label: tracking.load_metrics records}."""
    panels = []
    for title, keys, ylabel in CURVE_PANELS:
        series = {}
        for label, records in runs.items():
            for key in keys:
                steps, values = metric_series(records, key)
                if len(steps):
                    series[label] = (steps, values)
                    break
        if series:
            panels.append((title, ylabel, series))
    if not panels:
        known = sorted({key for _, keys, _ in CURVE_PANELS for key in keys})
        raise ValueError(f"none of the runs {list(runs)} has a metric to plot (looked for {known})")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.0 * ncols, 3.4 * nrows + 0.6)
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # one colour per run in every panel
    for index, (title, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for label, (steps, values) in series.items():
            marker = "o" if len(steps) < 30 else None  # a handful of evaluations stays visible as points
            ax.plot(steps, values, color=colors[label], marker=marker, markersize=3, linewidth=1.2, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        if ylabel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    # an empty line per run: the legend lists every run even if the first panel lacks one
    handles = [fig.axes[0].plot([], [], color=colors[label], label=label)[0] for label in runs]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.4 * nrows + 0.6)))
    return _save(fig, path)
