"""benchmarks/segmentation.py's pieces: the scenes and their labels, the FPN head's shapes, the scores."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "segmentation.py"


@pytest.fixture(scope="module")
def seg():
    spec = importlib.util.spec_from_file_location("segmentation_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def square_garments() -> tuple[np.ndarray, np.ndarray]:
    """Two 28 px 'garments': a bright square with a faint halo (below the mask threshold) around it."""
    garments = np.full((2, 28, 28), 10, np.uint8)  # 10 / 255 < 0.1: not garment
    garments[:, 8:20, 8:20] = 200
    return garments, np.array([3, 7])


def test_scenes_label_exactly_the_pasted_pixels(seg) -> None:
    garments, classes = square_garments()
    black = [np.zeros((200, 200, 3), np.uint8)]  # every pasted pixel shows as non-zero on it
    images, labels = seg.make_scenes(garments, classes, black, 8, 32, np.random.default_rng(0))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (8, 32, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 4, 8}  # background, class + 1
    assert torch.equal(labels > 0, images.sum(1) > 0)  # the halo is neither drawn nor labelled
    assert (labels > 0).flatten(1).any(1).all()  # at least one garment in every scene


def test_scenes_are_reproducible_and_use_real_data(seg) -> None:
    garments, classes = square_garments()
    photos = seg.load_photos("test")
    assert len(photos) == len(seg.TEST_PHOTOS) and len(seg.load_photos("train")) > 0
    a = seg.make_scenes(garments, classes, photos, 4, 32, np.random.default_rng(1))
    b = seg.make_scenes(garments, classes, photos, 4, 32, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("arch", ["pico", "nano"])
def test_segmenter_logits_at_input_size(seg, arch: str) -> None:
    args = argparse.Namespace(arch=arch, size=64, window=8, drop_path=0.0, head_width=8)
    model = seg.build_segmenter(args, None)
    assert len(model.head.lateral) == len(model.encoder.feature_info)  # one lateral conv per stage
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, seg.NUM_CLASSES, 64, 64)
    logits.logsumexp(1).mean().backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None and model.head.lateral[-1].weight.grad is not None


def test_scores_from_a_known_confusion(seg) -> None:
    labels = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 1, 1]]]), 3).permute(0, 3, 1, 2).float()
    result = seg.scores(seg.confusion(logits, labels, 3))
    # background IoU 1/2, class 1 IoU 2/3, class 2 absent from labels and predictions: left out
    assert result["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert result["pixel_acc"] == pytest.approx(75.0)
    assert result["iou_per_class"][2] is None
