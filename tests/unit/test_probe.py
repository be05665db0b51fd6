"""Online probes: the kNN and linear classifiers, the probe set, run_probe's side effects and the probe config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import compose_config

from simmim_swin.config import ConfigError, PretrainConfig, ProbeConfig, from_dict, validate_pretrain
from simmim_swin.distributed import DistInfo
from simmim_swin.models import build_simmim
from simmim_swin.probe import _share, build_probe_set, gather_rows, knn_top1, linear_top1, run_probe


def _clusters(num_per_class: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 10
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_knn_separable_features_score_100_and_shuffled_labels_score_chance() -> None:
    train, train_labels = _clusters(50, 10, 32, seed=0)
    val, val_labels = _clusters(100, 10, 32, seed=1)
    assert knn_top1(train, train_labels, val, val_labels, k=20, temperature=0.07, num_classes=10) == 100.0
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))]
    chance = knn_top1(train, shuffled, val, val_labels, k=20, temperature=0.07, num_classes=10, chunk=64)
    assert 3.0 <= chance <= 20.0  # 10 classes: chance is 10 %


def test_knn_weights_votes_by_similarity() -> None:
    """Two far neighbours of class 1 lose to one very close neighbour of class 0 at a low temperature."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    val = torch.tensor([[1.0, 0.05]])
    assert knn_top1(train, labels, val, torch.tensor([0]), k=3, temperature=0.07, num_classes=2) == 100.0
    # a plain majority (a very high temperature makes the weights equal) picks class 1
    assert knn_top1(train, labels, val, torch.tensor([0]), k=3, temperature=1e6, num_classes=2) == 0.0


def test_linear_probe_fits_separable_features_without_random_draws() -> None:
    train, train_labels = _clusters(30, 4, 16, seed=0)
    val, val_labels = _clusters(30, 4, 16, seed=1)
    state = torch.get_rng_state()
    assert linear_top1(train, train_labels, val, val_labels, 4) == 100.0
    assert torch.equal(state, torch.get_rng_state())


def test_shares_pad_and_gather_back_in_order() -> None:
    images = torch.arange(7).view(7, 1)
    shares = [_share(images, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert torch.equal(torch.cat(shares)[:7], images) and shares[2][1:].eq(0).all()
    assert torch.equal(gather_rows(images, 5, DistInfo()), images[:5])


def test_probe_set_from_a_class_folder_and_probe_leave_training_untouched(class_folder: Path) -> None:
    root = class_folder
    cfg = ProbeConfig(enabled=True, source="folder", root=str(root), num_train=12, num_val=9, k=5, linear=True)
    probe_set = build_probe_set(cfg, 32, torch.device("cpu"), DistInfo())
    assert probe_set.train_images.shape == (12, 3, 32, 32) and probe_set.train_images.dtype == torch.uint8
    assert probe_set.val_images.shape == (9, 3, 32, 32) and probe_set.num_classes == 3
    assert probe_set.train_labels.bincount().tolist() == [4, 4, 4]  # class-balanced
    torch.manual_seed(0)
    model = build_simmim("pico", img_size=32, window_size=4).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    metrics = run_probe(model, probe_set, "fp32", DistInfo())
    assert set(metrics) == {
        "probe_knn_top1", "probe_knn_top1_last2", "probe_linear_top1", "probe_linear_top1_last2", "probe_seconds"
    }  # fmt: skip
    assert metrics["probe_knn_top1"] > 60  # three solid colours are easy even for an untrained encoder
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert run_probe(model, probe_set, "fp32", DistInfo())["probe_knn_top1"] == metrics["probe_knn_top1"]


def test_probe_set_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="probe.root"):
        build_probe_set(ProbeConfig(source="folder", root=str(tmp_path)), 32, torch.device("cpu"), DistInfo())


def test_probe_preset_composes_and_validates() -> None:
    assert compose_config("pretrain").probe == ProbeConfig()  # off by default
    config = compose_config("pretrain", "experiment=quickstart", "probe=fashion_mnist", "probe.every=60")
    validate_pretrain(config)
    assert config.probe.enabled and config.probe.source == "fashion_mnist" and config.probe.every == 60
    assert (config.probe.k, config.probe.temperature) == (20, 0.07)


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ({"source": "imagenet"}, "probe.source"),
        ({"source": "shards"}, "probe.train and probe.val"),
        ({"source": "folder"}, "probe.root"),
        ({"every": 0}, "probe.every"),
        ({"temperature": 0.0}, "probe.temperature"),
    ],
)
def test_bad_probe_settings_are_rejected(probe: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):  # an unknown probe.source already in from_dict
        validate_pretrain(from_dict(PretrainConfig, {"probe": {"enabled": True, **probe}}))
    with pytest.raises(ConfigError, match="probe.train"):
        from_dict(PretrainConfig, {"probe": {"train": 3}})
