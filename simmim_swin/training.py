"""What the pretraining and fine-tuning loops share: the set-up from a run's config, one optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .config import FinetuneConfig, PretrainConfig, to_dict
from .distributed import DistInfo, StopSignal, wrap_model
from .engine import LossFn, train_step
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .precision import build_grad_scaler
from .run import TrainingRun


def start_training(
    config: PretrainConfig | FinetuneConfig, model: nn.Module, info: DistInfo, stop: StopSignal, device: torch.device,
    precision: str, steps_per_epoch: int, extra_meta: Callable[[int], dict[str, Any]],
    layer_decay: float | None = None,
) -> tuple[TrainingRun, float, Callable[[Iterator[tuple], LossFn], tuple[int, torch.Tensor]]]:  # fmt: skip
    """Wrap `model` for run.parallel, build its AdamW, the per-step schedule and the TrainingRun.

    Returns the run, the peak lr and `step(batches, loss_fn)`: one optimizer step on the next accum_steps
    micro-batches, which returns the step count and the gradient norm.
    """
    total_batch = config.data.batch_size * config.optim.accum_steps * info.world_size
    lr, warmup_lr, min_lr = scaled_lrs(config.optim, total_batch)
    wrapped = wrap_model(model, info, device, config.run.parallel)  # FSDP shards in place: before the optimizer
    optimizer = build_optimizer(model, config.optim, lr, layer_decay=layer_decay)
    scheduler = build_scheduler(optimizer, config.schedule, steps_per_epoch, warmup_lr, min_lr)
    run = TrainingRun(
        to_dict(config), config.run, config.logger, info, stop, model, optimizer, build_grad_scaler(precision, device),
        sharded=config.run.parallel == "fsdp" and info.distributed, total_batch=total_batch,
        steps_per_epoch=steps_per_epoch, total_steps=config.schedule.epochs * steps_per_epoch, extra_meta=extra_meta,
    )  # fmt: skip
    step_model = torch.compile(wrapped) if config.run.compile else wrapped  # checkpoints save `model`: no _orig_mod.

    def step(batches: Iterator[tuple], loss_fn: LossFn) -> tuple[int, torch.Tensor]:
        with run.timer.measure("data"):
            micro_batches = [next(batches) for _ in range(config.optim.accum_steps)]
        scheduler.step_update(run.step)  # the lr is a function of the optimizer step
        loss, grad_norm, skipped = train_step(
            step_model, micro_batches, loss_fn, optimizer, run.scaler, precision, device, config.optim.clip_grad
        )
        return run.step_done(loss, skipped), grad_norm

    return run, lr, step


def startup_line(
    run: TrainingRun, device: torch.device, precision: str, lr: float, what: str, details: str, data: str = ""
) -> str:
    """The start-up line: what trains where, on what data."""
    parallel = run.run_cfg.parallel if run.info.distributed else "one process"
    return (
        f"{what} on {run.info.world_size} x {device} ({precision}, {parallel}): {details}, {run.steps_per_epoch} "
        f"steps/epoch, total batch {run.total_batch}, lr {lr:.3g}; {data}run dir {run.run_dir}"
    )
