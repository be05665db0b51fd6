"""Every Hydra preset composes into a valid typed config (the YAML and the dataclasses agree key for key)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from simmim_swin.config import ConfigError, PretrainConfig, from_dict
from simmim_swin.pretrain import validate_config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_pretrain(*overrides: str) -> PretrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=list(overrides))
    return from_dict(PretrainConfig, OmegaConf.to_container(cfg, resolve=True))


def test_there_are_presets():
    assert "quickstart" in EXPERIMENTS and len(EXPERIMENTS) >= 3


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_preset_composes_and_validates(experiment):
    config = compose_pretrain(*([f"experiment={experiment}"] if experiment else []))
    validate_config(config)
    if experiment:
        assert config.run.name == experiment


@pytest.mark.parametrize("group", ["model", "mask", "data", "optim", "schedule", "logger"])
def test_group_files_list_every_dataclass_field(group):
    """A YAML file missing a key would silently fall back to the dataclass default and hide it from users."""
    field_type = {f.name: f.type for f in dataclasses.fields(PretrainConfig)}[group]
    cls = getattr(__import__("simmim_swin.config", fromlist=[field_type]), field_type)
    names = {f.name for f in dataclasses.fields(cls)}
    for path in (CONF_DIR / group).glob("*.yaml"):
        keys = set(OmegaConf.load(path).keys())
        assert keys == names, f"{path.name}: missing {names - keys}, extra {keys - names}"


def test_reference_recipe_matches_spec():
    config = compose_pretrain("experiment=swinv2_base_w12_192_800ep")
    assert (config.model.arch, config.model.img_size, config.model.window_size) == ("base", 192, 12)
    assert config.model.drop_path_rate == 0.1 and config.mask.norm_target and config.mask.norm_target_window == 47
    assert (config.mask.mask_patch_size, config.mask.mask_ratio) == (32, 0.6)
    assert (config.optim.base_lr, config.optim.warmup_lr, config.optim.weight_decay) == (1e-4, 5e-7, 0.05)
    assert config.optim.betas == [0.9, 0.999] and config.optim.eps == 1e-8 and config.optim.clip_grad == 5.0
    assert (config.schedule.kind, config.schedule.epochs, config.schedule.warmup_epochs) == ("multistep", 800, 10)
    assert config.schedule.decay_epochs == [700] and config.schedule.decay_rate == 0.1


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
        validate_config(compose_pretrain(*overrides))
