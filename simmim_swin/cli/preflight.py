"""Every setting checked before Hydra creates anything: a Hydra callback that builds and validates the typed config
when the run starts, before Hydra makes the run directory and writes .hydra/ and the job log into it.

Registered in conf/pretrain.yaml and conf/finetune.yaml under hydra.callbacks. A bad value ends the command with
one line (exit 2) and leaves no directory behind; the run itself validates again (library callers get the same
checks without Hydra).
"""

from __future__ import annotations

import copy
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from ..config import FinetuneConfig, PretrainConfig, validate_finetune, validate_pretrain
from .common import build_config
from .errors import command_errors


def validate_composed(config: DictConfig, command: str) -> Any:
    """The typed config of a composed Hydra config (its `hydra` node left out), validated as `command` will run it;
    raises ConfigError naming the key."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        choices = dict(task.hydra.runtime.choices) if "hydra" in task else {}
        task.pop("hydra", None)
    if command == "pretrain":
        typed = build_config(PretrainConfig, task, choices, preset_group="experiment")
        validate_pretrain(typed)
    else:
        typed = build_config(FinetuneConfig, task, choices, preset_group="finetune")
        validate_finetune(typed)
    return typed


class ValidateBeforeStart(Callback):
    """Hydra callback: validate the whole config at the start of a run or sweep, before any directory exists."""

    def __init__(self, command: str) -> None:
        if command not in ("pretrain", "finetune"):
            raise ValueError(f"command={command!r}: expected pretrain or finetune")
        self.command = command

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with command_errors():
            validate_composed(config, self.command)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the values before the sweep: a bad value given once stops the sweep before a job is launched
        with command_errors():
            validate_composed(config, self.command)
