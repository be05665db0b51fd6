"""from_dict / to_dict: unknown keys, types, ints as floats, nested defaults, the plain-dict round trip."""

import dataclasses
import io

import pytest
import torch

from simmim_swin.config import (
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    from_dict,
    to_dict,
)


def test_defaults_match_the_reference_recipe() -> None:
    cfg = from_dict(PretrainConfig, {})
    assert cfg == PretrainConfig()
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.window_size) == ("base", 192, 12)
    assert (cfg.mask.mask_patch_size, cfg.mask.mask_ratio, cfg.mask.norm_target) == (32, 0.6, True)
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.clip_grad) == (1e-4, 0.05, 5.0)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.decay_epochs) == (800, 10, [700])
    assert from_dict(PretrainConfig, None) == PretrainConfig()


def test_unknown_key_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\] in optim;.*base_lr"):
        from_dict(PretrainConfig, {"optim": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"\['modle'\] in PretrainConfig"):
        from_dict(PretrainConfig, {"modle": {}})
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"model": {"img_size": 192.0}},
            r"model.img_size=192.0 must be a positive int \(square\) or \[height, width\]",
        ),
        ({"model": {"img_size": True}}, "model.img_size=True must be a positive int"),
        ({"model": {"img_size": [96, "x"]}}, r"model.img_size=\[96, 'x'\] must be"),
        ({"model": {"depths": [2, "x", 2]}}, r"model\.depths\[1\]: Value 'x'"),
        ({"model": {"depths": 2}}, "model.depths: .*not a ListConfig, list or tuple"),
        ({"model": {"arch": None}}, "model.arch: Incompatible value 'None'"),
        ({"data": {"crop_scale": [0.5, "x"]}}, r"data.crop_scale\[1\]: Value 'x'"),
        ({"data": {"crop_scale": 0.5}}, "data.crop_scale: .*not a ListConfig"),
        ({"data": {"urls": 3}}, "data.urls: expected a string, a list of strings or null, got 3"),
        ({"data": {"val_urls": ["a", 1]}}, "data.val_urls: expected a string"),
        ({"optim": {"base_lr": "fast"}}, "optim.base_lr: Value 'fast'"),
        ({"optim": {"betas": [0.9, None]}}, r"optim.betas\[1\]: .*NoneType"),
        ({"logger": {"tags": "a"}}, "logger.tags: .*not a ListConfig"),
        ({"optim": 3}, "optim: expected a mapping"),
        ({"model": {"window_size": 8}, "optim": {"clip_grad": "x"}}, "optim.clip_grad"),
    ],
)
def test_type_errors_name_the_path(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(PretrainConfig, data)
    assert "\n" not in str(info.value)  # one line: no full_key / object_type lines from OmegaConf


def test_path_prefixes_the_message_for_a_section() -> None:
    with pytest.raises(ConfigError, match="^model.patch_size: "):
        from_dict(ModelConfig, {"patch_size": "x"}, "model")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['imgsize'\] in model;"):
        from_dict(ModelConfig, {"imgsize": 1}, "model")


def test_command_line_conversions_apply() -> None:
    """As on the command line, OmegaConf converts numeric and boolean strings and ints to the field's type."""
    cfg = from_dict(PretrainConfig, {"model": {"img_size": "96", "ape": "true"}, "run": {"name": 3}})
    assert (cfg.model.img_size, cfg.model.ape, cfg.run.name) == (96, True, "3")
    cfg = from_dict(PretrainConfig, {"data": {"urls": ["a.tar", "b.tar"], "val_urls": "v.json"}})
    assert cfg.data.urls == ["a.tar", "b.tar"] and cfg.data.val_urls == "v.json"


def test_ints_accepted_for_floats_and_optionals() -> None:
    cfg = from_dict(PretrainConfig, {"optim": {"base_lr": 1, "betas": [1, 0.999], "clip_grad": None, "fused": True}})
    assert cfg.optim.base_lr == 1.0 and type(cfg.optim.base_lr) is float
    assert cfg.optim.betas == [1.0, 0.999] and type(cfg.optim.betas[0]) is float
    assert cfg.optim.clip_grad is None and cfg.optim.fused is True
    cfg = from_dict(OptimConfig, {"clip_grad": 3})
    assert cfg.clip_grad == 3.0 and type(cfg.clip_grad) is float
    cfg = from_dict(ModelConfig, {"depths": (2, 2, 6, 2), "embed_dim": None})
    assert cfg.depths == [2, 2, 6, 2] and cfg.embed_dim is None


def test_nested_defaults_are_kept() -> None:
    cfg = from_dict(PretrainConfig, {"model": {"arch": "pico"}, "data": {"batch_size": 8}})
    assert cfg.model.arch == "pico"
    assert cfg.model.img_size == ModelConfig().img_size  # the rest of the section keeps its defaults
    assert cfg.data == dataclasses.replace(DataConfig(), batch_size=8)
    assert cfg.logger == LoggerConfig()
    # Mutable defaults are not shared between instances.
    cfg.logger.tags.append("x")
    assert LoggerConfig().tags == []


def test_to_dict_round_trip_through_weights_only_load() -> None:
    cfg = from_dict(
        PretrainConfig,
        {"model": {"arch": "nano", "depths": [1, 1, 2, 1]}, "optim": {"fused": False}, "run": {"max_steps": 5}},
    )
    plain = to_dict(cfg)
    assert isinstance(plain["model"], dict) and plain["model"]["depths"] == [1, 1, 2, 1]
    assert from_dict(PretrainConfig, plain) == cfg
    buffer = io.BytesIO()
    torch.save({"config": plain}, buffer)  # what checkpoints store
    buffer.seek(0)
    assert from_dict(PretrainConfig, torch.load(buffer, weights_only=True)["config"]) == cfg


def test_img_size_takes_height_and_width() -> None:
    assert from_dict(PretrainConfig, {"model": {"img_size": [96, 160]}}).model.img_size == [96, 160]
    assert from_dict(PretrainConfig, {"model": {"img_size": [64, 64]}}).model.img_size == 64  # square: one int
