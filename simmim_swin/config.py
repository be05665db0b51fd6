"""Typed run configuration: one dataclass per concern, registered as Hydra structured configs (conf/*.yaml holds
presets only). `validate_pretrain` / `validate_finetune` check every value once, before any directory, model or data
exists; the code below takes the values as checked and the one narrow sub-config it needs."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import EnumNode, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

# PIL stops at twice its MAX_IMAGE_PIXELS by default (178,956,970 pixels): the same limit by default here
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names it and the fix."""


class Choice(str, enum.Enum):
    """A setting that names one of a few values: Hydra and `from_dict` refuse any other with the key and the choices."""

    # a member prints as its string (str() and f-strings of a plain (str, Enum) differ between Python versions)
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choices(name: str, values: str) -> Any:
    # each member is named as its value: OmegaConf, which looks members up by name, then accepts exactly the values
    return Choice(name, [(value, value) for value in values.split()], module=__name__, qualname=name)


# the settings that name one of a few values (the first is not necessarily the default)
DataSource = _choices("DataSource", "photos folder fashion_mnist shards")  # data.source of pretraining
LabelledSource = _choices("LabelledSource", "folder fashion_mnist")  # data.source of fine-tuning
ProbeSource = _choices("ProbeSource", "fashion_mnist folder shards")  # probe.source
Split = _choices("Split", "train test")  # data.split of source=fashion_mnist
ScheduleKind = _choices("ScheduleKind", "cosine multistep")  # schedule.kind
WandbMode = _choices("WandbMode", "online offline disabled")  # logger.wandb
WandbConsole = _choices("WandbConsole", "auto wrap redirect off")  # logger.console: W&B's Settings.console
Precision = _choices("Precision", "auto fp32 bf16 fp16")  # run.precision; auto: bf16 on CUDA, fp32 elsewhere
Parallel = _choices("Parallel", "ddp fsdp")  # run.parallel
WeightFormat = _choices("WeightFormat", "auto simmim reference timm hf")  # init_from_format, pretrained_format
HeadInit = _choices("HeadInit", "random linear_probe")  # train.head_init
MixupMode = _choices("MixupMode", "batch pair elem")  # augment.mixup_mode (timm's Mixup)
EraseMode = _choices("EraseMode", "const rand pixel")  # augment.remode: the fill of timm's random erasing
Interpolation = _choices("Interpolation", "bicubic bilinear nearest box hamming lanczos")  # augment.interpolation (PIL)


@dataclass
class ModelConfig:
    """SwinV2 encoder architecture; `arch` names a size, the optional fields override it."""

    arch: str = "base"  # a key of simmim_swin.models.swinv2.SWINV2_SIZES (tiny ... giant; pico / nano / micro)
    img_size: Any = 192  # pixels: an int (square) or [height, width] (Any: OmegaConf has no int-or-list type)
    patch_size: int = 4  # pixels per side of a patch-embedding token
    in_chans: int = 3  # image channels
    window_size: int = 12  # attention window in tokens (clipped per stage to the stage's resolution)
    pretrained_window_sizes: list[int] | None = None  # one per stage; None means 0 (no transfer)
    embed_dim: int | None = None  # None: taken from `arch`
    depths: list[int] | None = None  # blocks per stage; None: taken from `arch`
    num_heads: list[int] | None = None  # attention heads per stage; None: taken from `arch`
    mlp_ratio: float = 4.0  # MLP hidden width / embedding width
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this over the blocks
    ape: bool = False  # learned absolute position embedding
    grad_checkpointing: bool = False  # recompute block activations in the backward pass (less memory)
    fused_attn: bool | None = None  # None: SDPA on CUDA, eager elsewhere

    def __post_init__(self) -> None:
        size = self.img_size
        pair = isinstance(size, (list, tuple))
        # digit strings convert, as OmegaConf converts them for typed fields
        sizes = [int(v) if isinstance(v, str) and v.isdigit() else v for v in (size if pair else [size])]
        if len(sizes) != (2 if pair else 1) or not all(type(v) is int and v > 0 for v in sizes):
            raise ConfigError(
                f"model.img_size={size!r} must be a positive int (square) or [height, width], e.g. 192 or [192, 256]"
            )
        self.img_size = sizes[0] if sizes[0] == sizes[-1] else sizes  # a square pair becomes the int


