"""AdamW through timm's factory, linear lr scaling with the batch, and per-step lr schedules.

Step convention of `build_scheduler`: `step` counts optimizer updates already done. The loop calls
`scheduler.step_update(step)` before update number `step` (0-indexed), so the lr is a function of the step.
The optim.* and schedule.* values were checked when the config was validated (config.check_optim / check_schedule).
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
    """AdamW through timm's optimizer factory, for pretraining (layer_decay None) and fine-tuning alike.

    The parameter groups come from the model's own hooks, as for any timm model: `no_weight_decay()` names the
    parameters without weight decay (besides every 1-D one) and `group_matcher()` gives each parameter its layer
    id, from which layer_decay sets a per-group `lr_scale` (decay^(num_layers - 1 - id)) that timm's schedulers
    apply. The fused kernel is the default: the training step relies on it to skip a non-finite step on the
    device without a host sync (engine.step_unless).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
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
    """timm scheduler stepped per optimizer update: linear warm-up from warmup_lr, then cosine or multistep.

    The peak lr is the optimizer's lr at construction (`build_optimizer(..., lr)`).
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    total_steps = schedule_cfg.epochs * steps_per_epoch
    warmup_steps = schedule_cfg.warmup_epochs * steps_per_epoch
    if schedule_cfg.kind == "cosine":
        # As the reference (Swin-Transformer's lr_scheduler with WARMUP_PREFIX=True, its default): the cosine
        # starts after the warm-up and spans the remaining steps, so it reaches min_lr at step == total_steps,
        # i.e. right after the last update; the last update (step total_steps - 1) is a hair above min_lr.
        return CosineLRScheduler(
            optimizer,
            t_initial=total_steps - warmup_steps,
            lr_min=min_lr,
            cycle_limit=1,
            warmup_t=warmup_steps,
            warmup_lr_init=warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    # Milestones count from the start of training (the reference: lr x 0.1 at epoch 700 of 800, warm-up
    # included), hence warmup_prefix=False. timm compares milestones with t + 1 (a drop at milestone m lands on
    # t = m - 1); the +1 moves the drop to exactly step m * steps_per_epoch, the first update of epoch m,
    # as the reference's own MultiStepLRScheduler does.
    decay_t = sorted(epoch * steps_per_epoch + 1 for epoch in schedule_cfg.decay_epochs)
    return MultiStepLRScheduler(
        optimizer,
        decay_t=decay_t,
        decay_rate=schedule_cfg.decay_rate,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )
