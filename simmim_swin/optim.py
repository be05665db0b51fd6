"""AdamW with the SimMIM weight-decay exclusions, linear lr scaling with the batch, and per-step lr schedules.

Step convention used by `build_scheduler` and `lr_at_step`: `step` counts optimizer updates already done, so
update number `step` (0-indexed) runs with `lr_at_step(scheduler, step)`. The loop calls
`scheduler.step_update(step)` before that update (or, equivalently, `scheduler.step_update(step + 1)` after it).
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from simmim_swin.config import OptimConfig, ScheduleConfig

# fnmatch patterns over full parameter names (timm matches `no_weight_decay_list` with fnmatch, so bare module
# names such as timm's own swinv2 `no_weight_decay()` set never match a full name). The leading `*` also covers
# the `encoder.` prefix of SimMIM and the `module.` prefix of DDP. Biases and every other 1-D parameter
# (norms, q_bias, v_bias) are excluded by timm's 1-D rule; these are the >= 2-D ones SPEC section 2 excludes:
# absolute_pos_embed (1, L, C), mask_token (1, 1, C), the cpb_mlp weights (2-D) and logit_scale (heads, 1, 1).
# The reference code means to exclude cpb_mlp and logit_scale but decays them through a name-prefix slip;
# we exclude them as SPEC.md asks.
NO_WEIGHT_DECAY_PATTERNS: tuple[str, ...] = (
    "*absolute_pos_embed",
    "*mask_token",
    "*cpb_mlp.*",
    "*logit_scale",
)

SCHEDULE_KINDS = ("cosine", "multistep")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_weight_decay_patterns: tuple[str, ...] | list[str] = NO_WEIGHT_DECAY_PATTERNS,
) -> list[dict]:
    """Two AdamW parameter groups: weight decay for >= 2-D weights, none for 1-D params and the excluded names.

    Parameters with requires_grad=False are left out.
    """
    return param_groups_weight_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=tuple(no_weight_decay_patterns)
    )


def scaled_lrs(optim_cfg: OptimConfig, total_batch: int) -> tuple[float, float, float]:
    """(lr, warmup_lr, min_lr) scaled linearly from `optim_cfg.lr_reference_batch` to `total_batch`."""
    if total_batch <= 0:
        raise ValueError(f"total_batch must be positive, got {total_batch}")
    if optim_cfg.lr_reference_batch <= 0:
        raise ValueError(f"optim.lr_reference_batch must be positive, got {optim_cfg.lr_reference_batch}")
    scale = total_batch / optim_cfg.lr_reference_batch
    return optim_cfg.base_lr * scale, optim_cfg.warmup_lr * scale, optim_cfg.min_lr * scale


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, with the fused kernel unless optim_cfg.fused is False."""
    if len(optim_cfg.betas) != 2:
        raise ValueError(f"optim.betas must have two values (beta1, beta2), got {optim_cfg.betas}")
    groups = param_groups(model, optim_cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    # the fused kernel runs on CUDA and on the CPU; the training step also relies on it to skip a non-finite
    # step on the device (engine.step_unless), so it is the default
    fused = True if optim_cfg.fused is None else optim_cfg.fused
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=(optim_cfg.betas[0], optim_cfg.betas[1]),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        fused=fused,
    )


def _check_schedule(schedule_cfg: ScheduleConfig, steps_per_epoch: int) -> None:
    """Raise ValueError for a schedule that cannot be built."""
    if schedule_cfg.kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule.kind={schedule_cfg.kind!r} is unknown; use one of {list(SCHEDULE_KINDS)}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if schedule_cfg.epochs <= 0:
        raise ValueError(f"schedule.epochs must be positive, got {schedule_cfg.epochs}")
    if not 0 <= schedule_cfg.warmup_epochs <= schedule_cfg.epochs:
        raise ValueError(
            f"schedule.warmup_epochs={schedule_cfg.warmup_epochs} must lie in [0, schedule.epochs="
            f"{schedule_cfg.epochs}]; lower warmup_epochs or raise epochs"
        )
    if schedule_cfg.kind == "cosine" and schedule_cfg.warmup_epochs == schedule_cfg.epochs:
        raise ValueError(
            f"schedule.kind=cosine needs at least one epoch after warm-up; warmup_epochs={schedule_cfg.warmup_epochs}"
            f" equals epochs={schedule_cfg.epochs}"
        )
    if schedule_cfg.kind == "multistep":
        for epoch in schedule_cfg.decay_epochs:
            if not 0 < epoch < schedule_cfg.epochs:
                raise ValueError(
                    f"schedule.decay_epochs={schedule_cfg.decay_epochs}: milestone {epoch} must lie strictly "
                    f"between 0 and schedule.epochs={schedule_cfg.epochs}"
                )
            if epoch < schedule_cfg.warmup_epochs:
                # The reference implementation asserts the same: a drop inside warm-up is never what was meant.
                raise ValueError(
                    f"schedule.decay_epochs={schedule_cfg.decay_epochs}: milestone {epoch} falls inside the "
                    f"warm-up (warmup_epochs={schedule_cfg.warmup_epochs}); move it after the warm-up"
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
    _check_schedule(schedule_cfg, steps_per_epoch)
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


def lr_at_step(scheduler: Scheduler, step: int) -> float:
    """The lr of the first param group for optimizer update `step`, computed without touching the optimizer."""
    # timm has no public pure accessor: `_get_lr` is the schedule function `step_update` applies (no noise is
    # configured here); `lr_scale` is what timm's `update_groups` multiplies in per group.
    lr = scheduler._get_lr(step)[0]
    return lr * scheduler.optimizer.param_groups[0].get("lr_scale", 1.0)