@dataclass
class MaskConfig:
    """SimMIM masking and reconstruction target."""

    mask_patch_size: int = 32  # pixels per side of a masked square (a multiple of model.patch_size)
    mask_ratio: float = 0.6  # share of mask patches masked, in (0, 1)
    norm_target: bool = True  # per-pixel normalisation by the local mean / variance (SwinV2 recipe)
    norm_target_window: int = 47  # side of the local window of norm_target, in pixels


@dataclass
class DataConfig:
    """Where images come from and how they are batched (batch_size is per process)."""

    source: DataSource = DataSource.photos  # photos (scikit-image's photographs) | folder | shards | fashion_mnist
    root: str | None = None  # image folder for source=folder
    urls: Any = None  # source=shards: index .json, brace pattern, `a::b` or `pipe:CMD` URLs (a str or a list of str)
    split: Split = Split.train  # source=fashion_mnist: train (60k) | test (10k)
    batch_size: int = 128  # images per process and micro-batch
    num_workers: int = 4  # data-loader worker processes per process
    samples_per_epoch: int = 8192  # photos: crops per epoch; shards: samples per epoch (0: the index's total)
    # folder / fashion_mnist: pretrain on this many of the images, a fixed random subset (the first N of a seed-0
    # permutation, so a smaller subset lies inside a larger one); null: all of them
    num_images: int | None = None
    shuffle_buffer: int = 2000  # source=shards: samples held per worker for shuffling (0: no shuffle)
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])  # RandomResizedCrop area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect range
    hflip: bool = True  # random horizontal flip
    pin_memory: bool = True  # page-locked host batches (CUDA only)
    max_bad_fraction: float = 0.01  # stop when skipped (corrupt / non-image / empty) samples exceed this fraction
    bad_check_after: int = 1000  # the fraction is bad / max(samples read, this): early stragglers never stop a run
    val_urls: Any = None  # held-out shards (same forms as urls: str, list of str or None) for the validation loss
    val_samples: int = 256  # the first N samples of val_urls, with fixed masks, every logger.val_every steps
    # per-channel statistics in the files' raw units (one value per model.in_chans; `simmim-swin stats` prints
    # them): the model sees (raw - mean) / std. null: ImageNet's, for 8-bit RGB; 16-bit / float files need them
    mean: list[float] | None = None
    std: list[float] | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images count as bad samples; null: no limit

    def __post_init__(self) -> None:
        _check_str_or_list(self, "data", "urls", "val_urls")


def _check_str_or_list(config: Any, section: str, *names: str) -> None:
    """The fields typed Any because OmegaConf has no str-or-list type: a str, a list of str or None."""
    for name in names:
        value = getattr(config, name)
        strings = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        if not (value is None or isinstance(value, str) or strings):
            raise ConfigError(f"{section}.{name}: expected a string, a list of strings or null, got {value!r}")


