"""run_finetune(config): fine-tune a (SimMIM-)pretrained SwinV2 classifier at a new size and window (the CPB
transferred through pretrained_window_sizes), and evaluate_transfer(config): evaluate one at another size and window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import CHECKPOINT_DIR, find_latest_checkpoint, load_checkpoint, save_checkpoint
from .config import (
    AugmentConfig,
    ConfigError,
    FinetuneConfig,
    FinetuneModelConfig,
    check_image_statistics,
    from_dict,
    to_dict,
    validate_finetune,
)
from .data.classification import (
    build_labelled_eval_dataset,
    build_train_dataset,
    build_val_dataset,
    keeps_raw_values,
)
from .data.loader import EvalShard, build_pretrain_loader, endless
from .data.pipeline import monitored
from .data.stream import BadDataMonitor, collate_good, collate_good_only
from .data.transforms import Normalizer, normalize_images
from .distributed import (
    DistInfo,
    LoaderWorkerInit,
    Preempted,
    StopSignal,
    full_model_state_dict,
    process_group,
)
from .engine import EvaluationStopped, LossFn, eval_mode, evaluate_classifier
from .precision import autocast_context, resolve_device, resolve_precision
from .probe import fit_logistic_regression
from .progress import Progress
from .run import TrainingRun, check_same_settings, run_directory
from .tracking import check_wandb_credentials
from .training import start_training, startup_line
from .transfer import build_classifier, load_pretrained, reinit_cpb_mlp, resolve_model_config

BEST_CHECKPOINT = "best.pt"

log = logging.getLogger(__name__)


def build_mixup_and_loss(augment: AugmentConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup/CutMix with SoftTargetCrossEntropy (smoothing inside the soft targets), or a plain CE loss."""
    if (augment.mixup > 0 or augment.cutmix > 0) and augment.mixup_prob > 0:
        mixup = Mixup(
            mixup_alpha=augment.mixup,
            cutmix_alpha=augment.cutmix,
            prob=augment.mixup_prob,
            switch_prob=augment.mixup_switch_prob,
            mode=augment.mixup_mode,
            label_smoothing=augment.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if augment.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=augment.label_smoothing)
    return None, nn.CrossEntropyLoss()


def _check_resumable(meta: dict[str, Any], config: dict[str, Any], classes: list[str], path: Path) -> None:
    """Refuse to resume a fine-tune of another model or other classes (names and order, not only their count)."""
    check_same_settings(meta["config"], config, ("model",), path)
    if meta.get("class_names") != classes:
        raise ConfigError(
            f"{path} was fine-tuned on the classes {meta.get('class_names')}, the data now has {classes}; resume "
            "with the same class folders or start a new run with run.name=<new name>"
        )


def _restore_state(run: TrainingRun, ema: ModelEmaV3 | None, best: dict[str, Any]) -> None:
    """What a resumed checkpoint adds to the run's state: the EMA weights, the best top-1 so far, an early stop."""
    if not run.state:
        return
    if ema is not None:
        # a checkpoint without EMA weights (EMA switched on at resume) starts the EMA at the loaded weights
        ema.module.load_state_dict(run.state["ema"]) if run.state.get("ema") else ema.set(run.model)
    best["top1"], best["since"] = run.state["best_top1"], run.state.get("evaluations_since_best", 0)
    if run.state.get("stopped_early_at") is not None:  # a finished early stop stays finished
        best["stopped_at"] = run.stop_step = run.state["stopped_early_at"]


def run_finetune(config: FinetuneConfig) -> Path:
    """Fine-tune as configured, resuming from the run directory's latest checkpoint; returns the run directory.

    Raises Preempted after saving when a stop signal arrives, TrainingDiverged after run.max_consecutive_skips
    non-finite steps in a row.
    """
    validate_finetune(config)
    check_wandb_credentials(config.logger)
    with process_group(resolve_device(config.run.device)) as (device, info, stop):
        return _finetune(config, device, info, stop)


