"""A tiny real pretraining run with wandb offline, then `simmim-swin plot` and `simmim-swin reconstruct` on it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import CommandResult, run_main
from e2e_helpers import ONE_EPOCH, PICO
from PIL import Image

from simmim_swin.cli.tools import main as tools_main
from simmim_swin.figures import MASK_GREY, panel_size, tile_box
from simmim_swin.tracking import load_metrics

IMG_SIZE = 32
# a 3-stage 16-wide SwinV2 at 32 px on the bundled photos: 10 optimizer steps of batch 8
TINY_RUN = [
    *PICO,
    "data.batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=240",
    *ONE_EPOCH,
    "logger.wandb=offline",
    "logger.log_every=2",
    "logger.image_every=5",
    "run.save_every=10",
    "run.max_steps=10",
    "run.name=tiny",
]


def _env() -> dict[str, str | None]:
    """No WANDB_ variable (the mode comes from the config), W&B quiet."""
    return {**{k: None for k in os.environ if k.startswith("WANDB_")}, "WANDB_SILENT": "true"}


def tool(*args: str, cwd: Path) -> CommandResult:
    """Run `simmim-swin ARGS` (its entry point, in this process)."""
    return run_main("tools", *args, cwd=cwd, env=_env())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a finished 10-step pretraining."""
    out = tmp_path_factory.mktemp("runs")
    result = run_main("pretrain", f"run.output_dir={out}", *TINY_RUN, cwd=out, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "tiny"


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB"))


@pytest.mark.slow
def test_run_has_metrics_and_an_offline_wandb_run_with_images(run_dir: Path) -> None:
    records = load_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10]
    assert all({"loss", "lr", "images_per_sec"} <= set(r) for r in records if "loss" in r)
    run_id = (run_dir / "wandb_run_id").read_text()
    run_folders = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_folders) == 1 and (run_folders[0] / f"run-{run_id}.wandb").is_file()
    logged = sorted(run_folders[0].glob("files/media/images/reconstruction_*.png"))
    assert logged, "no reconstruction panel reached the wandb run"
    local = {tuple(_png(p).reshape(-1)[:64]) for p in (run_dir / "images").glob("*.png")}
    assert tuple(_png(logged[-1]).reshape(-1)[:64]) in local  # the same pixels as a panel in the run directory


@pytest.mark.slow
def test_plot_overlays_runs_and_skips_malformed_lines(run_dir: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other" / "tiny"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    with open(other / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 0.')  # a line cut short by a crash
    tools_main(["plot", str(run_dir), str(other), "--out", str(tmp_path / "curves.png")])
    out, err = capsys.readouterr()
    assert "skipped a malformed line" in err and "metrics.jsonl:6" in err
    png = _png(tmp_path / "curves.png")
    assert png.shape[1] == 1500 and len(np.unique(png.reshape(-1, 3), axis=0)) > 20  # three panels, two runs
    assert "2 runs" in out


def test_plot_names_a_run_without_metrics(tmp_path: Path, capsys) -> None:
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit) as exit_info:  # a message, no traceback
        tools_main(["plot", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: .*not_a_run has no metrics.jsonl.*\n", capsys.readouterr().err)
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_reconstruct_shows_the_checkpoint_on_real_photos(run_dir: Path, tmp_path: Path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    photos = [str(Path(skimage_data.__file__).parent / name) for name in ("astronaut.png", "coffee.png")]
    out = tmp_path / "recon.png"
    result = tool("reconstruct", "--checkpoint", str(run_dir), "--images", *photos, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint step 10" in result.stdout
    png = _png(out)
    width, height = panel_size(2, IMG_SIZE, IMG_SIZE)
    assert png.shape == (height, width, 3)
    top, _, bottom, _ = tile_box(0, 0, IMG_SIZE, IMG_SIZE)
    bottom = tile_box(1, 0, IMG_SIZE, IMG_SIZE)[2]
    original, masked, reconstruction = (
        png[top:bottom, left:right].astype(float)
        for _, left, _, right in (tile_box(0, col, IMG_SIZE, IMG_SIZE) for col in range(3))
    )
    assert original.std() > 20  # photographs, not a blank panel
    assert 0.4 < (masked == MASK_GREY).all(axis=-1).mean() < 0.8  # mask ratio 0.6 in grey
    assert np.abs(masked - original).mean() > 10 and np.abs(reconstruction - original).mean() > 1


@pytest.mark.slow
def test_reconstruct_names_a_file_that_is_not_an_image(run_dir: Path, tmp_path: Path, capsys) -> None:
    not_image = str(run_dir / "config.yaml")
    with pytest.raises(SystemExit) as exit_info:
        tools_main(["reconstruct", "--checkpoint", str(run_dir), "--images", not_image, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: .*config.yaml is not an image.*\n", capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