@dataclass
class OptimConfig:
    """AdamW; learning rates are for a total batch of `lr_reference_batch` and scale linearly with it."""

    base_lr: float = 1e-4  # peak lr at the reference batch
    warmup_lr: float = 5e-7  # lr at step 0, rising linearly to base_lr over the warm-up
    min_lr: float = 5e-6  # lr floor of the decay
    lr_reference_batch: int = 512  # total batch the lrs above are quoted for
    weight_decay: float = 0.05  # decoupled weight decay (not on biases, norms, position tables, logit_scale)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator epsilon
    clip_grad: float | None = 5.0  # max global gradient norm; None disables clipping
    accum_steps: int = 1  # micro-batches per optimizer step
    fused: bool | None = None  # fused AdamW kernel; None: on CUDA only


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in epochs of the training data, converted to optimizer steps at start-up."""

    epochs: int = 800  # training length
    warmup_epochs: int = 10  # linear warm-up from optim.warmup_lr
    kind: ScheduleKind = ScheduleKind.multistep  # multistep | cosine
    decay_epochs: list[int] = field(default_factory=lambda: [700])  # multistep milestones
    decay_rate: float = 0.1  # multistep: lr factor at each milestone


@dataclass
class LoggerConfig:
    """Metrics sinks: metrics.jsonl is always written; wandb is optional."""

    wandb: WandbMode = WandbMode.disabled  # online | offline | disabled (logger=wandb: WANDB_MODE, else online)
    # W&B run fields; a null one comes from W&B's environment variable, as in any W&B script (WANDB_PROJECT,
    # WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS, WANDB_JOB_TYPE, WANDB_NOTES); a value set here wins over it
    project: str | None = None  # null: WANDB_PROJECT, else simmim-swin
    entity: str | None = None  # W&B team or user; null: WANDB_ENTITY, else the API key's default
    group: str | None = None  # null: WANDB_RUN_GROUP, else the command line's experiment / finetune preset or sweep
    tags: list[str] = field(default_factory=list)  # empty: WANDB_TAGS; the command line adds the preset name
    job_type: str | None = None  # W&B job type (e.g. pretrain, finetune, eval); null: WANDB_JOB_TYPE
    notes: str | None = None  # W&B run notes; null: WANDB_NOTES
    system_metrics: bool = True  # W&B samples GPU / CPU / memory / disk use alongside the run
    git: bool = True  # W&B records the commit and the uncommitted diff of the working tree
    console: WandbConsole = WandbConsole.auto  # W&B console capture: auto | wrap | redirect | off
    log_every: int = 20  # optimizer steps between metric lines (each one syncs the host)
    image_every: int = 1000  # optimizer steps between reconstruction panels
    num_images: int = 4  # fixed images in the panel
    val_every: int = 1000  # optimizer steps between validation losses (needs data.val_urls), and at the end
    # bands shown in the panels (0-based; three as red, green, blue or one in grey), each stretched per image to its
    # 1st-99th percentile; null: the first three (one band: grey). 8-bit RGB with ImageNet statistics is shown as is
    panel_bands: list[int] | None = None


@dataclass
class RunConfig:
    """Where the run lives and how it executes."""

    name: str = "pretrain"  # the run directory is <output_dir>/<name>; starting it again resumes it
    output_dir: str = "outputs"  # parent of the run directories
    seed: int = 0  # seeds weights, data order, crops and masks
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_last: int = 3  # checkpoints kept on disk
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is unchanged)
    compile: bool = False  # torch.compile the model
    parallel: Parallel = Parallel.ddp  # ddp | fsdp (parameters sharded across ranks, for models too large for DDP)
    max_consecutive_skips: int = 10  # stop after this many optimizer steps in a row with a non-finite loss/gradient
    lock_stale_after_s: float = 600.0  # take over another host's run lock silent this long (heartbeat: metrics lines)


@dataclass
class ProbeConfig:
    """Online kNN (and optionally linear) top-1 of the frozen encoder's features on a small labelled holdout."""

    enabled: bool = False  # run the probes during pretraining (the conf/probe presets set it)
    every: int = 500  # optimizer steps between probes (and the last step)
    source: ProbeSource = ProbeSource.fashion_mnist  # fashion_mnist | folder (class folders) | shards (.cls labels)
    root: str | None = None  # folder: a folder with train/ and val/ class folders; fashion_mnist: the IDX folder
    # explicit probe sets (Any: str or list): folder: class-folder paths, null: <root>/train and <root>/val;
    # shards: index .json / URLs of labelled shards
    train: Any = None
    val: Any = None
    num_train: int = 2000  # labelled images the kNN votes with (class-balanced where the labels are known upfront)
    num_val: int = 1000  # images scored
    k: int = 20  # neighbours per vote (DINO's 20)
    temperature: float = 0.07  # vote weight exp(cosine / temperature) (DINO's 0.07)
    linear: bool = False  # also fit a logistic-regression head (L-BFGS, as the fine-tuning LP head) every probe
    batch_size: int = 256  # images per forward pass when embedding the probe set
    seed: int = 0  # which images the class-balanced subsets pick

    def __post_init__(self) -> None:
        _check_str_or_list(self, "probe", "train", "val")


