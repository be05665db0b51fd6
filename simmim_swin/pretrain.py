"""run_pretrain(config): build everything, train, log, save, and resume a SimMIM run from its run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import (
    CHECKPOINT_DIR,
    check_total_batch,
    find_latest_checkpoint,
    read_resume_meta,
    restore_training_state,
    save_training_state,
)
from .config import ConfigError, PretrainConfig, check_run_config, to_dict
from .data import DATA_SOURCES, build_pretrain_data, make_fixed_batch, normalize_images
from .distributed import (
    DistInfo,
    Preempted,
    StopSignal,
    all_reduce_mean,
    process_group,
    wrap_model,
)
from .engine import StepStats, TrainingDiverged, evaluate_reconstruction, simmim_loss, train_step
from .masking import MaskGenerator
from .models import SimMIM, build_simmim
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .panel import save_reconstruction_panel
from .precision import autocast_context, build_grad_scaler, resolve_device, resolve_precision
from .tracking import MetricsLogger, ProgressPrinter, StepTimer, lr_metrics, system_metrics
from .viz import make_position_bias_maps, save_position_bias_figure

# parts of the config that must match a checkpoint for it to be resumed into this run
RESUME_MUST_MATCH = ("model", "mask")


def validate_config(config: PretrainConfig) -> MaskGenerator:
    """Reject inconsistent settings before anything is built; returns the run's mask generator."""
    model_cfg, mask_cfg = config.model, config.mask
    from .models.swinv2 import SWINV2_SIZES

    if model_cfg.arch not in SWINV2_SIZES:
        raise ConfigError(f"model.arch={model_cfg.arch!r} is not a known size; choose one of {sorted(SWINV2_SIZES)}")
    num_stages = len(model_cfg.depths or SWINV2_SIZES[model_cfg.arch]["depths"])
    reduction = model_cfg.patch_size * 2 ** (num_stages - 1)
    if model_cfg.img_size % reduction:
        suggestion = max(1, round(model_cfg.img_size / reduction)) * reduction
        raise ConfigError(
            f"model.img_size={model_cfg.img_size} must be divisible by patch_size * 2**(stages-1) = {reduction} "
            f"for model.arch={model_cfg.arch}; try model.img_size={suggestion}"
        )
    if config.data.batch_size < 1 or config.optim.accum_steps < 1:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} and optim.accum_steps={config.optim.accum_steps} must be >= 1"
        )
    if config.logger.log_every < 1 or config.logger.image_every < 1:
        raise ConfigError("logger.log_every and logger.image_every must be >= 1")
    check_run_config(config.run)
    _validate_data(config)
    try:
        return MaskGenerator(
            input_size=model_cfg.img_size,
            mask_patch_size=mask_cfg.mask_patch_size,
            model_patch_size=model_cfg.patch_size,
            mask_ratio=mask_cfg.mask_ratio,
        )
    except ValueError as e:
        raise ConfigError(f"mask: {e}") from e


def _validate_data(config: PretrainConfig) -> None:
    """The data settings that can be checked without reading any data."""
    data_cfg = config.data
    if data_cfg.source not in DATA_SOURCES:
        raise ConfigError(f"data.source={data_cfg.source!r} is not one of {list(DATA_SOURCES)}")
    if data_cfg.source == "shards" and not data_cfg.urls:
        raise ConfigError("data=shards needs data.urls: the index .json written by `simmim-swin make-shards`")
    if data_cfg.num_workers < 0 or data_cfg.shuffle_buffer < 0 or data_cfg.val_samples < 0:
        raise ConfigError(
            f"data.num_workers={data_cfg.num_workers}, data.shuffle_buffer={data_cfg.shuffle_buffer} and "
            f"data.val_samples={data_cfg.val_samples} must be >= 0"
        )
    if not 0.0 <= data_cfg.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={data_cfg.max_bad_fraction} must lie in [0, 1], e.g. 0.01")
    if config.logger.val_every < 1:
        raise ConfigError(f"logger.val_every={config.logger.val_every} must be >= 1")


