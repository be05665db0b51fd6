"""run_finetune(config): fine-tune a (SimMIM-)pretrained SwinV2 classifier at a new size and window (SPEC section 3),
and evaluate_transfer(config): evaluate a fine-tuned classifier at another size and window without training.

The classifier is built at the new image size and window with pretrained_window_sizes = the windows each stage
used in pretraining, so the continuous position bias transfers (simmim_swin.transfer). Training: AdamW with
layer-wise lr decay and the pretraining weight-decay exclusions, warm-up + cosine per step, drop path, timm's
RandAugment / random erasing / mixup / cutmix / label smoothing, gradient clipping, optional weight EMA;
top-1 / top-5 every eval_every epochs, best and last checkpoints, metrics.jsonl (+ wandb), automatic resume.
One process or many (torchrun / Slurm / submitit; DDP or FSDP), with the same fault handling as pretraining:
SIGTERM saves and exits, non-finite steps are skipped, evaluation is sharded over ranks and summed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import (
    CHECKPOINT_DIR,
    check_total_batch,
    find_latest_checkpoint,
    read_resume_meta,
    restore_training_state,
    save_checkpoint,
    save_training_state,
)
from .config import (
    AugmentConfig,
    ConfigError,
    FinetuneConfig,
    FinetuneModelConfig,
    OptimConfig,
    check_run_config,
    from_dict,
    to_dict,
)
from .data.classification import build_train_dataset, build_val_dataset
from .data.loader import EvalShard, build_pretrain_loader
from .data.transforms import normalize_images
from .distributed import (
    DistInfo,
    Preempted,
    StopSignal,
    full_model_state_dict,
    process_group,
    wrap_model,
)
from .engine import StepStats, TrainingDiverged, evaluate_classifier, train_step
from .optim import NO_WEIGHT_DECAY_PATTERNS, build_scheduler, scaled_lrs
from .precision import build_grad_scaler, resolve_device, resolve_precision
from .tracking import MetricsLogger, ProgressPrinter, lr_metrics
from .transfer import build_classifier, load_pretrained, reinit_cpb_mlp, resolve_model_config

BEST_CHECKPOINT = "best.pt"


# ----------------------------------------------------------------------------------------------------------------
# layer-wise lr decay


def layer_id(name: str, depths: Sequence[int]) -> int:
    """SPEC section 3 layer id of a parameter of our (timm) layout; `module.` / `encoder.` prefixes are ignored.

    Patch embedding 0; block j of stage i -> sum(depths[:i]) + j + 1; a stage's patch merging shares the id of
    that stage's last block (timm keeps the merging after stage i as layers.{i+1}.downsample, so that one gets
    sum(depths[:i+1])); everything else (final norm, head, absolute position embedding) the top id sum(depths) + 1.
    """
    name = re.sub(r"^(?:module\.|_orig_mod\.|encoder\.)+", "", name)
    if name.startswith("patch_embed."):
        return 0
    if match := re.match(r"layers\.(\d+)\.(?:blocks|extra_norms)\.(\d+)\.", name):
        stage, block = int(match.group(1)), int(match.group(2))
        return sum(depths[:stage]) + block + 1
    if match := re.match(r"layers\.(\d+)\.downsample\.", name):
        return sum(depths[: int(match.group(1))])
    return sum(depths) + 1


def layer_decay_param_groups(
    model: nn.Module,
    depths: Sequence[int],
    weight_decay: float,
    layer_decay: float,
    no_weight_decay_patterns: Sequence[str] = NO_WEIGHT_DECAY_PATTERNS,
) -> list[dict[str, Any]]:
    """AdamW groups per (layer id, decay or not) with lr_scale = layer_decay^(num_layers - 1 - id).

    num_layers = sum(depths) + 2. No weight decay for 1-D parameters, biases and the pretraining exclusions
    (optim.NO_WEIGHT_DECAY_PATTERNS: position embedding, mask token, cpb_mlp, logit_scale), as timm's
    param_groups_weight_decay decides it. timm's scheduler multiplies each group's lr by its lr_scale.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"train.layer_decay={layer_decay} must lie in (0, 1]; 1.0 turns layer decay off")
    num_layers = sum(depths) + 2
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (
            param.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatch(name, pattern) for pattern in no_weight_decay_patterns)
        )
        lid = layer_id(name, depths)
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - 1 - lid),
                "layer_id": lid,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_finetune_optimizer(
    model: nn.Module, depths: Sequence[int], optim_cfg: OptimConfig, layer_decay: float, lr: float
) -> torch.optim.Optimizer:
    """timm's AdamW over the layer-decay groups; the fused kernel unless optim.fused is false (as pretraining)."""
    if len(optim_cfg.betas) != 2:
        raise ValueError(f"optim.betas must have two values (beta1, beta2), got {optim_cfg.betas}")
    groups = layer_decay_param_groups(model, depths, optim_cfg.weight_decay, layer_decay)
    return create_optimizer_v2(
        groups,
        opt="adamw",
        lr=lr,
        weight_decay=optim_cfg.weight_decay,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        fused=optim_cfg.fused is not False,
    )


