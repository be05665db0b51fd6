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

    source: str = "photos"  # photos (bundled scikit-image photographs) | folder
    root: str | None = None  # image folder for source=folder
    batch_size: int = 128
    num_workers: int = 4
    samples_per_epoch: int = 8192  # length of one epoch of random crops for source=photos
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    pin_memory: bool = True


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