def simmim_loss_uint8(model: SimMIM, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """simmim_loss on a batch whose images are still uint8: normalised here, on the device."""
    return simmim_loss(model, (normalize_images(batch[0]), *batch[1:]))


def _check_resumable(saved: dict[str, Any], config: PretrainConfig, path: Path) -> None:
    current = to_dict(config)
    for section in RESUME_MUST_MATCH:
        old, new = saved.get(section, {}), current[section]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            diffs = ", ".join(f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{path} was written by a run with different settings ({diffs}); resume with the same settings "
                "or start a new run with run.name=<new name>"
            )


@torch.no_grad()
def write_panel(
    model: SimMIM, batch: tuple[torch.Tensor, torch.Tensor], path: Path, precision: str, write: bool = True
) -> Path:
    """Reconstruct the fixed panel images and save original | masked | reconstruction as a PNG (if `write`)."""
    images, masks = batch
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with autocast_context(precision, device):
        _, reconstruction = model(images.to(device), masks.to(device))
    reconstruction = model.target_to_image(images.to(device), reconstruction).cpu()
    model.train(was_training)
    if not write:
        return path
    return save_reconstruction_panel(path, images, masks, reconstruction, patch_size=model.patch_size)


def run_pretrain(config: PretrainConfig) -> Path:
    """Train SimMIM as configured; resumes from the latest checkpoint in the run directory. Returns the run dir.

    Raises Preempted after saving when SIGTERM arrives, and TrainingDiverged after run.max_consecutive_skips
    non-finite steps in a row.
    """
    mask_generator = validate_config(config)
    with process_group(resolve_device(config.run.device)) as (device, info, stop_signal):
        return _train(config, mask_generator, device, info, stop_signal)


def _train(
    config: PretrainConfig, mask_generator: MaskGenerator, device: torch.device, info: DistInfo, stop: StopSignal
) -> Path:
    precision = resolve_precision(config.run.precision, device)
    run_dir = Path(config.run.output_dir) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.run.seed)  # the same initial weights on every rank

    model = build_simmim(config.model, config.mask).to(device)
    micro_batch, accum = config.data.batch_size, config.optim.accum_steps
    data = build_pretrain_data(
        config.data,
        config.model.img_size,
        mask_generator,
        seed=config.run.seed,
        accum_steps=accum,
        rank=info.rank,
        world_size=info.world_size,
        pin_memory=config.data.pin_memory and device.type == "cuda",
        num_panel_images=config.logger.num_images,
    )
    steps_per_epoch = data.steps_per_epoch
    total_batch = micro_batch * accum * info.world_size
    lr, warmup_lr, min_lr = scaled_lrs(config.optim, total_batch)
    # FSDP shards the parameters in place, so it comes before the optimizer is built over them
    wrapped = wrap_model(model, info, device, config.run.parallel)
    sharded = config.run.parallel == "fsdp" and info.distributed
    optimizer = build_optimizer(model, config.optim, lr)
    scheduler = build_scheduler(optimizer, config.schedule, steps_per_epoch, warmup_lr, min_lr)
    scaler = build_grad_scaler(precision, device)
    total_steps = config.schedule.epochs * steps_per_epoch
    stop_step = min(total_steps, config.run.max_steps) if config.run.max_steps is not None else total_steps

    step, wandb_run_id, state = 0, None, {}
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        state = read_resume_meta(latest)
        _check_resumable(state["config"], config, latest)
        check_total_batch(state, total_batch, latest, info.world_size * accum)
        restore_training_state(latest, state, model, optimizer, scaler, info.rank, sharded)
        step, wandb_run_id = state["step"], state.get("wandb_run_id")
        if info.is_main:
            print(f"resuming {run_dir} from {latest.name} at step {step}", flush=True)

    config_dict = to_dict(config)
    if info.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    logger = MetricsLogger(
        run_dir, config.logger, config_dict, run_id=wandb_run_id, enabled=info.is_main, run_name=config.run.name
    )
    progress = ProgressPrinter(total_steps=stop_step, start_step=step, steps_per_epoch=steps_per_epoch)
    panel_batch = make_fixed_batch(
        data.panel_source, config.logger.num_images, config.model.img_size, mask_generator, seed=config.run.seed
    )
    step_model = torch.compile(wrapped) if config.run.compile else wrapped
    if info.is_main:
        print(
            f"pretraining {config.model.arch} at {config.model.img_size}px on {info.world_size} x {device} "
            f"({precision}, {config.run.parallel if info.distributed else 'one process'}): "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {steps_per_epoch} steps/epoch, "
            f"total batch {total_batch}, lr {lr:.3g}; data: {data.description}"
            + (f", {sum(len(b[0]) for b in data.val_batches)} validation images" if data.val_batches else "")
            + f"; run dir {run_dir}",
            flush=True,
        )

    def save(step: int) -> None:
        meta = {
            "step": step,
            "config": config_dict,
            "stage_window_sizes": model.encoder.stage_window_sizes,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "wandb_run_id": logger.run_id,
            "total_batch": total_batch,
            **stats.counts(),
        }
        save_training_state(run_dir, step, model, optimizer, meta, config.run.keep_last, info, sharded)

    def save_images(step: int) -> Path | None:
        # under FSDP every rank runs the forward (each holds a shard); rank 0 alone writes
        if not (info.is_main or sharded):
            return None
        panel_file = run_dir / "images" / f"recon_{step:08d}.png"
        panel = write_panel(model, panel_batch, panel_file, precision, write=info.is_main)
        images = {"reconstruction": panel}
        if not sharded and info.is_main:  # the CPB MLPs are sharded under FSDP
            bias_path = run_dir / "images" / f"position_bias_{step:08d}.png"
            images["position_bias"] = save_position_bias_figure(make_position_bias_maps(model), bias_path)
        logger.log_images(step, images)
        return panel

    stats = StepStats(device, state.get("skipped_steps", 0), state.get("consecutive_skips", 0))
    # the divergence check reads a device counter: every step on the CPU, where a read is free
    check_every = 1 if device.type == "cpu" else config.logger.log_every
    panel_path, last_loss = None, float("nan")
    timer = StepTimer()
    model.train()
    # the data position is the step: map-style sources skip to it exactly, shards draw a new order from it
    batches = data.batches(step)
    while step < stop_step:
        with timer.data():
            micro_batches = [next(batches) for _ in range(accum)]
        scheduler.step_update(step)  # the lr is a function of the optimizer step
        loss, grad_norm, skipped = train_step(
            step_model, micro_batches, simmim_loss_uint8, optimizer, scaler, precision, device, config.optim.clip_grad
        )
        step += 1
        stats.update(loss, skipped)
        num_skipped_in_a_row = stats.in_a_row() if step % check_every == 0 else 0

        if step % config.logger.log_every == 0 or step == stop_step:
            last_loss = stats.mean_loss(info)  # syncs the device: only here, every log_every steps
            bad = torch.tensor(float(data.monitor.num_bad), device=device)  # NCCL reduces device tensors only
            metrics = {
                "loss": last_loss,
                **lr_metrics(optimizer),
                "grad_norm": float(grad_norm),
                **timer.pop(images_per_step=total_batch, world_size=info.world_size),
                **system_metrics(device),
                "epoch": step / steps_per_epoch,
                "skipped_steps": int(stats.skipped_total),
                "bad_samples": int(all_reduce_mean(bad, info).item() * info.world_size),
            }
            if data.val_batches and (step % config.logger.val_every == 0 or step == stop_step):
                with timer.exclude():
                    metrics["val_loss"] = evaluate_reconstruction(model, data.val_batches, precision, device)
                logger.update_best(step, "best_val_loss", metrics["val_loss"], mode="min")
            logger.log(step, metrics)
            if info.is_main:
                progress.update(step, metrics)
        elif data.val_batches and step % config.logger.val_every == 0:
            with timer.exclude():
                val_loss = evaluate_reconstruction(model, data.val_batches, precision, device)
            logger.log(step, {"val_loss": val_loss})
            logger.update_best(step, "best_val_loss", val_loss, mode="min")

        if num_skipped_in_a_row >= config.run.max_consecutive_skips:
            progress.close()
            logger.close()
            raise TrainingDiverged(num_skipped_in_a_row, step, run_dir / CHECKPOINT_DIR)
        if step % config.logger.image_every == 0 or step == stop_step:
            with timer.exclude():
                panel_path = save_images(step)
        # a skipped step is not saved on schedule: the last good checkpoint stays the newest
        saved = (step % config.run.save_every == 0 or step == stop_step) and stats.in_a_row() == 0
        if saved:
            with timer.exclude():
                save(step)
        if stop.should_stop():
            if not saved:
                save(step)
            progress.close()
            logger.close()
            raise Preempted(step, stop.name)

    if panel_path is None:  # nothing left to train: still show where the run stands
        panel_path = save_images(step)
    progress.close()
    logger.log_summary({"final_loss": last_loss, "steps": step})
    logger.close()
    if info.is_main:
        print(f"done at step {step}/{total_steps}. reconstructions: {panel_path}", flush=True)
    return run_dir
