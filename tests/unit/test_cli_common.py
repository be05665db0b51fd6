"""The command-line helpers: CPU thread default, wrong-command groups, the W&B name of a preset, overrides Hydra
cannot parse."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from simmim_swin.cli import common
from simmim_swin.cli.overrides import override_error


@pytest.mark.parametrize(
    ("cores", "env", "device", "expected"),
    [
        (2, {}, "cpu", [1]),
        (2, {}, "auto", [1]),  # no CUDA in the test environment
        (2, {"OMP_NUM_THREADS": "2"}, "cpu", []),
        (16, {}, "cpu", []),
        (2, {}, "cuda", []),
    ],
)
def test_default_cpu_threads(monkeypatch, cores, env, device, expected):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    calls = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    common.default_cpu_threads(device)
    assert calls == expected


def test_group_of_the_other_command_exits_with_the_right_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.check_command_groups("simmim-pretrain", ["model.arch=pico", "finetune=quickstart"])
    assert exit_info.value.code == 2 and "run `simmim-finetune finetune=quickstart ...`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.check_command_groups("simmim-finetune", ["+experiment=quickstart"])
    assert "run `simmim-pretrain experiment=quickstart ...`" in capsys.readouterr().err
    common.check_command_groups("simmim-finetune", ["logger=wandb", "data.root=/x", "finetune=quickstart"])
    common.check_command_groups("simmim-pretrain", ["data=folder", "experiment=quickstart", "--help"])


def test_logger_named_after_the_preset():
    logger = {"group": None, "tags": []}
    common.name_logger_after_preset(logger, "quickstart")
    assert logger == {"group": "quickstart", "tags": ["quickstart"]}
    logger = {"group": "mine", "tags": ["quickstart"]}
    common.name_logger_after_preset(logger, "quickstart")
    assert logger == {"group": "mine", "tags": ["quickstart"]}
    logger = {"group": None, "tags": []}
    common.name_logger_after_preset(logger, None)
    assert logger == {"group": None, "tags": []}


def test_conf_dir_holds_both_primary_configs():
    assert (common.CONF_DIR / "pretrain.yaml").is_file() and (common.CONF_DIR / "finetune.yaml").is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["data.root=/path/with", "spaces", "ü"], "the shell split a value with spaces"),
        (["data.root=/path/with spaces ü"], "non-ASCII letters"),
    ],
)
def test_unquoted_value_with_spaces_or_umlaut_gets_the_quoting_advice(monkeypatch, capsys, tmp_path, argv, expected):
    from simmim_swin.cli import pretrain

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["simmim-pretrain", *argv])
    with pytest.raises(SystemExit) as exc:
        pretrain.main()
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].endswith("\"data.root='/path/with spaces ü'\"")
    assert not list(tmp_path.iterdir())


def test_override_error_quotes_a_value_holding_a_single_quote():
    message = override_error("data.root=/it's here", ["data.root=/it's here"])
    assert message.endswith('"data.root=\\"/it\'s here\\""')
    assert "is not a KEY=VALUE override (e.g. data.root=DIR)" in override_error("oops", ["oops"])


@pytest.mark.parametrize(
    ("command", "argv", "expected"),
    [
        ("pretrain", ["logger.wandb=sometimes"], "logger.wandb='sometimes' is unknown"),
        ("pretrain", ["schedule.kind=linear"], "schedule.kind='linear' is unknown"),
        ("pretrain", ["model.arch=pico", "model.img_size=36"], "model.img_size=36 must be divisible"),
        ("finetune", ["run.precision=fp8"], "run.precision='fp8' is unknown"),
        ("finetune", ["data.root=imgs", "data.batch_size=3"], "data.batch_size=3 must be even"),
        ("finetune", [], "data.source=folder needs data.root"),
    ],
)
def test_a_bad_value_is_refused_before_hydra_creates_the_run_directory(
    monkeypatch, capsys, tmp_path, command, argv, expected
):
    import importlib

    module = importlib.import_module(f"simmim_swin.cli.{command}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"simmim-{command}", f"run.output_dir={tmp_path}/runs", *argv])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not list(tmp_path.iterdir())  # no run directory, no .hydra/, no log


def test_logger_defaults_give_way_to_wandb_environment_variables():
    """WANDB_RUN_GROUP / WANDB_TAGS win over the preset's group and tag list; a config value wins over both."""
    env = {"WANDB_RUN_GROUP": "cluster", "WANDB_TAGS": "a, b"}
    logger = {"group": None, "tags": []}
    common.name_logger_after_preset(logger, "quickstart", env)
    assert logger == {"group": None, "tags": ["a", "b", "quickstart"]}  # group None: W&B reads WANDB_RUN_GROUP
    logger = {"group": "mine", "tags": ["x"]}
    common.name_logger_after_preset(logger, "quickstart", env)
    assert logger == {"group": "mine", "tags": ["x", "quickstart"]}
    logger = {"group": None, "tags": []}
    common.name_logger_after_preset(logger, None, {}, group="pretrain_sweep")  # a sweep without a preset
    assert logger == {"group": "pretrain_sweep", "tags": []}


