"""run_finetune / evaluate_transfer in-process on a tiny model and a generated class-folder dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.config import FinetuneConfig, from_dict
from simmim_swin.finetune import evaluate_transfer, run_finetune

TINY = dict(arch="pico", img_size=32, window_size=4, drop_path_rate=0.0)


@pytest.fixture
def image_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 3)):
        for c in range(2):
            folder = tmp_path / "images" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 100, size=(36, 36, 3)) + 120 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")
    return tmp_path / "images"


def config(tmp_path, image_root, **sections) -> FinetuneConfig:
    base = dict(
        model=TINY,
        data=dict(root=str(image_root), batch_size=4, eval_batch_size=4, num_workers=0),
        augment=dict(mixup=0.0, cutmix=0.0, rand_augment=None, reprob=0.0),
        optim=dict(base_lr=0.1, warmup_lr=0.001, min_lr=0.001),
        schedule=dict(epochs=2, warmup_epochs=1, kind="cosine"),
        logger=dict(log_every=1),
        run=dict(output_dir=str(tmp_path), name="scratch", device="cpu"),
    )
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return from_dict(FinetuneConfig, base)


def test_scratch_run_then_evaluate_at_same_and_larger_size(tmp_path, image_root):
    run_dir = run_finetune(config(tmp_path, image_root, train=dict(reinit_cpb_mlp=True)))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_top1" in r][-1]
    assert final["step"] == 4 and final["val_num_images"] == 6
    assert (run_dir / "images" / "confusion_matrix.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_top1"] == final["val_top1"] and summary["best_val_top1"] >= final["val_top1"]
    saved = torch.load(run_dir / "checkpoints" / "step_00000004.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["model"]["arch"] == "pico" and saved["pretrained_window_sizes"] == [0, 0, 0]

    # the classifier evaluated at its own size gives the training run's final numbers exactly
    same = evaluate_transfer(config(tmp_path, image_root, evaluate=str(run_dir), model={}, run=dict(name="e32")))
    assert same["top1"] == final["val_top1"] and same["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    # and at twice the size and window, CPB normalised by the windows it was trained with
    model = dict(img_size=64, window_size=8)
    larger = evaluate_transfer(config(tmp_path, image_root, evaluate=str(run_dir), model=model, run=dict(name="e64")))
    assert larger["stage_window_sizes"] == [8, 8, 4] and larger["pretrained_window_sizes"] == [4, 4, 2]
    assert json.loads((tmp_path / "e64" / "evaluation.json").read_text())["img_size"] == 64


def test_resume_refuses_a_different_model(tmp_path, image_root):
    run_finetune(config(tmp_path, image_root, run=dict(max_steps=1)))
    with pytest.raises(ValueError, match="model.window_size: 4 -> 2"):
        run_finetune(config(tmp_path, image_root, model=dict(window_size=2)))
