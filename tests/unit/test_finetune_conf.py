"""conf/finetune.yaml and every preset in conf/finetune/ compose on the registered schema into a valid config."""

from __future__ import annotations

import pytest
from cli_helpers import compose_config

from simmim_swin.cli.common import CONF_DIR
from simmim_swin.config import FinetuneConfig, validate_finetune

PRESETS = sorted(p.stem for p in (CONF_DIR / "finetune").glob("*.yaml"))


def test_there_are_presets():
    assert {"fashion_mnist", "quickstart", "swinv2_base_w14_224"} <= set(PRESETS)


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_preset_composes_and_validates(preset):
    overrides = [f"finetune={preset}"] if preset else []
    # data.source=folder needs the folder (??? in swinv2_base_w14_224); source=fashion_mnist reads its files there
    overrides.append("data.root=/data/labelled")
    config = compose_config("finetune", *overrides)
    validate_finetune(config)
    if preset:
        assert config.run.name != "finetune"  # each preset runs in its own directory
        assert config.logger.group == preset and preset in config.logger.tags
    else:
        assert config.logger.group is None


def test_defaults_are_the_recipe():
    """Without a preset: the dataclass defaults with the recipe's lrs and schedule from conf/finetune.yaml."""
    config = compose_config("finetune")
    assert config.model == FinetuneConfig().model and config.augment == FinetuneConfig().augment
    assert (config.optim.base_lr, config.optim.warmup_lr, config.optim.min_lr) == (1.25e-3, 2.5e-7, 2.5e-7)
    assert (config.schedule.kind, config.schedule.epochs, config.schedule.warmup_epochs) == ("cosine", 100, 20)
    assert (config.run.name, config.run.keep_last, config.data.num_workers) == ("finetune", 2, 8)


def test_reference_recipe_matches_the_papers():
    config = compose_config("finetune", "finetune=swinv2_base_w14_224", "data.root=/data/imagenet")
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
    config = compose_config("finetune", "finetune=quickstart")
    assert config.pretrained == "outputs/quickstart" and config.data.source == "fashion_mnist"
    assert (config.model.img_size, config.model.window_size, config.data.num_labelled) == (128, 8, 1000)
    assert config.logger.group == "quickstart"


def test_schema_rejects_unknown_keys():
    with pytest.raises(Exception, match=r"augment\.mixupp"):
        compose_config("finetune", "augment.mixupp=0.5")