def _finetune(config: FinetuneConfig, device: torch.device, info: DistInfo, stop: StopSignal) -> Path:
    precision = resolve_precision(config.run.precision, device)
    torch.manual_seed(config.run.seed)  # the same initial weights (head, re-initialised CPB MLPs) on every rank
    config, model, classes, train_set, val_set = _build_model_and_data(config, info)
    model.to(device)
    # with data.val_fraction the held-out labelled images steer best.pt and early stopping; val_set is scored once
    holdout_set = _labelled_eval_set(config, "held_out") if config.data.val_fraction > 0 else None
    if config.train.head_init == "linear_probe" and find_latest_checkpoint(run_directory(config.run)) is None:
        fit_top1 = _init_head_by_linear_probe(model, config, precision, len(classes))
        log.info(f"classifier initialised by a linear probe of the frozen features (train top-1 {fit_top1:.1f}%)")
    ema = ModelEmaV3(model, decay=config.train.ema_decay) if config.train.ema else None  # a plain copy, unwrapped
    random_seed(config.run.seed, info.rank)  # each rank its own drop path and mixup draws (numpy's global RNG)
    micro_batch, accum = config.data.batch_size, config.optim.accum_steps
    # each rank takes every world_size-th image of one shuffled order: the per-rank share sets the epoch length
    steps_per_epoch = len(train_set) // info.world_size // (micro_batch * accum)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"one optimizer step needs data.batch_size * optim.accum_steps * processes = "
            f"{micro_batch * accum * info.world_size} labelled images but there are {len(train_set)}; lower the "
            "batch size or label more images"
        )
    best = {"top1": -1.0, "since": 0}  # the best top-1 so far, evaluations since it
    run, lr, optimizer_step = start_training(
        config, model, info, stop, device, precision, steps_per_epoch, layer_decay=config.train.layer_decay,
        extra_meta=lambda step: {
            **_checkpoint_meta(model, classes, best["top1"]),
            "ema": ema.module.state_dict() if ema is not None else None,
            "evaluations_since_best": best["since"],
            "stopped_early_at": best.get("stopped_at"),
        },
    )  # fmt: skip
    scored_set = holdout_set if holdout_set is not None else val_set  # what the evaluations during training score
    val_loader = _eval_loader(scored_set, config, info, device)
    # the evaluations during training score a fixed subset when train.eval_num_images asks for one
    val_subset = _evaluation_subset(scored_set, config.train.eval_num_images, config.run.seed)
    train_val_loader = val_loader if val_subset is scored_set else _eval_loader(val_subset, config, info, device)
    loss_fn = _classification_loss(config, len(classes))
    monitor = BadDataMonitor(config.data.max_bad_fraction, config.data.bad_check_after, info.world_size, True)

    with run.running(lambda meta, path: _check_resumable(meta, run.config, classes, path)):
        _restore_state(run, ema, best)
        size = f"{config.model.img_size}px / window {config.model.window_size}"
        what = f"fine-tuning {config.model.arch} at {size} (stage windows {model.stage_window_sizes})"
        log.info(startup_line(run, device, precision, lr, what, f"{len(train_set)} images of {len(classes)} classes"))
        if val_subset is not scored_set:
            what = "held-out" if holdout_set is not None else "validation"
            log.info(f"evaluating {len(val_subset)} of {len(scored_set)} {what} images during training, all at the end")
        model.train()
        batches = monitored(endless(_train_loader(train_set, config, run, info, device)), monitor)
        final_done = False
        while run.step < run.stop_step:
            step, grad_norm = optimizer_step(batches, loss_fn)
            if ema is not None:
                ema.update(model, step=step)
            if run.log_due():  # bad_samples: summed over ranks, which all stop here past data.max_bad_fraction
                run.log({**run.training_metrics(grad_norm), "bad_samples": monitor.reduce(info, device)})
            with run.timer.measure("excluded"):
                if step == run.stop_step:  # the end (schedule or run.max_steps): the whole set, confusion matrix
                    final = holdout_set is None  # with a held-out part the evaluation images come after the loop
                    final_done = _evaluate(run, val_loader, ema, classes, best, precision, final=final)
                elif run.epoch_done and (step // steps_per_epoch) % config.train.eval_every == 0:
                    _evaluate(run, train_val_loader, ema, classes, best, precision, final=False)
            if 0 < config.train.patience <= best["since"] and step < run.stop_step:
                best["stopped_at"] = run.stop_step = step  # end_of_step saves the last step
                log.info(f"early stop at step {step}: no better top-1 in {best['since']} evaluations")
            run.end_of_step(save_now=run.epoch_done)  # saves and raises Preempted if a stop signal came
        if holdout_set is not None:  # best.pt, chosen on the held-out images, scored once on the evaluation images
            if not _test_best(run, val_set, config, classes, precision):
                raise Preempted(run.step, stop.name)
        # resumed at the end, or stopped during the final evaluation last time: its checkpoint is on disk already
        elif not final_done and not _evaluate(run, val_loader, ema, classes, best, precision, final=True):
            raise Preempted(run.step, stop.name)
    which = "held-out " if holdout_set is not None else ""
    log.info(f"done at step {run.step}/{run.total_steps}. best {which}top-1 {best['top1']:.2f}%; run dir {run.run_dir}")
    return run.run_dir


def _classification_loss(config: FinetuneConfig, num_classes: int) -> LossFn:
    """train_step's loss_fn: the images normalised on the device, mixup / cutmix when configured, the criterion."""
    mixup, criterion = build_mixup_and_loss(config.augment, num_classes)
    # timm's 8-bit RGB pipeline normalises in the workers; other data keeps raw values up to the device
    normalize = (
        Normalizer(config.data.mean, config.data.std)
        if keeps_raw_values(config.data, config.model.in_chans)
        else normalize_images
    )

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, targets = normalize(batch[0]), batch[1]
        if mixup is not None:
            even = images.shape[0] // 2 * 2  # mixup pairs images; a batch short of a bad sample may be odd
            images, targets = mixup(images[:even], targets[:even])  # soft targets (B, classes), smoothing included
        return criterion(model(images), targets)

    return loss_fn


def _evaluation_subset(dataset: Dataset, num_images: int | None, seed: int) -> Dataset:
    """A fixed random `num_images` of `dataset` in index order (the same at every evaluation, on every rank)."""
    if num_images is None or num_images >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:num_images].tolist()))


