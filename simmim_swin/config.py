"""Typed run configuration: one dataclass per concern, built from plain dicts that must not carry unknown keys.

Hydra composes YAML at the command-line edge (simmim_swin.cli); everything below takes these dataclasses,
or better the one narrow sub-config it needs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names it and the fix."""


@dataclass
class ModelConfig:
    """SwinV2 encoder architecture; `arch` names a size, the optional fields override it."""

    arch: str = "base"  # a key of simmim_swin.models.swinv2.SWINV2_SIZES
    img_size: int = 192
    patch_size: int = 4
    in_chans: int = 3
    window_size: int = 12
    pretrained_window_sizes: list[int] | None = None  # one per stage; None means 0 (no transfer)
    embed_dim: int | None = None  # None: taken from `arch`
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    ape: bool = False  # learned absolute position embedding
    grad_checkpointing: bool = False
    fused_attn: bool | None = None  # None: SDPA on CUDA, eager elsewhere


@dataclass
class MaskConfig:
    """SimMIM masking and reconstruction target."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target: bool = True  # per-pixel normalisation by the local mean / variance (SwinV2 recipe)
    norm_target_window: int = 47


@dataclass
class DataConfig:
    """Where images come from and how they are batched (batch_size is per process)."""

    source: str = "photos"  # photos (bundled scikit-image photographs) | folder | shards | fashion_mnist
    root: str | None = None  # image folder for source=folder
    urls: str | list[str] | None = None  # source=shards: index .json, brace pattern, `a::b`, or `pipe:CMD` URLs
    split: str = "train"  # source=fashion_mnist: train (60k) | test (10k)
    batch_size: int = 128
    num_workers: int = 4
    samples_per_epoch: int = 8192  # photos: crops per epoch; shards: samples per epoch (0: the index's total)
    shuffle_buffer: int = 2000  # source=shards: samples held per worker for shuffling (0: no shuffle)
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    pin_memory: bool = True
    max_bad_fraction: float = 0.01  # stop when skipped (corrupt / non-image / empty) samples exceed this fraction
    bad_check_after: int = 1000  # the fraction is bad / max(samples read, this): early stragglers never stop a run
    val_urls: str | list[str] | None = None  # held-out shards (same forms as urls) for the validation loss
    val_samples: int = 256  # the first N samples of val_urls, with fixed masks, every logger.val_every steps


@dataclass
class OptimConfig:
    """AdamW; learning rates are for a total batch of `lr_reference_batch` and scale linearly with it."""

    base_lr: float = 1e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_reference_batch: int = 512
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = 5.0  # max global gradient norm; None disables clipping
    accum_steps: int = 1  # micro-batches per optimizer step
    fused: bool | None = None  # fused AdamW kernel; None: on CUDA only


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in epochs of the training data, converted to optimizer steps at start-up."""

    epochs: int = 800
    warmup_epochs: int = 10
    kind: str = "multistep"  # multistep | cosine
    decay_epochs: list[int] = field(default_factory=lambda: [700])  # multistep milestones
    decay_rate: float = 0.1


@dataclass
class LoggerConfig:
    """Metrics sinks: metrics.jsonl is always written; wandb is optional."""

    wandb: str = "disabled"  # online | offline | disabled
    project: str = "simmim-swin"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 20  # optimizer steps between metric lines (each one syncs the host)
    image_every: int = 1000  # optimizer steps between reconstruction panels
    num_images: int = 4  # fixed images in the panel
    val_every: int = 1000  # optimizer steps between validation losses (needs data.val_urls), and at the end


@dataclass
class RunConfig:
    """Where the run lives and how it executes."""

    name: str = "pretrain"  # the run directory is <output_dir>/<name>; starting it again resumes it
    output_dir: str = "outputs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_last: int = 3  # checkpoints kept on disk
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is unchanged)
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # ddp | fsdp (parameters sharded across ranks, for models too large for DDP)
    max_consecutive_skips: int = 10  # stop after this many optimizer steps in a row with a non-finite loss/gradient


PARALLEL_STRATEGIES = ("ddp", "fsdp")


