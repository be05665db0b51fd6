"""The real tools end to end on the CPU: pretrain a tiny model, fine-tune it at a larger size and window on a few
labelled images (and resume), evaluate it at another size, export it for timm and get the same outputs there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import CommandResult, run_main
from e2e_helpers import ONE_EPOCH, PICO
from PIL import Image

# a 3-stage 16-wide SwinV2 at 32 px / window 4 (stage windows 4, 4, 2), 4 SimMIM steps on the bundled photos
PRETRAIN = [
    *PICO,
    "data.batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=32",
    *ONE_EPOCH,
    "logger.log_every=2",
    "logger.image_every=100",
    "run.name=pre",
]
# fine-tune at 64 px / window 8 (stage windows 8, 8, 4; CPB normalised by the pretrained 4, 4, 2): 2 epochs of 3 steps
FINETUNE = [
    "model.img_size=64",
    "model.window_size=8",
    "data.batch_size=4",
    "data.eval_batch_size=6",
    "data.num_workers=0",
    "optim.base_lr=0.1",
    "optim.warmup_lr=0.001",
    "optim.min_lr=0.001",
    "schedule.epochs=2",
    "schedule.warmup_epochs=1",
    "train.ema=true",
    "logger.log_every=1",
    "run.keep_last=1",
    "run.name=ft",
]
CLASSES = ("red", "green", "blue")


def make_class_folders(root: Path) -> None:
    """train/ with 4 images per class, val/ with 2: noisy colour patches, one colour per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 90, size=(40, 48, 3))
                pixels[..., c] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")


def tool(tmp_path: Path, module: str, *args: str) -> CommandResult:
    """Run the command `python -m simmim_swin.cli.<module> ARGS` would run, in this process, from tmp_path."""
    return run_main(module, *args, cwd=tmp_path)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_finetune_evaluate_export_to_timm(tmp_path):
    timm = pytest.importorskip("timm")
    make_class_folders(tmp_path / "images")
    pre = tool(tmp_path, "pretrain", f"run.output_dir={tmp_path}", *PRETRAIN)
    assert pre.returncode == 0, pre.stderr[-3000:]
    pretrained = [f"pretrained={tmp_path / 'pre'}", f"data.root={tmp_path / 'images'}", f"run.output_dir={tmp_path}"]

    # stopped after 2 of 6 steps, then the same command resumes and finishes
    first = tool(tmp_path, "finetune", *pretrained, *FINETUNE, "run.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "windows [8, 8, 4], CPB normalised by [4, 4, 2]" in first.stdout
    assert "dropped (SimMIM only): 1: mask_token" in first.stdout
    assert "dropped (SimMIM decoder): 2" in first.stdout
    assert "re-created (fresh classifier head): 2: head.fc.bias, head.fc.weight" in first.stdout
    second = tool(tmp_path, "finetune", *pretrained, *FINETUNE)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout and "at step 2" in second.stdout

    run_dir = tmp_path / "ft"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    evals = [m for m in metrics if "val_top1" in m]
    assert [m["step"] for m in evals] == [2, 3, 6]  # the interrupted run's last step, then every epoch end
    for m in evals:
        assert 0 <= m["val_top1"] <= 100 and m["val_top5"] == 100.0 and m["val_num_images"] == 6
        assert "ema_val_top1" in m
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert checkpoints == ["best.pt", "step_00000006.pt"]  # steps 2 and 3 pruned (keep_last=1)
    state = torch.load(run_dir / "checkpoints" / "step_00000006.pt", map_location="cpu", weights_only=True)
    assert state["stage_window_sizes"] == [8, 8, 4] and state["pretrained_window_sizes"] == [4, 4, 2]
    assert state["num_classes"] == 3 and state["class_names"] == sorted(CLASSES)

    # resolution transfer: the 64 px / window 8 classifier evaluated at 128 px / window 16, no training
    evaluate = tool(
        tmp_path,
        "finetune",
        f"evaluate={run_dir}",
        f"data.root={tmp_path / 'images'}",
        "model.img_size=128",
        "model.window_size=16",
        "data.num_workers=0",
        f"run.output_dir={tmp_path}",
        "run.name=eval128",
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads((tmp_path / "eval128" / "evaluation.json").read_text())
    assert (result["trained_img_size"], result["img_size"], result["window_size"]) == (64, 128, 16)
    assert result["stage_window_sizes"] == [16, 16, 8] and result["pretrained_window_sizes"] == [4, 4, 2]
    assert result["num_images"] == 6

    # the same number of classes under other names: the head's outputs would be scored against the wrong folders
    renamed = tmp_path / "renamed"
    for split in ("train", "val"):
        for name, other in zip(CLASSES, ("crimson", "emerald", "navy"), strict=True):
            (renamed / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "images" / split / name).rename(renamed / split / other)
    refused = tool(tmp_path, "finetune", f"evaluate={run_dir}", f"data.root={renamed}", f"run.output_dir={tmp_path}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "was fine-tuned on other classes than the data has" in refused.stderr.strip().splitlines()[-1]
    for split in ("train", "val"):  # back, for the export below
        for name, other in zip(CLASSES, ("crimson", "emerald", "navy"), strict=True):
            (renamed / split / other).rename(tmp_path / "images" / split / name)

    # export in timm's layout; timm builds the same model from the printed arguments and gives the same logits
    out = tmp_path / "ft.safetensors"
    export = tool(tmp_path, "tools", "export", str(run_dir), "--out", str(out), "--timm")
    assert export.returncode == 0, export.stderr[-3000:]
    assert "timm.create_model('swinv2_tiny_window8_256'" in export.stdout
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        info = json.loads(f.metadata()["simmim_swin"])
    kwargs = dict(info["timm_create_model"])
    timm_model = timm.create_model(kwargs.pop("model_name"), **kwargs).eval()

    from simmim_swin.config import FinetuneModelConfig
    from simmim_swin.transfer import build_classifier, load_pretrained, resolve_model_config

    weights = load_pretrained(run_dir)
    ours = build_classifier(resolve_model_config(FinetuneModelConfig(), weights), 3, weights, keep_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ours(x)
        assert expected.std() > 0
        torch.testing.assert_close(timm_model(x), expected, rtol=0, atol=1e-5)


def test_finetune_rejects_bad_input_without_traceback(tmp_path):
    make_class_folders(tmp_path / "images")
    common = [f"data.root={tmp_path / 'images'}", f"run.output_dir={tmp_path}", "data.num_workers=0"]
    result = tool(tmp_path, "finetune", *common, "model.img_size=64", "model.window_size=8")
    assert result.returncode != 0 and "model.arch is not set" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
