"""When does SimMIM pretraining pay off? Pretrain at a low resolution, fine-tune at a higher one on few labels.

1. SimMIM-pretrain a small SwinV2 on the unlabelled images at --pretrain-size px with window --pretrain-window
   (simmim_swin.pretrain.run_pretrain): Fashion-MNIST's 60k training images (default) or the images of
   --root DIR/train (`--data folder`), labels unused. --unlabelled N uses a fixed random N of them (data.num_images:
   smaller sets lie inside larger ones). At the last step the online probe (kNN and linear top-1 on frozen
   features) and the reconstruction loss are recorded.
2. Fine-tune at --size px with window --window (the CPB transferred, simmim_swin.finetune.run_finetune) on a
   class-balanced subset of --num-labelled training images, a different subset per seed, and evaluate on the
   held-out images (Fashion-MNIST's 10,000 test images, or DIR/val). Variants: `pretrained`; `scratch` (same
   recipe, random init); `reinit_cpb` (pretrained encoder, CPB MLPs re-initialised: what the position-bias
   transfer is worth).
3. Print, per label count, a table of the cells (unlabelled images x pretraining steps): final-epoch top-1 mean
   and sample standard deviation over seeds per variant, pretrained - scratch, the probe numbers; then the total
   wall and CPU time per variant. Everything is also written as JSON to --json.

Your own labelled class folder, one command (DIR/train/<class>/* and DIR/val/<class>/*; sizes to suit the images):
    python benchmarks/quality.py --data folder --root DIR --pretrain-size 64 --pretrain-window 4 --size 96 --window 6
8-bit RGB files use ImageNet's statistics; other files (16-bit, multi-band: --in-chans N) need --mean / --std
(what `simmim-swin stats --root DIR/train --in-chans N` prints) and fine-tune with crop / flip only.

A grid: --unlabelled, --pretrain-steps and --num-labelled take several values and every combination is run
(the Fashion-MNIST study in benchmarks/RESULTS.md):
    python benchmarks/quality.py --unlabelled 5000 15000 60000 --pretrain-steps 500 1500 4000 \\
        --num-labelled 500 1000 --variants pretrained scratch
A pretraining length in steps becomes whole epochs of the unlabelled set (round(steps / steps per epoch), at
least one) with --warmup-fraction of them as warm-up (at least one when there are two or more epochs); without
--pretrain-steps the run is --pretrain-epochs long with one warm-up epoch.

Defaults (the Fashion-MNIST protocol; about 20 minutes on a 2-core CPU): 32 px / window 4 -> 48 px / window 6
(stage windows [4, 4, 2] -> [6, 6, 3]), 3 pretraining epochs, 15 fine-tuning epochs, two single-thread runs side
by side. With so short a fine-tuning, mixup / cutmix / random erasing slow convergence more than they regularise,
so they are off here (the reference recipe, conf/finetune/swinv2_base_w14_224.yaml, is for 100 ImageNet epochs).
Scale up with flags on a GPU, e.g.
    python benchmarks/quality.py --device cuda --threads 0 --jobs 1 --size 64 --window 8 \\
        --pretrain-epochs 50 --epochs 100 --embed-dim 96 --depths 2 2 6 --heads 3 6 12 --seeds 0 1 2 3 4

--tag T adds _T to the fine-tuning run names, so another fine-tuning recipe (e.g. --layer-decay 0.75 --tag ld75)
can run in the same --out and reuse its pretrainings. Runs live under --out and resume: starting the same
command again reuses every finished run (its result is kept in the run folder's benchmark.json) and continues an
interrupted one from its last checkpoint; a finished run whose settings differ from the command's is refused
(use another --out or --tag).

--in-chans 1 reads Fashion-MNIST as the single grey band it is (instead of grey copied into RGB), with the
per-channel statistics `simmim-swin stats --source fashion-mnist` prints; fine-tuning then keeps raw values and
uses crop / flip only (RandAugment and colour jitter are 8-bit RGB operations, so --rand-augment has no effect
there). --own-stats gives three channels the same treatment (grey in RGB with the Fashion-MNIST statistics,
crop / flip only): with it the two channel counts differ in nothing but the channels. The probe reads 8-bit RGB
with ImageNet's statistics, so it is skipped for raw values.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from simmim_swin.cli.stats import fashion_mnist_moments
from simmim_swin.config import FinetuneConfig, PretrainConfig, from_dict, to_dict
from simmim_swin.data import find_images
from simmim_swin.distributed import DistInfo
from simmim_swin.finetune import run_finetune
from simmim_swin.models import build_simmim
from simmim_swin.pretrain import run_pretrain
from simmim_swin.probe import build_probe_set, run_probe

VARIANTS = ("pretrained", "scratch", "reinit_cpb")
FMNIST_TRAIN_IMAGES = 60000
RECORD = "benchmark.json"  # a finished run's result, in its run folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked, with the defaults that depend on other flags filled in."""
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    if args.data == "folder" and not args.root:
        parser.error("--data folder needs --root DIR (with DIR/train/<class>/ and DIR/val/<class>/)")
    if args.data == "fashion_mnist" and (args.root or args.unlabelled_root):
        parser.error("--root / --unlabelled-root are for --data folder; Fashion-MNIST is read from Debian's package")
    if args.data == "folder":
        for folder in (Path(args.root) / "train", Path(args.root) / "val", Path(unlabelled_root(args))):
            if not folder.is_dir():
                parser.error(f"{folder} is not a folder: --root DIR needs DIR/train/<class>/ and DIR/val/<class>/")
    try:
        total = unlabelled_total(args)
    except ValueError as e:  # no images: named here rather than as a traceback from a worker
        parser.error(str(e))
    if not all(0 <= n <= total for n in args.unlabelled):
        parser.error(f"--unlabelled {args.unlabelled}: each must lie in [0, {total}] (the images there; 0: all)")
    if args.data == "fashion_mnist" and args.in_chans not in (1, 3):
        parser.error(f"--in-chans {args.in_chans}: Fashion-MNIST is read as 1 band or as grey in 3")
    if (args.mean is None) != (args.std is None):
        parser.error("give --mean and --std together, one value per channel")
    if args.data == "folder" and args.own_stats:
        parser.error("--own-stats is Fashion-MNIST's; for a folder give --mean / --std")
    if args.data == "folder" and args.in_chans != 3 and args.mean is None:
        parser.error(
            f"--in-chans {args.in_chans} needs --mean and --std (one per channel): run `simmim-swin stats --root "
            f"{args.unlabelled_root or Path(args.root) / 'train'} --in-chans {args.in_chans}`"
        )
    if raw_values(args) and args.rand_augment != "none":
        note = f"note: --rand-augment {args.rand_augment} is not applied (raw values: crop / flip only)"
        print(note, file=sys.stderr)
    if args.data == "fashion_mnist":
        suffix = f"_{args.in_chans}ch" if args.in_chans != 3 else "_own_stats" if args.own_stats else ""
        default_name = f"quality_fmnist{suffix}"
    else:
        default_name = f"quality_{Path(args.root).resolve().name}"
    args.out = args.out or f"outputs/{default_name}"
    args.json = args.json or str(Path(__file__).parent / "results" / f"{default_name}.json")
    return args


