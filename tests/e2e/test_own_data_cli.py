"""Users' own data through the real tools: a corrupt file among good ones (folder, shards, fine-tuning), 1 / 4 / 13
channel pretraining, fine-tuning, panels, reconstruct and export, and an RGB checkpoint fine-tuned into 4 bands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import CommandResult, run_main
from e2e_helpers import ONE_EPOCH, PICO
from PIL import Image

from simmim_swin.data.loader import SeededSampler
from simmim_swin.data.shards import ShardSample, folder_samples, write_shards

TINY = [
    *PICO,
    "data.batch_size=8",
    "data.num_workers=0",
    *ONE_EPOCH,
    "logger.log_every=1",
    "logger.image_every=100",
]
FINETUNE = [
    "model.img_size=32",
    "model.window_size=4",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "logger.log_every=1",
]


def tool(tmp_path: Path, module: str, *args: str) -> CommandResult:
    """Run the command `python -m simmim_swin.cli.<module> ARGS` would run, in this process, from tmp_path."""
    return run_main(module, *args, cwd=tmp_path)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def corrupt_position(num_files: int, batch: int, seed: int = 0) -> int:
    """A sorted position the first epoch draws (an epoch of whole batches may leave one file out), below 40."""
    drawn = [index for index, _ in SeededSampler(num_files, seed, samples_per_epoch=num_files // batch * batch)]
    return next(i for i in drawn if i < num_files - 1)


def write_jpegs(folder: Path, num_files: int, corrupt_at: int | None = None, seed: int = 0) -> Path | None:
    """num_files noisy JPEGs, the one at sorted position `corrupt_at` truncated; returns that file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"img{i:02d}.jpg" for i in range(num_files)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name, quality=90)
    if corrupt_at is None:
        return None
    corrupt = folder / names[corrupt_at]
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # a truncated download: the header reads, decoding fails
    return corrupt


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step RGB pretraining on the bundled photos, which the fine-tuning tests only read."""
    out = tmp_path_factory.mktemp("rgb")
    pre = tool(out, "pretrain", *TINY, "data.samples_per_epoch=16", f"run.output_dir={out}", "run.name=rgb")
    assert pre.returncode == 0, pre.stderr[-3000:]
    return out / "rgb"


# --------------------------------------------------------------------------------------------- corrupt files


def test_folder_pretraining_skips_a_corrupt_jpeg_or_stops_at_max_bad_fraction_zero(tmp_path):
    corrupt = write_jpegs(tmp_path / "images", 41, corrupt_position(41, 8))  # 40 good, 1 corrupt
    args = [*TINY, "data=folder", f"data.root={tmp_path / 'images'}", f"run.output_dir={tmp_path}"]
    ok = tool(tmp_path, "pretrain", *args, "run.name=ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    metrics = read_metrics(tmp_path / "ok")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5] and metrics[-1]["bad_samples"] == 1
    assert (ok.stdout + ok.stderr).count(corrupt.name) == 1  # named once
    assert (tmp_path / "ok" / "images" / "recon_00000005.png").is_file()

    stop = tool(tmp_path, "pretrain", *args, "data.max_bad_fraction=0", "run.name=stop")
    assert stop.returncode == 2, stop.stderr[-3000:]
    errors = [line for line in stop.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0] and "max_bad_fraction=0" in errors[0]
    assert "Traceback" not in stop.stderr


@pytest.mark.slow
def test_shard_pretraining_skips_a_corrupt_jpeg(tmp_path):
    corrupt = write_jpegs(tmp_path / "images", 41, corrupt_position(41, 8))
    skipped: list[str] = []
    _, samples, _ = folder_samples(tmp_path / "images", skipped=skipped)
    assert len(list(samples)) == 40 and skipped[0].startswith(f"{corrupt}: ")  # make-shards leaves it out
    # shards written some other way can still hold it (the header is fine): a run must skip it
    paths = sorted((tmp_path / "images").glob("*.jpg"))
    write_shards((ShardSample(path.stem, path.read_bytes(), "jpg") for path in paths), tmp_path / "shards")
    shards = [f"data.urls={tmp_path / 'shards' / 'train.json'}", "data.samples_per_epoch=40", "data.shuffle_buffer=0"]
    args = [*TINY, "data=shards", *shards]  # in file order: the corrupt sample comes before the 40th good one
    ok = tool(tmp_path, "pretrain", *args, f"run.output_dir={tmp_path}", "run.name=ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert read_metrics(tmp_path / "ok")[-1]["bad_samples"] == 1
    assert (ok.stdout + ok.stderr).count(f"'{corrupt.stem}'") == 1
    stop = tool(tmp_path, "pretrain", *args, "data.max_bad_fraction=0", f"run.output_dir={tmp_path}", "run.name=no")
    assert stop.returncode == 2 and "train-000000.tar (1)" in stop.stderr.splitlines()[-1], stop.stderr[-2000:]


@pytest.mark.slow
def test_finetuning_skips_a_corrupt_jpeg_in_a_class_folder(tmp_path, rgb_run):
    position = corrupt_position(41, 8)  # ImageFolder order: class a, then class b; 40 good images and 1 corrupt
    in_a = position < 21
    train = tmp_path / "data" / "train"
    corrupt_a = write_jpegs(train / "a", 21 if in_a else 20, position if in_a else None)
    corrupt_b = write_jpegs(train / "b", 20 if in_a else 21, None if in_a else position - 20, seed=1)
    corrupt = corrupt_a or corrupt_b
    for name in ("a", "b"):
        write_jpegs(tmp_path / "data" / "val" / name, 4, seed=2)
    args = [f"pretrained={rgb_run}", f"data.root={tmp_path / 'data'}", f"run.output_dir={tmp_path}"]
    ok = tool(tmp_path, "finetune", *args, *FINETUNE, "run.name=ft")
    assert ok.returncode == 0, ok.stderr[-3000:]
    losses = [m for m in read_metrics(tmp_path / "ft") if "loss" in m]
    assert len(losses) == 5 and losses[-1]["bad_samples"] == 1
    assert (ok.stdout + ok.stderr).count(str(corrupt)) == 1
    stop = tool(tmp_path, "finetune", *args, *FINETUNE, "data.max_bad_fraction=0", "run.name=ft0")
    assert stop.returncode == 2 and str(corrupt) in stop.stderr.splitlines()[-1], stop.stderr[-2000:]


# ------------------------------------------------------------------------------------------ channel counts


def write_bands(root: Path, in_chans: int, count: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """`count` images of in_chans bands: 16-bit PNG (1), 16-bit TIFF (4), float .npy (13); their statistics."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = np.linspace(500, 60000, in_chans)[:, None, None]
    for i in range(count):
        bands = (rng.random((in_chans, 40, 48)) * scale).astype(np.uint16)
        if in_chans == 1:
            Image.fromarray(bands[0]).save(root / f"{i:02d}.png")
        elif in_chans == 4:
            tifffile.imwrite(root / f"{i:02d}.tif", bands, photometric="minisblack")
        else:
            np.save(root / f"{i:02d}.npy", bands.astype(np.float32) / 1000)
    divisor = 1 if in_chans != 13 else 1000
    mean = (scale[:, 0, 0] / 2 / divisor).tolist()
    std = (scale[:, 0, 0] / np.sqrt(12) / divisor).tolist()
    return mean, std