@dataclass
class PretrainConfig:
    """Everything a SimMIM pretraining run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the encoder
    mask: MaskConfig = field(default_factory=MaskConfig)  # masking and target
    data: DataConfig = field(default_factory=DataConfig)  # images and batching
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # lr over the epochs
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # metrics sinks
    run: RunConfig = field(default_factory=RunConfig)  # run directory and execution
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # online kNN / linear probes of the features
    # weights a NEW run starts from (run dir, checkpoint, .safetensors, Hugging Face folder); a run that resumes
    # continues from its own checkpoint and ignores this. The optimizer and the schedule start fresh
    init_from: str | None = None
    init_from_format: WeightFormat = WeightFormat.auto  # simmim | reference (Microsoft SimMIM / Swin) | timm | hf


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys and mistyped values raise ConfigError naming the key.

    Missing keys keep their defaults; OmegaConf converts as on the command line (ints to floats, numeric strings).
    Args: path: where `data` sits in a larger config, for the messages.
    """
    _check_sections(cls, data or {}, path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data or {})
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = _join(path, e.full_key)
        parent_key, _, name = key.rpartition(".")
        valid = (
            sorted(f.name for f in dataclasses.fields(e.object_type)) if dataclasses.is_dataclass(e.object_type) else []
        )
        raise ConfigError(
            f"unknown key(s) [{name!r}] in {parent_key or cls.__name__}; valid keys are {valid}. "
            "Check the spelling of the override."
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(describe_error(e, path, cls.__name__)) from None


def describe_error(e: OmegaConfBaseException, path: str = "", where: str = "") -> str:
    """One line for an OmegaConf error naming the full key (under `path`, else `where`), and an Enum's choices."""
    key = _join(path, e.full_key) or where
    node = getattr(e, "child_node", None)
    if isinstance(node, EnumNode) and getattr(e, "value", None) is not None:
        return f"{key}={e.value!r} is unknown; use one of {[choice.value for choice in node.enum_type]}"
    reason = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]  # without the full_key: / object_type= lines
    return f"{key}: {reason}" if key else reason


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass, choices as their strings (as checkpoints, config.yaml and W&B hold)."""
    return dataclasses.asdict(
        config, dict_factory=lambda items: {k: v.value if isinstance(v, enum.Enum) else v for k, v in items}
    )


def _check_sections(cls: type, data: Any, path: str) -> None:
    """A nested section given as something other than a mapping (OmegaConf's merge error names no key)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    for f in dataclasses.fields(cls):
        if f.name in data and dataclasses.is_dataclass(f.default_factory):
            _check_sections(f.default_factory, data[f.name], _join(path, f.name))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning (simmim-finetune)


@dataclass
class FinetuneModelConfig:
    """The classifier to fine-tune; null fields come from the pretrained checkpoint (its config or its weights)."""

    arch: str | None = None  # a key of SWINV2_SIZES; null: the checkpoint's (required when training from scratch)
    img_size: int | None = None  # null: the checkpoint's pretraining size
    window_size: int | None = None  # null: the checkpoint's window
    pretrained_window_sizes: list[int] | None = None  # one per stage; null: the windows each stage used in pretraining
    patch_size: int | None = None  # null: from the checkpoint's weights (or the arch from scratch)
    in_chans: int | None = None  # null: from the checkpoint's weights
    embed_dim: int | None = None  # null: from the checkpoint's weights
    depths: list[int] | None = None  # null: from the checkpoint's weights
    num_heads: list[int] | None = None  # null: from the checkpoint's config
    mlp_ratio: float | None = None  # null: from the checkpoint's weights
    ape: bool | None = None  # null: from the checkpoint's weights
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this over the blocks
    grad_checkpointing: bool = False  # recompute block activations in the backward pass (less memory)
    fused_attn: bool | None = None  # None: SDPA on CUDA, eager elsewhere


@dataclass
class FinetuneDataConfig:
    """Labelled images; batch sizes are per process."""

    # folder (one sub-folder per class) | fashion_mnist (Debian's package; its test split is the validation set)
    source: LabelledSource = LabelledSource.folder
    root: str | None = None  # source=folder: training images, or a folder holding train/ and val/
    val_root: str | None = None  # source=folder: validation images (same class folders); null: <root>/val
    num_labelled: int | None = None  # train on this many labelled images, class-balanced; null: all of them
    subset_seed: int = 0  # which images num_labelled picks
    # held-out class-balanced share of the labelled training images (after num_labelled) for the evaluations during
    # training, best.pt and train.patience; the evaluation images are then scored once, at the end, with best.pt
    val_fraction: float = 0.0  # 0: the evaluations during training score the evaluation images
    batch_size: int = 128  # training images per process and micro-batch
    eval_batch_size: int = 256  # evaluation images per process
    num_workers: int = 4  # data-loader worker processes per process
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, then centre crop img_size (224 of 256)
    pin_memory: bool = True  # page-locked host batches (CUDA only)
    # per-channel statistics in the files' raw units, one per model.in_chans (`simmim-swin stats`); null: ImageNet's.
    # Set (or in_chans != 3): images keep their bit depth, crop / flip only (RandAugment etc. are 8-bit RGB operations)
    mean: list[float] | None = None
    std: list[float] | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images count as bad samples; null: no limit
    max_bad_fraction: float = 0.01  # stop when unreadable training images exceed this fraction of those read
    bad_check_after: int = 1000  # the fraction is bad / max(images read, this)


@dataclass
class AugmentConfig:
    """Training augmentation (timm's create_transform and Mixup); zero / null switches a part off."""

    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm auto_augment string
    color_jitter: float = 0.4  # colour jitter strength
    interpolation: Interpolation = Interpolation.bicubic  # resize interpolation of training and evaluation
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect range
    hflip: float = 0.5  # probability of a horizontal flip
    reprob: float = 0.25  # random erasing probability
    remode: EraseMode = EraseMode.pixel  # random erasing fill: const | rand | pixel
    recount: int = 1  # random erasing: rectangles per image
    mixup: float = 0.8  # mixup alpha
    cutmix: float = 1.0  # cutmix alpha
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: MixupMode = MixupMode.batch  # batch | pair | elem
    label_smoothing: float = 0.1  # inside mixup's soft targets, or a smoothed cross-entropy without mixup


@dataclass
class FinetuneTrainConfig:
    """Fine-tuning specifics: layer-wise lr decay, weight EMA, evaluation cadence, ablations."""

    layer_decay: float = 0.75  # lr scale decay^(num_layers - 1 - layer_id); 1.0 disables it
    ema: bool = False  # keep an exponential moving average of the weights and evaluate it too
    ema_decay: float = 0.9998  # EMA weight of the old average per step, in (0, 1)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    # validation images scored by the evaluations during training: a fixed random subset (the same every time,
    # drawn from run.seed) keeps them short on a large set; null: all. The end of the run always scores them all.
    eval_num_images: int | None = None
    reinit_cpb_mlp: bool = False  # ablation: fresh continuous-position-bias MLPs instead of the pretrained ones
    # stop after this many evaluations in a row without a better top-1 (with data.val_fraction: on the held-out
    # labelled images); 0: train for the whole schedule
    patience: int = 0
    # random: timm's initialisation of the classifier | linear_probe: a logistic regression fitted on the frozen
    # pretrained features of the training images (no augmentation) before any step (LP-FT, Kumar et al. 2022)
    head_init: HeadInit = HeadInit.random


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; `evaluate` turns it into an evaluation of a fine-tuned checkpoint."""

    pretrained: str | None = None  # run dir, checkpoint (.pt / .pth) or export (.safetensors); null: from scratch
    pretrained_format: WeightFormat = WeightFormat.auto  # simmim | reference (Microsoft SimMIM / Swin) | timm | hf
    evaluate: str | None = None  # fine-tuned run dir or checkpoint: evaluate it at model.img_size / window_size
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)  # the classifier
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)  # labelled images
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentation
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW (conf/finetune.yaml sets the recipe's lrs)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # lr over the epochs
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)  # layer decay, EMA, evaluation
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # metrics sinks
    run: RunConfig = field(default_factory=RunConfig)  # run directory and execution


# ----------------------------------------------------------------------------------------------------------------
# the checks at the door: every value, run once where a config enters (the Hydra preflight callback before any
# directory exists, and run_pretrain / run_finetune / evaluate_transfer for library callers). What the code deeper
# down still checks depends on the machine or the data (CUDA present, a folder that exists, a readable file).


def check_types(config: Any) -> None:
    """A config built in Python gets the refusal `from_dict` gives a mistyped value or a choice outside its set."""
    from_dict(type(config), to_dict(config))


def check_device(name: str, key: str = "run.device") -> None:
    """A device name: auto, cpu, cuda or cuda:N (whether CUDA is there is checked when the run starts)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{key}={name!r} is unknown; use auto, cpu, cuda or cuda:N")


def _check_training(config: PretrainConfig | FinetuneConfig) -> None:
    """AdamW's betas, data.max_bad_fraction and the lr schedule (warm-up within the epochs, milestones after it)."""
    schedule, betas, max_bad_fraction = config.schedule, config.optim.betas, config.data.max_bad_fraction
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"optim.betas={list(betas)} must be two values (beta1, beta2) in [0, 1), e.g. [0.9, 0.999]")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={max_bad_fraction} must lie in [0, 1], e.g. 0.01")
    if schedule.warmup_epochs > schedule.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={schedule.warmup_epochs} must lie in [0, schedule.epochs={schedule.epochs}]; "
            "lower warmup_epochs or raise epochs"
        )
    if schedule.kind == ScheduleKind.cosine and schedule.warmup_epochs == schedule.epochs:
        raise ConfigError(
            f"schedule.kind=cosine needs at least one epoch after warm-up; warmup_epochs={schedule.warmup_epochs} "
            f"equals epochs={schedule.epochs}"
        )
    if schedule.kind != ScheduleKind.multistep:
        return
    for epoch in schedule.decay_epochs:
        if not 0 < epoch < schedule.epochs:
            raise ConfigError(
                f"schedule.decay_epochs={schedule.decay_epochs}: milestone {epoch} must lie strictly between 0 and "
                f"schedule.epochs={schedule.epochs}"
            )
        if epoch < schedule.warmup_epochs:
            # the reference implementation asserts the same: a drop inside the warm-up is never what was meant
            raise ConfigError(
                f"schedule.decay_epochs={schedule.decay_epochs}: milestone {epoch} falls inside the warm-up "
                f"(warmup_epochs={schedule.warmup_epochs}); move it after the warm-up"
            )