def _labelled_eval_set(config: FinetuneConfig, part: str) -> Dataset:
    """A part ("train" / "held_out") of the labelled training images with the evaluation transform."""
    model_cfg, interpolation = config.model, config.augment.interpolation
    return build_labelled_eval_dataset(config.data, model_cfg.img_size, part, interpolation, model_cfg.in_chans)


@torch.no_grad()
def frozen_features(
    model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features (N, num_features) float32: what head.fc reads, labels (N,)) in eval mode; bad images dropped."""
    device = next(model.parameters()).device
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, worker_init_fn=LoaderWorkerInit(),
        collate_fn=collate_good_only,
    )  # fmt: skip
    features, labels = [], []
    with eval_mode(model):
        for images, targets, *_ in loader:
            with autocast_context(precision, device):
                x = model.forward_features(normalize_images(images.to(device)))
                features.append(model.forward_head(x, pre_logits=True).float())  # B, num_features
            labels.append(targets.to(device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def _init_head_by_linear_probe(
    model: nn.Module, config: FinetuneConfig, precision: str, num_classes: int
) -> float:  # fmt: skip
    """LP-FT: head.fc set to a logistic regression on the frozen features of the training images (evaluation
    transform); returns its top-1 (%) on them."""
    features, labels = frozen_features(
        model, _labelled_eval_set(config, "train"), config.data.eval_batch_size, config.data.num_workers, precision
    )
    weight, bias = fit_logistic_regression(features, labels, num_classes, l2=1e-3)
    model.head.fc.weight.copy_(weight)
    model.head.fc.bias.copy_(bias)
    return 100.0 * ((features @ weight.T + bias).argmax(dim=1) == labels).float().mean().item()


def _save_confusion(run: TrainingRun, confusion: torch.Tensor, classes: list[str]) -> None:
    """images/confusion_matrix.png (and to W&B) from rank 0."""
    if run.info.is_main:
        from .figures import save_confusion_matrix  # matplotlib: only for the final picture

        path = save_confusion_matrix(confusion, classes, run.run_dir / "images" / "confusion_matrix.png")
        run.logger.log_images(run.step, {"confusion_matrix": path})


def _test_best(
    run: TrainingRun, test_set: Dataset, config: FinetuneConfig, classes: list[str], precision: str
) -> bool:  # fmt: skip
    """Score best.pt (chosen on the held-out images) once on the evaluation images: test_* metrics, final_test_* in
    the summary, the confusion matrix. False, having logged nothing, when a stop signal cut it short."""
    device, info = next(run.model.parameters()).device, run.info
    best_path = run.run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
    if info.distributed:
        torch.distributed.barrier()  # rank 0 may still be writing best.pt from the last evaluation
    best = load_checkpoint(best_path)  # to the CPU; load_state_dict copies it onto the device
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.model.load_state_dict(best["model"])
    loader = _eval_loader(test_set, config, info, device)
    try:
        result = _scored(run, run.model, loader, precision, confusion=True, what="test of best.pt")
    except EvaluationStopped:
        log.info(f"{run.stop.name} during the test of best.pt at step {run.step}: stopped it")
        return False
    finally:
        run.model.load_state_dict(trained)  # the last step's weights, as the resume checkpoint holds them
    confusion = result.pop("confusion")
    run.log({f"test_{k}": v for k, v in result.items()} | {"best_step": best["step"]})
    run.logger.log_summary({"final_test_top1": result["top1"], "final_test_top5": result["top5"]})
    _save_confusion(run, confusion, classes)
    log.info(f"best.pt (step {best['step']}) on the {result['num_images']} evaluation images: top-1 "
             f"{result['top1']:.2f}%, top-5 {result['top5']:.2f}%")  # fmt: skip
    return True


def _build_model_and_data(
    config: FinetuneConfig, info: DistInfo
) -> tuple[FinetuneConfig, nn.Module, list[str], Dataset, Dataset]:
    """The classifier (pretrained weights unless the run resumes) and the labelled sets; the config as resolved."""
    pretrained = load_pretrained(config.pretrained, config.pretrained_format) if config.pretrained else None
    model_cfg = resolve_model_config(config.model, pretrained)
    config = dataclasses.replace(config, model=from_dict(FinetuneModelConfig, to_dict(model_cfg)))  # as saved
    try:
        check_image_statistics(config.data.mean, config.data.std, config.data.max_image_pixels, model_cfg.in_chans)
    except ConfigError as e:
        raise ConfigError(f"{e} (model.in_chans={model_cfg.in_chans} as resolved from the checkpoint)") from None
    in_chans = model_cfg.in_chans
    train_set, classes = build_train_dataset(config.data, model_cfg.img_size, config.augment, in_chans)
    val_set, _ = build_val_dataset(config.data, model_cfg.img_size, config.augment.interpolation, in_chans)
    resuming = find_latest_checkpoint(run_directory(config.run)) is not None  # its own weights win
    model = build_classifier(model_cfg, len(classes), None if resuming else pretrained, verbose=info.is_main)
    if config.train.reinit_cpb_mlp and not resuming:
        reinitialised = reinit_cpb_mlp(model, seed=config.run.seed)
        log.info(f"re-initialised {len(reinitialised)} CPB MLPs (ablation)")
    return config, model, classes, train_set, val_set


def _train_loader(
    dataset: Dataset, config: FinetuneConfig, run: TrainingRun, info: DistInfo, device: torch.device
) -> DataLoader:
    """One loader for the run, from the epoch and batch where the run stands (each rank a share of one order)."""
    batches_per_epoch = run.steps_per_epoch * config.optim.accum_steps
    return build_pretrain_loader(
        dataset, batch_size=config.data.batch_size, num_workers=config.data.num_workers, seed=config.run.seed,
        epoch=run.step // run.steps_per_epoch, pin_memory=config.data.pin_memory and device.type == "cuda",
        rank=info.rank, world_size=info.world_size, batches_per_epoch=batches_per_epoch,
        skip_batches=(run.step % run.steps_per_epoch) * config.optim.accum_steps, collate_fn=collate_good,
    )  # fmt: skip


def _eval_loader(dataset: Dataset, config: FinetuneConfig, info: DistInfo, device: torch.device) -> DataLoader:
    """This rank's disjoint share of the evaluation set (padded even): the counts are summed over ranks."""
    return DataLoader(
        EvalShard(dataset, info.rank, info.world_size),
        batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        pin_memory=config.data.pin_memory and device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
        worker_init_fn=LoaderWorkerInit(),
        collate_fn=collate_good_only,
    )


