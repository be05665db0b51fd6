"""When does SimMIM pretraining pay off? Pretrain at a low resolution, fine-tune at a higher one on few labels.

1. SimMIM-pretrain a small SwinV2 on the unlabelled images at --pretrain-size px with window --pretrain-window
   (simmim_swin.pretrain.run_pretrain): Fashion-MNIST's 60k training images (default) or the images of
   --root DIR/train (`--data folder`), labels unused. --unlabelled N uses a fixed random N of them (data.num_images:
   smaller sets lie inside larger ones). At the last step the online probe (kNN and linear top-1 on frozen
   features) and the reconstruction loss are recorded.
2. Fine-tune at --size px with window --window (the CPB transferred, simmim_swin.finetune.run_finetune) on a
   class-balanced subset of --num-labelled training images, a different subset per seed, with the recipe of
   conf/finetune/--preset.yaml (default few_labels). A class-balanced part of each seed's labels is held out
   (data.val_fraction): the best epoch, early stopping and, with several --lr / --layer-decay values, the run of
   the sweep are chosen on it per variant and seed; only the chosen run's best.pt is scored on the test images
   (Fashion-MNIST's 10,000, or DIR/val). Variants: `pretrained`; `scratch` (same recipe, random init);
   `reinit_cpb` (pretrained encoder, CPB MLPs re-initialised: what the position-bias transfer is worth).
3. Baselines on the same parts and test images, their settings chosen on the held-out part: a logistic
   regression on the pixels, kNN and logistic regression on the frozen pooled features of the untrained encoder
   and of each pretrained one (--no-baselines skips them).
4. Print, per label count, a table of the cells (unlabelled images x pretraining steps): test top-1 mean and
   sample standard deviation over seeds per variant, pretrained - scratch, the baselines; the settings chosen;
   then the wall and CPU time per variant. Everything is also written as JSON to --json, with a picture.

Your own labelled class folder, one command (DIR/train/<class>/* and DIR/val/<class>/*; sizes to suit the images):
    python benchmarks/quality.py --data folder --root DIR --pretrain-size 64 --pretrain-window 4 --size 96 --window 6
8-bit RGB files use ImageNet's statistics; other files (16-bit, multi-band: --in-chans N) need --mean / --std
(what `simmim-swin stats --root DIR/train --in-chans N` prints) and fine-tune with crop / flip only.

A grid: --unlabelled, --pretrain-steps and --num-labelled take several values and every combination is run
(the 15-epoch grid "When does SimMIM pay off?" in benchmarks/RESULTS.md was):
    python benchmarks/quality.py --unlabelled 5000 15000 60000 --pretrain-steps 500 1500 4000 \\
        --num-labelled 500 1000 --variants pretrained scratch --preset fashion_mnist --eval-every 100
A pretraining length in steps becomes whole epochs of the unlabelled set (round(steps / steps per epoch), at
least one) with --warmup-fraction of them as warm-up (at least one when there are two or more epochs); without
--pretrain-steps the run is --pretrain-epochs long with one warm-up epoch.

Defaults: 32 px / window 4 -> 48 px / window 6 (stage windows [4, 4, 2] -> [6, 6, 3]), 3 pretraining epochs,
fine-tuning with finetune=few_labels (up to 100 epochs, held-out selection, linear-probe head, crops and flips),
two single-thread runs side by side. A 1,000-label fine-tune takes 3-6 CPU-minutes on this model; the study in
benchmarks/RESULTS.md ("Few labels, converged and selected on held-out images") is
    python benchmarks/quality.py --in-chans 1 --pretrain-steps 4000 --num-labelled 500 1000 --lr 0.01 0.02 \
        --variants pretrained scratch
--preset fashion_mnist gives the older 15-epoch recipe of the earlier sections (last epoch, no selection).
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
import dataclasses
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
from simmim_swin.config import FinetuneConfig, FinetuneModelConfig, PretrainConfig, from_dict, to_dict
from simmim_swin.data import find_images
from simmim_swin.data.classification import build_labelled_eval_dataset, build_val_dataset
from simmim_swin.distributed import DistInfo
from simmim_swin.finetune import frozen_features, run_finetune
from simmim_swin.models import build_simmim
from simmim_swin.pretrain import run_pretrain
from simmim_swin.probe import build_probe_set, fit_logistic_regression, knn_top1, run_probe
from simmim_swin.progress import command_logging
from simmim_swin.transfer import build_classifier, load_pretrained, resolve_model_config

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
    try:
        args.recipe = preset_recipe(args.preset)
    except Exception as e:  # a missing or broken preset: named at the command line
        parser.error(f"--preset {args.preset}: {e}")
    rand_augment = args.rand_augment or args.recipe["augment"]["rand_augment"]
    if raw_values(args) and rand_augment not in (None, "none"):
        note = f"note: RandAugment {rand_augment} is not applied (raw values: crop / flip only)"
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
    p.add_argument(
        "--preset", default="few_labels",
        help="the fine-tuning recipe: conf/finetune/PRESET.yaml (few_labels; fashion_mnist: the old 15-epoch one); "
        "the flags below override it",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--warmup-epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument(
        "--lr", type=float, nargs="+", default=None,
        help="base lr for a batch of 512 (scaled linearly); several: a sweep, each variant selecting its own on the "
        "held-out labelled images",
    )  # fmt: skip
    p.add_argument(
        "--layer-decay", type=float, nargs="+", default=None, help="several: swept like --lr (1.0: none)"
    )
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--rand-augment", default=None, help="timm RandAugment string; 'none': off")
    p.add_argument("--mixup", type=float, default=None)
    p.add_argument("--cutmix", type=float, default=None)
    p.add_argument("--reprob", type=float, default=None)
    p.add_argument("--smoothing", type=float, default=None)
    p.add_argument("--crop-min", type=float, default=None, help="RandomResizedCrop's smallest area fraction")
    p.add_argument(
        "--val-fraction", type=float, default=None,
        help="class-balanced share of each seed's labelled images held out for selection (0: select nothing, "
        "report the last epoch on the test images)",
    )  # fmt: skip
    p.add_argument("--patience", type=int, default=None, help="evaluations without a better held-out top-1 to stop")
    p.add_argument("--head-init", default=None, choices=("random", "linear_probe"), help="classifier start (LP-FT)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="pixel logistic regression, kNN and linear probes of the frozen encoders")  # fmt: skip
    p.add_argument(
        "--crop-pct", type=float, default=None,
        help="evaluation centre crop (default 1.0 for Fashion-MNIST, whose garments fill the frame; 0.875 otherwise)",
    )  # fmt: skip
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (bf16 autocast also works on CPUs)")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between evaluations (and the last)")
    p.add_argument("--workers", type=int, default=0)
    return p


def preset_recipe(name: str) -> dict[str, dict]:
    """The data / augment / optim / schedule / train sections of conf/finetune/NAME.yaml, composed as
    `simmim-finetune finetune=NAME` composes them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from simmim_swin.cli.common import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=[f"finetune={name}"])
    composed = OmegaConf.to_container(cfg, resolve=True)
    return {section: composed[section] for section in ("data", "augment", "optim", "schedule", "train")}