# (key, lower bound, whether the bound itself is allowed): every number is also checked to be finite. Keys that a
# config does not have (pretraining has no augment.*) are skipped; None means "not set" and passes.
NUMBER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    *((key, 1, True) for key in (
        "model.img_size", "model.patch_size", "model.window_size", "model.in_chans", "mask.mask_patch_size",
        "data.batch_size", "data.eval_batch_size", "optim.accum_steps", "optim.lr_reference_batch",
        "schedule.epochs", "run.save_every", "run.keep_last", "run.max_consecutive_skips", "logger.log_every",
        "logger.image_every", "logger.num_images", "logger.val_every", "train.eval_every", "data.num_images",
        "train.eval_num_images", "data.num_labelled", "probe.every", "probe.num_train", "probe.num_val", "probe.k",
        "probe.batch_size",
    )),
    *((key, 0, False) for key in (
        "optim.base_lr", "optim.eps", "model.mlp_ratio", "optim.clip_grad", "run.lock_stale_after_s",
        "probe.temperature",
    )),
    *((key, 0, True) for key in (
        "optim.warmup_lr", "optim.min_lr", "optim.weight_decay", "model.drop_path_rate", "data.num_workers",
        "schedule.warmup_epochs", "schedule.decay_rate", "run.seed", "run.max_steps", "data.samples_per_epoch",
        "augment.mixup", "augment.cutmix", "augment.label_smoothing", "augment.reprob", "data.shuffle_buffer",
        "data.val_samples", "train.patience",
    )),
)  # fmt: skip


