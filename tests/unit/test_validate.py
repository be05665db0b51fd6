"""validate_pretrain / validate_finetune: every check of a config value rejects with a message naming the key."""

from __future__ import annotations

import pytest
import yaml

from simmim_swin.config import (
    Choice,
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    from_dict,
    to_dict,
    validate_finetune,
    validate_pretrain,
)

# a model the checks accept: pico at 32 px (3 stages: 32 must divide by 4 * 2**2)
SMALL = {"model": {"arch": "pico", "img_size": 32, "window_size": 4}, "mask": {"mask_patch_size": 8}}
LABELLED = {"data": {"root": "labelled"}}  # fine-tuning's default source=folder needs a folder (never read here)


def pretrain_config(**sections: dict) -> PretrainConfig:
    data = {k: dict(v) for k, v in SMALL.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(PretrainConfig, data)


def finetune_config(**sections: dict | str) -> FinetuneConfig:
    data = {k: dict(v) for k, v in LABELLED.items()}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return from_dict(FinetuneConfig, data)


def test_defaults_and_small_model_pass():
    validate_pretrain(PretrainConfig())
    validate_pretrain(pretrain_config())
    validate_finetune(finetune_config())
    validate_finetune(from_dict(FinetuneConfig, {"data": {"source": "fashion_mnist"}}))


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
        ({"run": {"parallel": "zero3"}}, r"run.parallel='zero3' is unknown; use one of \['ddp', 'fsdp'\]"),
        ({"run": {"device": "gpu"}}, "run.device='gpu' is unknown; use auto, cpu, cuda or cuda:N"),
        ({"run": {"device": "cuda:x"}}, "run.device='cuda:x'"),
        ({"run": {"lock_stale_after_s": 0}}, "run.lock_stale_after_s=0"),
        ({"run": {"max_consecutive_skips": 0}}, "run.max_consecutive_skips=0"),
        ({"run": {"save_every": 0}}, "run.save_every=0"),
        ({"run": {"keep_last": 0}}, "run.keep_last=0"),
        ({"data": {"source": "ftp"}}, "data.source='ftp' is unknown; use one of"),
        ({"data": {"source": "shards"}}, "data=shards needs data.urls"),
        ({"data": {"source": "folder"}}, "data.source=folder needs data.root"),
        ({"data": {"samples_per_epoch": 0}}, "data.samples_per_epoch=0: source=photos needs"),
        ({"data": {"num_images": 5}}, "data.num_images=5 picks a subset .* not of data.source=photos;"),
        ({"data": {"num_workers": -1}}, "data.num_workers=-1"),
        ({"data": {"shuffle_buffer": -1}}, "data.shuffle_buffer=-1"),
        ({"data": {"val_samples": -1}}, "data.val_samples=-1"),
        ({"data": {"max_bad_fraction": 1.5}}, r"data.max_bad_fraction=1.5 must lie in \[0, 1\]"),
        ({"mask": {"mask_patch_size": 6}}, "mask: .*mask_patch_size=6"),
        ({"mask": {"mask_ratio": 1.5}}, "mask: .*mask_ratio=1.5"),
        ({"mask": {"norm_target_window": 4}}, "mask.norm_target_window=4 must be odd and >= 3"),
        ({"mask": {"mask_patch_size": 64}}, "mask: "),
        # the lr schedule and AdamW (checked here, not when the scheduler / optimizer is built)
        ({"schedule": {"epochs": 10, "warmup_epochs": 11}}, r"schedule.warmup_epochs=11 must lie in \[0, "),
        ({"schedule": {"kind": "cosine", "epochs": 10, "warmup_epochs": 10}}, "after warm-up"),
        ({"schedule": {"epochs": 10, "warmup_epochs": 2, "decay_epochs": [10]}}, "decay_epochs=.*milestone 10"),
        ({"schedule": {"epochs": 10, "warmup_epochs": 2, "decay_epochs": [0]}}, "milestone 0"),
        ({"schedule": {"epochs": 10, "warmup_epochs": 2, "decay_epochs": [1]}}, "inside the warm-up"),
        ({"schedule": {"epochs": 0}}, "schedule.epochs=0"),
        ({"optim": {"lr_reference_batch": 0}}, "optim.lr_reference_batch=0"),
        ({"optim": {"betas": [0.9]}}, r"optim.betas=\[0.9\] must be two values"),
        ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas"),
        ({"probe": {"k": 0}}, "probe.k=0 must be >= 1"),
        ({"probe": {"temperature": 0}}, "probe.temperature=0"),
        ({"probe": {"enabled": True, "source": "shards"}}, "probe.source=shards needs probe.train"),
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
        ({"train": {"layer_decay": 0.0}}, r"train.layer_decay=0.0 must lie in \(0, 1\]"),
        ({"train": {"patience": -1}}, "train.patience=-1"),
        ({"data": {"crop_pct": 1.5}}, r"data.crop_pct=1.5 must lie in \(0, 1\]"),
        ({"data": {"num_labelled": 0}}, "data.num_labelled=0"),
        ({"augment": {"crop_scale": [0.5, 1.5]}}, r"augment.crop_scale=\[0.5, 1.5\] must be \[min, max\]"),
        ({"augment": {"rand_augment": "xyz"}}, "augment.rand_augment='xyz' is not a timm augmentation policy"),
        ({"schedule": {"epochs": 5, "warmup_epochs": 6}}, "schedule.warmup_epochs=6"),
        ({"optim": {"betas": [0.9, 0.99, 0.999]}}, "optim.betas"),
    ],
)
def test_validate_finetune_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_finetune(finetune_config(**data))


