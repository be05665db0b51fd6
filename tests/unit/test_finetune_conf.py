"""conf/finetune.yaml and every preset in conf/finetune/ compose into a valid FinetuneConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from simmim_swin.config import FinetuneConfig, from_dict
from simmim_swin.finetune import build_mixup_and_loss, validate_config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(p.stem for p in (CONF_DIR / "finetune").glob("*.yaml"))


def compose_finetune(*overrides: str) -> FinetuneConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=list(overrides))
    return from_dict(FinetuneConfig, OmegaConf.to_container(cfg, resolve=True))


def test_there_are_presets():
    assert {"fashion_mnist", "quickstart", "swinv2_base_w14_224"} <= set(PRESETS)


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_preset_composes_and_validates(preset):
    config = compose_finetune(*([f"finetune={preset}"] if preset else []))
    validate_config(config)
    build_mixup_and_loss(config.augment, num_classes=10)
    if preset:
        assert config.run.name != "finetune"  # each preset runs in its own directory


def test_finetune_yaml_lists_every_field_of_its_own_sections():
    """A missing key would silently take the dataclass default and hide the setting from users."""
    raw = OmegaConf.load(CONF_DIR / "finetune.yaml")
    fields = {f.name: f.type for f in dataclasses.fields(FinetuneConfig)}
    assert set(raw.keys()) - {"defaults", "hydra"} == set(fields) - {"logger"}
    for section in ("model", "data", "augment", "train", "schedule"):
        cls = getattr(__import__("simmim_swin.config", fromlist=[fields[section]]), fields[section])
        assert set(raw[section].keys()) == {f.name for f in dataclasses.fields(cls)}, section


def test_reference_recipe_matches_spec():
    config = compose_finetune("finetune=swinv2_base_w14_224", "data.root=/data/imagenet")
    assert (config.model.img_size, config.model.window_size, config.model.drop_path_rate) == (224, 14, 0.1)
    assert config.model.pretrained_window_sizes is None  # read from the checkpoint: [12, 12, 12, 6] for 192 / w12
    assert (config.schedule.epochs, config.schedule.warmup_epochs, config.schedule.kind) == (100, 20, "cosine")
    assert (config.optim.base_lr, config.optim.warmup_lr, config.optim.min_lr) == (1.25e-3, 2.5e-7, 2.5e-7)
    assert config.optim.lr_reference_batch == 512 and config.optim.weight_decay == 0.05
    assert config.optim.clip_grad == 5.0 and config.train.layer_decay == 0.75
    augment = config.augment
    assert augment.rand_augment == "rand-m9-mstd0.5-inc1" and augment.reprob == 0.25
    assert (augment.mixup, augment.cutmix, augment.label_smoothing) == (0.8, 1.0, 0.1)
    assert config.data.crop_pct == pytest.approx(224 / 256)


def test_quickstart_preset_builds_on_fashion_mnist_preset():
    config = compose_finetune("finetune=quickstart")
    assert config.pretrained == "outputs/quickstart" and config.data.source == "fashion_mnist"
    assert (config.model.img_size, config.model.window_size, config.data.num_labelled) == (128, 8, 1000)
