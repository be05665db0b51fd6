"""One optimizer step written out in order (accumulate, unscale, clip, step, update, zero), and the evaluations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data.transforms import normalize_images
from .distributed import DistInfo, all_reduce_sum_
from .precision import autocast_context

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]  # loss_fn(model, micro-batch on the device)


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient; `last_checkpoint` is the newest save."""

    def __init__(self, num_skipped: int, step: int, last_checkpoint: object | None) -> None:
        kept = (
            f"The last good checkpoint is {last_checkpoint}: starting the run again resumes from it."
            if last_checkpoint is not None
            else "No checkpoint was saved before it: the run starts from scratch when started again."
        )
        super().__init__(
            f"{num_skipped} consecutive optimizer steps (up to step {step}) had a non-finite loss or gradient and "
            f"were skipped; stopping. {kept} Lower optim.base_lr, keep optim.clip_grad on, or use "
            "run.precision=bf16 instead of fp16."
        )


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation, which was abandoned at the next batch (no numbers)."""


def train_step(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, ...]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    precision: str,
    device: torch.device,
    clip_grad: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate gradients over `micro_batches`, then clip and step once (skipped if anything is non-finite).

    Returns the mean loss, the gradient norm before clipping and whether the step was skipped, as device tensors:
    nothing here waits for the device, so the caller decides when to sync.
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

    # by hand rather than timm's NativeScaler / dispatch_clip_grad: they return no gradient norm, skip nothing
    # without a scaler and know no accumulation (no_sync) or FSDP's DTensor norm
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if clip_grad is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    else:  # the norm alone: clip_grad_norm_ with an infinite max would still multiply every gradient by 1
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    skipped = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))  # device bool: NaN/inf loss or gradient
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # the loss is this rank's own: a rank with a non-finite loss but finite averaged gradients must not step
        # alone, or the replicas drift apart and the ranks disagree on what to save. One scalar, queued on the
        # device like the gradient all-reduce: no host sync.
        any_skipped = skipped.to(torch.int32)
        dist.all_reduce(any_skipped, op=dist.ReduceOp.MAX)
        skipped = any_skipped.bool()
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when the unscaled gradients hold inf/NaN
        scaler.update()
    else:
        step_unless(optimizer, skipped)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / num_micro, grad_norm, skipped


class StepStats:
    """The loop's running counts (loss of the good steps, skips), on the device: reading them is a sync on CUDA."""

    def __init__(self, device: torch.device, skipped_steps: int = 0, consecutive_skips: int = 0) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.steps_since_log = 0
        self.skipped_since_log = torch.zeros((), dtype=torch.long, device=device)
        self.skipped_total = torch.tensor(skipped_steps, dtype=torch.long, device=device)
        self.consecutive_skips = torch.tensor(consecutive_skips, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        """Count one optimizer step (what train_step returned)."""
        self.skipped_total += skipped
        self.skipped_since_log += skipped
        self.consecutive_skips = (self.consecutive_skips + 1) * skipped  # resets on a good step
        self.loss_sum += torch.where(skipped, 0.0, loss.detach())
        self.steps_since_log += 1

    def mean_loss(self, info: DistInfo) -> float:
        """Mean loss over ranks of the good steps since the last call (NaN if all were skipped); starts a new window."""
        total = all_reduce_sum_(self.loss_sum, info).item() / info.world_size  # every rank joins, whatever its count
        good_steps = self.steps_since_log - int(self.skipped_since_log)
        self.loss_sum.zero_()
        self.skipped_since_log.zero_()
        self.steps_since_log = 0
        return total / good_steps if good_steps else float("nan")

    def in_a_row(self) -> int:
        """Optimizer steps skipped in a row up to now (0 after a good step)."""
        return int(self.consecutive_skips)

    def counts(self) -> dict[str, int]:
        """What a checkpoint keeps, so a resumed run keeps counting (and keeps its allowance of skips in a row)."""
        return {"skipped_steps": int(self.skipped_total), "consecutive_skips": self.in_a_row()}


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (a device bool): a non-finite step changes no weight and no moment."""
    # fused Adam(W) reads the flag on the device through `found_inf`, as GradScaler uses it: no host sync
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The block runs `model` in eval mode; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], precision: str, device: torch.device,
    normalize: Callable[[torch.Tensor], torch.Tensor] = normalize_images,
) -> float:  # fmt: skip
    """Mean SimMIM loss per image over fixed (images, masks) batches, in eval mode; `normalize` runs on the device."""
    total, count = torch.zeros((), device=device), 0
    with eval_mode(model):
        for images, masks, *_ in batches:
            images = normalize(images.to(device, non_blocking=True))
            with autocast_context(precision, device):
                loss, _ = model(images, masks.to(device, non_blocking=True))
            total += loss.float() * images.shape[0]
            count += images.shape[0]
    return total.item() / count  # syncs: once per evaluation


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, ...]],
    precision: str,
    device: torch.device,
    confusion: bool = False,
    info: DistInfo | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over (images, labels) batches, in eval mode.

    Args:
        confusion: add "confusion", the (classes, classes) count matrix, rows true classes, columns predicted.
        info: of a multi-process job: the counts are summed over the ranks' shards, every rank returns the whole set's.
        should_stop: asked before every batch (a collective: every rank asks it as often); yes raises
            EvaluationStopped, so a stop signal never waits for a whole evaluation.
        on_batch: told the size of each batch done (a progress display).
    """
    from .figures import confusion_matrix

    # correct top-1, correct top-5, summed loss, images; float64 keeps the counts exact past 2**24
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    matrix = None
    with eval_mode(model):
        for images, labels, *_ in loader:
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            images = normalize_images(images.to(device, non_blocking=True))  # uint8 only; float is normalised
            labels = labels.to(device, non_blocking=True)
            with autocast_context(precision, device):
                logits = model(images)
            logits = logits.float()  # B, classes
            valid = labels >= 0  # -1: data.loader.EvalShard's padding, counted nowhere
            # by hand rather than timm.utils.accuracy, which has no notion of padded samples
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # B, k
            hits = (top == labels[:, None]) & valid[:, None]
            loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
            totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), loss, valid.sum()]).double()
            if confusion:
                # boolean indexing syncs the device: fine, the confusion matrix is asked for once per run
                cells = confusion_matrix(logits[valid], labels[valid], logits.shape[1], check=False)
                matrix = cells if matrix is None else matrix + cells
            if on_batch is not None:
                on_batch(len(labels))
    if info is not None:
        all_reduce_sum_(totals, info)
        if matrix is not None:
            all_reduce_sum_(matrix, info)
    correct1, correct5, loss, count = totals.tolist()  # one host sync for the whole evaluation
    if count == 0:
        raise ValueError("the evaluation set is empty: check the validation images")
    metrics: dict[str, Any] = {
        "top1": 100 * correct1 / count,
        "top5": 100 * correct5 / count,
        "loss": loss / count,
        "num_images": int(count),
    }
    if matrix is not None:
        metrics["confusion"] = matrix.cpu()
    return metrics
