"""Few-label fine-tuning: the held-out validation part of the labelled images, early stopping on it, the linear-probe
head (LP-FT), the logistic regression behind it, and the few_labels preset."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from builders import tiny_finetune_config, write_two_class_images

from simmim_swin.config import ConfigError, FinetuneConfig, FinetuneDataConfig, from_dict, validate_finetune
from simmim_swin.data.classification import build_labelled_eval_dataset, labelled_split, split_labelled
from simmim_swin.finetune import run_finetune
from simmim_swin.probe import fit_logistic_regression


def test_split_is_class_balanced_disjoint_and_fixed_by_the_seed():
    targets = np.repeat(np.arange(10), 100)  # 10 classes of 100
    data = FinetuneDataConfig(source="fashion_mnist", num_labelled=500, subset_seed=3, val_fraction=0.2)
    train, held_out = labelled_split(data, targets)
    assert len(train) == 400 and len(held_out) == 100 and not set(train) & set(held_out)
    assert np.bincount(targets[held_out], minlength=10).tolist() == [10] * 10
    assert np.bincount(targets[train], minlength=10).tolist() == [40] * 10
    assert labelled_split(data, targets) == (train, held_out)  # the same seed, the same parts
    other = labelled_split(FinetuneDataConfig(num_labelled=500, subset_seed=4, val_fraction=0.2), targets)
    assert other[1] != held_out
    # no held-out part: the subset itself; a class of one image keeps it for training
    assert split_labelled(targets, [0, 5, 100], 0.0, 0) == ([0, 5, 100], [])
    assert split_labelled(targets, [0, 5, 100], 0.5, 0)[1] in ([0], [5])


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")  # fmt: skip
def test_fashion_mnist_held_out_and_test_images_are_disjoint_from_training():
    from simmim_swin.data.fashion_mnist import load_fashion_mnist

    data = FinetuneDataConfig(source="fashion_mnist", num_labelled=1000, subset_seed=0, val_fraction=0.2, crop_pct=1.0)
    train = build_labelled_eval_dataset(data, 32, "train", in_chans=1)
    held_out = build_labelled_eval_dataset(data, 32, "held_out", in_chans=1)
    assert len(train) == 800 and len(held_out) == 200 and not set(train.indices) & set(held_out.indices)
    images, _ = load_fashion_mnist("train")
    test_images, _ = load_fashion_mnist("test")
    seen = {images[i].tobytes() for i in train.indices}
    assert not seen & {images[i].tobytes() for i in held_out.indices}
    assert not seen & {image.tobytes() for image in test_images}  # the test split shares no image with training


def test_logistic_regression_separates_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=generator) * 4
    labels = torch.arange(3).repeat_interleave(40)
    features = centres[labels] + torch.randn(120, 5, generator=generator)
    weight, bias = fit_logistic_regression(features, labels, 3)
    assert weight.shape == (3, 5) and bias.shape == (3,)
    assert ((features @ weight.T + bias).argmax(1) == labels).float().mean() > 0.95
    again = fit_logistic_regression(features, labels, 3)
    assert torch.equal(weight, again[0]) and torch.equal(bias, again[1])
    # a larger L2 shrinks the weights
    assert fit_logistic_regression(features, labels, 3, l2=1.0)[0].norm() < weight.norm()


@pytest.fixture
def image_root(tmp_path):
    return write_two_class_images(tmp_path / "images", {"train": (10, 10), "val": (3, 3)})


# a fifth of the labelled images held out, 6 epochs
HELD_OUT = dict(data=dict(val_fraction=0.2), schedule=dict(epochs=6), run=dict(name="held_out"))


def config(tmp_path, image_root, **sections) -> FinetuneConfig:
    """The tiny fine-tuning of tiny_finetune_config with HELD_OUT; `sections` replace keys of either."""
    for key, value in sections.items():
        sections[key] = {**HELD_OUT.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_finetune_config(tmp_path, image_root, **{**HELD_OUT, **sections})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_held_out_validation_selects_best_and_the_test_images_are_scored_once(tmp_path, image_root):
    run_dir = run_finetune(config(tmp_path, image_root))
    lines = records(run_dir)
    evaluations = [r for r in lines if "val_top1" in r]
    assert {r["val_num_images"] for r in evaluations} == {4}  # 2 of each class's 10 held out
    tests = [r for r in lines if "test_top1" in r]
    assert len(tests) == 1 and tests[0]["test_num_images"] == 6  # the val/ folder, once
    best = max(evaluations, key=lambda r: r["val_top1"])  # the first of the best: later ties do not replace it
    assert tests[0]["best_step"] == best["step"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_top1"] == tests[0]["test_top1"]
    assert (run_dir / "images" / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_patience_stops_early_and_a_restart_stays_stopped(tmp_path, image_root):
    cfg = config(tmp_path, image_root, train=dict(patience=1), optim=dict(base_lr=1e-9, warmup_lr=0.0, min_lr=0.0))
    run_dir = run_finetune(cfg)  # an lr of ~0 never improves on the first evaluation: stop at the second
    evaluations = [r for r in records(run_dir) if "val_top1" in r]
    assert [r["step"] for r in evaluations] == [4, 8]
    assert len([r for r in records(run_dir) if "test_top1" in r]) == 1
    run_finetune(cfg)  # started again: no training step, the stop holds
    assert max(r["step"] for r in records(run_dir)) == 8


def test_linear_probe_head_starts_from_the_fitted_regression(tmp_path, image_root, caplog):
    caplog.set_level(logging.INFO, logger="simmim_swin")
    from simmim_swin.config import FinetuneModelConfig, to_dict
    from simmim_swin.finetune import _init_head_by_linear_probe, _labelled_eval_set, frozen_features
    from simmim_swin.transfer import build_classifier, resolve_model_config

    cfg = config(tmp_path, image_root, train=dict(head_init="linear_probe"))
    resolved = dataclasses.replace(
        cfg, model=from_dict(FinetuneModelConfig, to_dict(resolve_model_config(cfg.model, None)))
    )  # as run_finetune resolves it
    torch.manual_seed(0)
    model = build_classifier(resolved.model, 2, None)
    fit_top1 = _init_head_by_linear_probe(model, resolved, "fp32", 2)
    features, labels = frozen_features(model, _labelled_eval_set(resolved, "train"), 4, 0, "fp32")
    assert len(labels) == 16  # the training part only: 8 of each class's 10, the held-out 2 left out
    weight, bias = fit_logistic_regression(features, labels, 2, l2=1e-3)
    assert torch.allclose(model.head.fc.weight, weight) and torch.allclose(model.head.fc.bias, bias)
    logits = model.eval()(torch.stack([_labelled_eval_set(resolved, "train")[i][0] for i in range(16)]))
    assert torch.allclose(logits, features @ weight.T + bias, atol=1e-5)  # the head reads exactly these features
    assert fit_top1 == pytest.approx(100.0 * ((logits.argmax(1) == labels).float().mean().item()))

    run_finetune(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=1)))
    assert "classifier initialised by a linear probe" in caplog.text


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("data", dict(val_fraction=1.0), "data.val_fraction=1.0"),
        ("train", dict(patience=-1), "train.patience=-1"),
        ("train", dict(head_init="zeros"), "train.head_init='zeros'"),
    ],
)
def test_bad_values_are_named(tmp_path, image_root, section, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_finetune(config(tmp_path, image_root, **{section: value}))