def recipe_value(args: argparse.Namespace, flag: str, section: str, key: str) -> Any:
    """A fine-tuning setting: the flag where given, else the preset's."""
    value = getattr(args, flag)
    return args.recipe[section][key] if value is None else value


def sweep(args: argparse.Namespace) -> list[tuple[float, float]]:
    """The (lr, layer decay) pairs every variant fine-tunes with, the held-out images choosing one."""
    lrs = args.lr or [args.recipe["optim"]["base_lr"]]
    decays = args.layer_decay or [args.recipe["train"]["layer_decay"]]
    return list(itertools.product(lrs, decays))


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
    args: argparse.Namespace, out: Path, variant: str, seed: int, pretrained: Path | None, num_labelled: int, name: str,
    lr: float | None = None, layer_decay: float | None = None,
) -> FinetuneConfig:  # fmt: skip
    """One fine-tuning run: the preset's recipe, the flags given, this run's labelled subset, lr and layer decay."""
    recipe = args.recipe
    lr = lr if lr is not None else sweep(args)[0][0]
    source = (
        dict(source="fashion_mnist", crop_pct=args.crop_pct or 1.0)  # the garment fills the 28 px frame
        if args.data == "fashion_mnist"
        else dict(source="folder", root=args.root, crop_pct=args.crop_pct or 0.875)
    )
    rand_augment = recipe_value(args, "rand_augment", "augment", "rand_augment")
    crop_min = recipe_value(args, "crop_min", "augment", "crop_scale")
    crop_min = crop_min[0] if isinstance(crop_min, list) else crop_min
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
                val_fraction=recipe_value(args, "val_fraction", "data", "val_fraction"),
                batch_size=recipe_value(args, "batch", "data", "batch_size"),
                eval_batch_size=500,
                num_workers=args.workers,
                **statistics_overrides(args),
            ),
            augment=recipe["augment"] | dict(
                rand_augment=None if rand_augment in (None, "none") or raw_values(args) else rand_augment,
                color_jitter=0.0 if raw_values(args) else recipe["augment"]["color_jitter"],
                crop_scale=[crop_min, 1.0],
                reprob=0.0 if raw_values(args) else recipe_value(args, "reprob", "augment", "reprob"),
                mixup=recipe_value(args, "mixup", "augment", "mixup"),
                cutmix=recipe_value(args, "cutmix", "augment", "cutmix"),
                label_smoothing=recipe_value(args, "smoothing", "augment", "label_smoothing"),
            ),  # fmt: skip
            optim=recipe["optim"] | dict(base_lr=lr, warmup_lr=lr / 100, min_lr=lr / 100),
            schedule=recipe["schedule"] | dict(
                kind="cosine",
                epochs=recipe_value(args, "epochs", "schedule", "epochs"),
                warmup_epochs=recipe_value(args, "warmup_epochs", "schedule", "warmup_epochs"),
            ),  # fmt: skip
            train=recipe["train"] | dict(
                layer_decay=layer_decay if layer_decay is not None else sweep(args)[0][1],
                eval_every=recipe_value(args, "eval_every", "train", "eval_every"),
                patience=recipe_value(args, "patience", "train", "patience"),
                head_init=recipe_value(args, "head_init", "train", "head_init"),
                reinit_cpb_mlp=variant == "reinit_cpb",
            ),  # fmt: skip
            logger=dict(log_every=50),
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
        # a key only the record has is a setting the package has dropped since (probe.linear_steps): not a change
        changed = [
            f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}"
            for section, new in settings.items()
            if isinstance(new, dict) and isinstance(old := record["config"].get(section, {}), dict)
            for key in sorted(new)
            if old.get(key) != new.get(key)
        ] + [f"{key}: {record['config'].get(key)!r} -> {value!r}" for key, value in settings.items()
             if not isinstance(value, dict) and record["config"].get(key) != value]  # fmt: skip
        if changed:
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
    num_labelled: int | None = None, name: str | None = None, lr: float | None = None,
    layer_decay: float | None = None,
) -> dict:  # fmt: skip
    """One fine-tune; returns its test top-1 (with a held-out part: of best.pt, the best held-out epoch, and that
    held-out top-1; without: the last epoch's), its length and times."""
    num_labelled = num_labelled or args.num_labelled[0]
    name = name or f"{variant}_seed{seed}"
    config = finetune_config(args, out, variant, seed, pretrained, num_labelled, name, lr, layer_decay)

    def summarise_run(run_dir: Path) -> dict:
        lines = metrics_lines(run_dir)
        evaluations = [line for line in lines if "val_top1" in line]
        result = {"steps": max(line["step"] for line in lines), "step_time_s": median_step_time(run_dir)}
        if config.data.val_fraction > 0:
            test = [line for line in lines if "test_top1" in line][-1]
            best = max(evaluations, key=lambda line: line["val_top1"])
            return result | {"top1": test["test_top1"], "top5": test["test_top5"], "held_out_top1": best["val_top1"],
                             "best_step": test["best_step"]}  # fmt: skip
        return result | {"top1": evaluations[-1]["val_top1"], "top5": evaluations[-1]["val_top5"]}

    result = run_once(config, run_finetune, summarise_run)
    return result | {"variant": variant, "seed": seed, "num_labelled": num_labelled, "lr": config.optim.base_lr,
                     "layer_decay": config.train.layer_decay}  # fmt: skip


