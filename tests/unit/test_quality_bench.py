"""benchmarks/quality.py (when does pretraining pay off) and the pretraining subset it relies on (data.num_images)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simmim_swin.config import ConfigError, PretrainConfig, from_dict, validate_pretrain
from simmim_swin.data import build_pretrain_data
from simmim_swin.data.datasets import ImageSubset, build_pretrain_dataset
from simmim_swin.masking import MaskGenerator

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    # imported by name (not from a file spec) so that the benchmark's spawned worker processes find it too
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import quality

        yield quality
    finally:
        sys.path.remove(str(BENCHMARKS))


def write_class_folder(root: Path, per_class: int, classes: int = 3, size: int = 40) -> None:
    """Images whose class is their mean brightness (so even a tiny model can tell them apart)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:03d}.png")


def folder_config(root: Path, **data) -> PretrainConfig:
    return from_dict(PretrainConfig, dict(data=dict(source="folder", root=str(root), **data)))


def test_num_images_is_a_fixed_nested_subset_of_the_folder(tmp_path) -> None:
    write_class_folder(tmp_path, per_class=10)
    masks = MaskGenerator(32, 8, 4, 0.6)

    def subset(n: int) -> ImageSubset:
        return build_pretrain_dataset(folder_config(tmp_path, num_images=n).data, 32, masks)

    small, large = subset(7), subset(20)
    assert len(small) == 7 and small.num_images == 7 and len(large) == 20
    assert set(small.indices) < set(large.indices)  # the smaller subset lies inside the larger one
    assert subset(7).indices == small.indices  # fixed: no dependence on anything but num_images
    paths = small.dataset.images.paths
    image, mask = small[0]
    assert image.shape == (3, 32, 32) and mask.shape == (8, 8)  # one entry per 4 px model patch
    assert np.array_equal(np.asarray(small.load_image(1)), np.asarray(Image.open(paths[small.indices[1]])))
    assert "num_images=7" in repr(small)
    data = build_pretrain_data(folder_config(tmp_path, num_images=12, batch_size=4).data, 32, masks, seed=0)
    assert data.steps_per_epoch == 3  # 12 of the 30 images, batches of 4


def test_num_images_errors_name_the_value_and_the_fix(tmp_path) -> None:
    write_class_folder(tmp_path, per_class=2)
    with pytest.raises(ValueError, match=r"data.num_images=7 must lie in \[1, 6\]"):
        build_pretrain_dataset(folder_config(tmp_path, num_images=7).data, 32, MaskGenerator(32, 8, 4, 0.6))
    with pytest.raises(ConfigError, match="data.num_images=0 must be >= 1"):
        validate_pretrain(folder_config(tmp_path, num_images=0))
    photos = from_dict(PretrainConfig, dict(data=dict(source="photos", num_images=5)))
    with pytest.raises(ConfigError, match="data.samples_per_epoch instead"):
        validate_pretrain(photos)


def test_pretraining_length_becomes_whole_epochs_with_a_warmup_share(quality) -> None:
    args = quality.parse_args(["--pretrain-batch", "128"])
    assert quality.pretraining_schedule(args, 60000, None) == (3, 1)  # the default protocol: 3 epochs, 1 warm-up
    assert quality.pretraining_schedule(args, 60000, 500) == (1, 0)  # 468 steps: one epoch has no room for one
    assert quality.pretraining_schedule(args, 60000, 4000) == (9, 1)
    assert quality.pretraining_schedule(args, 5000, 4000) == (103, 10)  # 39 steps an epoch
    assert quality.pretraining_schedule(args, 5000, 10) == (1, 0)  # at least one epoch
    with pytest.raises(SystemExit, match="do not fill one --pretrain-batch 128"):
        quality.pretraining_schedule(args, 100, 500)


