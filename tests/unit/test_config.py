"""Typed config validation: unknown keys, types, ints as floats, nested defaults, the plain-dict round trip."""

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
        ({"model": {"img_size": "192"}}, "model.img_size: expected int"),
        ({"model": {"img_size": 192.0}}, "model.img_size: expected int"),
        ({"model": {"img_size": True}}, "model.img_size: expected an integer"),
        # Optional fields (list | None) currently report the None branch's message; the path is what matters.
        ({"model": {"depths": [2, "x", 2]}}, r"model\.depths\[1\]: expected int, got 'x'"),
        ({"model": {"depths": 2}}, "model.depths"),
        ({"data": {"crop_scale": [0.5, "x"]}}, r"data.crop_scale\[1\]: expected float"),
        ({"data": {"crop_scale": 0.5}}, "data.crop_scale: expected a list"),
        ({"model": {"ape": "yes"}}, "model.ape: expected bool"),
        ({"optim": {"base_lr": "1e-4"}}, "optim.base_lr: expected float"),
        ({"optim": {"betas": [0.9, None]}}, r"optim.betas\[1\]: expected float"),
        ({"logger": {"tags": "a"}}, "logger.tags: expected a list"),
        ({"optim": 3}, "optim: expected a mapping"),
    ],
)
def test_type_errors_name_the_path(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(PretrainConfig, data)


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
