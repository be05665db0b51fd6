"""Which number tells whether pretraining works? Probes, reconstruction loss and fine-tuned accuracy, compared.

1. SimMIM-pretrain the small SwinV2 of benchmarks/quality.py on the 60k Fashion-MNIST training images
   (labels unused) with the online probe on (probe.source=fashion_mnist, kNN and linear): a probe and a
   checkpoint every (pretraining steps // --points) steps, --points checkpoints in all.
2. For each checkpoint: the probe's numbers at that step (metrics.jsonl), the masked-pixel loss on --val-images
   Fashion-MNIST test images with fixed masks (the validation reconstruction loss), and a fine-tune with
   quality.py's recipe on --num-labelled labels (seed 0), evaluated on the 10k test images; --jobs
   fine-tunes run side by side, --threads torch threads each.
3. Print the table and the Spearman rank correlation of each number with the fine-tuned top-1 across the
   checkpoints (the reconstruction loss is negated: lower should mean better), and write them as JSON to --json.

The model, pretraining and fine-tuning flags of quality.py apply (Fashion-MNIST only; --seeds, --variants,
--unlabelled and --pretrain-steps do not: one fine-tune per checkpoint, seed 0, the first --num-labelled).
The defaults (3 pretraining epochs, 15 fine-tuning epochs at 48 px) take well over half an hour on a shared
2-core CPU; the run in benchmarks/RESULTS.md adds
--pretrain-epochs 1 --pretrain-batch 48 --size 32 --window 4 --epochs 8 (18 minutes there).
Runs live under --out; starting the same command again reuses the finished pretraining and fine-tunes.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from quality import _set_threads, build_parser, finetune, model_overrides, preset_recipe, statistics_overrides

from simmim_swin.checkpoint import load_checkpoint
from simmim_swin.config import PretrainConfig, from_dict
from simmim_swin.data import FashionMNIST, Normalizer, make_fixed_batch
from simmim_swin.engine import evaluate_reconstruction
from simmim_swin.masking import MaskGenerator
from simmim_swin.models import build_simmim
from simmim_swin.pretrain import run_pretrain
from simmim_swin.progress import command_logging

FMNIST_TRAIN_IMAGES = 60000  # one pretraining epoch


def parse_args():
    p = build_parser(__doc__)
    p.add_argument("--points", type=int, default=5, help="checkpoints to compare (evenly spaced over the run)")
    p.add_argument("--val-images", type=int, default=1000, help="test images of the reconstruction loss")
    p.add_argument("--probe-train", type=int, default=2000)
    p.add_argument("--probe-val", type=int, default=1000)
    p.set_defaults(json=str(Path(__file__).parent / "results" / "probe_correlation.json"), out="outputs/probe_corr")
    # the recipe this was measured with: 15 epochs, evaluated once at the end
    p.set_defaults(preset="fashion_mnist", eval_every=100)
    args = p.parse_args()
    if args.val_images < 1:
        p.error(f"--val-images {args.val_images}: the reconstruction loss needs at least 1 test image, e.g. 1000")
    args.recipe = preset_recipe(args.preset)
    return args


def pretrain(args, out: Path, every: int) -> Path:
    """The probed pretraining: a checkpoint and a probe every `every` steps, all checkpoints kept."""
    config = from_dict(
        PretrainConfig,
        dict(
            model=dict(**model_overrides(args), img_size=args.pretrain_size, window_size=args.pretrain_window,
                       drop_path_rate=0.0),
            mask=dict(mask_patch_size=args.mask_patch, mask_ratio=args.mask_ratio, norm_target=args.norm_target),
            data=dict(source="fashion_mnist", split="train", batch_size=args.pretrain_batch, num_workers=args.workers,
                      **statistics_overrides(args)),
            optim=dict(base_lr=args.pretrain_lr, warmup_lr=args.pretrain_lr / 100, min_lr=args.pretrain_lr / 100),
            schedule=dict(kind="cosine", epochs=args.pretrain_epochs, warmup_epochs=min(1, args.pretrain_epochs - 1)),
            logger=dict(log_every=50, image_every=10**9),
            run=dict(name="pretrain", output_dir=str(out), device=args.device, save_every=every,
                     keep_last=args.points + 1),
            probe=dict(enabled=True, source="fashion_mnist", every=every, num_train=args.probe_train,
                       num_val=args.probe_val, linear=True),
        ),
    )  # fmt: skip
    return run_pretrain(config)


def reconstruction_loss(args, checkpoint: Path) -> float:
    """The masked-pixel loss of a checkpoint on the first --val-images test images with masks fixed by seed 0,
    normalised with the pretraining's statistics (ImageNet's for grey-in-RGB, the band's own for --in-chans 1)."""
    state = load_checkpoint(checkpoint)
    model = build_simmim(**model_overrides(args), img_size=args.pretrain_size, window_size=args.pretrain_window,
                         norm_target=47 if args.norm_target else None)  # fmt: skip
    model.load_state_dict(state["model"])
    masks = MaskGenerator(args.pretrain_size, args.mask_patch, 4, args.mask_ratio)
    images, fixed_masks = make_fixed_batch(
        FashionMNIST("test"), args.val_images, args.pretrain_size, masks, seed=0, in_chans=args.in_chans
    )
    batches = [(images[i : i + 250], fixed_masks[i : i + 250]) for i in range(0, args.val_images, 250)]
    normalize = Normalizer(**statistics_overrides(args))
    return evaluate_reconstruction(model, batches, "fp32", torch.device("cpu"), normalize=normalize)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else float("nan")