def _checkpoint_meta(model: nn.Module, classes: list[str], best_top1: float) -> dict[str, Any]:
    """What identifies a fine-tuned model besides its weights (saved with every checkpoint and best.pt)."""
    return {
        "stage_window_sizes": model.stage_window_sizes,
        "pretrained_window_sizes": list(model.pretrained_window_sizes),
        "num_classes": len(classes),
        "class_names": classes,
        "best_top1": best_top1,
    }


def _evaluate(
    run: TrainingRun, loader: DataLoader, ema: ModelEmaV3 | None, classes: list[str], best: dict[str, float],
    precision: str, final: bool,
) -> bool:  # fmt: skip
    """Top-1 / top-5 of the model (and its EMA) on `loader`, keeping best.pt; `final` adds the confusion matrix and
    summary.json's final numbers. False, having logged nothing, when a stop signal cut it short."""
    model, info, step = run.model, run.info, run.step
    try:
        what = "final evaluation" if final else "evaluation"
        result = _scored(run, model, loader, precision, confusion=final, what=what)
        if ema is not None:
            ema_metrics = _scored(run, ema.module, loader, precision, confusion=False, what="EMA evaluation")
    except EvaluationStopped:
        log.info(f"{run.stop.name} during the evaluation at step {step}: stopped it")
        return False
    confusion = result.pop("confusion", None)
    metrics = {f"val_{k}": v for k, v in result.items()}
    if ema is not None:
        metrics.update({f"ema_val_{k}": v for k, v in ema_metrics.items() if k != "num_images"})
    best["since"] += 1
    if metrics["val_top1"] > best["top1"]:  # the same on every rank: the counts were summed over ranks
        best["top1"], best["since"] = metrics["val_top1"], 0
        weights = full_model_state_dict(model, run.sharded)  # every rank joins the gather under FSDP
        if info.is_main:
            ema_weights = ema.module.state_dict() if ema is not None else None
            state = {"model": weights, "ema": ema_weights, "step": step, "config": run.config,
                     **_checkpoint_meta(model, classes, best["top1"])}  # fmt: skip
            save_checkpoint(run.run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT, state)
    run.logger.update_best(step, "best_val_top1", metrics["val_top1"], mode="max")
    metrics.update(best_top1=best["top1"], epoch=step / run.steps_per_epoch)
    run.log(metrics)
    if confusion is not None:
        _save_confusion(run, confusion, classes)
    if final:
        run.logger.log_summary({"final_val_top1": metrics["val_top1"], "final_val_top5": metrics["val_top5"]})
    return True


