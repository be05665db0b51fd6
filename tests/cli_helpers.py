"""Run a console entry point in this process, as its console script would run it, without a second interpreter.

Imported as `from cli_helpers import run_main` (pytest puts tests/ on sys.path: it holds conftest.py and no
packages). A subprocess costs about 5 s of start-up on a busy 2-core machine, mostly importing torch; tests that
need a real process (signals, torchrun, dying workers, the installed scripts, `--help` not importing torch) keep it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.core.global_hydra import GlobalHydra

# the signals a run may take over while it trains (saved and put back around every call)
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class CommandResult(NamedTuple):
    """What a finished command left: its exit status and everything it printed."""

    returncode: int
    stdout: str
    stderr: str


def compose_config(command: str, *overrides: str) -> Any:
    """The typed config `simmim-<command>` (pretrain / finetune) builds from these command-line arguments, without
    running anything (W&B group / tag from the preset)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from simmim_swin.cli.common import CONF_DIR, build_config
    from simmim_swin.config import FinetuneConfig, PretrainConfig

    cls, preset_group = {"pretrain": (PretrainConfig, "experiment"), "finetune": (FinetuneConfig, "finetune")}[command]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=command, overrides=list(overrides), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return build_config(cls, cfg, choices, preset_group=preset_group)


def _exit_code(e: SystemExit) -> int:
    """The status a process would exit with for this SystemExit (None is 0, a message is 1)."""
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def run_main(
    module: str, *argv: str, cwd: Path | str | None = None, env: Mapping[str, str | None] | None = None
) -> CommandResult:
    """`python -m simmim_swin.cli.<module> ARGV` in this process, from `cwd`, with the environment variables in `env`
    set (None: unset) for this call only: (exit status, stdout, stderr).

    Hydra's global state, the working directory, the environment, sys.argv, the root logger's handlers, the signal
    handlers, torch's thread count and W&B's per-process settings are put back afterwards, so that calls do not see
    each other. An exception other than SystemExit is a bug of the command (a process would print its traceback):
    it propagates.
    """
    command = importlib.import_module(f"simmim_swin.cli.{module}")
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    saved_handlers, saved_level = list(logging.root.handlers), logging.root.level
    saved_signals = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    saved_threads = torch.get_num_threads()  # a CPU run on few cores sets one thread
    out, err = io.StringIO(), io.StringIO()
    code = 0
    GlobalHydra.instance().clear()
    try:
        if cwd is not None:
            os.chdir(cwd)
        for name, value in (env or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.argv = [f"simmim_swin.cli.{module}", *argv]  # a list of its own: the entry points append to it
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    command.main()
                except SystemExit as e:
                    code = _exit_code(e)
        except BaseException:
            sys.stderr.write(out.getvalue() + err.getvalue())  # what a process would have printed before dying
            raise
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in logging.root.handlers:
            if handler not in saved_handlers:
                handler.close()  # Hydra's job log file
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        torch.set_num_threads(saved_threads)
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()  # W&B reads its settings from the environment once per process
    return CommandResult(code, out.getvalue(), err.getvalue())
