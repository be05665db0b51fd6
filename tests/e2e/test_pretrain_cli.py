"""The real `simmim-pretrain` command (its entry point, in this process): trains, writes its run directory, resumes,
rejects bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import CommandResult, run_main
from e2e_helpers import ONE_EPOCH, PICO

# a 3-stage 16-wide SwinV2 at 32 px on the bundled photos: 30 optimizer steps of batch 8 in one epoch
TINY_RUN = [
    *PICO,
    "data.batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=240",
    "optim.base_lr=0.05",
    "optim.warmup_lr=0.0005",
    "optim.min_lr=0.0005",
    *ONE_EPOCH,
    "logger.log_every=5",
    "logger.image_every=10",
    "run.save_every=10",
    "run.keep_last=2",
    "run.name=tiny",
]


def pretrain(tmp_path: Path, *overrides: str) -> CommandResult:
    """Run `simmim-pretrain` (in this process) with the overrides, output under tmp_path."""
    return run_main("pretrain", f"run.output_dir={tmp_path}", *overrides, cwd=tmp_path)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_trains_writes_run_dir_and_resumes(tmp_path):
    run_dir = tmp_path / "tiny"
    first = pretrain(tmp_path, *TINY_RUN, "run.max_steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reconstructions:" in first.stdout

    assert (run_dir / "config.yaml").is_file()
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    for m in metrics:
        assert {"loss", "lr", "grad_norm", "images_per_sec"} <= set(m)
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert [c.name for c in checkpoints] == ["step_00000010.pt", "step_00000020.pt"]
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    assert state["step"] == 20 and "encoder.mask_token" in state["model"]
    assert sorted(p.name for p in (run_dir / "images").glob("recon_*.png")) == [
        "recon_00000010.png",
        "recon_00000020.png",
    ]
    assert sorted(p.name for p in (run_dir / "images").glob("position_bias_*.png")) == [
        "position_bias_00000010.png",
        "position_bias_00000020.png",
    ]

    # the same command without the step limit picks up at step 20 and finishes the 30-step schedule
    second = pretrain(tmp_path, *TINY_RUN)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout and "at step 20" in second.stdout
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    steps = sorted(int(c.stem.split("_")[1]) for c in (run_dir / "checkpoints").glob("step_*.pt"))
    assert steps == [20, 30]  # keep_last=2 pruned step 10

    # the loss went down over 30 steps of real photographs
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.02, losses


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.img_size=36", "img_size=36"),
        ("mask.mask_patch_size=6", "mask_patch_size=6"),
        ("mask.mask_ratio=1.5", "mask_ratio=1.5"),
        ("model.arch=colossal", "colossal"),
        ("run.precision=fp12", "fp12"),
    ],
)
def test_pretrain_rejects_bad_input_before_compute(tmp_path, override, expected):
    result = pretrain(tmp_path, *TINY_RUN, override)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tiny" / "checkpoints").exists()
