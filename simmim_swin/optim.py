"""AdamW through timm's factory, linear lr scaling with the batch, and per-step lr schedules.

`step` counts the optimizer updates done: the loop calls `scheduler.step_update(step)` before update `step`.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from simmim_swin.config import OptimConfig, ScheduleConfig


def scaled_lrs(optim_cfg: OptimConfig, total_batch: int) -> tuple[float, float, float]:
    """(lr, warmup_lr, min_lr) scaled linearly from `optim_cfg.lr_reference_batch` to `total_batch`."""
    if total_batch <= 0:
        raise ValueError(f"total_batch must be positive, got {total_batch}")
    scale = total_batch / optim_cfg.lr_reference_batch
    return optim_cfg.base_lr * scale, optim_cfg.warmup_lr * scale, optim_cfg.min_lr * scale


def build_optimizer(
    model: nn.Module, optim_cfg: OptimConfig, lr: float, layer_decay: float | None = None
) -> torch.optim.Optimizer:
    """AdamW with the parameter groups of the model's `no_weight_decay()` / `group_matcher()` hooks, as for any timm
    model; `layer_decay` (fine-tuning) sets each group's `lr_scale`."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    # fused by default: train_step skips a non-finite step on the device through it (engine.step_unless)
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=lr,
        weight_decay=optim_cfg.weight_decay,
        layer_decay=layer_decay,
        betas=(optim_cfg.betas[0], optim_cfg.betas[1]),
        eps=optim_cfg.eps,
        fused=optim_cfg.fused is not False,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule_cfg: ScheduleConfig,
    steps_per_epoch: int,
    warmup_lr: float,
    min_lr: float,
) -> Scheduler:
    """Linear warm-up from warmup_lr to the optimizer's lr, then cosine or multistep, stepped per update."""
    total_steps = schedule_cfg.epochs * steps_per_epoch
    warmup = dict(warmup_t=schedule_cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if schedule_cfg.kind == "cosine":
        # As the reference (Swin-Transformer's lr_scheduler with WARMUP_PREFIX=True, its default): the cosine
        # starts after the warm-up and spans the remaining steps, so it reaches min_lr at step == total_steps,
        # i.e. right after the last update; the last update (step total_steps - 1) is a hair above min_lr.
        t_initial = total_steps - warmup["warmup_t"]
        return CosineLRScheduler(optimizer, t_initial=t_initial, lr_min=min_lr, warmup_prefix=True, **warmup)
    # Milestones count from the start of training (the reference: lr x 0.1 at epoch 700 of 800, warm-up
    # included), hence warmup_prefix=False. timm compares milestones with t + 1 (a drop at milestone m lands on
    # t = m - 1); the +1 moves the drop to exactly step m * steps_per_epoch, the first update of epoch m,
    # as the reference's own MultiStepLRScheduler does.
    decay_t = sorted(epoch * steps_per_epoch + 1 for epoch in schedule_cfg.decay_epochs)
    return MultiStepLRScheduler(
        optimizer, decay_t=decay_t, decay_rate=schedule_cfg.decay_rate, warmup_prefix=False, **warmup
    )
