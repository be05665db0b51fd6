"""run_pretrain(config): build everything, train, log, save, and resume a SimMIM run from its run directory."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import torch
import yaml
from torch import nn

from .checkpoint import find_latest_checkpoint
from .config import PretrainConfig, to_dict, validate_pretrain
from .data import Normalizer, PretrainData, build_pretrain_data, make_fixed_batch, normalize_images
from .distributed import DistInfo, StopSignal, process_group
from .engine import eval_mode, evaluate_reconstruction
from .figures import (
    BandDisplay,
    build_display,
    make_panel_tiles,
    make_position_bias_maps,
    save_position_bias_figure,
    save_reconstruction_panel,
)
from .masking import MaskGenerator
from .models import SimMIM, build_simmim
from .precision import autocast_context, resolve_device, resolve_precision
from .probe import ProbeSet, build_probe_set, run_probe
from .run import TrainingRun, check_same_settings, run_directory
from .tracking import check_wandb_credentials
from .training import start_training, startup_line
from .transfer import load_simmim_weights, resolve_init_from

log = logging.getLogger(__name__)


@torch.no_grad()
def write_panel(
    model: SimMIM, batch: tuple[torch.Tensor, torch.Tensor], path: Path, precision: str, write: bool = True,
    display: BandDisplay | None = None,
) -> Path:  # fmt: skip
    """Reconstruct the fixed panel images (normalised) and save original | masked | reconstruction | error as a PNG
    (if `write`); `display` picks and stretches the bands shown (figures.build_display)."""
    images, masks = batch
    device = next(model.parameters()).device
    with eval_mode(model):
        with autocast_context(precision, device):
            _, prediction = model(images.to(device), masks.to(device))
        target = model.target(images.to(device)).cpu()
        reconstruction = model.target_to_image(images.to(device), prediction, masks.to(device)).cpu()
    if not write:
        return path
    tiles = make_panel_tiles(images, masks, reconstruction, model.patch_size, prediction.float().cpu(), target, display)
    return save_reconstruction_panel(path, *tiles)


def masked_pixel_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...], normalize: Normalizer | None = None
) -> torch.Tensor:
    """SimMIM's loss on (raw images, masks) on the device, normalised by `normalize` (None: ImageNet's for uint8)."""
    images, masks = batch[0], batch[1]
    loss, _ = model((normalize or normalize_images)(images), masks)
    return loss


def run_pretrain(config: PretrainConfig) -> Path:
    """Train SimMIM as configured, resuming from the run directory's latest checkpoint; returns the run directory.

    Raises Preempted after saving when a stop signal arrives, TrainingDiverged after run.max_consecutive_skips
    non-finite steps in a row.
    """
    validate_pretrain(config)
    check_wandb_credentials(config.logger)
    with process_group(resolve_device(config.run.device)) as (device, info, stop):
        return _train(config, device, info, stop)


def _train(config: PretrainConfig, device: torch.device, info: DistInfo, stop: StopSignal) -> Path:
    precision = resolve_precision(config.run.precision, device)
    torch.manual_seed(config.run.seed)  # the same initial weights on every rank
    config, model = _build_model(config, info)
    model.to(device)
    mask_generator = MaskGenerator(
        input_size=config.model.img_size,
        mask_patch_size=config.mask.mask_patch_size,
        model_patch_size=config.model.patch_size,
        mask_ratio=config.mask.mask_ratio,
    )
    data = build_pretrain_data(
        config.data, config.model.img_size, mask_generator, seed=config.run.seed,
        accum_steps=config.optim.accum_steps, rank=info.rank, world_size=info.world_size,
        pin_memory=config.data.pin_memory and device.type == "cuda", num_panel_images=config.logger.num_images,
        in_chans=config.model.in_chans,
    )  # fmt: skip
    normalize = Normalizer(config.data.mean, config.data.std)  # raw units -> model input, on the device
    loss_fn = partial(masked_pixel_loss, normalize=normalize)
    run, lr, optimizer_step = start_training(
        config, model, info, stop, device, precision, data.steps_per_epoch,
        extra_meta=lambda step: {"stage_window_sizes": model.encoder.stage_window_sizes},
    )  # fmt: skip
    panel_images, panel_masks = make_fixed_batch(
        data.panel_source, config.logger.num_images, config.model.img_size, mask_generator, seed=config.run.seed,
        in_chans=config.model.in_chans,
    )  # fmt: skip
    panel_batch = (normalize(panel_images), panel_masks)
    display = build_display(config.model.in_chans, normalize.is_default, config.logger.panel_bands)
    probe_set = build_probe_set(config.probe, config.model.img_size, device, info) if config.probe.enabled else None

    panel_path, last_loss = None, float("nan")
    # a checkpoint of another model or mask is refused
    with run.running(lambda meta, path: check_same_settings(meta["config"], run.config, ("model", "mask"), path)):
        params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"
        validation = f", {sum(len(b[0]) for b in data.val_batches)} validation images" if data.val_batches else ""
        what = f"pretraining {config.model.arch} at {config.model.img_size}px"
        log.info(startup_line(run, device, precision, lr, what, params, f"data: {data.description}{validation}; "))
        if probe_set is not None:
            log.info(f"probe: {probe_set.description}")
        model.train()
        # the data position is the step: map-style sources skip to it exactly, shards draw a new order from it
        batches = data.batches(run.step)
        while run.step < run.stop_step:
            step, grad_norm = optimizer_step(batches, loss_fn)

            metrics = {}
            if run.log_due():
                # summed over ranks; every rank stops here together when data.max_bad_fraction is exceeded
                metrics = {**run.training_metrics(grad_norm), "bad_samples": data.monitor.reduce(info, device)}
                last_loss = metrics["loss"]
            with run.timer.measure("excluded"):
                metrics.update(_evaluations(config, run, data, probe_set, precision, normalize))
            if metrics:
                run.log(metrics, show=run.log_due())
            if step % config.logger.image_every == 0 or step == run.stop_step:
                with run.timer.measure("excluded"):
                    panel_path = _save_images(run, model, panel_batch, precision, display)
            run.end_of_step()

        if panel_path is None:  # nothing left to train: still show where the run stands
            panel_path = _save_images(run, model, panel_batch, precision, display)
        run.logger.log_summary({"final_loss": last_loss, "steps": run.step})
    log.info(f"done at step {run.step}/{run.total_steps}. reconstructions: {panel_path}")
    return run.run_dir


def _evaluations(
    config: PretrainConfig, run: TrainingRun, data: PretrainData, probe_set: ProbeSet | None, precision: str,
    normalize: Normalizer,
) -> dict[str, float]:  # fmt: skip
    """The validation loss every logger.val_every steps and the probes every probe.every steps (and at the end)."""
    model, step, last = run.model, run.step, run.step == run.stop_step
    metrics = {}
    if data.val_batches and (step % config.logger.val_every == 0 or last):
        device = next(model.parameters()).device
        metrics["val_loss"] = evaluate_reconstruction(model, data.val_batches, precision, device, normalize=normalize)
        run.logger.update_best(step, "best_val_loss", metrics["val_loss"], mode="min")
    if probe_set is not None and (step % config.probe.every == 0 or last):
        probe_metrics = run_probe(model, probe_set, precision, run.info, sharded=run.sharded)
        metrics.update(probe_metrics)
        scores = [f"{k.removeprefix('probe_')} {v:.2f}" for k, v in probe_metrics.items() if k != "probe_seconds"]
        log.info(f"probe at step {step}: {', '.join(scores)} ({probe_metrics['probe_seconds']:.1f} s)")
    return metrics


def _build_model(config: PretrainConfig, info: DistInfo) -> tuple[PretrainConfig, SimMIM]:
    """SimMIM as configured, starting from init_from's weights in a new run; the config as resolved (the CPB
    windows of the source). A run that resumes builds the same model and continues from its own checkpoint."""
    norm_target = config.mask.norm_target_window if config.mask.norm_target else None
    pretrained = None
    if config.init_from:
        run_dir = run_directory(config.run)
        if find_latest_checkpoint(run_dir) is not None:
            config = _windows_as_saved(config, run_dir)
            log.info(f"resuming {run_dir}: its own checkpoint wins; init_from={config.init_from} is not loaded")
        else:
            model_cfg, pretrained = resolve_init_from(config.model, config.init_from, config.init_from_format)
            config = dataclasses.replace(config, model=model_cfg)
    model = build_simmim(**to_dict(config.model), norm_target=norm_target)
    if pretrained is not None:
        report = load_simmim_weights(model, pretrained)
        windows = f"windows {model.encoder.stage_window_sizes}, CPB normalised by {model.encoder.cpb_window_sizes}"
        log.info(f"init_from: {pretrained.source_format} weights from {pretrained.path} ({windows})")
        log.info(report.summary())
        if pretrained.cpb_windows() is None and config.model.pretrained_window_sizes is None:
            note = "set model.pretrained_window_sizes to the source's windows when they differ"
            log.info(f"init_from: the source does not record its windows; CPB normalised by this run's ({note})")
    return config, model


def _windows_as_saved(config: PretrainConfig, run_dir: Path) -> PretrainConfig:
    """The CPB windows the run's first start took from init_from (its config.yaml), so the resume check agrees."""
    saved = run_dir / "config.yaml"
    if config.model.pretrained_window_sizes is not None or not saved.is_file():
        return config
    windows = (yaml.safe_load(saved.read_text()) or {}).get("model", {}).get("pretrained_window_sizes")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained_window_sizes=windows))


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
        images["position_bias"] = save_position_bias_figure(make_position_bias_maps(model), bias_path, step=run.step)
    run.logger.log_images(run.step, images)
    return panel
