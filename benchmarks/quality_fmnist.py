"""Does SimMIM pretraining help? Fashion-MNIST: pretrain at a low resolution, fine-tune at a higher one on few labels.

1. SimMIM-pretrain a small SwinV2 on the 60k Fashion-MNIST training images, labels unused, at --pretrain-size px
   with window --pretrain-window (the 28 px images resized; simmim_swin.pretrain.run_pretrain).
2. Fine-tune at --size px with window --window (the CPB transferred, simmim_swin.finetune.run_finetune) on a
   class-balanced subset of --num-labelled training images, one subset per seed, and evaluate on the 10,000
   test images. Variants: `pretrained`; `scratch` (same recipe, random init); `reinit_cpb` (pretrained encoder,
   CPB MLPs re-initialised: what the position-bias transfer is worth).
3. Print a table (final-epoch top-1 / top-5, mean and sample standard deviation over seeds) and write it as
   JSON to --json (benchmarks/results/quality_fmnist.json).

Defaults fit a 2-core CPU in about 30 minutes: 32 px / window 4 -> 48 px / window 6 (stage windows [4, 4, 2] ->
[6, 6, 3]), 3 pretraining epochs, 15 fine-tuning epochs, two single-thread fine-tunes side by side. With so
short a fine-tuning, mixup / cutmix / random erasing slow convergence more than they regularise, so they are
off here (the reference recipe, conf/finetune/swinv2_base_w14_224.yaml, is for 100 ImageNet epochs). Scale up with
flags on a GPU, e.g.
    python benchmarks/quality_fmnist.py --device cuda --threads 0 --jobs 1 --size 64 --window 8 \
        --pretrain-epochs 50 --epochs 100 --embed-dim 96 --depths 2 2 6 --heads 3 6 12 --seeds 0 1 2 3 4
Runs live under --out and resume: starting the same command again reuses finished runs.

--in-chans 1 reads the images as the single grey band they are (instead of grey copied into RGB), with the
per-channel statistics `simmim-swin stats --source fashion-mnist` prints (data.mean / data.std); fine-tuning then
keeps raw values and uses crop / flip only (RandAugment and colour jitter are 8-bit RGB operations, so
--rand-augment has no effect there). --own-stats gives three channels the same treatment (grey in RGB with the
Fashion-MNIST statistics, crop / flip only): with it the two channel counts differ in nothing but the channels.
The median step time of the pretraining and of the fine-tunes (median over all of them) is recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from simmim_swin.cli.stats import fashion_mnist_moments
from simmim_swin.config import FinetuneConfig, PretrainConfig, from_dict
from simmim_swin.finetune import run_finetune
from simmim_swin.pretrain import run_pretrain

VARIANTS = ("pretrained", "scratch", "reinit_cpb")


def parse_args() -> argparse.Namespace:
    args = build_parser(__doc__).parse_args()
    suffix = f"_{args.in_chans}ch" if args.in_chans != 3 else "_own_stats" if args.own_stats else ""
    if raw_values(args) and args.rand_augment != "none":
        print(
            f"note: --rand-augment {args.rand_augment} is not applied (raw values: crop / flip only)", file=sys.stderr
        )
    args.out = args.out or f"outputs/quality_fmnist{suffix}"
    args.json = args.json or str(Path(__file__).parent / "results" / f"quality_fmnist{suffix}.json")
    return args


def build_parser(description: str) -> argparse.ArgumentParser:
    """The benchmark's flags (benchmarks/probe_correlation.py adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the runs (default outputs/quality_fmnist[_1ch])")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/quality_fmnist[_1ch].json)")
    p.add_argument("--in-chans", type=int, default=3, choices=(1, 3), help="1: one grey band with its own statistics")
    p.add_argument(
        "--own-stats", action="store_true",
        help="Fashion-MNIST's own statistics and crop / flip only also for --in-chans 3 (always so for 1)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--jobs", type=int, default=2, help="fine-tunes run side by side in this many processes")
    # model
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 4])
    p.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8])
    # pretraining
    p.add_argument("--pretrain-size", type=int, default=32)
    p.add_argument("--pretrain-window", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=8e-3, help="base lr for a batch of 512 (scaled linearly)")
    p.add_argument("--mask-patch", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--norm-target", action=argparse.BooleanOptionalAction, default=False)
    # fine-tuning
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--window", type=int, default=6)
    p.add_argument("--num-labelled", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-2, help="base lr for a batch of 512 (scaled linearly)")
    p.add_argument("--layer-decay", type=float, default=0.9)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--rand-augment", default="rand-m6-mstd0.5-inc1", help="timm RandAugment string; 'none': off")
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--reprob", type=float, default=0.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--crop-min", type=float, default=0.5, help="RandomResizedCrop's smallest area fraction")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (bf16 autocast also works on CPUs)")
    p.add_argument("--eval-every", type=int, default=100, help="epochs between test evaluations (and the last)")
    p.add_argument("--workers", type=int, default=0)
    return p