def test_odd_batch_is_fine_without_mixing():
    validate_finetune(finetune_config(data={"batch_size": 3}, augment={"mixup": 0, "cutmix": 0}))


def test_an_evaluation_checks_only_what_it_uses():
    """evaluate=RUN trains nothing: an odd batch with mixup passes, a missing data folder does not."""
    validate_finetune(finetune_config(data={"batch_size": 3}, train={"layer_decay": 0.0}, evaluate="run"))
    with pytest.raises(ConfigError, match="needs data.root"):
        validate_finetune(from_dict(FinetuneConfig, {"evaluate": "run"}))
    with pytest.raises(ConfigError, match="run.precision='fp8' is unknown"):
        validate_finetune(finetune_config(run={"precision": "fp8"}, evaluate="run"))


# every Enum-typed field: (config class, dotted key, a valid value other than the default)
CHOICES = [
    (PretrainConfig, "data.source", "fashion_mnist"),
    (PretrainConfig, "data.split", "test"),
    (PretrainConfig, "schedule.kind", "cosine"),
    (PretrainConfig, "logger.wandb", "offline"),
    (PretrainConfig, "logger.console", "off"),
    (PretrainConfig, "run.precision", "bf16"),
    (PretrainConfig, "run.parallel", "fsdp"),
    (PretrainConfig, "probe.source", "shards"),
    (PretrainConfig, "init_from_format", "timm"),
    (FinetuneConfig, "data.source", "fashion_mnist"),
    (FinetuneConfig, "pretrained_format", "reference"),
    (FinetuneConfig, "augment.remode", "const"),
    (FinetuneConfig, "augment.mixup_mode", "elem"),
    (FinetuneConfig, "augment.interpolation", "bilinear"),
    (FinetuneConfig, "train.head_init", "linear_probe"),
]


def _nested(key: str, value: object) -> dict:
    *sections, name = key.split(".")
    tree: dict = {name: value}
    for section in reversed(sections):
        tree = {section: tree}
    return tree


def _get(config: object, key: str) -> object:
    for name in key.split("."):
        config = getattr(config, name)
    return config


@pytest.mark.parametrize(("cls", "key", "valid"), CHOICES)
def test_a_choice_outside_its_set_is_refused_with_the_key_and_the_choices(cls, key, valid):
    typed = _get(cls(), key)
    assert isinstance(typed, Choice) and valid in [c.value for c in type(typed)]
    config = from_dict(cls, _nested(key, valid))
    assert _get(config, key) == valid and f"{_get(config, key)}" == valid and str(_get(config, key)) == valid
    choices = str([c.value for c in type(typed)]).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConfigError, match=f"^{key}='bogus' is unknown; use one of {choices}$"):
        from_dict(cls, _nested(key, "bogus"))
    # a config built in Python, not through from_dict or Hydra: the door refuses it as well
    config = cls()
    parent = _get(config, key.rpartition(".")[0]) if "." in key else config
    setattr(parent, key.rpartition(".")[2], "bogus")
    validate = validate_pretrain if cls is PretrainConfig else validate_finetune
    with pytest.raises(ConfigError, match=f"^{key}='bogus' is unknown; use one of {choices}$"):
        validate(config)


def test_choices_are_stored_as_plain_strings():
    """config.yaml, the checkpoint meta and W&B get strings (old run directories hold strings and still resume)."""
    config = from_dict(PretrainConfig, {"schedule": {"kind": "cosine"}, "run": {"precision": "bf16"}})
    plain = to_dict(config)
    assert type(plain["schedule"]["kind"]) is str and plain["schedule"]["kind"] == "cosine"
    assert type(plain["run"]["precision"]) is str and type(plain["data"]["source"]) is str
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert from_dict(PretrainConfig, plain) == config  # read back from a checkpoint's strings
