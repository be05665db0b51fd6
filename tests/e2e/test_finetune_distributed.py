"""Fine-tuning on several CPU processes (gloo): DDP equivalence, FSDP from an FSDP pretraining, SIGTERM under
torchrun, non-finite steps. The pretraining side of the same machinery is tested in test_distributed.py."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from builders import write_two_class_images
from e2e_helpers import cli_command, max_weight_diff, run_cli, wait_for

from simmim_swin.checkpoint import find_latest_checkpoint, load_checkpoint
from simmim_swin.engine import TrainingDiverged

# a 3-stage 16-wide SwinV2 at 32 px / window 4; 16 training images = 2 optimizer steps of a global batch of 8.
# Mixup off: its lambda is drawn per rank, so only without it do one and two processes see the same batch.
FINETUNE = [
    "model.arch=pico",
    "model.img_size=32",
    "model.window_size=4",
    "model.drop_path_rate=0.0",
    "data.num_workers=0",
    "data.eval_batch_size=2",
    "augment.mixup=0.0",
    "augment.cutmix=0.0",
    "optim.base_lr=0.005",  # lr 7.8e-5 at batch 8: see test_distributed's note on Adam and float noise
    "optim.warmup_lr=0.00005",
    "optim.min_lr=0.00005",
    "schedule.epochs=2",
    "schedule.warmup_epochs=1",
    "logger.log_every=1",
    "run.device=cpu",
]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """train/ 8 + 8 images, val/ 3 + 2: five validation images do not split evenly over two ranks."""
    return write_two_class_images(tmp_path / "images", {"train": (8, 8), "val": (3, 2)})


def finetune_args(images: Path, name: str, *overrides: str) -> list[str]:
    return [*FINETUNE, f"data.root={images}", f"run.name={name}", *overrides]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_fine_tune_like_one(tmp_path, images):
    """DDP with half the batch per rank ends with the weights of one process; the sharded evaluation (5 images
    over 2 ranks, one padded) reports exactly the single-process numbers; rank 0 alone writes."""
    run_cli(tmp_path, "finetune", *finetune_args(images, "one", "data.batch_size=8"))
    two = run_cli(tmp_path, "finetune", *finetune_args(images, "two", "data.batch_size=4"), nproc=2)
    assert "on 2 x cpu (fp32, ddp)" in two.stdout and "total batch 8" in two.stdout

    one_weights = load_checkpoint(find_latest_checkpoint(tmp_path / "one"))["model"]
    two_weights = load_checkpoint(find_latest_checkpoint(tmp_path / "two"))["model"]
    assert max_weight_diff(one_weights, two_weights) <= 1e-6

    one_evals = [r for r in records(tmp_path / "one") if "val_top1" in r]
    two_evals = [r for r in records(tmp_path / "two") if "val_top1" in r]
    assert [r["step"] for r in two_evals] == [2, 4] and all(r["val_num_images"] == 5 for r in two_evals)
    for a, b in zip(one_evals, two_evals, strict=True):
        assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    # one metrics line per step, not one per rank
    assert [r["step"] for r in records(tmp_path / "two") if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "two" / "images" / "confusion_matrix.png").is_file()
    assert two.stdout.count("done at step 4/4") == 1


@pytest.mark.slow
def test_two_processes_select_on_held_out_labels_then_score_best_once(tmp_path, images):
    """DDP with data.val_fraction and the linear-probe head: every rank holds out the same labelled images, best.pt
    is chosen on them, and the whole val/ set is scored once, with the same numbers on every rank."""
    held_out = ("data.val_fraction=0.25", "train.head_init=linear_probe", "data.batch_size=3", "schedule.epochs=3")
    two = run_cli(tmp_path, "finetune", *finetune_args(images, "two", *held_out), nproc=2)
    assert two.stdout.count("classifier initialised by a linear probe") == 1
    lines = records(tmp_path / "two")
    assert {r["val_num_images"] for r in lines if "val_top1" in r} == {4}  # 2 of each class's 8 held out
    (test,) = [r for r in lines if "test_top1" in r]
    assert test["test_num_images"] == 5 and test["best_step"] in (2, 4, 6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["final_test_top1"] == test["test_top1"]


@pytest.mark.slow
def test_fsdp_fine_tune_from_fsdp_pretraining_resumes_and_evaluates_in_one_process(tmp_path, images):
    """FSDP end to end: a sharded pretraining checkpoint is read as pretrained weights, the FSDP fine-tune writes
    sharded resume checkpoints and a whole best.pt, one process resumes it, and evaluate= reads a shard folder."""
    run_cli(
        tmp_path,
        "pretrain",
        "model.arch=pico",
        "model.img_size=32",
        "model.window_size=4",
        "mask.mask_patch_size=8",
        "data.num_workers=0",
        "data.samples_per_epoch=16",
        "data.batch_size=4",
        "schedule=cosine",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "logger.image_every=100",
        "run.device=cpu",
        "run.name=pre",
        "run.parallel=fsdp",
        nproc=2,
    )
    assert find_latest_checkpoint(tmp_path / "pre").name == "step_00000002.dcp"

    larger = ["model.img_size=64", "model.window_size=8", f"pretrained={tmp_path / 'pre'}"]
    args = finetune_args(images, "ft", *larger, "data.batch_size=4", "run.parallel=fsdp", "run.max_steps=3")
    fsdp = run_cli(tmp_path, "finetune", *args, nproc=2)
    assert "on 2 x cpu (fp32, fsdp)" in fsdp.stdout
    assert "windows [8, 8, 4], CPB normalised by [4, 4, 2]" in fsdp.stdout
    checkpoints = tmp_path / "ft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002.dcp", "step_00000003.dcp"]
    best = torch.load(checkpoints / "best.pt", map_location="cpu", weights_only=True)
    assert all(type(t) is torch.Tensor for t in best["model"].values())  # gathered whole, not DTensor shards
    assert "head.fc.weight" in best["model"] and best["num_classes"] == 2

    # evaluate= the shard folder of step 3, in one process: the numbers the FSDP run logged at step 3
    logged = [r for r in records(tmp_path / "ft") if "val_top1" in r][-1]
    assert logged["step"] == 3
    evaluate = ["data.num_workers=0", f"data.root={images}", f"evaluate={checkpoints / 'step_00000003.dcp'}"]
    run_cli(tmp_path, "finetune", *evaluate, "run.device=cpu", "run.name=eval")
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["num_images"] == 5 and result["top1"] == logged["val_top1"]
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)

    # the same run continued by one process without FSDP picks up the sharded model and optimizer
    resumed = run_cli(tmp_path, "finetune", *finetune_args(images, "ft", *larger, "data.batch_size=8"))
    assert "resuming" in resumed.stdout and "at step 3" in resumed.stdout
    assert load_checkpoint(find_latest_checkpoint(tmp_path / "ft"))["step"] == 4


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, images):
    """Slurm preemption under torchrun: the agent forwards SIGTERM, the ranks agree on a step, rank 0 saves it."""
    args = finetune_args(images, "preempted", "data.batch_size=4", "schedule.epochs=5000", "run.save_every=100000")
    args += ["train.eval_every=100000"]
    proc = subprocess.Popen(
        cli_command(tmp_path, "finetune", *args, nproc=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 300, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "preempted"))
    assert state["step"] == last_logged >= 3, output[-3000:]
    assert output.count(f"received SIGTERM: saved a checkpoint at step {last_logged}") == 1, output[-3000:]
    assert len(state["rng"]) == 2  # both ranks' RNG states, for an exact continuation


def test_non_finite_fine_tune_steps_are_skipped_then_stop_the_run_cli(tmp_path, images, monkeypatch):
    """A NaN loss skips its step (counted, not saved); max_consecutive_skips in a row stop the run and the last good
    checkpoint stays the newest. (That a skipped step changes no weight is test_optim's
    test_non_finite_step_changes_nothing.)"""
    from torch import nn

    from simmim_swin import finetune as finetune_module
    from simmim_swin.config import FinetuneConfig, from_dict

    calls = {"n": 0}

    class FlakyLoss(nn.Module):
        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            loss = nn.functional.cross_entropy(logits, targets)
            # step 2 is one bad step among good ones; from step 5 on every step is bad
            return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 5 else loss

    monkeypatch.setattr(finetune_module, "build_mixup_and_loss", lambda augment, num_classes: (None, FlakyLoss()))
    config = from_dict(
        FinetuneConfig,
        dict(
            model=dict(arch="pico", img_size=32, window_size=4, drop_path_rate=0.0),
            data=dict(root=str(images), batch_size=4, eval_batch_size=4, num_workers=0),
            schedule=dict(epochs=10, warmup_epochs=0, kind="cosine"),
            logger=dict(log_every=1),
            run=dict(
                output_dir=str(tmp_path),
                name="diverging",
                device="cpu",
                save_every=1,
                keep_last=10,
                max_consecutive_skips=3,
            ),
        ),
    )
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        finetune_module.run_finetune(config)
    skipped = {r["step"]: r["skipped_steps"] for r in records(tmp_path / "diverging") if "loss" in r}
    assert (skipped[1], skipped[2], skipped[4], skipped[7]) == (0, 1, 1, 4)
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "diverging" / "checkpoints").glob("step_*.pt"))
    assert 2 not in steps and 3 in steps and max(steps) == 4  # the last good step
    latest = load_checkpoint(find_latest_checkpoint(tmp_path / "diverging"))
    assert latest["step"] == 4 and all(torch.isfinite(v).all() for v in latest["model"].values())
    assert (latest["skipped_steps"], latest["consecutive_skips"]) == (1, 0)  # a resumed run keeps counting
