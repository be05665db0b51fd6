"""validate_pretrain / validate_finetune: every cross-field check rejects with a message naming the key."""

from __future__ import annotations

import pytest

from simmim_swin.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    from_dict,
    validate_finetune,
    validate_pretrain,
)

# a model the checks accept: pico at 32 px (3 stages: 32 must divide by 4 * 2**2)
SMALL = {"model": {"arch": "pico", "img_size": 32, "window_size": 4}, "mask": {"mask_patch_size": 8}}


def pretrain_config(**sections: dict) -> PretrainConfig:
    data = {k: dict(v) for k, v in SMALL.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(PretrainConfig, data)


def test_defaults_and_small_model_pass():
    validate_pretrain(PretrainConfig())
    validate_pretrain(pretrain_config())
    validate_finetune(FinetuneConfig())


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {"arch": "enormous"}}, "model.arch='enormous' is not a known size"),
        ({"model": {"img_size": 36}}, r"model.img_size=36 must be divisible .* try model.img_size=32"),
        ({"data": {"batch_size": 0}}, "data.batch_size=0"),
        ({"optim": {"accum_steps": 0}}, "optim.accum_steps=0"),
        ({"logger": {"log_every": 0}}, "logger.log_every"),
        ({"logger": {"image_every": 0}}, "logger.image_every"),
        ({"logger": {"val_every": 0}}, "logger.val_every=0"),
        ({"run": {"parallel": "zero3"}}, "run.parallel='zero3' is unknown"),
        ({"run": {"max_consecutive_skips": 0}}, "run.max_consecutive_skips=0"),
        ({"run": {"save_every": 0}}, "run.save_every=0"),
        ({"run": {"keep_last": 0}}, "run.keep_last=0"),
        ({"data": {"source": "ftp"}}, "data.source='ftp' is not one of"),
        ({"data": {"source": "shards"}}, "data=shards needs data.urls"),
        ({"data": {"num_workers": -1}}, "data.num_workers=-1"),
        ({"data": {"shuffle_buffer": -1}}, "data.shuffle_buffer=-1"),
        ({"data": {"val_samples": -1}}, "data.val_samples=-1"),
        ({"data": {"max_bad_fraction": 1.5}}, r"data.max_bad_fraction=1.5 must lie in \[0, 1\]"),
        ({"mask": {"mask_patch_size": 6}}, "mask: .*mask_patch_size=6"),
        ({"mask": {"mask_ratio": 1.5}}, "mask: .*mask_ratio=1.5"),
        ({"mask": {"mask_patch_size": 64}}, "mask: "),
    ],
)
def test_validate_pretrain_names_the_key(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate_pretrain(pretrain_config(**sections))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": {"batch_size": 0}}, "data.batch_size=0"),
        ({"data": {"eval_batch_size": 0}}, "data.eval_batch_size=0"),
        ({"optim": {"accum_steps": 0}}, "optim.accum_steps=0"),
        ({"augment": {"mixup_mode": "row"}}, "augment.mixup_mode='row' is unknown"),
        ({"data": {"batch_size": 3}}, "data.batch_size=3 must be even"),
        ({"train": {"ema_decay": 1.0}}, r"train.ema_decay=1.0 must lie in \(0, 1\)"),
        ({"train": {"eval_every": 0}}, "train.eval_every"),
        ({"logger": {"log_every": 0}}, "logger.log_every"),
        ({"run": {"parallel": "zero3"}}, "run.parallel='zero3'"),
        ({"train": {"ema": True}, "run": {"parallel": "fsdp"}}, "train.ema=true does not work with run.parallel=fsdp"),
    ],
)
def test_validate_finetune_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_finetune(from_dict(FinetuneConfig, data))


def test_odd_batch_is_fine_without_mixing():
    validate_finetune(from_dict(FinetuneConfig, {"data": {"batch_size": 3}, "augment": {"mixup": 0, "cutmix": 0}}))
