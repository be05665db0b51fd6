"""make-shards then pretraining from the shards (the entry points, in this process): validation loss, resume, and
bad data."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from cli_helpers import CommandResult, run_main
from e2e_helpers import PICO
from PIL import Image

from simmim_swin.data import folder_samples, write_shards
from simmim_swin.data.fashion_mnist import FASHION_MNIST_DIR


def pretrain(tmp_path: Path, *overrides: str) -> CommandResult:
    """`simmim-pretrain` (its entry point, in this process) with the tiny model, output under tmp_path."""
    return run_main("pretrain", f"run.output_dir={tmp_path}", *PICO, *overrides, cwd=tmp_path)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """64 JPEGs of 64x48 px cut from the bundled photographs, in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    for i in range(64):
        photo = photos[i % 3]
        top, left = rng.integers(0, photo.shape[0] - 200), rng.integers(0, photo.shape[1] - 200)
        crop = Image.fromarray(photo[top : top + 150, left : left + 200]).resize((64, 48))
        path = root / ("even" if i % 2 == 0 else "odd") / f"img{i:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        crop.save(path, quality=90)
    return root


@pytest.mark.slow
def test_make_shards_then_pretrain_with_validation_and_resume(photo_folder, tmp_path):
    made = run_main("tools", "make-shards", str(photo_folder), "--out", "shards", "--labels", "--max-count", "8",
                    cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    assert "wrote 64 samples, 2 classes in 8 shards" in made.stdout
    _, val_samples, _ = folder_samples(photo_folder / "odd")  # in-process: the tool itself ran above
    write_shards(val_samples, tmp_path / "shards", name="val")

    run_args = [
        "data=shards",
        "data.urls=shards/train.json",  # 64 samples: 8 steps of 8 per epoch
        "data.val_urls=shards/val.json",
        "data.val_samples=12",
        "data.batch_size=8",
        "data.num_workers=2",
        "data.shuffle_buffer=16",
        "optim.base_lr=0.05",
        "schedule=cosine",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "logger.log_every=5",
        "logger.val_every=5",
        "logger.image_every=100",
        "run.save_every=5",
        "run.name=shards",
    ]
    first = pretrain(tmp_path, *run_args, "run.max_steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "8 shards, 64 samples per epoch, 12 validation images" in first.stdout
    second = pretrain(tmp_path, *run_args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 10" in second.stdout

    metrics = [json.loads(line) for line in (tmp_path / "shards" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 16]
    assert all(m["bad_samples"] == 0 and np.isfinite(m["loss"]) for m in metrics)
    # the validation loss every val_every steps and at the end; a fixed set, so it moves only with the weights
    val_losses = [m["val_loss"] for m in metrics]
    assert all(np.isfinite(v) and v > 0 for v in val_losses) and len(set(val_losses)) == 4
    assert (tmp_path / "shards" / "images" / "recon_00000016.png").is_file()


def _corrupt_shards(out: Path) -> list[str]:
    """Two shards of 16 samples each: one in four is a good PNG, the rest are cut-off JPEGs."""
    good = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[::8, ::8]).save(good, format="PNG")
    names = []
    for s in range(2):
        path = out / f"bad-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(16):
                name, data = (f"k{s}_{i}.png", good.getvalue()) if i % 4 == 0 else (f"k{s}_{i}.jpg", b"\xff\xd8\xff")
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        names.append(path.name)
    return names


def test_too_many_bad_samples_stop_the_run_naming_the_shards(tmp_path):
    names = _corrupt_shards(tmp_path)
    result = pretrain(
        tmp_path,
        "data=shards",
        f"data.urls='{tmp_path}/bad-{{000000..000001}}.tar'",  # a brace pattern, quoted for Hydra
        "data.samples_per_epoch=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.max_bad_fraction=0.2",
        "data.bad_check_after=16",
        "schedule=cosine",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "run.name=bad",
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: stopping:") and "above data.max_bad_fraction=0.2" in error, error
    # the shards read so far, each with its count of bad samples
    assert re.search(r"Bad samples per shard: \S+/bad-00000[01]\.tar \(\d+\)", error), error
    assert any(name in error for name in names)
    assert "skipping bad sample" in result.stderr  # and each bad sample was logged (rate-limited) on its way


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="no dataset-fashion-mnist")
def test_pretrain_on_fashion_mnist_directly(tmp_path):
    result = pretrain(tmp_path, "data=fashion_mnist", "data.batch_size=8", "data.num_workers=0",
                      "logger.log_every=2", "run.max_steps=2", "run.name=fmnist")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FashionMNIST(split='train', num_images=60000)" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "fmnist" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2] and np.isfinite(metrics[0]["loss"])
