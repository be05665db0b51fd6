"""Pictures of a run: learned position-bias maps, a confusion matrix and metric curves, each written as a PNG.

matplotlib is imported inside the functions that use it (headless Agg canvas, no pyplot state), so importing
this module stays cheap for a training loop that only draws bias maps now and then.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from .files import atomic_write

BIAS_MIN_TILE_PX = 64  # a (2W-1)^2 map is enlarged (nearest neighbour) by an integer factor to at least this
BIAS_GUTTER_PX = 4  # white space between tiles
BIAS_MARGIN_PX = 6  # white border around the figure
BIAS_LABEL_PX = 18  # text band above each stage's row of tiles
BIAS_TITLE_PX = 16  # the figure's title line
BIAS_COLORBAR_PX = 12  # height of the colour bar under the rows
BIAS_MIN_WIDTH_PX = 420  # room for the row labels when a stage has few heads
BIAS_COLORMAP = "viridis"


# ----------------------------------------------------------------------------------------------------------------
# position bias


@torch.no_grad()
def make_position_bias_maps(model: nn.Module, block: int = 0) -> list[tuple[int, torch.Tensor]]:
    """16 * sigmoid(cpb_mlp(relative_coords_table)) of one block per stage: [(stage, (heads, 2Wh-1, 2Ww-1))].

    Args:
        model: a SwinTransformerV2, or a SimMIM (its encoder is used); not wrapped in DDP/FSDP.
        block: which block of every stage (0 = the first, -1 = the last).
    Map entry [a, b] is the bias added for the offset (dy, dx) = (a - (Wh-1), b - (Ww-1)): the centre is offset 0.
    """
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


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def position_bias_layout(maps: Sequence[tuple[int, torch.Tensor]]) -> tuple[int, int, list[list[tuple]]]:
    """(width, height, boxes) of the bias figure; boxes[row][head] = (left, top, width, height) of a tile.

    Below the title line come the stages' rows; the colour bar sits under the last row (colour_bar_box).
    """
    rows, top = [], BIAS_MARGIN_PX + BIAS_TITLE_PX
    width = BIAS_MIN_WIDTH_PX
    for _, bias in maps:
        heads, h, w = bias.shape
        scale = max(1, math.ceil(BIAS_MIN_TILE_PX / max(h, w)))
        tile_h, tile_w = h * scale, w * scale
        top += BIAS_LABEL_PX
        rows.append([(BIAS_MARGIN_PX + k * (tile_w + BIAS_GUTTER_PX), top, tile_w, tile_h) for k in range(heads)])
        width = max(width, 2 * BIAS_MARGIN_PX + heads * tile_w + (heads - 1) * BIAS_GUTTER_PX)
        top += tile_h + BIAS_GUTTER_PX
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
    """PNG of bias maps from make_position_bias_maps: one row per stage, one tile per head (viridis), one colour
    scale for the whole figure with its colour bar at the bottom, and the step in the title.

    Args:
        value_range: the colour scale's (low, high), e.g. (0, 16) to compare runs or steps; None spans the
            figure's own min..max over every stage (a barely trained model shows as nearly flat, as it is).
        step: the training step the maps belong to, written in the title.
    """
    from matplotlib import colormaps

    if not maps:
        raise ValueError("no bias maps to draw; make them with make_position_bias_maps(encoder)")
    cmap = colormaps[BIAS_COLORMAP]
    if value_range is None:
        value_range = (min(float(b.min()) for _, b in maps), max(float(b.max()) for _, b in maps))
    low, high = value_range
    width, height, boxes = position_bias_layout(maps)
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    at_step = f" at step {step}" if step is not None else ""
    draw.text((BIAS_MARGIN_PX, BIAS_MARGIN_PX), f"position bias 16*sigmoid(CPB){at_step}", fill="black", font=font)
    for (stage_index, bias), row in zip(maps, boxes):
        values = bias.detach().float().numpy()  # heads, h, w
        scaled = (values - low) / max(high - low, 1e-6)
        tiles = (cmap(np.clip(scaled, 0.0, 1.0))[..., :3] * 255).round().astype(np.uint8)  # heads, h, w, 3
        heads, h, w = values.shape
        label = (
            f"stage {stage_index} | window {(h + 1) // 2}x{(w + 1) // 2} | {heads} head{'s' if heads != 1 else ''} | "
            f"{values.min():.2f} .. {values.max():.2f}"
        )
        draw.text((BIAS_MARGIN_PX, row[0][1] - BIAS_LABEL_PX + 2), label, fill="black", font=font)
        for tile, (left, top, tile_w, tile_h) in zip(tiles, row):
            big = tile.repeat(tile_h // h, axis=0).repeat(tile_w // w, axis=1)  # nearest-neighbour enlargement
            canvas.paste(Image.fromarray(big), (left, top))
    left, top, bar_w, bar_h = colour_bar_box(width, height)
    bar = (cmap(np.linspace(0.0, 1.0, bar_w))[:, :3] * 255).round().astype(np.uint8)  # bar_w, 3
    canvas.paste(Image.fromarray(np.repeat(bar[None], bar_h, axis=0)), (left, top))
    draw.text((left, top + bar_h + 2), f"{low:.3f}", fill="black", font=font)
    draw.text((left + bar_w, top + bar_h + 2), f"{high:.3f}", fill="black", font=font, anchor="ra")
    return atomic_write(path, lambda f: canvas.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------------
# confusion matrix


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int, check: bool = True) -> torch.Tensor:
    """int64 counts (num_classes, num_classes) on the inputs' device: rows are true classes, columns predicted.

    preds: class indices (N,) or logits (N, num_classes); targets: class indices (N,). Sum the matrices of
    several batches (or all-reduce those of several ranks) to get the whole set's. check=False skips the range
    check, which syncs the device, for use inside an evaluation loop.
    """
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = confusion.detach().cpu().long().numpy()
    num_classes = counts.shape[0]
    if counts.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(
            f"confusion {tuple(counts.shape)} must be square with one class name per row, got {len(class_names)} names"
        )
    total = int(counts.sum())
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # recall per true class

    side = float(np.clip(0.45 * num_classes + 2.5, 5.0, 20.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
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
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(total, 1)
    ax.set_title(title or f"confusion matrix: {total} samples, top-1 {100 * accuracy:.2f}%")
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------------------------------------------
# metric curves

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
    """PNG with one panel per metric in CURVE_PANELS that some run has, every run overlaid (legend: run name).

    Args:
        runs: {run label: metrics.jsonl records (tracking.load_metrics)}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # one colour per run in every panel
    for index, (title, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for label, (steps, values) in series.items():
            marker = "o" if len(steps) < 30 else None  # a handful of evaluations stays visible as points
            ax.plot(steps, values, color=colors[label], marker=marker, markersize=3, linewidth=1.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ylabel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles = [
        fig.axes[0].plot([], [], color=colors[label], label=label)[0] for label in runs
    ]  # an empty line per run: the legend lists every run even if the first panel lacks one
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.4 * nrows + 0.6)))
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))