def test_command_line_errors(quality, capsys, tmp_path) -> None:
    (tmp_path / "train").mkdir(), (tmp_path / "val").mkdir()
    write_class_folder(tmp_path / "images", per_class=1)
    folder = ["--data", "folder", "--root", str(tmp_path), "--unlabelled-root", str(tmp_path / "images")]
    for argv, message in (
        (["--data", "folder"], "--data folder needs --root"),
        (["--root", "x"], "--root / --unlabelled-root are for --data folder"),
        (["--data", "folder", "--root", "no_such_dir"], "no_such_dir/train is not a folder"),
        ([*folder, "--unlabelled-root", "nowhere"], "nowhere is not a folder"),
        (folder[:4], "holds no images"),
        ([*folder, "--unlabelled", "4", "0"], "--unlabelled [4, 0]: each must lie in [0, 3]"),
        (["--unlabelled", "70000"], "each must lie in [0, 60000]"),
        (["--in-chans", "4"], "Fashion-MNIST is read as 1 band or as grey in 3"),
        ([*folder, "--mean", "1"], "give --mean and --std together"),
        ([*folder, "--in-chans", "4"], "--in-chans 4 needs --mean and --std"),
    ):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
        assert message in capsys.readouterr().err


def test_summary_pairs_each_cell_with_the_scratch_runs_of_its_label_count(quality, tmp_path) -> None:
    argv = ["--num-labelled", "500", "1000", "--seeds", "0", "1", "--variants", "pretrained", "scratch"]
    args = quality.parse_args(argv)
    pretrainings = [
        {"cell": (5000, 500), "unlabelled": 5000, "steps": 507, "epochs": 13, "final_loss": 0.5, "probe_knn_top1": 70.0,
         "wall_s": 60.0, "cpu_s": 50.0},
    ]  # fmt: skip
    finetunes = [
        {"variant": v, "num_labelled": n, "seed": s, "top1": top1, "cell": (5000, 500) if v == "pretrained" else None,
         "wall_s": 10.0, "cpu_s": 8.0}
        for v, n, s, top1 in (
            ("pretrained", 500, 0, 60.0), ("pretrained", 500, 1, 62.0), ("scratch", 500, 0, 55.0),
            ("scratch", 500, 1, 57.0), ("pretrained", 1000, 0, 70.0), ("pretrained", 1000, 1, 70.0),
            ("scratch", 1000, 0, 71.0), ("scratch", 1000, 1, 73.0),
        )
    ]  # fmt: skip
    rows = quality.summarise(pretrainings, finetunes, args)
    assert [(r["num_labelled"], r["gain"]) for r in rows] == [(500, 5.0), (1000, -2.0)]
    assert rows[0]["pretrained"]["per_seed"] == [60.0, 62.0] and rows[0]["pretrained"]["std"] == pytest.approx(2**0.5)
    assert rows[1]["probe_knn_top1"] == 70.0 and rows[1]["steps"] == 507
    quality.plot_grid(rows, args, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    times = quality.variant_times(pretrainings, finetunes)
    assert times["pretraining"] == {"runs": 1, "wall_s": 60.0, "cpu_s": 50.0}
    assert times["scratch"] == {"runs": 4, "wall_s": 40.0, "cpu_s": 32.0}


@pytest.mark.slow
def test_one_command_on_a_class_folder_runs_resumes_and_refuses_other_settings(quality, tmp_path, capsys) -> None:
    write_class_folder(tmp_path / "data" / "train", per_class=12)
    write_class_folder(tmp_path / "data" / "val", per_class=4)
    out, results = tmp_path / "runs", tmp_path / "quality.json"
    argv = [
        "--data", "folder", "--root", str(tmp_path / "data"), "--out", str(out), "--json", str(results),
        "--device", "cpu", "--jobs", "1", "--embed-dim", "16", "--depths", "1", "1", "--heads", "1", "2",
        "--pretrain-size", "32", "--pretrain-window", "4", "--size", "32", "--window", "4", "--mask-patch", "8",
        "--pretrain-batch", "12", "--pretrain-steps", "3", "--num-labelled", "15", "--epochs", "2",
        "--warmup-epochs", "0", "--batch", "4", "--seeds", "1", "--variants", "pretrained", "scratch",
        "--lr", "0.02", "0.04",
    ]  # fmt: skip
    quality.main(argv)
    summary = json.loads(results.read_text())
    (row,) = summary["summary"]
    assert row["unlabelled"] == 36 and row["steps"] == 3  # 36 images, batch 12: one epoch of 3 steps
    assert len(row["pretrained"]["per_seed"]) == 1 and len(row["scratch"]["per_seed"]) == 1
    assert row["gain"] == pytest.approx(row["pretrained"]["mean"] - row["scratch"]["mean"])
    assert 0 <= row["probe_knn_top1"] <= 100
    assert set(summary["times"]) == {"pretraining", "pretrained", "scratch"}
    assert 0 <= summary["untrained_probe"]["probe_linear_top1_last2"] <= 100

    # two lrs per (variant, seed); the one reported is the best on the held-out labels, scored on the val/ images
    assert len(summary["results"]) == 4 and len(summary["selected"]) == 2
    for chosen in summary["selected"]:
        sweep = [r for r in summary["results"] if (r["variant"], r["seed"]) == (chosen["variant"], chosen["seed"])]
        assert {r["lr"] for r in sweep} == {0.02, 0.04}
        assert chosen["held_out_top1"] == max(r["held_out_top1"] for r in sweep)
    assert row["scratch"]["per_seed"] == [r["top1"] for r in sorted(
        (r for r in summary["selected"] if r["variant"] == "scratch"), key=lambda r: r["seed"])]  # fmt: skip
    # the baselines on the same labelled parts and test images, with keys that name them
    for key in ("pixel_logistic_regression", "untrained_knn", "untrained_linear_probe", "pretrained_knn",
                "pretrained_linear_probe"):  # fmt: skip
        assert len(row[key]["per_seed"]) == 1 and all(0 <= v <= 100 for v in row[key]["per_seed"])
    assert summary["baselines"]["pixel_logistic_regression"]["15"][0]["setting"] in (1e-4, 1e-3, 1e-2, 1e-1)
    printed = capsys.readouterr().out
    assert "pixel logistic regression" in printed and "untrained linear probe" in printed
    assert "| 15 | 36 | 3 |" in printed and "| pretraining | 1 |" in printed
    assert Path(results).with_suffix(".png").stat().st_size > 10_000

    records = sorted(p.relative_to(out).parent.name for p in out.glob("*/benchmark.json"))
    assert records == ["pretrain_uall_s3"] + [
        f"{v}_{t}seed{s}_lr{lr}_ld0.9" for v, t in (("pretrained", "uall_s3_l15_"), ("scratch", "l15_"))
        for s in (1,) for lr in ("0.02", "0.04")
    ]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*")}
    quality.main(argv)  # everything finished: reused, nothing trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*")} == before
    assert json.loads(results.read_text())["summary"] == summary["summary"]
    with pytest.raises(SystemExit, match=r"holds a finished run with other settings .*train.patience: 25 -> 3"):
        quality.main([*argv, "--patience", "3"])


def test_held_out_labels_never_overlap_training_or_test(quality) -> None:
    """The benchmark's parts for a seed: training and held-out labelled images are disjoint, and both come from the
    training split while the scores come from the test split."""
    args = quality.parse_args(["--in-chans", "1", "--num-labelled", "500"])
    data = quality.finetune_config(args, Path("unused"), "scratch", 2, None, 500, "x").data
    assert data.source == "fashion_mnist" and data.val_fraction == 0.2 and data.subset_seed == 2
    from simmim_swin.data.classification import labelled_split

    targets = np.repeat(np.arange(10), 6000)
    train, held_out = labelled_split(data, targets)
    assert len(train) == 400 and len(held_out) == 100 and not set(train) & set(held_out)


def test_the_default_recipe_is_the_few_labels_preset(quality) -> None:
    args = quality.parse_args([])
    config = quality.finetune_config(args, Path("unused"), "pretrained", 0, Path("ckpt"), 1000, "x")
    assert args.preset == "few_labels"
    assert (config.data.val_fraction, config.train.patience, config.train.head_init) == (0.2, 25, "linear_probe")
    assert (config.schedule.epochs, config.augment.mixup, config.augment.rand_augment) == (100, 0.0, None)
    old = quality.finetune_config(quality.parse_args(["--preset", "fashion_mnist"]), Path("u"), "scratch", 0, None,
                                  1000, "x")  # fmt: skip
    assert (old.schedule.epochs, old.data.val_fraction, old.augment.rand_augment) == (15, 0.0, "rand-m6-mstd0.5-inc1")