def statistics(mean: list[float], std: list[float]) -> list[str]:
    return [f"data.mean=[{','.join(f'{v:.4g}' for v in mean)}]", f"data.std=[{','.join(f'{v:.4g}' for v in std)}]"]


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", [1, 4, 13])
def test_multiband_pretraining_panels_finetuning_reconstruct(tmp_path, in_chans):
    stats = statistics(*write_bands(tmp_path / "unlabelled", in_chans, 16))
    for seed, (split, c, count) in enumerate([("train", "x", 8), ("train", "y", 8), ("val", "x", 4), ("val", "y", 4)]):
        write_bands(tmp_path / "labelled" / split / c, in_chans, count, seed=seed + 1)
    pre = tool(
        tmp_path, "pretrain", *TINY, "data=folder", f"data.root={tmp_path / 'unlabelled'}",
        f"model.in_chans={in_chans}", *stats, f"run.output_dir={tmp_path}", "run.name=pre",
    )  # fmt: skip
    assert pre.returncode == 0, pre.stderr[-3000:]
    panel = Image.open(tmp_path / "pre" / "images" / "recon_00000002.png")
    assert panel.mode == "RGB" and np.asarray(panel).std() > 10  # stretched per image: not a flat tile
    ft = tool(
        tmp_path, "finetune", f"pretrained={tmp_path / 'pre'}", f"data.root={tmp_path / 'labelled'}", *FINETUNE,
        *stats, "data.batch_size=4", f"run.output_dir={tmp_path}", "run.name=ft",
    )  # fmt: skip
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert [m for m in read_metrics(tmp_path / "ft") if "val_top1" in m], ft.stdout
    if in_chans == 4:
        image = sorted((tmp_path / "unlabelled").iterdir())[0]
        out = tmp_path / "recon.png"
        recon = tool(tmp_path, "tools", "reconstruct", "--checkpoint", str(tmp_path / "pre"), "--images", str(image),
                     "--out", str(out), "--bands", "3", "2", "1")  # fmt: skip
        assert recon.returncode == 0 and out.is_file(), recon.stderr[-2000:]
        export = tool(tmp_path, "tools", "export", str(tmp_path / "ft"), "--out", str(tmp_path / "ft.safetensors"))
        assert export.returncode == 0 and (tmp_path / "ft.safetensors").is_file(), export.stderr[-2000:]


@pytest.mark.slow
def test_rgb_checkpoint_finetunes_into_four_bands_with_the_adaptation_reported(tmp_path, rgb_run):
    for seed, (split, c, count) in enumerate([("train", "x", 8), ("train", "y", 8), ("val", "x", 4), ("val", "y", 4)]):
        stats = write_bands(tmp_path / "labelled" / split / c, 4, count, seed=seed)
    ft = tool(
        tmp_path, "finetune", f"pretrained={rgb_run}", f"data.root={tmp_path / 'labelled'}", *FINETUNE,
        "model.in_chans=4", *statistics(*stats), "data.batch_size=4", f"run.output_dir={tmp_path}", "run.name=ft",
    )  # fmt: skip
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "patch embedding adapted from 3 to 4 input channels (timm adapt_input_conv)" in ft.stdout