def main() -> None:
    args = parse_args()
    _set_threads(args.threads)
    out, start = Path(args.out), time.perf_counter()
    total_steps = args.pretrain_epochs * (FMNIST_TRAIN_IMAGES // args.pretrain_batch)
    every = max(1, total_steps // args.points)
    run_dir = pretrain(args, out, every)
    pretrain_s = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probes = {r["step"]: r for r in records if "probe_knn_top1" in r}
    rows, checkpoints = [], []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        step = int(checkpoint.stem.split("_")[1])
        if step not in probes:
            print(f"skipping {checkpoint}: no probe at step {step}", flush=True)
            continue
        row = {key: probes[step][key] for key in probes[step] if key.startswith("probe_")}
        row["step"], row["val_loss"] = step, reconstruction_loss(args, checkpoint)
        rows.append(row)
        checkpoints.append(checkpoint)
    if len(rows) < 3:
        raise SystemExit(f"only {len(rows)} probed checkpoints in {run_dir / 'checkpoints'}: a rank correlation "
                         "needs at least 3 (raise --points or the pretraining length)")  # fmt: skip
    jobs = [(args, out, f"step{row['step']:06d}", 0, checkpoint) for row, checkpoint in zip(rows, checkpoints)]
    finetune_start = time.perf_counter()
    if args.jobs > 1:
        # one single-thread process per fine-tune, side by side (see quality.py)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_set_threads,
                                 initargs=(args.threads,)) as pool:  # fmt: skip
            results = list(pool.map(finetune, *zip(*jobs)))
    else:
        results = [finetune(*job) for job in jobs]
    finetune_s = time.perf_counter() - finetune_start
    for row, result in zip(rows, results):
        row["finetune_top1"] = result["top1"]
        print(row, flush=True)
    keys = ("probe_knn_top1", "probe_knn_top1_last2", "probe_linear_top1", "probe_linear_top1_last2", "val_loss")
    target = [r["finetune_top1"] for r in rows]
    correlations = {key: spearman([-r[key] if key == "val_loss" else r[key] for r in rows], target) for key in keys}
    print("| step | " + " | ".join(keys) + " | fine-tuned top-1 |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        cells = [f"{r[k]:.4f}" if k == "val_loss" else f"{r[k]:.2f}" for k in keys]
        print(f"| {r['step']} | " + " | ".join(cells) + f" | {r['finetune_top1']:.2f} |")
    print("| Spearman with fine-tuned top-1 | " + " | ".join(f"{correlations[k]:+.2f}" for k in keys) + " | |")
    wall = time.perf_counter() - start
    print(f"wall time {wall / 60:.1f} min (pretraining with probes {pretrain_s / 60:.1f} min, "
          f"{len(rows)} fine-tunes {finetune_s / 60:.1f} min, {args.jobs} side by side)")  # fmt: skip
    summary = {
        "args": vars(args), "rows": rows, "spearman_vs_finetune_top1": correlations, "wall_s": wall,
        "pretrain_s": pretrain_s, "finetune_s": finetune_s,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    with command_logging():  # the runs' messages and progress lines, as the commands show them
        main()