SWEEP_LAYOUT = [
    "hydra.sweep.dir=${run.output_dir}/${run.name}_sweep",
    "hydra.sweep.subdir='${simmim_job_dir:${hydra.job.override_dirname},${hydra.job.num}}'",
]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # each job of a sweep in its own folder, named by what differs between the jobs
        (["-m", "mask.mask_ratio=0.4,0.6", "experiment=quickstart", "+x=1"],
         [*SWEEP_LAYOUT, "hydra.job.config.override_dirname.exclude_keys=['experiment','x']"]),
        (["--multirun", "optim.base_lr=range(1,3)", "hydra/launcher=local2"],
         [*SWEEP_LAYOUT, "hydra.job.config.override_dirname.exclude_keys=[]"]),
        (["-m", "hydra/sweeper=optuna", "run.device=cpu"],  # a sweeper plugin picks the values
         [*SWEEP_LAYOUT, "hydra.job.config.override_dirname.exclude_keys=['run.device']"]),
        # the user's own sweep folder is kept
        (["-m", "a=1,2", "hydra.sweep.dir=/x"], [SWEEP_LAYOUT[1], "hydra.job.config.override_dirname.exclude_keys=[]"]),
        (["-m", "hydra/launcher=slurm", "run.name=base"], []),  # one job through a launcher: <output_dir>/<name>
        (["-m", "a=1,2", "run.name=r1,r2"], []),  # run.name differs between the jobs
        (["-m", "a=1,2", "run.name=lr${a}"], []),
        (["a=1", "b=2"], []),  # not a multirun
        (["-m", "a=1,2", "--help"], []),
    ],
)  # fmt: skip
def test_hydra_arguments_lay_out_a_sweep(argv, expected):
    assert common.hydra_arguments(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "a=1,2", "run.name=same"], "run.name=same names every job of this sweep the same run"),
        (["-m", "a=1,2", "--cfg", "hydra"], "-m/--multirun and --cfg cannot be combined"),
        (["--info", "--cfg", "job"], "--cfg and --info cannot be combined"),
    ],
)
def test_hydra_arguments_refuse_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.hydra_arguments(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def _hydra_job(output_dir: str, cwd: str, chdir: bool = False) -> OmegaConf:
    return OmegaConf.create({"runtime": {"output_dir": output_dir, "cwd": cwd}, "job": {"chdir": chdir}})


@pytest.mark.parametrize(
    ("run", "job", "expected"),
    [
        # Hydra's folder is the run directory already: nothing moves
        ({"output_dir": "outputs", "name": "a"}, _hydra_job("/w/outputs/a", "/w"), None),
        ({"output_dir": "/data/runs", "name": "a"}, _hydra_job("/data/runs/a", "/w"), None),
        # hydra.run.dir=elsewhere/D, a sweep job: the run follows Hydra's folder (relative stays relative)
        ({"output_dir": "outputs", "name": "a"}, _hydra_job("/w/elsewhere/D", "/w"), ("elsewhere", "D")),
        ({"output_dir": "out", "name": "a"}, _hydra_job("/w/out/a_sweep/x=1", "/w"), ("out/a_sweep", "x=1")),
        ({"output_dir": "/o", "name": "a"}, _hydra_job("/o/a_sweep/x=1", "/w"), ("/o/a_sweep", "x=1")),
        # hydra.job.chdir=true: the process works inside the run directory, so the run's path must be absolute
        ({"output_dir": "outputs", "name": "a"}, _hydra_job("/w/outputs/a", "/w", chdir=True), ("/w/outputs", "a")),
    ],
)  # fmt: skip
def test_place_run_follows_the_folder_hydra_made(run, job, expected):
    before = dict(run)
    moved = common.place_run(run, job)
    assert moved == (expected is not None)
    assert (run["output_dir"], run["name"]) == (expected or (before["output_dir"], before["name"]))


def test_job_folder_names_the_overrides_or_the_job_number():
    assert common._job_dir("data.root=/a/b,mask.mask_ratio=0.4", 0) == "data.root=_a_b,mask.mask_ratio=0.4"
    assert common._job_dir("", 3) == "3"