def model_overrides(args: argparse.Namespace) -> dict:
    return dict(arch="tiny", embed_dim=args.embed_dim, depths=args.depths, num_heads=args.heads, in_chans=args.in_chans)


def raw_values(args: argparse.Namespace) -> bool:
    """Whether the runs read raw values with Fashion-MNIST's statistics (one band, or --own-stats)."""
    return args.in_chans != 3 or args.own_stats


def statistics_overrides(args: argparse.Namespace) -> dict:
    """data.mean / data.std of Fashion-MNIST (what `simmim-swin stats --source fashion-mnist --in-chans N` prints)
    with --own-stats (always for one band); none otherwise: grey-in-RGB keeps ImageNet's like any 8-bit RGB data."""
    if not raw_values(args):
        return {}
    moments = fashion_mnist_moments(args.in_chans)
    return dict(mean=moments.mean.tolist(), std=moments.std.tolist())


def median_step_time(run_dir: Path) -> float | None:
    """Median step_time_s of a run's metrics.jsonl lines."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [line["step_time_s"] for line in lines if "step_time_s" in line]
    return statistics.median(times) if times else None


def pretrain(args: argparse.Namespace, out: Path) -> Path:
    """SimMIM on the 60k training images, no labels; returns the run dir (an existing finished run is reused)."""
    config = from_dict(
        PretrainConfig,
        dict(
            model=dict(
                **model_overrides(args),
                img_size=args.pretrain_size,
                window_size=args.pretrain_window,
                drop_path_rate=0.0,
            ),
            mask=dict(mask_patch_size=args.mask_patch, mask_ratio=args.mask_ratio, norm_target=args.norm_target),
            data=dict(
                source="fashion_mnist",
                split="train",
                batch_size=args.pretrain_batch,
                num_workers=args.workers,
                **statistics_overrides(args),
            ),  # fmt: skip
            optim=dict(base_lr=args.pretrain_lr, warmup_lr=args.pretrain_lr / 100, min_lr=args.pretrain_lr / 100),
            schedule=dict(kind="cosine", epochs=args.pretrain_epochs, warmup_epochs=min(1, args.pretrain_epochs - 1)),
            logger=dict(log_every=50, image_every=10**9),
            run=dict(name="pretrain", output_dir=str(out), device=args.device, save_every=200, keep_last=1),
        ),
    )
    return run_pretrain(config)


def finetune(args: argparse.Namespace, out: Path, variant: str, seed: int, pretrained: Path | None) -> dict:
    """One fine-tune; returns its final evaluation (metrics.jsonl's last val_* line)."""
    name = f"{variant}_seed{seed}"
    config = from_dict(
        FinetuneConfig,
        dict(
            pretrained=str(pretrained) if variant != "scratch" else None,
            model={
                **model_overrides(args),
                # from the checkpoint when there is one: a size name is refused unless it describes the weights
                **({"arch": None} if variant != "scratch" else {}),
                "img_size": args.size,
                "window_size": args.window,
                "drop_path_rate": args.drop_path,
            },
            data=dict(
                source="fashion_mnist",
                num_labelled=args.num_labelled,
                subset_seed=seed,
                batch_size=args.batch,
                eval_batch_size=500,
                num_workers=args.workers,
                crop_pct=1.0,  # the garment fills the 28 px frame: no border to crop away
                **statistics_overrides(args),
            ),
            augment=dict(
                rand_augment=None if args.rand_augment == "none" else args.rand_augment,
                crop_scale=[args.crop_min, 1.0],
                reprob=args.reprob,
                mixup=args.mixup,
                cutmix=args.cutmix,
                label_smoothing=args.smoothing,
            ),
            optim=dict(base_lr=args.lr, warmup_lr=args.lr / 100, min_lr=args.lr / 100, weight_decay=0.05),
            schedule=dict(kind="cosine", epochs=args.epochs, warmup_epochs=args.warmup_epochs),
            train=dict(
                layer_decay=args.layer_decay, eval_every=args.eval_every, reinit_cpb_mlp=variant == "reinit_cpb"
            ),
            logger=dict(log_every=20),
            run=dict(
                name=name,
                output_dir=str(out),
                device=args.device,
                precision=args.precision,
                seed=seed,
                save_every=10**9,
                keep_last=1,
            ),
        ),
    )
    run_dir = run_finetune(config)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [line for line in lines if "val_top1" in line][-1]
    return {
        "variant": variant, "seed": seed, "top1": final["val_top1"], "top5": final["val_top5"],
        "step_time_s": median_step_time(run_dir),
    }  # fmt: skip


def summarise(results: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for variant in variants:
        runs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        top1 = [r["top1"] for r in runs]
        rows.append(
            {
                "variant": variant,
                "top1_mean": statistics.mean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "top5_mean": statistics.mean(r["top5"] for r in runs),
                "top1_per_seed": top1,
            }
        )
    return rows


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def main() -> None:
    args = parse_args()
    _set_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    needs_pretraining = any(v != "scratch" for v in args.variants)
    pretrain_dir = pretrain(args, out) if needs_pretraining else None
    pretrain_time = time.perf_counter() - start
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    if args.jobs > 1:
        # independent fine-tunes side by side, one process each: on a small CPU two single-thread processes do
        # more work than one process with two threads (tiny matrices leave threads waiting on each other)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            args.jobs, mp_context=context, initializer=_set_threads, initargs=(args.threads,)
        ) as pool:
            results = list(pool.map(finetune, *zip(*[(args, out, v, s, pretrain_dir) for v, s in runs])))
    else:
        results = [finetune(args, out, variant, seed, pretrain_dir) for variant, seed in runs]
    rows = summarise(results, args.variants)
    wall = time.perf_counter() - start
    pretrain_step = median_step_time(pretrain_dir) if pretrain_dir else None
    finetune_step = statistics.median(r["step_time_s"] for r in results if r["step_time_s"] is not None)
    print(
        f"\nFashion-MNIST, {args.in_chans} channel(s), {args.num_labelled} labels, fine-tuned at {args.size}px / "
        f"window {args.window} "
        f"(pretrained at {args.pretrain_size}px / window {args.pretrain_window}); test set of 10,000 images"
    )
    print("| variant | top-1 mean ± std (%) | top-5 mean (%) | top-1 per seed |")
    print("|---|---|---|---|")
    for row in rows:
        seeds = ", ".join(f"{v:.2f}" for v in row["top1_per_seed"])
        print(
            f"| {row['variant']} | {row['top1_mean']:.2f} ± {row['top1_std']:.2f} | {row['top5_mean']:.2f} | {seeds} |"
        )
    by_name = {row["variant"]: row for row in rows}
    if "pretrained" in by_name and "scratch" in by_name:
        gap = by_name["pretrained"]["top1_mean"] - by_name["scratch"]["top1_mean"]
        print(f"pretrained - scratch: {gap:+.2f} points top-1 (goal: >= +5)")
    if pretrain_step is not None:
        print(f"median step time: pretraining {pretrain_step * 1000:.1f} ms, fine-tuning {finetune_step * 1000:.1f} ms")
    print(
        f"wall time {wall / 60:.1f} min (pretraining {pretrain_time / 60:.1f} min), torch threads "
        f"{torch.get_num_threads()}, {args.jobs} fine-tune process(es)"
    )
    summary = {
        "args": vars(args), "results": results, "summary": rows, "wall_s": wall, "pretrain_s": pretrain_time,
        "pretrain_step_time_s": pretrain_step, "finetune_step_time_s": finetune_step,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
