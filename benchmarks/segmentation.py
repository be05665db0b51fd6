"""A dense-task check: does SimMIM pretraining help garment segmentation on real photographs?

The task: Fashion-MNIST garments pasted at random positions and scales onto crops of scikit-image's bundled
photographs, labelled per pixel (0 background, garment class + 1: 11 classes). A garment's mask is where its
grey intensity is above --mask-threshold; it is drawn in a random tint with its own texture. Training scenes use
the Fashion-MNIST training split and seven photographs; the held-out scenes use the test split and two other
photographs (chelsea, coffee), with a fixed seed.

1. SimMIM-pretrain a small SwinV2 on the 60k Fashion-MNIST training images, labels unused, at --pretrain-size px
   with window --pretrain-window (simmim_swin.pretrain.run_pretrain), or take a finished run with --pretrained.
2. For each seed, train encoder + an FPN-style head together (AdamW, cross-entropy, --steps steps) at --size px
   with window --window, once from the pretrained encoder (CPB transferred to the new windows) and once from
   scratch, and evaluate mIoU and pixel accuracy on --num-test held-out scenes.
3. Print a table and write it as JSON to --json (benchmarks/results/segmentation.json).

Defaults (arch pico, three stages: 32 px / window 4 -> 64 px / window 8, stage windows [4, 4, 2] -> [8, 8, 4];
one pretraining epoch, 800 fine-tuning steps of 16 scenes, seeds 0 and 1) take about 25 minutes on a 2-core CPU
shared with other jobs. At 300 steps both variants still predict background almost everywhere. --pretrained
RUN_DIR reuses a finished pretraining run (e.g. outputs/segmentation/pretrain).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from simmim_swin.config import PretrainConfig, from_dict
from simmim_swin.data.datasets import PHOTO_FILES, skimage_data_dir
from simmim_swin.data.fashion_mnist import load_fashion_mnist
from simmim_swin.files import atomic_write
from simmim_swin.models.simmim import build_encoder
from simmim_swin.models.swinv2 import SwinTransformerV2
from simmim_swin.pretrain import run_pretrain
from simmim_swin.progress import command_logging
from simmim_swin.transfer import load_encoder_weights, load_pretrained

NUM_CLASSES = 11  # background + the 10 Fashion-MNIST classes
TEST_PHOTOS = ("chelsea.png", "coffee.png")  # backgrounds of the held-out scenes only
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics pretraining on grey-in-RGB Fashion-MNIST uses
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# data


def load_photos(split: str) -> list[np.ndarray]:
    """The bundled photographs (H, W, 3) uint8 used as backgrounds of the train or test scenes."""
    names = [n for n in PHOTO_FILES if (n in TEST_PHOTOS) == (split == "test")]
    data_dir = skimage_data_dir()
    photos = []
    for name in names:
        with Image.open(data_dir / name) as img:
            photos.append(np.asarray(img.convert("RGB")))
    return photos


def make_scenes(
    garments: np.ndarray,
    classes: np.ndarray,
    photos: list[np.ndarray],
    num: int,
    size: int,
    rng: np.random.Generator,
    max_garments: int = 2,
    mask_threshold: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` scenes: garments pasted on photo crops.

    Args:
        garments: (N, 28, 28) uint8 Fashion-MNIST images; classes: (N,) their labels 0..9.
        photos: backgrounds (H, W, 3) uint8, each at least `size` px on both sides.
        max_garments: 1..max_garments garments per scene, each 0.35..0.75 of the side; later ones cover earlier.
        mask_threshold: a garment pixel belongs to the garment where its intensity (0..1) is above this.
    Returns:
        images (num, 3, size, size) uint8 and labels (num, size, size) int64 (0 background, class + 1).
    """
    images = np.empty((num, size, size, 3), np.uint8)
    labels = np.zeros((num, size, size), np.int64)
    for i in range(num):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(size, min(photo.shape[:2]) // 2 + 1))  # crop side before resizing to `size`
        y, x = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        scene = np.asarray(crop, np.float32) / 255  # size, size, 3
        for _ in range(rng.integers(1, max_garments + 1)):
            k = rng.integers(len(garments))
            g_side = int(rng.uniform(0.35, 0.75) * size)
            grey = np.asarray(Image.fromarray(garments[k]).resize((g_side, g_side), Image.BILINEAR), np.float32) / 255
            gy, gx = rng.integers(size - g_side + 1), rng.integers(size - g_side + 1)
            mask = grey > mask_threshold  # g_side, g_side
            tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
            region = scene[gy : gy + g_side, gx : gx + g_side]
            region[mask] = (0.15 + 0.85 * grey[mask, None]) * tint  # the garment's own texture in a random colour
            labels[i, gy : gy + g_side, gx : gx + g_side][mask] = classes[k] + 1
        images[i] = np.round(scene * 255).astype(np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float with ImageNet statistics (what the pretraining saw)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# model


class FPNHead(nn.Module):
    """FPN-style segmentation head: a 1x1 conv per stage to a common width, upsampled to the finest stage and
    summed, a 3x3 conv + ReLU, a 1x1 conv to classes, bilinear upsampling to the input size.

    Written here because no maintained segmentation library (mmseg, segmentation_models_pytorch) is installed
    offline; these few layers are all the check needs.
    """

    def __init__(self, in_channels: list[int], width: int, num_classes: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Conv2d(width, width, 3, padding=1)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """features: (B, C_i, H_i, W_i), finest first -> logits (B, num_classes, *out_size)."""
        finest = features[0].shape[-2:]
        x = sum(
            F.interpolate(conv(f), size=finest, mode="bilinear", align_corners=False)
            if f.shape[-2:] != finest
            else conv(f)
            for conv, f in zip(self.lateral, features)
        )  # B, width, H_0, W_0
        x = self.classify(F.relu(self.fuse(x)))  # B, num_classes, H_0, W_0
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """A SwinV2 encoder's per-stage maps through an FPNHead."""

    def __init__(self, encoder: SwinTransformerV2, width: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = FPNHead([info["num_chs"] for info in encoder.feature_info], width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H, W)."""
        features = self.encoder.forward_intermediates(x, intermediates_only=True)  # per stage (B, C_i, H_i, W_i)
        return self.head(features, x.shape[-2:])


def build_segmenter(args: argparse.Namespace, pretrained_dir: Path | None) -> Segmenter:
    """The segmenter at --size / --window; the encoder from `pretrained_dir` (CPB transferred) or random."""
    kwargs = dict(img_size=args.size, window_size=args.window, drop_path_rate=args.drop_path)
    if pretrained_dir is None:
        return Segmenter(build_encoder(args.arch, **kwargs), args.head_width, NUM_CLASSES)
    weights = load_pretrained(pretrained_dir)
    arch = (weights.model_config or {}).get("arch", args.arch)
    if arch != args.arch:
        raise ValueError(f"--pretrained {pretrained_dir} holds a {arch!r} encoder; pass --arch {arch}")
    encoder = build_encoder(arch, pretrained_window_sizes=weights.cpb_windows(), **kwargs)
    load_encoder_weights(encoder, weights.state_dict, source=str(weights.path))
    return Segmenter(encoder, args.head_width, NUM_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# training and evaluation


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up for --warmup-steps, then cosine to zero at --steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + np.cos(np.pi * progress))


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows the true class, columns the predicted one."""
    index = labels.flatten() * num_classes + logits.argmax(1).flatten()
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def scores(matrix: torch.Tensor) -> dict:
    """mIoU over the classes present in the labels or the predictions, pixel accuracy, per-class IoU."""
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = tp / union.clamp(min=1)
    present = union > 0
    return {
        "miou": 100 * iou[present].mean().item(),
        "pixel_acc": 100 * (tp.sum() / matrix.sum()).item(),
        "iou_per_class": [round(100 * v, 2) if p else None for v, p in zip(iou.tolist(), present.tolist())],
    }


@torch.no_grad()
def evaluate(model: Segmenter, images: torch.Tensor, labels: torch.Tensor, batch: int = 100) -> dict:
    model.eval()
    matrix = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in range(0, len(images), batch):
        matrix += confusion(model(normalise(images[i : i + batch])), labels[i : i + batch], NUM_CLASSES)
    model.train()
    return scores(matrix)


def train(args: argparse.Namespace, variant: str, seed: int, pretrained_dir: Path | None, data: dict) -> dict:
    """Encoder and head trained together from the pretrained encoder or from scratch; the held-out scores."""
    torch.manual_seed(seed)
    model = build_segmenter(args, pretrained_dir if variant == "pretrained" else None)
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "cpb_mlp" in n or "logit_scale" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim <= 1 or "cpb_mlp" in n or "logit_scale" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    rng = np.random.default_rng([seed, 1])  # the same training scenes for both variants of a seed
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        images, labels = make_scenes(*data["train"], args.batch, args.size, rng, args.max_garments, args.mask_threshold)
        loss = F.cross_entropy(model(normalise(images)), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  {variant} seed {seed} step {step:4d} loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - start
    result = evaluate(model, *data["test"])
    print(f"  {variant} seed {seed}: mIoU {result['miou']:.2f}, pixel acc {result['pixel_acc']:.2f}", flush=True)
    return {"variant": variant, "seed": seed, **result, "train_s": train_s}


def pretrain(args: argparse.Namespace) -> Path:
    """SimMIM on the 60k Fashion-MNIST training images, no labels; returns the run dir (a finished run is reused)."""
    config = from_dict(
        PretrainConfig,
        dict(
            model=dict(arch=args.arch, img_size=args.pretrain_size, window_size=args.pretrain_window),
            mask=dict(mask_patch_size=args.mask_patch, mask_ratio=0.6, norm_target=False),
            data=dict(source="fashion_mnist", split="train", batch_size=args.pretrain_batch, num_workers=0),
            optim=dict(base_lr=args.pretrain_lr, warmup_lr=args.pretrain_lr / 100, min_lr=args.pretrain_lr / 100),
            schedule=dict(kind="cosine", epochs=args.pretrain_epochs, warmup_epochs=min(1, args.pretrain_epochs - 1)),
            logger=dict(log_every=50, image_every=10**9),
            run=dict(name="pretrain", output_dir=args.out, device="cpu", save_every=10**9, keep_last=1),
        ),
    )
    return run_pretrain(config)


# ----------------------------------------------------------------------------------------------------------------
# entry point


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/segmentation", help="folder of the pretraining run")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "segmentation.json"))
    p.add_argument("--pretrained", default=None, help="a finished pretraining run dir / checkpoint: skip pretraining")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--arch", default="pico", help="pico / nano / micro ... (a SWINV2_SIZES name)")
    p.add_argument("--pretrain-size", type=int, default=32)
    p.add_argument("--pretrain-window", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=1, help="epochs of 60k images")
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=8e-3, help="base lr for a batch of 512 (scaled linearly)")
    p.add_argument("--mask-patch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--max-garments", type=int, default=2)
    p.add_argument("--mask-threshold", type=float, default=0.1)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pretrained_dir = Path(args.pretrained) if args.pretrained else pretrain(args)
    pretrain_s = time.perf_counter() - start
    data = {
        "train": (*load_fashion_mnist("train"), load_photos("train")),
        "test": make_scenes(
            *load_fashion_mnist("test"), load_photos("test"), args.num_test, args.size, np.random.default_rng(12345),
            args.max_garments, args.mask_threshold,
        ),
    }  # fmt: skip
    results = [
        train(args, variant, seed, pretrained_dir, data) for seed in args.seeds for variant in ("pretrained", "scratch")
    ]
    rows = []
    for variant in ("pretrained", "scratch"):
        runs = [r for r in results if r["variant"] == variant]
        miou, acc = [r["miou"] for r in runs], [r["pixel_acc"] for r in runs]
        rows.append({
            "variant": variant, "miou_mean": statistics.mean(miou), "pixel_acc_mean": statistics.mean(acc),
            "miou_per_seed": miou, "pixel_acc_per_seed": acc,
        })  # fmt: skip
    wall = time.perf_counter() - start
    print(
        f"\nGarment segmentation, {args.arch} at {args.size}px / window {args.window}, {args.steps} steps of "
        f"{args.batch}; {args.num_test} held-out scenes, {NUM_CLASSES} classes"
    )
    print("| variant | mIoU mean (%) | pixel acc mean (%) | mIoU per seed | pixel acc per seed |")
    print("|---|---|---|---|---|")
    for row in rows:
        per_miou = ", ".join(f"{v:.2f}" for v in row["miou_per_seed"])
        per_acc = ", ".join(f"{v:.2f}" for v in row["pixel_acc_per_seed"])
        print(f"| {row['variant']} | {row['miou_mean']:.2f} | {row['pixel_acc_mean']:.2f} | {per_miou} | {per_acc} |")
    print(f"pretrained - scratch: {rows[0]['miou_mean'] - rows[1]['miou_mean']:+.2f} mIoU points")
    print(
        f"wall time {wall / 60:.1f} min (pretraining {pretrain_s / 60:.1f} min), "
        f"torch threads {torch.get_num_threads()}"
    )
    summary = {
        "args": vars(args), "pretrained_dir": str(pretrained_dir), "results": results, "summary": rows,
        "wall_s": wall, "pretrain_s": pretrain_s,
    }  # fmt: skip
    atomic_write(args.json, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    with command_logging():  # the runs' messages and progress lines, as the commands show them
        main()