def select(finetunes: list[dict]) -> list[dict]:
    """Per (variant, cell, labels, seed), the run of the sweep with the best held-out top-1 (the first of equals);
    runs without a held-out part cannot be selected and are returned as they are."""
    chosen: dict[tuple, dict] = {}
    for run in finetunes:
        key = (run["variant"], tuple(run["cell"] or ()), run["num_labelled"], run["seed"])
        if key not in chosen or run.get("held_out_top1", -1.0) > chosen[key].get("held_out_top1", -1.0):
            chosen[key] = run
    return list(chosen.values())


# ----------------------------------------------------------------------------------------------------------------
# simple baselines on the same labelled parts and test images: pixels, frozen features

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # logistic regressions: the held-out part picks one
K_GRID = (1, 5, 20)  # weighted kNN (temperature 0.07): the held-out part picks one


def stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, ...) float, labels (N,)) of an evaluation-transform dataset."""
    images, labels = zip(*(dataset[i][:2] for i in range(len(dataset))))
    return torch.stack(images).float(), torch.tensor(labels)


def scored_choice(scores: dict[Any, tuple[float, float]]) -> dict:
    """Of {setting: (held-out top-1, test top-1)}, the setting with the best held-out top-1 (the first of equals)."""
    setting = max(scores, key=lambda key: scores[key][0])
    return {"top1": scores[setting][1], "held_out_top1": scores[setting][0], "setting": setting}


def linear_scores(
    train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
) -> dict:  # fmt: skip
    """Logistic regression on standardised inputs, L2 chosen on the held-out part, scored on the test images."""
    mean, std = train[0].mean(dim=0), train[0].std(dim=0) + 1e-6
    scores = {}
    for l2 in L2_GRID:
        weight, bias = fit_logistic_regression((train[0] - mean) / std, train[1], num_classes, l2=l2)
        top1 = [
            100.0 * (((x - mean) / std @ weight.T + bias).argmax(dim=1) == y).float().mean().item()
            for x, y in (held_out, test)
        ]  # fmt: skip
        scores[l2] = (top1[0], top1[1])
    return scored_choice(scores)


def knn_scores(train: tuple, held_out: tuple, test: tuple, num_classes: int) -> dict:
    """DINO's weighted kNN on the features, k chosen on the held-out part, scored on the test images."""
    return scored_choice({
        k: tuple(knn_top1(train[0], train[1], x, y, k, 0.07, num_classes) for x, y in (held_out, test))
        for k in K_GRID
    })  # fmt: skip