def _scored(
    run: TrainingRun, model: nn.Module, loader: DataLoader, precision: str, confusion: bool, what: str
) -> dict[str, Any]:
    """evaluate_classifier with the run's stop signal asked at every batch and the images counted on rank 0."""
    device = next(model.parameters()).device
    total = len(loader.dataset) * run.info.world_size  # EvalShard: every rank's padded share
    progress = Progress(  # rank 0 alone counts (on_batch): no bar on the others
        total, every=max(1, total // 10), desc=f"{what} at step {run.step}", stream=sys.stdout,
        tty=None if run.info.is_main else False,
    )  # fmt: skip
    on_batch = (lambda n: progress.update(n * run.info.world_size)) if run.info.is_main else None
    try:
        return evaluate_classifier(
            model, loader, precision, device, confusion=confusion, info=run.info, should_stop=run.stop.should_stop,
            on_batch=on_batch,
        )  # fmt: skip
    finally:
        progress.close()


def evaluate_transfer(config: FinetuneConfig) -> dict[str, Any]:
    """Evaluate the fine-tuned classifier `config.evaluate` at model.img_size / window_size (the CPB normalised as in
    its training: the SwinV2 paper's direct transfer) without training; rank 0 writes evaluation.json."""
    if not config.evaluate:
        raise ConfigError("evaluate is not set: give the fine-tuned run directory or checkpoint to evaluate")
    validate_finetune(config)  # with `evaluate` set: only what an evaluation uses
    with process_group(resolve_device(config.run.device)) as (device, info, _):
        return _evaluate_transfer(config, device, info)


def _evaluate_transfer(config: FinetuneConfig, device: torch.device, info: DistInfo) -> dict[str, Any]:
    precision = resolve_precision(config.run.precision, device)
    weights = load_pretrained(config.evaluate, config.pretrained_format)
    if "head.fc.weight" not in weights.state_dict:
        raise ValueError(f"{weights.path} has no classifier head (head.fc.weight): evaluate a fine-tuned checkpoint")
    model_cfg = resolve_model_config(config.model, weights)
    val_set, classes = build_val_dataset(
        config.data, model_cfg.img_size, config.augment.interpolation, model_cfg.in_chans
    )
    num_classes = weights.state_dict["head.fc.weight"].shape[0]
    if num_classes != len(classes):
        raise ValueError(f"{weights.path} classifies {num_classes} classes but the data has {len(classes)}")
    trained_classes = weights.extra.get("class_names")
    if trained_classes is not None and list(trained_classes) != classes:
        # the head's outputs are in the order of the training class folders: other names would be scored wrongly
        changed = [f"{i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(trained_classes, classes)) if a != b]
        raise ValueError(
            f"{weights.path} was fine-tuned on other classes than the data has ({', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}); evaluate on folders named as in training: {list(trained_classes)}"
        )
    model = build_classifier(model_cfg, num_classes, weights, keep_head=True, verbose=info.is_main).to(device)
    metrics = evaluate_classifier(model, _eval_loader(val_set, config, info, device), precision, device, info=info)
    trained = weights.model_config or {}
    result = {
        "checkpoint": str(weights.path),
        "trained_img_size": trained.get("img_size"),
        "trained_window_size": trained.get("window_size"),
        "img_size": model_cfg.img_size,
        "window_size": model_cfg.window_size,
        "stage_window_sizes": model.stage_window_sizes,
        "pretrained_window_sizes": list(model.pretrained_window_sizes),
        **metrics,
    }
    if not info.is_main:
        return result
    run_dir = run_directory(config.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    log.info(
        f"{weights.path} (trained at {result['trained_img_size']}px / window {result['trained_window_size']}) "
        f"evaluated at {model_cfg.img_size}px / window {model_cfg.window_size}: top-1 {metrics['top1']:.2f}%, "
        f"top-5 {metrics['top5']:.2f}% on {metrics['num_images']} images"
    )
    return result
