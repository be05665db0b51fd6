"""The command-line helpers: CPU thread default, wrong-command groups, the W&B name of a preset."""

from __future__ import annotations

import os

import pytest
import torch

from simmim_swin.cli import common


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
