"""One optimizer step, written out in order (STYLE.md rule 4); pretraining and fine-tuning share it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.transforms import normalize_images
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate gradients over `micro_batches`, then clip and step once (skipped if anything is non-finite).

    Each micro-batch is a tuple of tensors moved to `device`; `loss_fn(model, batch)` returns its scalar loss.

    Returns the mean loss, the gradient norm before clipping and whether the step was skipped, all as device
    tensors: nothing here waits for the device, so the caller decides when to sync (every log_every steps).
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
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    skipped = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))  # device bool: NaN/inf loss or gradient
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when the unscaled gradients hold inf/NaN
        scaler.update()
    else:
        step_unless(optimizer, skipped)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / num_micro, grad_norm, skipped


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (a device bool): a non-finite step changes no weight and no moment.

    Fused Adam(W) takes the flag on the device through its `found_inf` argument, as GradScaler uses it, so there
    is no host sync; other optimizers need the flag on the host (.item(), free on the CPU, a sync on CUDA).
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], precision: str, device: torch.device
) -> float:
    """Mean SimMIM loss over fixed (images, masks) batches, in eval mode; the model's mode is restored after.

    uint8 images are normalised with the ImageNet mean / std on the device; float images are taken as normalised.
    Each batch's loss is weighted by its number of images. This .item() syncs: call it every val_every steps.
    """
    if not batches:
        raise ValueError("no validation batches: set data.val_urls and data.val_samples > 0")
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    try:
        for images, masks, *_ in batches:
            images = normalize_images(images.to(device, non_blocking=True))
            with autocast_context(precision, device):
                loss, _ = model(images, masks.to(device, non_blocking=True))
            total += loss.float() * images.shape[0]
            count += images.shape[0]
    finally:
        model.train(was_training)
    return total.item() / count


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, ...]],
    precision: str,
    device: torch.device,
    confusion: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over (images, labels) batches, in eval mode.

    uint8 images are normalised on the device; float images are taken as normalised. The model's mode is restored.
    confusion=True adds "confusion": the (classes, classes) count matrix, rows true classes, columns predicted.
    """
    from timm.utils import accuracy

    from .viz import confusion_matrix

    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=device)  # correct top-1, correct top-5, summed loss
    count, matrix = 0, None
    try:
        for images, labels, *_ in loader:
            images = normalize_images(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            with autocast_context(precision, device):
                logits = model(images)
            logits = logits.float()
            top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))  # percentages of this batch
            batch = labels.shape[0]
            loss = F.cross_entropy(logits, labels, reduction="sum")
            totals += torch.stack([top1 * batch / 100, top5 * batch / 100, loss])
            count += batch
            if confusion:
                cells = confusion_matrix(logits, labels, logits.shape[1], check=False)
                matrix = cells if matrix is None else matrix + cells
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set is empty: check the validation images")
    correct1, correct5, loss = totals.tolist()  # one host sync for the whole evaluation
    metrics: dict[str, Any] = {
        "top1": 100 * correct1 / count,
        "top5": 100 * correct5 / count,
        "loss": loss / count,
        "num_images": count,
    }
    if matrix is not None:
        metrics["confusion"] = matrix.cpu()
    return metrics