def check_numbers(config: Any) -> None:
    """Every numeric setting finite and within its sign; raises ConfigError naming the key and a valid value."""
    values = dict(_numbers(to_dict(config)))
    for path, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(f"{path}={value} is not a finite number; give a plain value such as the default")
    for key, bound, inclusive in NUMBER_BOUNDS:
        value = values.get(key)
        if value is not None and (value < bound if inclusive else value <= bound):
            raise ConfigError(f"{key}={value} must be {'>=' if inclusive else '>'} {bound}")


def _numbers(tree: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every number in a nested dict (list items as key[i])."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}" if path else key)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def validate_pretrain(config: PretrainConfig) -> None:
    """Reject a pretraining setting that cannot work before anything is built; raises ConfigError naming the key."""
    check_types(config)
    check_numbers(config)
    # imported here: torch and timm, which the command line loads only once a run starts (`--help` stays quick)
    from .masking import MaskGenerator
    from .models.swinv2 import SWINV2_SIZES, check_divisible_size

    model_cfg, mask_cfg, data_cfg, probe = config.model, config.mask, config.data, config.probe
    if model_cfg.arch not in SWINV2_SIZES:
        raise ConfigError(f"model.arch={model_cfg.arch!r} is not a known size; choose one of {sorted(SWINV2_SIZES)}")
    num_stages = len(model_cfg.depths or SWINV2_SIZES[model_cfg.arch]["depths"])
    try:
        check_divisible_size(model_cfg.img_size, model_cfg.patch_size, num_stages, name="model.img_size")
    except ValueError as error:
        raise ConfigError(f"{error} (model.arch={model_cfg.arch})") from None
    if not isinstance(model_cfg.img_size, int):
        # the pretraining crops, masks and panels are square; non-square sizes are for encoders run on other data
        raise ConfigError(
            f"model.img_size={model_cfg.img_size}: pretraining crops square images; give one int (e.g. "
            f"{min(model_cfg.img_size)}). A non-square size works for building an encoder and for its feature maps "
            "(forward_intermediates), which accept any size the patch size and stages divide"
        )
    check_device(config.run.device)
    _check_training(config)
    if data_cfg.source == DataSource.shards and not data_cfg.urls:
        raise ConfigError("data=shards needs data.urls: the index .json written by `simmim-swin make-shards`")
    if data_cfg.source == DataSource.folder and not data_cfg.root:
        raise ConfigError("data.source=folder needs data.root: the folder of images to pretrain on")
    if data_cfg.source == DataSource.photos and data_cfg.samples_per_epoch < 1:
        raise ConfigError(
            f"data.samples_per_epoch={data_cfg.samples_per_epoch}: source=photos needs the crops per epoch, e.g. 8192"
        )
    if data_cfg.num_images is not None and data_cfg.source not in (DataSource.folder, DataSource.fashion_mnist):
        raise ConfigError(
            f"data.num_images={data_cfg.num_images} picks a subset of a folder or of Fashion-MNIST, not of "
            f"data.source={data_cfg.source}; set data.samples_per_epoch instead, or data.num_images=null"
        )
    check_image_statistics(data_cfg.mean, data_cfg.std, data_cfg.max_image_pixels, model_cfg.in_chans)
    bands = config.logger.panel_bands
    if bands is not None and len(bands) not in (1, 3):
        raise ConfigError(f"logger.panel_bands={list(bands)}: give three bands (red, green, blue) or one")
    if bands is not None and any(b < 0 or b >= model_cfg.in_chans for b in bands):
        raise ConfigError(f"logger.panel_bands={list(bands)} must lie in [0, model.in_chans={model_cfg.in_chans})")
    if probe.enabled and probe.source == ProbeSource.shards and not (probe.train and probe.val):
        raise ConfigError("probe.source=shards needs probe.train and probe.val: labelled shards (make-shards --labels)")
    if probe.enabled and probe.source == ProbeSource.folder and not (probe.root or (probe.train and probe.val)):
        raise ConfigError("probe.source=folder needs probe.root (with train/ and val/) or probe.train and probe.val")
    window = mask_cfg.norm_target_window
    if mask_cfg.norm_target and (window < 3 or window % 2 == 0):
        raise ConfigError(f"mask.norm_target_window={window} must be odd and >= 3 (47 in SwinV2)")
    try:
        MaskGenerator(
            input_size=model_cfg.img_size,
            mask_patch_size=mask_cfg.mask_patch_size,
            model_patch_size=model_cfg.patch_size,
            mask_ratio=mask_cfg.mask_ratio,
        )
    except ValueError as e:
        raise ConfigError(f"mask: {e}") from e


