"""A Hydra callback (conf/*.yaml, hydra.callbacks) that validates the typed config when a run or sweep starts, before
Hydra makes the run directory: a bad value ends the command with one line (exit 2) and leaves no directory behind
(the run validates again, for library callers)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..config import FinetuneConfig, PretrainConfig, validate_finetune, validate_pretrain
from .common import build_config
from .errors import command_errors


def validate_composed(config: DictConfig, command: str) -> Any:
    """The typed config of a composed Hydra config (its `hydra` node left out), validated as `command` will run it;
    raises ConfigError naming the key."""
    choices = dict(config.hydra.runtime.choices) if "hydra" in config else {}
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
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

    # a sweep: the values before the sweep, so that a bad value given once stops it before a job is launched
    on_multirun_start = on_run_start
