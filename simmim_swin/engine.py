"""One optimizer step of SimMIM pretraining, written out in order (STYLE.md rule 4)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from .precision import autocast_context


def train_step(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    precision: str,
    device: torch.device,
    clip_grad: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients over `micro_batches` of (images, masks), then clip and step once.

    Returns the mean loss and the gradient norm before clipping, both as device tensors: nothing here waits for
    the device, so the caller decides when to sync (every log_every steps).
    """
    num_micro = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for i, (images, masks) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs
        last = i == num_micro - 1
        sync_context = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync_context:
            with autocast_context(precision, device):
                loss, _ = model(images, masks)
            scaled = loss / num_micro  # the accumulated gradient is the mean over micro-batches
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    max_norm = clip_grad if clip_grad is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step if the unscaled gradients hold inf/NaN
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / num_micro, grad_norm
