"""run_pretrain(config): build everything, train, log, save, and resume a SimMIM run from its run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import capture_rng_state, find_latest_checkpoint, load_checkpoint, restore_rng_state, save_and_prune
from .config import ConfigError, PretrainConfig, to_dict
from .data import build_pretrain_dataset, build_pretrain_loader, make_fixed_batch
from .engine import simmim_loss, train_step
from .masking import MaskGenerator
from .models import SimMIM, build_simmim
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .panel import save_reconstruction_panel
from .precision import autocast_context, build_grad_scaler, resolve_device, resolve_precision
from .tracking import MetricsLogger, ProgressPrinter

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
    if config.logger.log_every < 1 or config.run.save_every < 1 or config.logger.image_every < 1:
        raise ConfigError("logger.log_every, logger.image_every and run.save_every must be >= 1")
    try:
        return MaskGenerator(
            input_size=model_cfg.img_size,
            mask_patch_size=mask_cfg.mask_patch_size,
            model_patch_size=model_cfg.patch_size,
            mask_ratio=mask_cfg.mask_ratio,
        )
    except ValueError as e:
        raise ConfigError(f"mask: {e}") from e


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
def write_panel(model: SimMIM, batch: tuple[torch.Tensor, torch.Tensor], path: Path, precision: str) -> Path:
    """Reconstruct the fixed panel images and save original | masked | reconstruction as a PNG."""
    images, masks = batch
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with autocast_context(precision, device):
        _, reconstruction = model(images.to(device), masks.to(device))
    reconstruction = model.target_to_image(images.to(device), reconstruction).cpu()
    model.train(was_training)
    return save_reconstruction_panel(path, images, masks, reconstruction, patch_size=model.patch_size)


def run_pretrain(config: PretrainConfig) -> Path:
    """Train SimMIM as configured; resumes from the latest checkpoint in the run directory. Returns the run dir."""
    mask_generator = validate_config(config)
    device = resolve_device(config.run.device)
    precision = resolve_precision(config.run.precision, device)
    run_dir = Path(config.run.output_dir) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.run.seed)

    model = build_simmim(config.model, config.mask).to(device)
    dataset = build_pretrain_dataset(config.data, config.model.img_size, mask_generator)
    micro_batch, accum = config.data.batch_size, config.optim.accum_steps
    steps_per_epoch = len(dataset) // (micro_batch * accum)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"one optimizer step needs data.batch_size * optim.accum_steps = {micro_batch * accum} images but the "
            f"dataset has {len(dataset)}; lower the batch size or use more data"
        )
    total_batch = micro_batch * accum  # x world size once runs are distributed
    lr, warmup_lr, min_lr = scaled_lrs(config.optim, total_batch)
    optimizer = build_optimizer(model, config.optim, lr)
    scheduler = build_scheduler(optimizer, config.schedule, steps_per_epoch, warmup_lr, min_lr)
    scaler = build_grad_scaler(precision, device)
    total_steps = config.schedule.epochs * steps_per_epoch
    stop_step = min(total_steps, config.run.max_steps) if config.run.max_steps is not None else total_steps

    step, wandb_run_id = 0, None
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        state = load_checkpoint(latest)
        _check_resumable(state["config"], config, latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        step, wandb_run_id = state["step"], state.get("wandb_run_id")
        print(f"resuming {run_dir} from {latest.name} at step {step}", flush=True)

    config_dict = to_dict(config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    logger = MetricsLogger(run_dir, config.logger, config_dict, run_id=wandb_run_id)
    progress = ProgressPrinter(total_steps=stop_step, start_step=step, steps_per_epoch=steps_per_epoch)
    panel_batch = make_fixed_batch(
        dataset, config.logger.num_images, config.model.img_size, mask_generator, seed=config.run.seed
    )
    step_model = torch.compile(model) if config.run.compile else model
    print(
        f"pretraining {config.model.arch} at {config.model.img_size}px on {device} ({precision}): "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {steps_per_epoch} steps/epoch, "
        f"total batch {total_batch}, lr {lr:.3g}; run dir {run_dir}",
        flush=True,
    )

    def save(step: int) -> None:
        state = {
            "model": model.state_dict(),  # the uncompiled module: no _orig_mod. prefixes
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "config": config_dict,
            "stage_window_sizes": model.encoder.stage_window_sizes,
            "rng": capture_rng_state(),
            "wandb_run_id": logger.run_id,
        }
        save_and_prune(run_dir, step, state, keep_last=config.run.keep_last)

    panel_path = None
    loss_sum, logged_steps = torch.zeros((), device=device), 0
    last_log_time, images_since_log = time.perf_counter(), 0
    model.train()
    while step < stop_step:
        epoch = step // steps_per_epoch
        loader = build_pretrain_loader(
            dataset,
            batch_size=micro_batch,
            num_workers=config.data.num_workers,
            seed=config.run.seed,
            epoch=epoch,
            pin_memory=config.data.pin_memory and device.type == "cuda",
            # a resumed run continues this epoch where it stopped, without loading the batches it already saw
            skip_batches=(step % steps_per_epoch) * accum,
        )
        batches = iter(loader)
        while step < stop_step and step // steps_per_epoch == epoch:
            micro_batches = [next(batches) for _ in range(accum)]
            scheduler.step_update(step)  # the lr is a function of the optimizer step
            loss, grad_norm = train_step(
                step_model, micro_batches, simmim_loss, optimizer, scaler, precision, device, config.optim.clip_grad
            )
            step += 1
            loss_sum += loss
            logged_steps += 1
            images_since_log += total_batch

            if step % config.logger.log_every == 0 or step == stop_step:
                now = time.perf_counter()  # .item() below syncs the device: only here, every log_every steps
                metrics = {
                    "loss": loss_sum.item() / logged_steps,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "images_per_sec": images_since_log / max(now - last_log_time, 1e-9),
                    "epoch": step / steps_per_epoch,
                }
                logger.log(step, metrics)
                progress.update(step, metrics)
                loss_sum.zero_()
                logged_steps, images_since_log, last_log_time = 0, 0, now
            if step % config.logger.image_every == 0 or step == stop_step:
                panel_path = write_panel(model, panel_batch, run_dir / "images" / f"recon_{step:08d}.png", precision)
                logger.log_image(step, "reconstruction", panel_path)
            if step % config.run.save_every == 0 or step == stop_step:
                save(step)

    if panel_path is None:  # nothing left to train: still show where the run stands
        panel_path = write_panel(model, panel_batch, run_dir / "images" / f"recon_{step:08d}.png", precision)
    logger.close()
    print(f"done at step {step}/{total_steps}. reconstructions: {panel_path}", flush=True)
    return run_dir