def frozen_encoder(args: argparse.Namespace, checkpoint: Path | None, num_classes: int) -> tuple[Any, FinetuneConfig]:
    """The classifier a fine-tune starts from (pretrained at the cell's checkpoint, or random seed-0 weights), with
    its config; its head is unused: the probes read the pooled features."""
    variant = "scratch" if checkpoint is None else "pretrained"
    config = finetune_config(args, Path(args.out), variant, 0, checkpoint, args.num_labelled[0], "probe")
    weights = load_pretrained(config.pretrained, config.pretrained_format) if checkpoint is not None else None
    model_cfg = resolve_model_config(config.model, weights)
    config = dataclasses.replace(config, model=from_dict(FinetuneModelConfig, to_dict(model_cfg)))
    torch.manual_seed(0)
    return build_classifier(model_cfg, num_classes, weights, verbose=False), config


def baselines(args: argparse.Namespace, pretrainings: list[dict]) -> dict[str, dict]:
    """{name: {num_labelled: [per-seed results]}} for the pixel logistic regression and, per encoder (untrained;
    each pretraining cell), kNN and linear probes of its frozen pooled features: each fitted on a seed's training
    part, its setting chosen on that seed's held-out part, scored on the test images."""
    encoders = [("untrained", None)]
    encoders += [(f"pretrained_{cell_name(*p['cell'])}", Path(p["run_dir"])) for p in pretrainings]
    test_set, classes = build_val_dataset(
        finetune_config(args, Path(args.out), "scratch", 0, None, args.num_labelled[0], "probe").data,
        args.pretrain_size, in_chans=args.in_chans,
    )  # fmt: skip
    pixel_test = stack(test_set)
    pixel_test = (pixel_test[0].flatten(1), pixel_test[1])
    results: dict[str, dict] = {}
    for num_labelled, seed in itertools.product(args.num_labelled, args.seeds):
        data = finetune_config(args, Path(args.out), "scratch", seed, None, num_labelled, "probe").data
        parts = [stack(build_labelled_eval_dataset(data, args.pretrain_size, part, in_chans=args.in_chans))
                 for part in ("train", "held_out")]  # fmt: skip
        parts = [(x.flatten(1), y) for x, y in parts]
        entry = linear_scores(parts[0], parts[1], pixel_test, len(classes)) | {"seed": seed}
        results.setdefault("pixel_logistic_regression", {}).setdefault(num_labelled, []).append(entry)
    for name, checkpoint in encoders:
        model, config = frozen_encoder(args, checkpoint, len(classes))
        size = config.model.img_size

        def features(dataset: Any, model: Any = model) -> tuple[torch.Tensor, torch.Tensor]:
            return frozen_features(model, dataset, 500, args.workers, "fp32")

        test = features(build_val_dataset(config.data, size, in_chans=config.model.in_chans)[0])
        for num_labelled, seed in itertools.product(args.num_labelled, args.seeds):
            data = dataclasses.replace(config.data, num_labelled=num_labelled, subset_seed=seed)
            train, held_out = (
                features(build_labelled_eval_dataset(data, size, part, in_chans=config.model.in_chans))
                for part in ("train", "held_out")
            )  # fmt: skip
            for kind, score in (("knn", knn_scores), ("linear_probe", linear_scores)):
                entry = score(train, held_out, test, len(classes)) | {"seed": seed}
                results.setdefault(f"{name}_{kind}", {}).setdefault(num_labelled, []).append(entry)
        print(f"[{time.strftime('%H:%M:%S')}] baselines of the {name} encoder done", flush=True)
    return results


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
    runs = sweep(args)

    def jobs(variant: str, cell: tuple | None, checkpoint: Path | None) -> list[tuple]:
        """Every fine-tune of one variant (and pretraining): labels x seeds x the (lr, layer decay) sweep."""
        ready = []
        for num_labelled, seed, (lr, decay) in itertools.product(args.num_labelled, args.seeds, runs):
            name = variant if checkpoint is None else f"{variant}_{checkpoint.name.removeprefix('pretrain_')}"
            name += f"_l{num_labelled}_seed{seed}" + (f"_lr{lr:g}_ld{decay:g}" if len(runs) > 1 else "")
            name += args.tag and f"_{args.tag}"
            ready.append(("finetune", cell, (args, out, variant, seed, checkpoint, num_labelled, name, lr, decay)))
        return ready

    if "scratch" in args.variants:
        waiting += jobs("scratch", None, None)
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
            waiting[:0] = [job for variant in pretrained_variants for job in jobs(variant, cell, checkpoint)]
    return pretrainings, finetunes


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