def build_parser(description: str) -> argparse.ArgumentParser:
    """The benchmark's flags (benchmarks/probe_correlation.py adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist", choices=("fashion_mnist", "folder"), help="labelled data")
    p.add_argument("--root", default=None, help="--data folder: DIR with train/<class>/ and val/<class>/ images")
    p.add_argument(
        "--unlabelled-root", default=None, help="--data folder: pretrain on this image folder (default DIR/train)"
    )
    p.add_argument("--out", default=None, help="folder for the runs (default outputs/quality_<data>)")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/quality_<data>.json)")
    p.add_argument("--in-chans", type=int, default=3, help="image channels (Fashion-MNIST: 1 or 3)")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean in the files' raw units")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std in the files' raw units")
    p.add_argument(
        "--own-stats", action="store_true",
        help="Fashion-MNIST's own statistics and crop / flip only also for --in-chans 3 (always so for 1)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side in this many processes")
    # model
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 4])
    p.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8])
    # pretraining
    p.add_argument("--unlabelled", type=int, nargs="+", default=[0], help="unlabelled images to pretrain on (0: all)")
    p.add_argument(
        "--pretrain-steps", type=int, nargs="+", default=None,
        help="pretraining lengths in optimizer steps (rounded to whole epochs); default: --pretrain-epochs",
    )  # fmt: skip
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="warm-up share of a --pretrain-steps run")
    p.add_argument("--pretrain-size", type=int, default=32)
    p.add_argument("--pretrain-window", type=int, default=4)
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=8e-3, help="base lr for a batch of 512 (scaled linearly)")
    p.add_argument("--mask-patch", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--norm-target", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True, help="probe the final encoder")
    # fine-tuning
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--window", type=int, default=6)
    p.add_argument("--num-labelled", type=int, nargs="+", default=[1000], help="labelled training images per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--tag", default="",
        help="suffix of the fine-tuning run names: another recipe in the same --out reuses its pretrainings",
    )  # fmt: skip
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
    p.add_argument(
        "--crop-pct", type=float, default=None,
        help="evaluation centre crop (default 1.0 for Fashion-MNIST, whose garments fill the frame; 0.875 otherwise)",
    )  # fmt: skip
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (bf16 autocast also works on CPUs)")
    p.add_argument("--eval-every", type=int, default=100, help="epochs between evaluations (and the last)")
    p.add_argument("--workers", type=int, default=0)
    return p


def model_overrides(args: argparse.Namespace) -> dict:
    return dict(arch="tiny", embed_dim=args.embed_dim, depths=args.depths, num_heads=args.heads, in_chans=args.in_chans)


def raw_values(args: argparse.Namespace) -> bool:
    """Whether the runs read raw values with their own statistics (not 8-bit RGB with ImageNet's)."""
    return args.in_chans != 3 or args.own_stats or args.mean is not None


def statistics_overrides(args: argparse.Namespace) -> dict:
    """data.mean / data.std: --mean / --std, or Fashion-MNIST's (what `simmim-swin stats --source fashion-mnist
    --in-chans N` prints) for raw Fashion-MNIST; none otherwise: 8-bit RGB keeps ImageNet's."""
    if args.mean is not None:
        return dict(mean=args.mean, std=args.std)
    if not raw_values(args):
        return {}
    moments = fashion_mnist_moments(args.in_chans)
    return dict(mean=moments.mean.tolist(), std=moments.std.tolist())


def unlabelled_root(args: argparse.Namespace) -> str:
    """--data folder: the folder pretraining reads."""
    return args.unlabelled_root or str(Path(args.root) / "train")


def unlabelled_total(args: argparse.Namespace) -> int:
    """Images in the whole unlabelled set."""
    return FMNIST_TRAIN_IMAGES if args.data == "fashion_mnist" else len(find_images(unlabelled_root(args)))


def pretraining_schedule(args: argparse.Namespace, num_images: int, steps: int | None) -> tuple[int, int]:
    """(epochs, warm-up epochs) of a pretraining run on `num_images` images: about `steps` optimizer steps, or
    --pretrain-epochs with one warm-up epoch when `steps` is None."""
    if steps is None:
        return args.pretrain_epochs, min(1, args.pretrain_epochs - 1)
    steps_per_epoch = num_images // args.pretrain_batch
    if steps_per_epoch < 1:
        raise SystemExit(f"{num_images} unlabelled images do not fill one --pretrain-batch {args.pretrain_batch}")
    epochs = max(1, round(steps / steps_per_epoch))
    warmup = 0 if epochs == 1 else min(epochs - 1, max(1, round(args.warmup_fraction * epochs)))
    return epochs, warmup


def cell_name(unlabelled: int, steps: int | None) -> str:
    """The pretraining run's folder name for one (unlabelled images, steps) cell."""
    images = "all" if unlabelled == 0 else str(unlabelled)
    return f"pretrain_u{images}" + ("" if steps is None else f"_s{steps}")


def pretrain_config(args: argparse.Namespace, out: Path, unlabelled: int, steps: int | None) -> PretrainConfig:
    """The pretraining run of one cell."""
    num_images = unlabelled or unlabelled_total(args)
    epochs, warmup = pretraining_schedule(args, num_images, steps)
    source = (
        dict(source="fashion_mnist", split="train")
        if args.data == "fashion_mnist"
        else dict(source="folder", root=unlabelled_root(args))
    )
    probe = dict(enabled=args.probe and not raw_values(args), every=10**9, linear=True)  # last step only
    fmnist = args.data == "fashion_mnist"
    probe.update(dict(source="fashion_mnist") if fmnist else dict(source="folder", root=args.root))
    return from_dict(
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
                **source,
                num_images=unlabelled or None,
                batch_size=args.pretrain_batch,
                num_workers=args.workers,
                **statistics_overrides(args),
            ),  # fmt: skip
            optim=dict(base_lr=args.pretrain_lr, warmup_lr=args.pretrain_lr / 100, min_lr=args.pretrain_lr / 100),
            schedule=dict(kind="cosine", epochs=epochs, warmup_epochs=warmup),
            logger=dict(log_every=50, image_every=10**9),
            probe=probe,
            run=dict(name=cell_name(unlabelled, steps), output_dir=str(out), device=args.device, save_every=200,
                     keep_last=1),
        ),
    )  # fmt: skip