# ----------------------------------------------------------------------------------------------------------------
# training


def build_mixup_and_loss(augment: AugmentConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup/CutMix with SoftTargetCrossEntropy (smoothing inside the soft targets), or a plain CE loss."""
    if augment.mixup_mode not in ("batch", "pair", "elem"):
        raise ConfigError(f"augment.mixup_mode={augment.mixup_mode!r} is unknown; use batch, pair or elem")
    if (augment.mixup > 0 or augment.cutmix > 0) and augment.mixup_prob > 0:
        mixup = Mixup(
            mixup_alpha=augment.mixup,
            cutmix_alpha=augment.cutmix,
            prob=augment.mixup_prob,
            switch_prob=augment.mixup_switch_prob,
            mode=augment.mixup_mode,
            label_smoothing=augment.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if augment.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=augment.label_smoothing)
    return None, nn.CrossEntropyLoss()


def validate_config(config: FinetuneConfig) -> None:
    """Reject settings that cannot work before anything is loaded."""
    train, data = config.train, config.data
    if data.batch_size < 1 or data.eval_batch_size < 1 or config.optim.accum_steps < 1:
        raise ConfigError(
            f"data.batch_size={data.batch_size}, data.eval_batch_size={data.eval_batch_size} and "
            f"optim.accum_steps={config.optim.accum_steps} must be >= 1"
        )
    mixing = (config.augment.mixup > 0 or config.augment.cutmix > 0) and config.augment.mixup_prob > 0
    if mixing and data.batch_size % 2:
        raise ConfigError(f"mixup / cutmix pair images within a batch: data.batch_size={data.batch_size} must be even")
    if not 0.0 < train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={train.ema_decay} must lie in (0, 1), e.g. 0.9998")
    if train.eval_every < 1 or config.logger.log_every < 1:
        raise ConfigError("train.eval_every and logger.log_every must be >= 1")
    check_run_config(config.run)
    if train.ema and config.run.parallel == "fsdp":
        # the EMA copy would need the sharded weights gathered every step, which defeats FSDP
        raise ConfigError(
            "train.ema=true does not work with run.parallel=fsdp; use run.parallel=ddp or train.ema=false"
        )


def _check_resumable(saved: dict[str, Any], state: dict[str, Any], config: dict[str, Any], classes: list[str]) -> None:
    changed = sorted(k for k in config["model"] if saved["model"].get(k) != config["model"][k])
    if changed or state.get("class_names") != classes:
        diffs = ", ".join(f"model.{k}: {saved['model'].get(k)!r} -> {config['model'][k]!r}" for k in changed)
        raise ConfigError(
            f"the run directory holds a fine-tune with a different model or classes ({diffs or 'class names'}); "
            "resume with the same settings or start a new run with run.name=<new name>"
        )


def _restore_ema(ema: ModelEmaV3 | None, model: nn.Module, state: dict[str, Any]) -> None:
    """The EMA weights of a checkpoint; one without them (EMA switched on at resume) starts at the loaded weights."""
    if ema is not None:
        ema.module.load_state_dict(state["ema"]) if state.get("ema") else ema.set(model)


def run_finetune(config: FinetuneConfig) -> Path:
    """Fine-tune as configured; resumes from the latest checkpoint in the run directory. Returns the run dir.

    Runs in one process or in every process of a torchrun / Slurm / submitit job (DDP or FSDP, run.parallel).
    Raises Preempted after saving when SIGTERM arrives, and TrainingDiverged after run.max_consecutive_skips
    non-finite steps in a row.
    """
    validate_config(config)
    with process_group(resolve_device(config.run.device)) as (device, info, stop):
        return _finetune(config, device, info, stop)


def _finetune(config: FinetuneConfig, device: torch.device, info: DistInfo, stop: StopSignal) -> Path:
    precision = resolve_precision(config.run.precision, device)
    run_dir = Path(config.run.output_dir) / config.run.name
    torch.manual_seed(config.run.seed)  # the same initial weights (head, re-initialised CPB MLPs) on every rank

    pretrained = load_pretrained(config.pretrained, config.pretrained_format) if config.pretrained else None
    model_cfg = resolve_model_config(config.model, pretrained)
    config = dataclasses.replace(config, model=from_dict(FinetuneModelConfig, to_dict(model_cfg)))  # as saved
    train_set, classes = build_train_dataset(config.data, model_cfg.img_size, config.augment)
    val_set, _ = build_val_dataset(config.data, model_cfg.img_size, config.augment.interpolation)
    latest = find_latest_checkpoint(run_dir)
    model = build_classifier(model_cfg, len(classes), pretrained if latest is None else None, verbose=info.is_main)
    if config.train.reinit_cpb_mlp and latest is None:
        reinitialised = reinit_cpb_mlp(model, seed=config.run.seed)
        if info.is_main:
            print(f"re-initialised {len(reinitialised)} CPB MLPs (ablation)", flush=True)
    model.to(device)
    ema = ModelEmaV3(model, decay=config.train.ema_decay) if config.train.ema else None  # a plain copy, unwrapped
    random_seed(config.run.seed, info.rank)  # each rank its own drop path and mixup draws (numpy's global RNG)

    micro_batch, accum = config.data.batch_size, config.optim.accum_steps
    # each rank takes every world_size-th image of one shuffled order: the per-rank share sets the epoch length
    steps_per_epoch = len(train_set) // info.world_size // (micro_batch * accum)
    total_batch = micro_batch * accum * info.world_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"one optimizer step needs data.batch_size * optim.accum_steps * processes = {total_batch} labelled "
            f"images but there are {len(train_set)}; lower the batch size or label more images"
        )
    lr, warmup_lr, min_lr = scaled_lrs(config.optim, total_batch)
    # FSDP shards the parameters in place, so it comes before the optimizer is built over them
    wrapped = wrap_model(model, info, device, config.run.parallel)
    sharded = config.run.parallel == "fsdp" and info.distributed
    optimizer = build_finetune_optimizer(model, model_cfg.depths, config.optim, config.train.layer_decay, lr)
    scheduler = build_scheduler(optimizer, config.schedule, steps_per_epoch, warmup_lr, min_lr)
    scaler = build_grad_scaler(precision, device)
    mixup, criterion = build_mixup_and_loss(config.augment, len(classes))
    total_steps = config.schedule.epochs * steps_per_epoch
    stop_step = min(total_steps, config.run.max_steps) if config.run.max_steps is not None else total_steps
    config_dict = to_dict(config)

    step, best_top1, wandb_run_id, state = 0, -1.0, None, {}
    if latest is not None:
        state = read_resume_meta(latest)
        _check_resumable(state["config"], state, config_dict, classes)
        check_total_batch(state, total_batch, latest, info.world_size * accum)
        restore_training_state(latest, state, model, optimizer, scaler, info.rank, sharded)
        _restore_ema(ema, model, state)
        step, best_top1, wandb_run_id = state["step"], state["best_top1"], state.get("wandb_run_id")
        if info.is_main:
            print(f"resuming {run_dir} from {latest.name} at step {step}", flush=True)

    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    logger = MetricsLogger(
        run_dir, config.logger, config_dict, run_id=wandb_run_id, enabled=info.is_main, run_name=config.run.name
    )
    progress = ProgressPrinter(total_steps=stop_step, start_step=step, steps_per_epoch=steps_per_epoch)
    val_loader = DataLoader(
        EvalShard(val_set, info.rank, info.world_size),  # every rank a disjoint share; counts summed over ranks
        batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        pin_memory=config.data.pin_memory and device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
    )
    if info.is_main:
        print(
            f"fine-tuning {model_cfg.arch} at {model_cfg.img_size}px / window {model_cfg.window_size} (stage windows "
            f"{model.stage_window_sizes}) on {info.world_size} x {device} ({precision}, "
            f"{config.run.parallel if info.distributed else 'one process'}): {len(train_set)} images of "
            f"{len(classes)} classes, {steps_per_epoch} steps/epoch, total batch {total_batch}, lr {lr:.3g}; "
            f"run dir {run_dir}",
            flush=True,
        )

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, targets = normalize_images(batch[0]), batch[1]
        if mixup is not None:
            images, targets = mixup(images, targets)  # soft targets (B, classes), label smoothing included
        return criterion(model(images), targets)

    def checkpoint_meta(step: int) -> dict[str, Any]:
        # everything but the weights and the optimizer: what identifies the model and the run
        return {
            "step": step,
            "config": config_dict,
            "stage_window_sizes": model.stage_window_sizes,
            "pretrained_window_sizes": list(model.pretrained_window_sizes),
            "num_classes": len(classes),
            "class_names": classes,
            "best_top1": best_top1,
        }

    def save(step: int) -> None:
        meta = {
            **checkpoint_meta(step),
            "ema": ema.module.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "wandb_run_id": logger.run_id,
            "total_batch": total_batch,
            **stats.counts(),
        }
        save_training_state(run_dir, step, model, optimizer, meta, config.run.keep_last, info, sharded)

    def save_best(step: int) -> None:
        weights = full_model_state_dict(model, sharded)  # every rank joins the gather under FSDP
        if info.is_main:
            ema_weights = ema.module.state_dict() if ema is not None else None
            state = {"model": weights, "ema": ema_weights, **checkpoint_meta(step)}
            save_checkpoint(run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT, state)

    def evaluate(step: int, final: bool) -> None:
        nonlocal best_top1
        result = evaluate_classifier(model, val_loader, precision, device, confusion=final, info=info)
        confusion = result.pop("confusion", None)
        metrics = {f"val_{k}": v for k, v in result.items()}
        if ema is not None:
            ema_metrics = evaluate_classifier(ema.module, val_loader, precision, device, info=info)
            metrics.update({f"ema_val_{k}": v for k, v in ema_metrics.items() if k != "num_images"})
        if metrics["val_top1"] > best_top1:  # the same on every rank: the counts were summed over ranks
            best_top1 = metrics["val_top1"]
            save_best(step)
        logger.update_best(step, "best_val_top1", metrics["val_top1"], mode="max")
        metrics.update(best_top1=best_top1, epoch=step / steps_per_epoch)
        logger.log(step, metrics)
        if info.is_main:
            progress.update(step, {k: v for k, v in metrics.items() if k != "val_num_images"})
        if confusion is not None and info.is_main:
            from .viz import save_confusion_matrix  # matplotlib: only for the final picture

            path = save_confusion_matrix(confusion, classes, run_dir / "images" / "confusion_matrix.png")
            logger.log_image(step, "confusion_matrix", path)
        if final:
            logger.log_summary({"final_val_top1": metrics["val_top1"], "final_val_top5": metrics["val_top5"]})

    step_model = torch.compile(wrapped) if config.run.compile else wrapped  # checkpoints save `model`: no _orig_mod.
    stats = StepStats(device, state.get("skipped_steps", 0), state.get("consecutive_skips", 0))
    # the divergence check reads a device counter: every step on the CPU, where a read is free
    check_every = 1 if device.type == "cpu" else config.logger.log_every
    last_log_time, images_since_log = time.perf_counter(), 0
    model.train()
    try:
        while step < stop_step:
            epoch = step // steps_per_epoch
            loader = build_pretrain_loader(
                train_set,
                batch_size=micro_batch,
                num_workers=config.data.num_workers,
                seed=config.run.seed,
                epoch=epoch,
                pin_memory=config.data.pin_memory and device.type == "cuda",
                rank=info.rank,
                world_size=info.world_size,
                skip_batches=(step % steps_per_epoch) * accum,  # a resumed run continues the epoch where it stopped
            )
            batches = iter(loader)
            while step < stop_step and step // steps_per_epoch == epoch:
                micro_batches = [next(batches) for _ in range(accum)]
                scheduler.step_update(step)  # the lr is a function of the optimizer step
                loss, grad_norm, skipped = train_step(
                    step_model, micro_batches, loss_fn, optimizer, scaler, precision, device, config.optim.clip_grad
                )
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
                stats.update(loss, skipped)
                images_since_log += total_batch
                num_skipped_in_a_row = stats.in_a_row() if step % check_every == 0 else 0

                if step % config.logger.log_every == 0 or step == stop_step:
                    now = time.perf_counter()  # mean_loss syncs the device: only here, every log_every steps
                    metrics = {
                        "loss": stats.mean_loss(info),
                        **lr_metrics(optimizer),  # lr: the largest (the head's, lr_scale 1); lr/groupN per layer group
                        "grad_norm": float(grad_norm),
                        "images_per_sec": images_since_log / max(now - last_log_time, 1e-9),
                        "epoch": step / steps_per_epoch,
                        "skipped_steps": int(stats.skipped_total),
                    }
                    logger.log(step, metrics)
                    if info.is_main:
                        progress.update(step, {k: v for k, v in metrics.items() if not k.startswith("lr/")})
                    images_since_log, last_log_time = 0, now
                if num_skipped_in_a_row >= config.run.max_consecutive_skips:
                    raise TrainingDiverged(num_skipped_in_a_row, step, run_dir / CHECKPOINT_DIR)
                epoch_done = step % steps_per_epoch == 0
                if (epoch_done and (step // steps_per_epoch) % config.train.eval_every == 0) or step == stop_step:
                    evaluate(step, final=step == total_steps)
                # a skipped step is not saved on schedule: the last good checkpoint stays the newest
                saved = (step % config.run.save_every == 0 or epoch_done or step == stop_step) and stats.in_a_row() == 0
                if saved:
                    save(step)
                if stop.should_stop():
                    if not saved:
                        save(step)
                    raise Preempted(step, stop.name)
    finally:
        progress.close()
        logger.close()
    if info.is_main:
        print(f"done at step {step}/{total_steps}. best top-1 {best_top1:.2f}%; run dir {run_dir}", flush=True)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# resolution transfer without training


def evaluate_transfer(config: FinetuneConfig) -> dict[str, Any]:
    """Evaluate the fine-tuned classifier `config.evaluate` at model.img_size / model.window_size, no training.

    The model is rebuilt at the new size and window with the CPB normalised as in its training (the SwinV2
    paper's direct transfer to larger images and windows). Writes evaluation.json into the run directory.
    Under a multi-process launch every rank evaluates a share of the images and rank 0 writes the result.
    """
    if not config.evaluate:
        raise ConfigError("evaluate is not set: give the fine-tuned run directory or checkpoint to evaluate")
    with process_group(resolve_device(config.run.device)) as (device, info, _):
        return _evaluate_transfer(config, device, info)


def _evaluate_transfer(config: FinetuneConfig, device: torch.device, info: DistInfo) -> dict[str, Any]:
    precision = resolve_precision(config.run.precision, device)
    weights = load_pretrained(config.evaluate, config.pretrained_format)
    if "head.fc.weight" not in weights.state_dict:
        raise ValueError(f"{weights.path} has no classifier head (head.fc.weight): evaluate a fine-tuned checkpoint")
    model_cfg = resolve_model_config(config.model, weights)
    val_set, classes = build_val_dataset(config.data, model_cfg.img_size, config.augment.interpolation)
    num_classes = weights.state_dict["head.fc.weight"].shape[0]
    if num_classes != len(classes):
        raise ValueError(f"{weights.path} classifies {num_classes} classes but the data has {len(classes)}")
    model = build_classifier(model_cfg, num_classes, weights, keep_head=True, verbose=info.is_main).to(device)
    loader = DataLoader(
        EvalShard(val_set, info.rank, info.world_size),
        batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
    )
    metrics = evaluate_classifier(model, loader, precision, device, info=info)
    trained = weights.model_config or {}
    result = {
        "checkpoint": str(weights.path),
        "trained_img_size": trained.get("img_size"),
        "trained_window_size": trained.get("window_size"),
        "img_size": model_cfg.img_size,
        "window_size": model_cfg.window_size,
        "stage_window_sizes": model.stage_window_sizes,
        "pretrained_window_sizes": list(model.pretrained_window_sizes),
        **metrics,
    }
    if not info.is_main:
        return result
    run_dir = Path(config.run.output_dir) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    print(
        f"{weights.path} (trained at {result['trained_img_size']}px / window {result['trained_window_size']}) "
        f"evaluated at {model_cfg.img_size}px / window {model_cfg.window_size}: top-1 {metrics['top1']:.2f}%, "
        f"top-5 {metrics['top5']:.2f}% on {metrics['num_images']} images",
        flush=True,
    )
    return result
