"""Online representation probes (is pretraining working?): every probe.every steps the frozen encoder embeds a
small labelled holdout kept on the device, and a weighted kNN (optionally a logistic regression) scores it. Nothing
here draws from the global random generators and the model's mode is restored: training goes on as without it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ProbeConfig
from .data.classification import balanced_subset
from .data.fashion_mnist import FASHION_MNIST_DIR, FashionMNIST
from .data.transforms import build_eval_transform, normalize_images
from .distributed import DistInfo
from .engine import eval_mode
from .precision import autocast_context


@dataclass
class ProbeSet:
    """A labelled holdout on the device: this rank's share of the images (zero-padded), every rank all the labels."""

    config: ProbeConfig
    train_images: torch.Tensor  # share, 3, S, S uint8
    val_images: torch.Tensor  # share, 3, S, S uint8
    train_labels: torch.Tensor  # num_train int64
    val_labels: torch.Tensor  # num_val int64
    num_classes: int
    description: str


def _load_split(cfg: ProbeConfig, split: str, num: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(uint8 images (N, 3, S, S), labels (N,), class names or []) of one split, resized and centre-cropped."""
    from torchvision.datasets import ImageFolder

    from .data.shards import resolve_urls
    from .data.stream import open_image, read_samples

    transform = build_eval_transform(img_size, normalize=False)
    explicit = cfg.train if split == "train" else cfg.val
    classes: list[str] = []
    if cfg.source == "shards":

        def labelled(sample: dict, generator: torch.Generator) -> tuple[torch.Tensor, int]:
            if "cls" not in sample:
                raise ValueError("no .cls member: write the probe shards with `simmim-swin make-shards --labels`")
            with open_image(sample) as img:
                return transform(img), int(sample["cls"])

        items = read_samples(resolve_urls(explicit, what=f"probe.{split}")[0], num, labelled)
    else:
        if cfg.source == "fashion_mnist":
            dataset = FashionMNIST("train" if split == "train" else "test", transform, cfg.root or FASHION_MNIST_DIR)
        else:
            folder = Path(explicit if isinstance(explicit, str) else Path(cfg.root or "") / split)
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"probe {split} folder {folder} does not exist; give probe.root with train/ and val/ class "
                    f"folders or probe.{split}=DIR"
                )
            dataset = ImageFolder(str(folder), transform)
        items = [dataset[i] for i in balanced_subset(dataset.targets, min(num, len(dataset)), cfg.seed)]
        classes = list(dataset.classes)
    if not items:
        raise ValueError(f"the probe's {split} set (probe.source={cfg.source}) holds no readable labelled image")
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes


def _share(images: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous share of `images`, zero-padded to ceil(N / world_size) rows."""
    per_rank = math.ceil(len(images) / info.world_size)
    share = images[info.rank * per_rank : (info.rank + 1) * per_rank]
    padding = share.new_zeros((per_rank - len(share), *images.shape[1:]))
    return torch.cat([share, padding])


def build_probe_set(cfg: ProbeConfig, img_size: int, device: torch.device, info: DistInfo) -> ProbeSet:
    """Read the probe's images once (class-balanced where the labels are known upfront, else the first of the shards)
    and keep this rank's share on `device` as uint8."""
    train_images, train_labels, train_classes = _load_split(cfg, "train", cfg.num_train, img_size)
    val_images, val_labels, val_classes = _load_split(cfg, "val", cfg.num_val, img_size)
    if train_classes != val_classes:
        raise ValueError(
            f"the probe's train classes {train_classes[:10]} differ from its val classes {val_classes[:10]}"
        )
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    if len(train_labels.unique()) < 2:
        raise ValueError(
            f"the probe's training images hold a single class ({int(train_labels[0])}); shards written class by "
            "class give their first images from one class: shuffle them, or use probe.source=folder"
        )
    description = (
        f"{cfg.source}: {len(train_labels)} labelled / {len(val_labels)} scored images, {num_classes} classes, "
        f"every {cfg.every} steps"
    )
    return ProbeSet(
        config=cfg,
        train_images=_share(train_images, info).to(device),
        val_images=_share(val_images, info).to(device),
        train_labels=train_labels.to(device),
        val_labels=val_labels.to(device),
        num_classes=num_classes,
        description=description,
    )


def embed(
    model: nn.Module, images: torch.Tensor, batch_size: int, precision: str, sharded: bool = False
) -> dict[str, torch.Tensor]:
    """{"last": the final norm's output averaged over positions, "last2": that and the stage before's (MIM features
    are spread over depth)}: (N, D) float32, L2-normalised, of uint8 images; the model must be in eval mode."""
    encoder = getattr(model, "encoder", model)
    parts: dict[str, list[torch.Tensor]] = {"last": [], "before_last": []}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            parts[name].append(output.float().mean(dim=(1, 2)))  # B, H, W, C -> B, C

        return hook

    hooks = [encoder.norm.register_forward_hook(keep("last"))]
    if len(encoder.layers) > 1:
        hooks.append(encoder.layers[-2].register_forward_hook(keep("before_last")))
    try:
        for start in range(0, len(images), batch_size):
            batch = normalize_images(images[start : start + batch_size])
            with autocast_context(precision, images.device):
                if sharded:  # FSDP: the whole model runs (its root gathers the shared parameters), nothing masked
                    p = encoder.patch_size
                    model(batch, batch.new_zeros((len(batch), batch.shape[-2] // p, batch.shape[-1] // p)))
                else:
                    encoder.forward_features(batch)
    finally:
        for handle in hooks:
            handle.remove()
    last = F.normalize(torch.cat(parts["last"]), dim=1)
    features = {"last": last}
    if parts["before_last"]:
        before = F.normalize(torch.cat(parts["before_last"]), dim=1)
        features["last2"] = torch.cat([last, before], dim=1) / math.sqrt(2)  # unit norm, both stages weigh alike
    return features


def gather_rows(share: torch.Tensor, num_rows: int, info: DistInfo) -> torch.Tensor:
    """The ranks' equal-sized shares concatenated in rank order, cut to the first num_rows (the padding dropped)."""
    if not info.distributed:
        return share[:num_rows]
    shares = [torch.empty_like(share) for _ in range(info.world_size)]
    dist.all_gather(shares, share.contiguous())
    return torch.cat(shares)[:num_rows]


@torch.no_grad()
def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> float:
    """Top-1 (%) of DINO's weighted kNN: the k most cosine-similar training features vote for their class with
    weight exp(similarity / temperature); ties go to the lower class index."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    val_feats = F.normalize(val_feats.float(), dim=1)
    k = min(k, len(train_feats))
    correct = torch.zeros((), dtype=torch.long, device=val_feats.device)
    for start in range(0, len(val_feats), chunk):
        similarity = val_feats[start : start + chunk] @ train_feats.T  # chunk, N_train
        top_similarity, top_index = similarity.topk(k, dim=1)  # chunk, k
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(len(similarity), num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_index], weights)  # chunk, classes
        correct += (votes.argmax(dim=1) == val_labels[start : start + chunk]).sum()
    return 100.0 * correct.item() / len(val_feats)


def linear_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
) -> float:
    """Top-1 (%) of fit_logistic_regression's head on the features standardised with the training mean / std."""
    mean, std = train_feats.mean(dim=0), train_feats.std(dim=0) + 1e-6
    weight, bias = fit_logistic_regression((train_feats - mean) / std, train_labels, num_classes)
    predictions = ((val_feats - mean) / std @ weight.T + bias).argmax(dim=1)
    return 100.0 * (predictions == val_labels).float().mean().item()


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (classes, D), bias (classes,)) of a multinomial logistic regression: mean cross-entropy plus
    l2 / 2 * |weight|^2, minimised full-batch by L-BFGS from zero (deterministic: no random draw)."""
    x = features.float()
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def run_probe(
    model: nn.Module, probe_set: ProbeSet, precision: str, info: DistInfo, sharded: bool = False
) -> dict[str, float]:
    """probe_knn_top1[_last2] (and probe_linear_top1[_last2] with probe.linear) and probe_seconds of the frozen
    encoder, the same on every rank. `model`: SimMIM (or its encoder) unwrapped from DDP, or sharded under FSDP."""
    cfg = probe_set.config
    start = time.perf_counter()
    with eval_mode(model):
        train = embed(model, probe_set.train_images, cfg.batch_size, precision, sharded)
        val = embed(model, probe_set.val_images, cfg.batch_size, precision, sharded)
    metrics = {}
    train_labels, val_labels = probe_set.train_labels, probe_set.val_labels
    for name, train_share in train.items():
        suffix = "" if name == "last" else f"_{name}"
        train_feats = gather_rows(train_share, len(train_labels), info)
        val_feats = gather_rows(val[name], len(val_labels), info)
        metrics[f"probe_knn_top1{suffix}"] = knn_top1(
            train_feats, train_labels, val_feats, val_labels, cfg.k, cfg.temperature, probe_set.num_classes
        )
        if cfg.linear:
            metrics[f"probe_linear_top1{suffix}"] = linear_top1(
                train_feats, train_labels, val_feats, val_labels, probe_set.num_classes
            )
    metrics["probe_seconds"] = time.perf_counter() - start
    return metrics