BASELINE_COLUMNS = (  # (JSON key prefix, table column)
    ("pixel_logistic_regression", "pixel logistic regression"),
    ("untrained_knn", "untrained kNN"),
    ("untrained_linear_probe", "untrained linear probe"),
    ("pretrained_knn", "pretrained kNN"),
    ("pretrained_linear_probe", "pretrained linear probe"),
)


def summarise(
    pretrainings: list[dict], finetunes: list[dict], args: argparse.Namespace, probes: dict | None = None
) -> list[dict]:
    """One row per (label count, cell): each variant's selected test top-1 over seeds (and the lr / layer decay the
    held-out images chose), the gain over scratch, the online probe and the baselines of `probes`."""
    rows, probes = [], probes or {}
    finetunes = select(finetunes)
    for num_labelled in args.num_labelled:

        def chosen(variant: str, cell: tuple | None, num_labelled: int = num_labelled) -> list[dict]:
            runs = [r for r in finetunes if r["variant"] == variant and r["num_labelled"] == num_labelled]
            runs = [r for r in runs if variant == "scratch" or tuple(r["cell"]) == tuple(cell)]
            return sorted(runs, key=lambda r: r["seed"])

        def over_seeds(runs: list[dict]) -> dict:
            values = [r["top1"] for r in runs]
            return dict(zip(("mean", "std"), mean_std(values))) | {"per_seed": values}

        for p in pretrainings or [{"cell": None}]:
            row = {"num_labelled": num_labelled, "cell": p["cell"]}
            row |= {k: p[k] for k in ("unlabelled", "steps", "epochs", "final_loss") if k in p}
            row |= {k: v for k, v in p.items() if k.startswith("probe_")}
            for variant in args.variants:
                runs = chosen(variant, None if variant == "scratch" else p["cell"])
                if runs:
                    row[variant] = over_seeds(runs) | {
                        "lr": [r.get("lr") for r in runs], "layer_decay": [r.get("layer_decay") for r in runs],
                        "cpu_s": [r["cpu_s"] for r in runs],
                    }  # fmt: skip
            encoder = f"pretrained_{cell_name(*p['cell'])}" if p["cell"] is not None else None
            for key, _ in BASELINE_COLUMNS:
                source = key.replace("pretrained", encoder) if key.startswith("pretrained") and encoder else key
                runs = sorted(probes.get(source, {}).get(num_labelled, []), key=lambda r: r["seed"])
                if runs and not (key.startswith("pretrained") and encoder is None):
                    row[key] = over_seeds(runs) | {"settings": [r["setting"] for r in runs]}
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
    first = finetune_config(args, Path(args.out), "scratch", 0, None, args.num_labelled[0], "probe")
    held_out = first.data.val_fraction
    selection = (
        f"best.pt of the best held-out epoch ({held_out:.0%} of each seed's labels held out; lr x layer decay "
        f"{sweep(args)} chosen on it per variant and seed)" if held_out > 0 else "the last epoch (no selection)"
    )  # fmt: skip
    print(f"\n{data}, {args.in_chans} channel(s): pretrained at {args.pretrain_size} px / window "
          f"{args.pretrain_window}, fine-tuned at {args.size} px / window {args.window} with --preset {args.preset} "
          f"(up to {first.schedule.epochs} epochs, head {first.train.head_init}); top-1 (%) on the test images of "
          f"{selection}, mean ± std over seeds {args.seeds}")  # fmt: skip
    variants = [v for v in VARIANTS if v in args.variants]
    baseline_columns = [(key, title) for key, title in BASELINE_COLUMNS if any(key in row for row in rows)]
    head = ["labels", "unlabelled", "pretraining steps", *variants, "pretrained − scratch"]
    head += [title for _, title in baseline_columns]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for row in rows:
        cells = [str(row["num_labelled"]), str(row.get("unlabelled", "–")), str(row.get("steps", "–"))]
        cells += [format_cell(row.get(v)) for v in variants]
        cells.append(f"{row['gain']:+.2f}" if "gain" in row else "–")
        cells += [format_cell(row.get(key)) for key, _ in baseline_columns]
        print("| " + " | ".join(cells) + " |")
    print("\nsettings chosen on the held-out images, per seed")
    for row in rows:
        chosen = [f"{v}: lr {row[v]['lr']}, layer decay {row[v]['layer_decay']}" for v in variants if v in row]
        chosen += [f"{key}: {row[key]['settings']}" for key, _ in baseline_columns if key in row]
        print(f"- {row['num_labelled']} labels, {row.get('steps', '–')} pretraining steps: " + "; ".join(chosen))
    print(f"\ntime per variant ({device}, {args.jobs} run(s) side by side, {args.threads or 'default'} thread(s) each)")
    print("| variant | runs | wall (min, summed over runs) | CPU (min) | CPU per run (min) |\n|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t['runs']} | {t['wall_s'] / 60:.1f} | {t['cpu_s'] / 60:.1f} | "
              f"{t['cpu_s'] / 60 / t['runs']:.1f} |")  # fmt: skip


