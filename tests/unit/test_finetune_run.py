"""run_finetune / evaluate_transfer in-process on a tiny model and a generated class-folder dataset."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from builders import tiny_finetune_config, write_two_class_images

from simmim_swin.checkpoint import find_latest_checkpoint
from simmim_swin.distributed import Preempted
from simmim_swin.finetune import evaluate_transfer, run_finetune


@pytest.fixture
def image_root(tmp_path):
    return write_two_class_images(tmp_path / "images", {"train": (4, 4), "val": (3, 3)})


def test_scratch_run_then_evaluate_at_same_and_larger_size(tmp_path, image_root):
    run_dir = run_finetune(tiny_finetune_config(tmp_path, image_root, train=dict(reinit_cpb_mlp=True)))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_top1" in r][-1]
    assert final["step"] == 4 and final["val_num_images"] == 6
    assert (run_dir / "images" / "confusion_matrix.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_top1"] == final["val_top1"] and summary["best_val_top1"] >= final["val_top1"]
    saved = torch.load(run_dir / "checkpoints" / "step_00000004.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["model"]["arch"] == "pico" and saved["pretrained_window_sizes"] == [0, 0, 0]

    # the classifier evaluated at its own size gives the training run's final numbers exactly
    evaluate = dict(evaluate=str(run_dir))
    same = evaluate_transfer(tiny_finetune_config(tmp_path, image_root, **evaluate, run=dict(name="e32")))
    assert same["top1"] == final["val_top1"] and same["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    # and at twice the size and window, CPB normalised by the windows it was trained with
    larger_model = dict(model=dict(img_size=64, window_size=8), run=dict(name="e64"))
    larger = evaluate_transfer(tiny_finetune_config(tmp_path, image_root, **evaluate, **larger_model))
    assert larger["stage_window_sizes"] == [8, 8, 4] and larger["pretrained_window_sizes"] == [4, 4, 2]
    assert json.loads((tmp_path / "e64" / "evaluation.json").read_text())["img_size"] == 64


def test_resume_refuses_a_different_model(tmp_path, image_root):
    run_finetune(tiny_finetune_config(tmp_path, image_root, run=dict(max_steps=1)))
    with pytest.raises(ValueError, match="model.window_size: 4 -> 2"):
        run_finetune(tiny_finetune_config(tmp_path, image_root, model=dict(window_size=2)))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_ended_by_max_steps_writes_the_final_evaluation(tmp_path, image_root):
    """run.max_steps ends a run normally: the whole set is scored, with the confusion matrix and final numbers."""
    run_dir = run_finetune(tiny_finetune_config(tmp_path, image_root, schedule=dict(epochs=3), run=dict(max_steps=3)))
    final = [r for r in _records(run_dir) if "val_top1" in r][-1]
    assert final["step"] == 3 and final["val_num_images"] == 6
    assert (run_dir / "images" / "confusion_matrix.png").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["final_val_top1"] == final["val_top1"]


def test_evaluations_during_training_score_a_fixed_subset_and_the_end_scores_all(tmp_path, image_root, caplog):
    caplog.set_level(logging.INFO, logger="simmim_swin")
    cfg = tiny_finetune_config(tmp_path, image_root, train=dict(eval_num_images=2))
    run_dir = run_finetune(cfg)
    evaluated = {r["step"]: r["val_num_images"] for r in _records(run_dir) if "val_top1" in r}
    assert evaluated == {2: 2, 4: 6}  # the end of epoch 1 on the subset, the end of the run on all
    out = caplog.text
    assert "evaluating 2 of 6 validation images during training, all at the end" in out
    assert "evaluation at step 2: 2/2" in out and "final evaluation at step 4: 6/6" in out  # the progress lines


def test_eval_num_images_must_be_positive(tmp_path, image_root):
    with pytest.raises(ValueError, match="train.eval_num_images=0"):
        run_finetune(tiny_finetune_config(tmp_path, image_root, train=dict(eval_num_images=0)))


# an evaluation during training, the final one
@pytest.mark.parametrize("at_step", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_stop_signal_during_an_evaluation_stops_at_the_next_batch_and_saves(tmp_path, image_root, at_step):
    """SIGTERM mid-evaluation: the evaluation ends at the next batch, not after the whole set; the step is saved."""
    import signal

    import simmim_swin.finetune as finetune

    current = {"step": 0, "batches": 0}
    real_evaluate, real_classifier = finetune._evaluate, finetune.evaluate_classifier

    def evaluate(run, *args, **kwargs):
        current.update(step=run.step, batches=0)
        return real_evaluate(run, *args, **kwargs)

    def classifier_signalled_at_the_first_batch(*args, on_batch=None, **kwargs):
        def count(n: int) -> None:
            current["batches"] += 1
            if current["step"] == at_step and current["batches"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # e.g. Slurm's time-limit warning

        return real_classifier(*args, on_batch=count, **kwargs)

    cfg = tiny_finetune_config(tmp_path, image_root, data=dict(eval_batch_size=1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "_evaluate", evaluate)
        patch.setattr(finetune, "evaluate_classifier", classifier_signalled_at_the_first_batch)
        with pytest.raises(Preempted, match=f"received SIGTERM: saved a checkpoint at step {at_step}"):
            run_finetune(cfg)
    assert current == {"step": at_step, "batches": 1}  # 1 of the batches: the signal did not wait for the rest
    run_dir = tmp_path / "scratch"
    assert find_latest_checkpoint(run_dir).name == f"step_{at_step:08d}.pt"
    assert not [r for r in _records(run_dir) if "val_top1" in r and r["step"] == at_step]  # cut short: no numbers
    assert not (run_dir / "run.lock").exists()

    # started again, the run finishes: the final evaluation (skipped by the stop at the end) runs on all images
    run_finetune(cfg)
    final = [r for r in _records(run_dir) if "val_top1" in r][-1]
    assert final["step"] == 4 and final["val_num_images"] == 6
    assert (run_dir / "images" / "confusion_matrix.png").is_file()
    assert "final_val_top1" in json.loads((run_dir / "summary.json").read_text())
