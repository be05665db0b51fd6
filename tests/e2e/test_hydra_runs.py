"""The Hydra entry points in-process on a pico model: sweeps, Hydra's folder options, the run's records and log,
users' own configs and W&B's environment. Each run is a few CPU steps; main() is called as the console script is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from builders import write_two_class_images
from cli_helpers import CommandResult, run_main
from e2e_helpers import PICO

TINY = [
    *PICO,
    "data.batch_size=4",
    "data.num_workers=0",
    "data.samples_per_epoch=16",
    "logger.log_every=1",
    "logger.image_every=100",
    "run.save_every=2",
    "run.device=cpu",
    "run.max_steps=2",
]


def main(module: str, *argv: str, **kwargs) -> CommandResult:
    """Run the command's entry point with these arguments, as the console script does; it must succeed."""
    result = run_main(module, *argv, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_each_job_of_a_sweep_gets_its_own_run_directory(tmp_path):
    sweep = ["-m", "mask.mask_ratio=0.4,0.6", f"run.output_dir={tmp_path}", *TINY]
    main("pretrain", *sweep)
    jobs = {ratio: tmp_path / "pretrain_sweep" / f"mask.mask_ratio={ratio}" for ratio in (0.4, 0.6)}
    for ratio, run_dir in jobs.items():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["mask"]["mask_ratio"] == ratio and steps(run_dir) == [1, 2]
        assert config["logger"]["group"] == "pretrain_sweep"  # the W&B group of the sweep
        log = (run_dir / "pretrain.log").read_text()
        assert "step 1/2" in log and "step 2/2" in log and "done at step 2" in log  # every line the run printed
        assert not (run_dir / ".hydra").exists()
    # the same sweep again, further: every job resumes its own run
    main("pretrain", *sweep, "run.max_steps=3")
    for run_dir in jobs.values():
        assert steps(run_dir) == [1, 2, 3] and "resuming" in (run_dir / "pretrain.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain_sweep"]


@pytest.mark.slow
def test_a_finetune_sweep_runs_every_job(tmp_path):
    write_two_class_images(tmp_path / "images", {"train": (4, 4), "val": (4, 4)})
    main(
        "finetune", "-m", "optim.base_lr=0.1,0.05", f"run.output_dir={tmp_path / 'out'}",
        "model.arch=pico", "model.img_size=32", "model.window_size=4", f"data.root={tmp_path / 'images'}",
        "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "augment.mixup=0", "augment.cutmix=0",
        "augment.rand_augment=null", "augment.reprob=0", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "run.device=cpu", "logger.log_every=1",
    )  # fmt: skip
    for lr in (0.1, 0.05):
        run_dir = tmp_path / "out" / "finetune_sweep" / f"optim.base_lr={lr}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["base_lr"] == lr
        assert any("val_top1" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_hydra_folder_options_keep_one_run_directory(tmp_path):
    main("pretrain", f"run.output_dir={tmp_path / 'outputs'}", f"hydra.run.dir={tmp_path / 'D'}", *TINY)
    assert steps(tmp_path / "D") == [1, 2] and (tmp_path / "D" / "checkpoints").is_dir()
    assert "step 2/2" in (tmp_path / "D" / "pretrain.log").read_text()
    assert not (tmp_path / "outputs").exists()

    # a relative run.output_dir with hydra.job.chdir=true does not nest the run in itself
    main("pretrain", "run.output_dir=rel", "run.name=cd", "hydra.job.chdir=true", *TINY, cwd=tmp_path)
    assert steps(tmp_path / "rel" / "cd") == [1, 2] and not (tmp_path / "rel" / "cd" / "rel").exists()


def test_a_refused_launch_leaves_the_records_of_the_run(tmp_path):
    main("pretrain", f"run.output_dir={tmp_path}", "run.name=kept", *TINY)
    config = (tmp_path / "kept" / "config.yaml").read_bytes()
    # composes (`--cfg job` shows it), then the schema refuses it
    refused = run_main("pretrain", f"run.output_dir={tmp_path}", "run.name=kept", *TINY, "+foo=1")
    assert refused.returncode == 2
    assert (tmp_path / "kept" / "config.yaml").read_bytes() == config
    assert not list(tmp_path.rglob(".hydra"))


def test_multirun_with_cfg_is_one_line(tmp_path):
    code, _, err = run_main("pretrain", "-m", "mask.mask_ratio=0.4,0.6", "--cfg", "hydra", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_users_own_configs(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quickstart\nmodel:\n  arch: pico\nrun:\n  name: mine\n"
    )
    (tmp_path / "mine.yaml").write_text("defaults:\n  - pretrain\n  - _self_\nmodel:\n  arch: nano\n")
    own = ["--config-dir", str(tmp_path)]
    config = yaml.safe_load(main("pretrain", *own, "experiment=mine", "--cfg", "job").stdout)
    assert (config["model"]["arch"], config["run"]["name"], config["schedule"]["epochs"]) == ("pico", "mine", 5)
    config = yaml.safe_load(main("pretrain", *own, "--config-name", "mine", "--cfg", "job").stdout)
    assert (config["model"]["arch"], config["run"]["name"]) == ("nano", "pretrain")


@pytest.mark.slow
def test_wandb_mode_from_the_environment(tmp_path):
    """A cluster job without an API key: WANDB_MODE=offline makes logger=wandb log offline instead of refusing."""
    pytest.importorskip("wandb")
    # no ~/.netrc; run_main tears W&B down afterwards (it reads its settings once per process)
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": None, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    quiet = ["logger.system_metrics=false", "logger.git=false"]
    main("pretrain", f"run.output_dir={tmp_path}", "run.name=w", "logger=wandb", *quiet, *TINY, env=env)
    run_dir = tmp_path / "w"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["wandb"] == "offline"
    assert list((run_dir / "wandb").glob("offline-run-*")) and steps(run_dir) == [1, 2]


@pytest.mark.slow
def test_a_sweep_through_the_submitit_launcher(tmp_path):
    """hydra/launcher=local2 starts the jobs side by side (two processes each): each holds its own run directory
    instead of waiting on the other's run lock."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    command = [sys.executable, "-m", "simmim_swin.cli.pretrain", "-m", "hydra/launcher=local2",
               "mask.mask_ratio=0.4,0.6", f"run.output_dir={tmp_path}", *TINY]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # 4 processes
    assert result.returncode == 0, result.stderr[-3000:]
    for ratio in (0.4, 0.6):
        run_dir = tmp_path / "pretrain_sweep" / f"mask.mask_ratio={ratio}"
        assert steps(run_dir) == [1, 2] and "2 x cpu" in (run_dir / "pretrain.log").read_text()