def check_run_config(run: RunConfig) -> None:
    """Reject run settings that cannot work (shared by pretraining and fine-tuning)."""
    if run.parallel not in PARALLEL_STRATEGIES:
        raise ConfigError(f"run.parallel={run.parallel!r} is unknown; use one of {list(PARALLEL_STRATEGIES)}")
    if run.max_consecutive_skips < 1:
        raise ConfigError(f"run.max_consecutive_skips={run.max_consecutive_skips} must be >= 1")
    if run.save_every < 1 or run.keep_last < 1:
        raise ConfigError(f"run.save_every={run.save_every} and run.keep_last={run.keep_last} must be >= 1")


@dataclass
class PretrainConfig:
    """Everything a SimMIM pretraining run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _check_type(value: Any, annotation: Any, path: str) -> Any:
    """Return `value` if it fits `annotation` (ints are accepted as floats); raise ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, path)
            except ConfigError as e:
                errors.append((option is type(None), e))
        # report what was wrong with the value against the real type, not "expected null"
        raise sorted(errors, key=lambda pair: pair[0])[0][1]
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_type(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is Any or (isinstance(annotation, type) and isinstance(value, annotation)):
        if annotation is int and isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    raise ConfigError(f"{path}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys and mistyped values with their full path."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys are {sorted(names)}. Check the spelling of the override."
        )
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        key_path = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{key_path}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(annotation, value, key_path)
        else:
            kwargs[name] = _check_type(value, annotation, key_path)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (what checkpoints store: no pickled objects)."""
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning (simmim-finetune)


@dataclass
class FinetuneModelConfig:
    """The classifier to fine-tune; null fields come from the pretrained checkpoint (its config or its weights)."""

    arch: str | None = None  # a key of SWINV2_SIZES; null: the checkpoint's (required when training from scratch)
    img_size: int | None = None  # null: the checkpoint's pretraining size
    window_size: int | None = None  # null: the checkpoint's window
    pretrained_window_sizes: list[int] | None = None  # one per stage; null: the windows each stage used in pretraining
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    mlp_ratio: float | None = None
    ape: bool | None = None
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    fused_attn: bool | None = None  # None: SDPA on CUDA, eager elsewhere


@dataclass
class FinetuneDataConfig:
    """Labelled images; batch sizes are per process."""

    source: str = "folder"  # folder (one sub-folder per class) | fashion_mnist (Debian's package; test split = val)
    root: str | None = None  # source=folder: training images, or a folder holding train/ and val/
    val_root: str | None = None  # source=folder: validation images (same class folders); null: <root>/val
    num_labelled: int | None = None  # train on this many labelled images, class-balanced; null: all of them
    subset_seed: int = 0  # which images num_labelled picks
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 4
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, then centre crop img_size (224 of 256)
    pin_memory: bool = True


@dataclass
class AugmentConfig:
    """Training augmentation (timm's create_transform and Mixup); zero / null switches a part off."""

    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm auto_augment string
    color_jitter: float = 0.4
    interpolation: str = "bicubic"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5  # probability of a horizontal flip
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"  # random erasing fill: const | rand | pixel
    recount: int = 1
    mixup: float = 0.8  # mixup alpha
    cutmix: float = 1.0  # cutmix alpha
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem
    label_smoothing: float = 0.1


@dataclass
class FinetuneTrainConfig:
    """Fine-tuning specifics: layer-wise lr decay, weight EMA, evaluation cadence, ablations."""

    layer_decay: float = 0.75  # lr scale decay^(num_layers - 1 - layer_id); 1.0 disables it
    ema: bool = False  # keep an exponential moving average of the weights and evaluate it too
    ema_decay: float = 0.9998
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    reinit_cpb_mlp: bool = False  # ablation: fresh continuous-position-bias MLPs instead of the pretrained ones


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; `evaluate` turns it into an evaluation of a fine-tuned checkpoint."""

    pretrained: str | None = None  # run dir, checkpoint (.pt / .pth) or export (.safetensors); null: from scratch
    pretrained_format: str = "auto"  # auto | simmim (ours) | reference (Microsoft's SimMIM / Swin) | timm
    evaluate: str | None = None  # fine-tuned run dir or checkpoint: evaluate it at model.img_size / window_size
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