PICTURE_LINES = (  # (row key, label, style): fine-tunes and probes that depend on the pretraining
    ("pretrained", "pretrained, fine-tuned", dict(marker="o", color="C0")),
    ("pretrained_linear_probe", "pretrained, linear probe (frozen)", dict(marker="s", color="C1")),
    ("pretrained_knn", "pretrained, kNN (frozen)", dict(marker="^", color="C2")),
)
PICTURE_LEVELS = (  # (row key, label, colour): what does not
    ("scratch", "scratch, fine-tuned", "grey"),
    ("pixel_logistic_regression", "logistic regression on pixels", "C3"),
    ("untrained_linear_probe", "untrained encoder, linear probe", "C4"),
)


def plot_grid(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """One panel per label count: against pretraining steps, the pretrained fine-tune and the frozen pretrained
    encoder's probes (error bars: std over seeds, a line per unlabelled-set size), and as horizontal bands (mean ±
    std) scratch, the pixel logistic regression and the untrained encoder's linear probe. x is the requested length
    (--pretrain-steps; the runs' whole epochs differ from it by a few per cent, the table has the exact counts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def requested(row: dict) -> int:
        return row["cell"][1] or row["steps"]

    fig = Figure(figsize=(5.0 * len(args.num_labelled) + 3.2, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(args.num_labelled), squeeze=False)[0]
    for ax, num_labelled in zip(axes, args.num_labelled):
        panel = [r for r in rows if r["num_labelled"] == num_labelled and "steps" in r]
        sizes = sorted({r["unlabelled"] for r in panel})
        for key, label, style in PICTURE_LINES:
            for unlabelled in sizes:
                line = sorted((r for r in panel if r["unlabelled"] == unlabelled and key in r), key=requested)
                if line:
                    suffix = f" ({unlabelled:,} images)" if len(sizes) > 1 else ""
                    x, means = [requested(r) for r in line], [r[key]["mean"] for r in line]
                    stds = [r[key]["std"] for r in line]
                    ax.errorbar(x, means, yerr=stds, capsize=3, label=label + suffix, **style)
        for key, label, colour in PICTURE_LEVELS:
            level = next((r[key] for r in rows if r["num_labelled"] == num_labelled and key in r), None)
            if level is not None:
                ax.axhspan(level["mean"] - level["std"], level["mean"] + level["std"], color=colour, alpha=0.2)
                ax.axhline(level["mean"], color=colour, linestyle="--", label=f"{label} (mean ± std)")
        steps = sorted({requested(r) for r in panel})
        if steps:
            ax.set_xscale("log")
            ax.set_xticks(steps, [f"{step:,}" for step in steps])
            ax.minorticks_off()
            if len(steps) == 1:
                ax.set_xlim(steps[0] / 2, steps[0] * 2)
        ax.set_xlabel("pretraining steps")
        ax.set_ylabel("top-1 on the test images (%)")
        ax.set_title(f"{num_labelled:,} labelled images, {len(args.seeds)} seed(s)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the points stay visible
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _set_threads(args.threads)
    out, start = Path(args.out), time.perf_counter()
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    pretrainings, finetunes = run_grid(args, out)
    probes = baselines(args, pretrainings) if args.baselines else {}
    rows, times = summarise(pretrainings, finetunes, args, probes), variant_times(pretrainings, finetunes)
    floor = untrained_probe(args) if any("probe_knn_top1" in p for p in pretrainings) else None
    wall = time.perf_counter() - start
    print_tables(rows, times, args, device)
    if floor:
        print(f"online probe of the untrained encoder (random initial weights): kNN {floor['probe_knn_top1']:.1f} "
              f"/ {floor['probe_knn_top1_last2']:.1f}, linear {floor['probe_linear_top1']:.1f} / "
              f"{floor['probe_linear_top1_last2']:.1f} (last / last two stages)")  # fmt: skip
    print(f"wall time of this command {wall / 60:.1f} min (finished runs it reused count as their recorded time above)")
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "recipe"}, "recipe": args.recipe, "device": device,
        "pretrainings": pretrainings, "results": finetunes, "selected": select(finetunes), "baselines": probes,
        "summary": rows, "times": times, "untrained_probe": floor, "wall_s": wall,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")
    if pretrainings:
        plot_grid(rows, args, Path(args.json).with_suffix(".png"))
        print(f"wrote {Path(args.json).with_suffix('.png')}")


if __name__ == "__main__":
    with command_logging():  # the runs' messages and progress lines, as the commands show them
        main()