def check_image_statistics(
    mean: list[float] | None, std: list[float] | None, max_image_pixels: int | None, in_chans: int | None
) -> None:
    """data.mean / data.std: both or neither, one value per channel, std > 0; required unless 8-bit RGB."""
    if (mean is None) != (std is None):
        raise ConfigError("data.mean and data.std go together: set both (`simmim-swin stats PATH` prints them)")
    if mean is None and in_chans is not None and in_chans != 3:
        raise ConfigError(
            f"model.in_chans={in_chans} needs data.mean and data.std (one value per channel, in the files' "
            "units): run `simmim-swin stats PATH` and pass the override line it prints"
        )
    if mean is not None and (len(mean) != len(std) or (in_chans is not None and len(mean) != in_chans)):
        raise ConfigError(
            f"data.mean has {len(mean)} values and data.std {len(std)}; give one per channel "
            f"(model.in_chans={in_chans})"
        )
    if mean is not None and not all(math.isfinite(s) and s > 0 for s in std):
        raise ConfigError(f"data.std={list(std)} must be positive, one value per channel")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels={max_image_pixels} must be >= 1 (or null for no limit)")


def validate_finetune(config: FinetuneConfig) -> None:
    """Reject fine-tuning settings that cannot work before anything is loaded; raises ConfigError naming the key."""
    check_types(config)
    check_numbers(config)
    check_device(config.run.device)
    train, data, augment = config.train, config.data, config.augment
    if data.source == LabelledSource.folder and not data.root:
        raise ConfigError("data.source=folder needs data.root: a folder of class sub-folders (or with train/ and val/)")
    if not 0.0 < data.crop_pct <= 1.0:
        raise ConfigError(f"data.crop_pct={data.crop_pct} must lie in (0, 1]; 0.875 is the 224-of-256 protocol")
    check_image_statistics(data.mean, data.std, data.max_image_pixels, config.model.in_chans)
    if config.evaluate:  # an evaluation trains nothing: the batch, augmentation, schedule and EMA checks do not apply
        return
    if len(augment.crop_scale) != 2 or not 0.0 < augment.crop_scale[0] <= augment.crop_scale[1] <= 1.0:
        raise ConfigError(f"augment.crop_scale={augment.crop_scale} must be [min, max] with 0 < min <= max <= 1")
    if augment.rand_augment:
        from timm.data import create_transform  # timm's parser is the only full definition of the policy strings

        try:
            create_transform(32, is_training=True, auto_augment=str(augment.rand_augment))
        except (AssertionError, KeyError, ValueError, IndexError) as e:
            raise ConfigError(
                f"augment.rand_augment={augment.rand_augment!r} is not a timm augmentation policy "
                f"({type(e).__name__}: {e}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3, original, or null for none"
            ) from None
    mixing = (augment.mixup > 0 or augment.cutmix > 0) and augment.mixup_prob > 0
    if mixing and data.batch_size % 2:
        raise ConfigError(f"mixup / cutmix pair images within a batch: data.batch_size={data.batch_size} must be even")
    if not 0.0 < train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={train.ema_decay} must lie in (0, 1), e.g. 0.9998")
    if not 0.0 < train.layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay={train.layer_decay} must lie in (0, 1]; 1.0 turns layer decay off")
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must lie in [0, 1), e.g. 0.2 (0: no held-out part)")
    _check_training(config)
    if data.val_fraction > 0 and config.run.parallel == Parallel.fsdp:
        # best.pt is scored at the end by loading it into the model, which FSDP holds sharded
        raise ConfigError("data.val_fraction > 0 does not work with run.parallel=fsdp; use run.parallel=ddp")
    if train.ema and config.run.parallel == Parallel.fsdp:
        # the EMA copy would need the sharded weights gathered every step, which defeats FSDP
        raise ConfigError(
            "train.ema=true does not work with run.parallel=fsdp; use run.parallel=ddp or train.ema=false"
        )


# Hydra structured configs, stored at import so that any compose of conf/ (the command line, tests, notebooks) finds
# them: conf/pretrain.yaml and conf/finetune.yaml start their defaults lists with these
ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)
