"""conf/pretrain.yaml and every experiment preset compose on the registered schema into a valid PretrainConfig."""

from __future__ import annotations

import dataclasses

import pytest
from cli_helpers import compose_config

from simmim_swin.cli.common import CONF_DIR
from simmim_swin.config import ConfigError, DataConfig, PretrainConfig, validate_pretrain

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_there_are_presets():
    assert "quickstart" in EXPERIMENTS and len(EXPERIMENTS) >= 3


def test_defaults_are_the_dataclass_defaults():
    """The YAML holds presets only: without options the composed config is PretrainConfig() on the photos."""
    config = compose_config("pretrain")
    # the photos preset only zeroes the shuffle buffer that map-style data does not use
    assert config == dataclasses.replace(PretrainConfig(), data=DataConfig(shuffle_buffer=0))


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_preset_composes_and_validates(experiment):
    config = compose_config("pretrain", *([f"experiment={experiment}"] if experiment else []))
    validate_pretrain(config)
    if experiment:
        assert config.run.name == experiment
        # the W&B group and tag default to the experiment name
        assert config.logger.group == experiment and config.logger.tags == [experiment]
    else:
        assert config.logger.group is None and config.logger.tags == []


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=folder", "data.root=/x"],
        ["data=shards", "data.urls=/x/train.json"],
        ["data=fashion_mnist"],
        ["schedule=cosine"],
        ["logger=wandb"],
        ["experiment=quickstart", "data=fashion_mnist", "logger=wandb", "schedule=cosine"],
    ],
)
def test_group_options_compose_and_validate(overrides):
    validate_pretrain(compose_config("pretrain", *overrides))


def test_logger_group_and_tags_set_by_the_user_are_kept():
    config = compose_config("pretrain", "experiment=quickstart", "logger.group=mine", "logger.tags=[a]")
    assert config.logger.group == "mine" and config.logger.tags == ["a", "quickstart"]
    config = compose_config("pretrain", "experiment=quickstart", "logger.tags=[quickstart]")
    assert config.logger.group == "quickstart" and config.logger.tags == ["quickstart"]


def test_reference_recipe_matches_the_papers():
    config = compose_config("pretrain", "experiment=swinv2_base_w12_192_800ep")
    assert (config.model.arch, config.model.img_size, config.model.window_size) == ("base", 192, 12)
    assert config.model.drop_path_rate == 0.1 and config.mask.norm_target and config.mask.norm_target_window == 47
    assert (config.mask.mask_patch_size, config.mask.mask_ratio) == (32, 0.6)
    assert (config.optim.base_lr, config.optim.warmup_lr, config.optim.weight_decay) == (1e-4, 5e-7, 0.05)
    assert config.optim.betas == [0.9, 0.999] and config.optim.eps == 1e-8 and config.optim.clip_grad == 5.0
    assert (config.schedule.kind, config.schedule.epochs, config.schedule.warmup_epochs) == ("multistep", 800, 10)
    assert config.schedule.decay_epochs == [700] and config.schedule.decay_rate == 0.1


def test_quickstart_uses_the_cosine_schedule():
    config = compose_config("pretrain", "experiment=quickstart")
    assert (config.schedule.kind, config.schedule.epochs, config.schedule.decay_epochs) == ("cosine", 5, [])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.img_size=100"], "img_size=100"),
        (["model.arch=tiny", "model.img_size=48"], "divisible"),
        (["mask.mask_patch_size=30"], "mask_patch_size=30"),
        (["mask.mask_ratio=0"], "mask_ratio=0"),
        (["mask.mask_ratio=1.0"], "mask_ratio=1.0"),
        (["model.arch=enormous"], "enormous"),
        (["data.batch_size=0"], "batch_size=0"),
    ],
)
def test_bad_settings_are_rejected_with_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_pretrain(compose_config("pretrain", *overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [("optim.lr=1", "optim.lr"), ("model.img_size=abc", "model.img_size"), ("data.crop_scale=3", "data.crop_scale")],
)
def test_schema_rejects_unknown_keys_and_wrong_types(override, key):
    """Hydra composes on the dataclasses: a misspelt key or a mistyped value fails with the full key."""
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        compose_config("pretrain", override)
