"""run_pretrain(config): build everything, train, log, save, and resume a SimMIM run from its run directory."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from .config import PretrainConfig, to_dict, validate_pretrain
from .data import Normalizer, PretrainData, build_pretrain_data, make_fixed_batch, normalize_images
from .distributed import DistInfo, StopSignal, process_group, wrap_model
from .engine import evaluate_reconstruction, train_step
from .masking import MaskGenerator
from .models import SimMIM, build_simmim
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .panel import BandDisplay, build_display, save_reconstruction_panel
from .precision import autocast_context, build_grad_scaler, resolve_device, resolve_precision
from .run import TrainingRun, check_same_settings
from .tracking import check_wandb_credentials
from .viz import make_position_bias_maps, save_position_bias_figure

# parts of the config that must match a checkpoint for it to be resumed into this run
RESUME_MUST_MATCH = ("model", "mask")


@torch.no_grad()
def write_panel(
    model: SimMIM, batch: tuple[torch.Tensor, torch.Tensor], path: Path, precision: str, write: bool = True,
    display: BandDisplay | None = None,
) -> Path:  # fmt: skip
    """Reconstruct the fixed panel images (normalised) and save original | masked | reconstruction as a PNG (if
    `write`); `display` picks and stretches the bands shown (panel.build_display)."""
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
    return save_reconstruction_panel(path, images, masks, reconstruction, patch_size=model.patch_size, display=display)


def masked_pixel_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...], normalize: Normalizer | None = None
) -> torch.Tensor:
    """SimMIM's loss on a batch of (raw images, masks) on the device: the images are normalised here (`normalize`:
    the run's data.mean / data.std; None: ImageNet's for uint8)."""
    images, masks = batch[0], batch[1]
    loss, _ = model((normalize or normalize_images)(images), masks)
    return loss


def run_pretrain(config: PretrainConfig) -> Path:
    """Train SimMIM as configured; resumes from the latest checkpoint in the run directory. Returns the run dir.

    Raises Preempted after saving when a stop signal arrives, and TrainingDiverged after
    run.max_consecutive_skips non-finite steps in a row.
    """
    validate_pretrain(config)
    check_wandb_credentials(config.logger)
    mask_generator = MaskGenerator(
        input_size=config.model.img_size,
        mask_patch_size=config.mask.mask_patch_size,
        model_patch_size=config.model.patch_size,
        mask_ratio=config.mask.mask_ratio,
    )
    with process_group(resolve_device(config.run.device)) as (device, info, stop):
        return _train(config, mask_generator, device, info, stop)


def _train(
    config: PretrainConfig, mask_generator: MaskGenerator, device: torch.device, info: DistInfo, stop: StopSignal
) -> Path:
    precision = resolve_precision(config.run.precision, device)
    torch.manual_seed(config.run.seed)  # the same initial weights on every rank
    norm_target = config.mask.norm_target_window if config.mask.norm_target else None
    model = build_simmim(**to_dict(config.model), norm_target=norm_target).to(device)
    data = build_pretrain_data(
        config.data, config.model.img_size, mask_generator, seed=config.run.seed,
        accum_steps=config.optim.accum_steps, rank=info.rank, world_size=info.world_size,
        pin_memory=config.data.pin_memory and device.type == "cuda", num_panel_images=config.logger.num_images,
        in_chans=config.model.in_chans,
    )  # fmt: skip
    normalize = Normalizer(config.data.mean, config.data.std)  # raw units -> model input, on the device
    total_batch = config.data.batch_size * config.optim.accum_steps * info.world_size
    lr, warmup_lr, min_lr = scaled_lrs(config.optim, total_batch)
    wrapped = wrap_model(model, info, device, config.run.parallel)  # FSDP shards in place: before the optimizer
    optimizer = build_optimizer(model, config.optim, lr)
    scheduler = build_scheduler(optimizer, config.schedule, data.steps_per_epoch, warmup_lr, min_lr)
    run = TrainingRun(
        to_dict(config), config.run, config.logger, info, stop, model, optimizer, build_grad_scaler(precision, device),
        sharded=config.run.parallel == "fsdp" and info.distributed, total_batch=total_batch,
        steps_per_epoch=data.steps_per_epoch, total_steps=config.schedule.epochs * data.steps_per_epoch,
        extra_meta=lambda step: {"stage_window_sizes": model.encoder.stage_window_sizes},
    )  # fmt: skip
    step_model = torch.compile(wrapped) if config.run.compile else wrapped  # checkpoints save `model`: no _orig_mod.
    panel_images, panel_masks = make_fixed_batch(
        data.panel_source, config.logger.num_images, config.model.img_size, mask_generator, seed=config.run.seed,
        in_chans=config.model.in_chans,
    )  # fmt: skip
    panel_batch = (normalize(panel_images), panel_masks)
    display = build_display(config.model.in_chans, normalize.is_default, config.logger.panel_bands)

    panel_path, last_loss = None, float("nan")
    with run.running(lambda meta, path: check_same_settings(meta["config"], run.config, RESUME_MUST_MATCH, path)):
        run.say(_describe(config, run, data, device, precision, lr))
        model.train()
        # the data position is the step: map-style sources skip to it exactly, shards draw a new order from it
        batches = data.batches(run.step)
        while run.step < run.stop_step:
            with run.timer.data():
                micro_batches = [next(batches) for _ in range(config.optim.accum_steps)]
            scheduler.step_update(run.step)  # the lr is a function of the optimizer step
            loss, grad_norm, skipped = train_step(
                step_model, micro_batches, partial(masked_pixel_loss, normalize=normalize), optimizer, run.scaler,
                precision, device, config.optim.clip_grad,
            )  # fmt: skip
            step = run.step_done(loss, skipped)

            metrics = {}
            if run.log_due():
                # summed over ranks; every rank stops here together when data.max_bad_fraction is exceeded
                metrics = {**run.training_metrics(grad_norm), "bad_samples": data.monitor.reduce(info, device)}
                last_loss = metrics["loss"]
            if data.val_batches and (step % config.logger.val_every == 0 or step == run.stop_step):
                with run.timer.exclude():
                    metrics["val_loss"] = evaluate_reconstruction(
                        model, data.val_batches, precision, device, normalize=normalize
                    )
                run.logger.update_best(step, "best_val_loss", metrics["val_loss"], mode="min")
            if metrics:
                run.log(metrics, show=run.log_due())
            if step % config.logger.image_every == 0 or step == run.stop_step:
                with run.timer.exclude():
                    panel_path = _save_images(run, model, panel_batch, precision, display)
            run.end_of_step()

        if panel_path is None:  # nothing left to train: still show where the run stands
            panel_path = _save_images(run, model, panel_batch, precision, display)
        run.logger.log_summary({"final_loss": last_loss, "steps": run.step})
    run.say(f"done at step {run.step}/{run.total_steps}. reconstructions: {panel_path}")
    return run.run_dir


def _save_images(
    run: TrainingRun, model: SimMIM, panel_batch: tuple[torch.Tensor, torch.Tensor], precision: str,
    display: BandDisplay | None = None,
) -> Path | None:  # fmt: skip
    """The reconstruction panel and the position-bias maps of the current step, logged as images."""
    # under FSDP every rank runs the forward (each holds a shard); rank 0 alone writes
    if not (run.info.is_main or run.sharded):
        return None
    images_dir = run.run_dir / "images"
    path = images_dir / f"recon_{run.step:08d}.png"
    panel = write_panel(model, panel_batch, path, precision, run.info.is_main, display)
    images = {"reconstruction": panel}
    if not run.sharded and run.info.is_main:  # the CPB MLPs are sharded under FSDP
        bias_path = images_dir / f"position_bias_{run.step:08d}.png"
        images["position_bias"] = save_position_bias_figure(make_position_bias_maps(model), bias_path)
    run.logger.log_images(run.step, images)
    return panel


def _describe(
    config: PretrainConfig, run: TrainingRun, data: PretrainData, device: torch.device, precision: str, lr: float
) -> str:
    """The start-up line: what trains where, on what data."""
    info, model = run.info, run.model
    validation = f", {sum(len(b[0]) for b in data.val_batches)} validation images" if data.val_batches else ""
    return (
        f"pretraining {config.model.arch} at {config.model.img_size}px on {info.world_size} x {device} "
        f"({precision}, {config.run.parallel if info.distributed else 'one process'}): "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {data.steps_per_epoch} steps/epoch, "
        f"total batch {run.total_batch}, lr {lr:.3g}; data: {data.description}{validation}; run dir {run.run_dir}"
    )