def finetune_config(
    args: argparse.Namespace, out: Path, variant: str, seed: int, pretrained: Path | None, num_labelled: int, name: str
) -> FinetuneConfig:
    """One fine-tuning run."""
    source = (
        dict(source="fashion_mnist", crop_pct=args.crop_pct or 1.0)  # the garment fills the 28 px frame
        if args.data == "fashion_mnist"
        else dict(source="folder", root=args.root, crop_pct=args.crop_pct or 0.875)
    )
    return from_dict(
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
                **source,
                num_labelled=num_labelled,
                subset_seed=seed,
                batch_size=args.batch,
                eval_batch_size=500,
                num_workers=args.workers,
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


def metrics_lines(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def median_step_time(run_dir: Path) -> float | None:
    """Median step_time_s of a run's metrics.jsonl lines."""
    times = [line["step_time_s"] for line in metrics_lines(run_dir) if "step_time_s" in line]
    return statistics.median(times) if times else None


def run_once(config: PretrainConfig | FinetuneConfig, train: Any, summarise_run: Any) -> dict:
    """Train `config` unless its folder holds a finished result; returns the result (with wall_s and cpu_s)."""
    run_dir = Path(config.run.output_dir) / config.run.name
    record_file, settings = run_dir / RECORD, to_dict(config)
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["config"] != settings:
            changed = [
                f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}"
                for section, new in settings.items()
                if isinstance(new, dict) and isinstance(old := record["config"].get(section, {}), dict)
                for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key)
            ]  # fmt: skip
            raise SystemExit(
                f"{run_dir} holds a finished run with other settings than this command's ({', '.join(changed[:5])}); "
                "use another --out or --tag (or delete that run folder)"
            )
        return record["result"]
    wall, cpu = time.perf_counter(), time.process_time()
    run_dir = train(config)
    # the time of this process only: an interrupted run that was resumed counts its last part
    result = summarise_run(run_dir) | {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    record_file.write_text(json.dumps({"config": settings, "result": result}, indent=1) + "\n")
    return result


def pretrain(args: argparse.Namespace, out: Path, unlabelled: int, steps: int | None) -> dict:
    """One cell's pretraining; returns its folder, length, final loss and probe numbers (a finished run is reused)."""

    def summarise_run(run_dir: Path) -> dict:
        lines = metrics_lines(run_dir)
        final = [line for line in lines if "loss" in line][-1]
        probes = [line for line in lines if "probe_knn_top1" in line]
        return {
            "run_dir": str(run_dir), "steps": final["step"], "final_loss": final["loss"],
            "step_time_s": median_step_time(run_dir),
            **({k: v for k, v in probes[-1].items() if k.startswith("probe_")} if probes else {}),
        }  # fmt: skip

    config = pretrain_config(args, out, unlabelled, steps)
    result = run_once(config, run_pretrain, summarise_run)
    return result | {"unlabelled": unlabelled or unlabelled_total(args), "target_steps": steps,
                     "epochs": config.schedule.epochs, "warmup_epochs": config.schedule.warmup_epochs}  # fmt: skip


def finetune(
    args: argparse.Namespace, out: Path, variant: str, seed: int, pretrained: Path | None,
    num_labelled: int | None = None, name: str | None = None,
) -> dict:  # fmt: skip
    """One fine-tune; returns its final evaluation (metrics.jsonl's last val_* line) and times."""
    num_labelled = num_labelled or args.num_labelled[0]
    name = name or f"{variant}_seed{seed}"

    def summarise_run(run_dir: Path) -> dict:
        final = [line for line in metrics_lines(run_dir) if "val_top1" in line][-1]
        return {"top1": final["val_top1"], "top5": final["val_top5"], "step_time_s": median_step_time(run_dir)}

    config = finetune_config(args, out, variant, seed, pretrained, num_labelled, name)
    result = run_once(config, run_finetune, summarise_run)
    return result | {"variant": variant, "seed": seed, "num_labelled": num_labelled}


def untrained_probe(args: argparse.Namespace) -> dict[str, float]:
    """The probe of the pretraining model at random initial weights (seed 0), before any step: the floor from
    which the pretrained cells' probe numbers should rise."""
    config = pretrain_config(args, Path(args.out), args.unlabelled[0], None)
    torch.manual_seed(0)
    model = build_simmim(**to_dict(config.model), norm_target=None)  # the probe reads the encoder only
    probe_set = build_probe_set(config.probe, args.pretrain_size, torch.device("cpu"), DistInfo())
    return run_probe(model, probe_set, "fp32", DistInfo())


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_grid(args: argparse.Namespace, out: Path) -> tuple[list[dict], list[dict]]:
    """Every pretraining cell and every fine-tune, `args.jobs` side by side. A cell's fine-tunes go ahead of the
    pretrainings still waiting, so its results come early. Returns (pretraining results, fine-tuning results)."""
    cells = list(itertools.product(args.unlabelled, args.pretrain_steps or [None]))
    pretrained_variants = [v for v in args.variants if v != "scratch"]
    if not pretrained_variants:
        cells = []
    cells.sort(key=lambda c: ((c[1] or 0), c[0] or unlabelled_total(args)))  # the shortest pretraining first
    waiting: list[tuple] = [("pretrain", cell, (args, out, *cell)) for cell in cells]
    if "scratch" in args.variants:
        for num_labelled, seed in itertools.product(args.num_labelled, args.seeds):
            name = f"scratch_l{num_labelled}_seed{seed}{args.tag and '_' + args.tag}"
            waiting.append(("finetune", None, (args, out, "scratch", seed, None, num_labelled, name)))
    pretrainings, finetunes = [], []
    context = multiprocessing.get_context("spawn")
    # independent runs side by side, one process each: on a small CPU two single-thread processes do more work
    # than one process with two threads (tiny matrices leave threads waiting on each other)
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_set_threads, initargs=(args.threads,)) as pool:
        running: dict[Future, tuple] = {}
        while waiting or running:
            while waiting and len(running) < args.jobs:
                kind, cell, job_args = waiting.pop(0)
                running[pool.submit(pretrain if kind == "pretrain" else finetune, *job_args)] = (kind, cell)
            job = next(as_completed(running))
            kind, cell = running.pop(job)
            result = job.result() | {"cell": cell}
            print(f"[{time.strftime('%H:%M:%S')}] {kind} done: {result}", flush=True)
            if kind == "finetune":
                finetunes.append(result)
                continue
            pretrainings.append(result)
            checkpoint = Path(result["run_dir"])
            ready = []
            for num_labelled, variant, seed in itertools.product(args.num_labelled, pretrained_variants, args.seeds):
                name = f"{variant}_{checkpoint.name.removeprefix('pretrain_')}_l{num_labelled}_seed{seed}"
                name += args.tag and f"_{args.tag}"
                ready.append(("finetune", cell, (args, out, variant, seed, checkpoint, num_labelled, name)))
            waiting[:0] = ready
    return pretrainings, finetunes


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(pretrainings: list[dict], finetunes: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per (label count, cell): each variant's top-1 over seeds, the gain over scratch, the probes."""
    rows = []
    for num_labelled in args.num_labelled:

        def top1(variant: str, cell: tuple | None, num_labelled: int = num_labelled) -> list[float]:
            runs = [r for r in finetunes if r["variant"] == variant and r["num_labelled"] == num_labelled]
            runs = [r for r in runs if variant == "scratch" or tuple(r["cell"]) == tuple(cell)]
            return [r["top1"] for r in sorted(runs, key=lambda r: r["seed"])]

        scratch = top1("scratch", None)
        for p in pretrainings or [{"cell": None}]:
            row = {"num_labelled": num_labelled, "cell": p["cell"]}
            row |= {k: p[k] for k in ("unlabelled", "steps", "epochs", "final_loss") if k in p}
            row |= {k: v for k, v in p.items() if k.startswith("probe_")}
            for variant in args.variants:
                values = scratch if variant == "scratch" else top1(variant, p["cell"])
                if values:
                    row[variant] = dict(zip(("mean", "std"), mean_std(values))) | {"per_seed": values}
            if "pretrained" in row and "scratch" in row:
                row["gain"] = row["pretrained"]["mean"] - row["scratch"]["mean"]
            rows.append(row)
    return rows


def variant_times(pretrainings: list[dict], finetunes: list[dict]) -> dict[str, dict]:
    """Runs, total wall and total CPU seconds per variant (pretraining counted on its own)."""
    groups: dict[str, list[dict]] = {"pretraining": pretrainings}
    for r in finetunes:
        groups.setdefault(r["variant"], []).append(r)
    return {
        name: {"runs": len(runs), "wall_s": sum(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs)}
        for name, runs in groups.items()
        if runs
    }


def format_cell(result: dict | None) -> str:
    return "–" if result is None else f"{result['mean']:.2f} ± {result['std']:.2f}"


def print_tables(rows: list[dict], times: dict[str, dict], args: argparse.Namespace, device: str) -> None:
    """The result tables in Markdown."""
    data = "Fashion-MNIST" if args.data == "fashion_mnist" else f"{args.root}"
    print(f"\n{data}, {args.in_chans} channel(s): pretrained at {args.pretrain_size} px / window "
          f"{args.pretrain_window}, "
          f"fine-tuned at {args.size} px / window {args.window} for {args.epochs} epochs; top-1 (%) on the held-out "
          f"images, mean ± std over seeds {args.seeds}")  # fmt: skip
    variants = [v for v in VARIANTS if v in args.variants]
    probe = any("probe_knn_top1" in row for row in rows)
    head = ["labels", "unlabelled", "pretraining steps", *variants, "pretrained − scratch"]
    head += ["kNN probe (last / last two)", "linear probe (last / last two)"] if probe else []
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for row in rows:
        cells = [str(row["num_labelled"]), str(row.get("unlabelled", "–")), str(row.get("steps", "–"))]
        cells += [format_cell(row.get(v)) for v in variants]
        cells.append(f"{row['gain']:+.2f}" if "gain" in row else "–")
        if probe:
            for kind in ("knn", "linear"):
                last, two = row.get(f"probe_{kind}_top1"), row.get(f"probe_{kind}_top1_last2")
                cells.append("–" if last is None else f"{last:.1f} / {two:.1f}")
        print("| " + " | ".join(cells) + " |")
    print(f"\ntime per variant ({device}, {args.jobs} run(s) side by side, {args.threads or 'default'} thread(s) each)")
    print("| variant | runs | wall (min, summed over runs) | CPU (min) |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t['runs']} | {t['wall_s'] / 60:.1f} | {t['cpu_s'] / 60:.1f} |")


def plot_grid(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """One panel per label count: pretrained top-1 against pretraining steps, a line per unlabelled-set size
    (error bars: std over seeds), and the scratch mean ± std as a band. x is the requested length (--pretrain-steps;
    the runs' whole epochs differ from it by a few per cent, the table has the exact counts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def requested(row: dict) -> int:
        return row["cell"][1] or row["steps"]

    fig = Figure(figsize=(5.2 * len(args.num_labelled), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(args.num_labelled), squeeze=False)[0]
    for ax, num_labelled in zip(axes, args.num_labelled):
        panel = [r for r in rows if r["num_labelled"] == num_labelled and "pretrained" in r]
        for unlabelled in sorted({r["unlabelled"] for r in panel}):
            line = sorted((r for r in panel if r["unlabelled"] == unlabelled), key=lambda r: requested(r))
            ax.errorbar([requested(r) for r in line], [r["pretrained"]["mean"] for r in line],
                        yerr=[r["pretrained"]["std"] for r in line], marker="o", capsize=3,
                        label=f"pretrained on {unlabelled:,} images")  # fmt: skip
        scratch = next((r["scratch"] for r in rows if r["num_labelled"] == num_labelled and "scratch" in r), None)
        if scratch is not None:
            ax.axhspan(scratch["mean"] - scratch["std"], scratch["mean"] + scratch["std"], color="grey", alpha=0.25)
            ax.axhline(scratch["mean"], color="grey", linestyle="--", label="scratch (mean ± std)")
        ax.set_xscale("log")
        steps = sorted({requested(r) for r in panel})
        ax.set_xticks(steps, [f"{step:,}" for step in steps])
        ax.minorticks_off()
        ax.set_xlabel("pretraining steps")
        ax.set_ylabel("fine-tuned top-1 (%)")
        ax.set_title(f"{num_labelled:,} labelled images, {len(args.seeds)} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _set_threads(args.threads)
    out, start = Path(args.out), time.perf_counter()
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    pretrainings, finetunes = run_grid(args, out)
    rows, times = summarise(pretrainings, finetunes, args), variant_times(pretrainings, finetunes)
    floor = untrained_probe(args) if any("probe_knn_top1" in p for p in pretrainings) else None
    wall = time.perf_counter() - start
    print_tables(rows, times, args, device)
    if floor:
        print(f"probe of the untrained encoder (random initial weights): kNN {floor['probe_knn_top1']:.1f} "
              f"/ {floor['probe_knn_top1_last2']:.1f}, linear {floor['probe_linear_top1']:.1f} / "
              f"{floor['probe_linear_top1_last2']:.1f} (last / last two stages)")  # fmt: skip
    print(f"wall time of this command {wall / 60:.1f} min (finished runs it reused count as their recorded time above)")
    summary = {
        "args": vars(args), "device": device, "pretrainings": pretrainings, "results": finetunes, "summary": rows,
        "times": times, "untrained_probe": floor, "wall_s": wall,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")
    if len(pretrainings) > 1:
        plot_grid(rows, args, Path(args.json).with_suffix(".png"))
        print(f"wrote {Path(args.json).with_suffix('.png')}")


if __name__ == "__main__":
    main()
