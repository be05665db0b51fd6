"""One optimizer step, written out in order (STYLE.md rule 4); pretraining and fine-tuning share it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .precision import autocast_context


def simmim_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SimMIM's masked-pixel loss for a batch of (images, masks) already on the device."""
    images, masks = batch[0], batch[1]
    loss, _ = model(images, masks)
    return loss


def train_step(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, ...]],
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    precision: str,
    device: torch.device,
    clip_grad: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients over `micro_batches`, then clip and step once.

    Each micro-batch is a tuple of tensors moved to `device`; `loss_fn(model, batch)` returns its scalar loss.

    Returns the mean loss and the gradient norm before clipping, both as device tensors: nothing here waits for
    the device, so the caller decides when to sync (every log_every steps).
    """
    num_micro = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs
        last = i == num_micro - 1
        sync_context = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync_context:
            with autocast_context(precision, device):
                loss = loss_fn(model, batch)
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
