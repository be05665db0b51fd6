"""Helpers shared by the Hydra entry points: where conf/ is, one-line errors, the preset name as W&B group."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ..config import from_dict
from ..launcher import launcher_rank
from .errors import command_errors, describe_os_error, fail
from .overrides import override_error


def find_conf_dir() -> Path:
    """The Hydra configs: simmim_swin/conf in an installed wheel, else conf/ at the repository root (a source
    tree or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "conf", package.parent / "conf")
    return next((c for c in candidates if (c / "pretrain.yaml").is_file()), candidates[-1])


CONF_DIR = find_conf_dir()

# the config groups each command composes (hydra/launcher is common to both); a group of the other command on the
# command line is a user mixing up the two tools, answered with the right command instead of Hydra's `+group=`
COMMAND_GROUPS = {
    "simmim-pretrain": ("experiment", "data", "schedule", "logger", "probe"),
    "simmim-finetune": ("finetune", "logger"),
}
# what the other command takes instead of a group it lacks
GROUP_HINTS = {
    ("simmim-finetune", "data"): "simmim-finetune picks its data with keys: data.source=folder data.root=DIR",
    ("simmim-finetune", "schedule"): "simmim-finetune sets its schedule with keys: schedule.epochs=N",
}


def check_command_groups(command: str, argv: Sequence[str]) -> None:
    """Exit with one line when an argument selects a config group that only the other command has."""
    own = set(COMMAND_GROUPS[command])
    for other, groups in COMMAND_GROUPS.items():
        for arg in argv:
            key, sep, value = arg.partition("=")
            key = key.lstrip("+~")
            if other == command or not sep or key in own or key not in groups:
                continue
            hint = GROUP_HINTS.get((command, key))
            fail(
                f"{key}={value} is an option of {other}, not {command}; run `{other} {key}={value} ...`"
                + (f" ({hint})" if hint else "")
            )


def run_hydra(entry: Callable[[], None]) -> None:
    """Call a @hydra.main function; a composition error (unknown key, wrong type, missing option) ends in one line.

    Hydra prints such errors over several lines with a hint to set HYDRA_FULL_ERROR; with it set the exception
    reaches this function instead, which names the key in one line.
    """
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except (ConfigCompositionException, OmegaConfBaseException) as e:
        fail(composition_error(e))
    except OverrideParseException as e:  # an unquoted value with spaces or non-ASCII letters
        fail(override_error(e.override, sys.argv[1:]))
    except OSError as e:  # Hydra creating the run directory (an unwritable or misspelt run.output_dir)
        fail(*describe_os_error(e))
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def composition_error(e: Exception) -> str:
    """One line for a Hydra / OmegaConf composition error, naming the full key where there is one."""
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, MissingMandatoryValue) and cause.full_key:
        return f"{cause.full_key} must be set on the command line, e.g. {cause.full_key}=VALUE"
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        reason = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
        object_type = getattr(cause, "object_type", None)
        if "not in" in reason and isinstance(object_type, type):
            return f"unknown key {cause.full_key} ({object_type.__name__} has no such key); check the spelling"
        return f"{cause.full_key}: {reason}"
    text = str(e).split("Config search path:")[0]  # Hydra appends its search path to a missing option
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# a CPU run on a machine with at most this many cores uses one intra-op thread unless OMP_NUM_THREADS is set:
# on a shared 2-core machine the tests' pico pretraining (20 steps) took 8-9 s with one thread against 20-32 s with
# torch's default of two, and the quickstart ran at about 50 img/s against 6-60 img/s (its two loader workers and
# any other process compete for the same cores, and busy-waiting threads stall each other)
SINGLE_THREAD_MAX_CORES = 2


def default_cpu_threads(device: str) -> None:
    """One torch thread for a CPU run on a machine of few cores, unless OMP_NUM_THREADS chooses."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ or cores > SINGLE_THREAD_MAX_CORES:
        return
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(1)


def name_logger_after_preset(logger: dict[str, Any], preset: str | None) -> None:
    """W&B group and tag from the selected preset: logger.group when it is null, and a tag unless already there."""
    if not preset:
        return
    if logger.get("group") is None:
        logger["group"] = preset
    tags = list(logger.get("tags") or [])
    if preset not in tags:
        logger["tags"] = [*tags, preset]


def build_config(cls: type, cfg: DictConfig, choices: Mapping[str, str | None], preset_group: str) -> Any:
    """The typed config of a composed Hydra config, with the W&B group / tag of the preset in `preset_group`."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    name_logger_after_preset(container["logger"], choices.get(preset_group))
    return from_dict(cls, container)


def quiet_hydra_on_other_ranks() -> None:
    """Under torchrun / srun every rank runs the entry point; only rank 0 writes Hydra's own output (.hydra/, the
    job log) into the run directory the ranks share."""
    if launcher_rank() > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


class _LogTee:
    """A text stream that writes through to `stream` and appends each finished line to `log`.

    Lines redrawn in place on a terminal (carriage returns) reach the log in their last state only, without the
    escape codes, so the log reads like the plain output of a run without a terminal.
    """

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log, self._pending = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            line = _ESCAPES.sub("", line.rsplit("\r", 1)[-1])
            if line.strip():
                self.log.write(line + "\n")
        if lines:
            self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextmanager
def output_into_log(path: Path) -> Iterator[None]:
    """Copy everything the command prints (progress, messages, the final error line) into the run's log file,
    `<run dir>/<command>.log`, which Hydra creates; other ranks have no log (their Hydra logging is off)."""
    if launcher_rank() > 0:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _LogTee(stdout, log), _LogTee(stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = stdout, stderr


def hydra_log_file() -> Path:
    """The job log Hydra writes in the run directory (pretrain.log / finetune.log)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"


def run_command(cfg: DictConfig, cls: type, preset_group: str, run: Callable[[Any], Any]) -> None:
    """The body of both Hydra entry points: build the typed config, then `run(config)`, every expected failure in one
    line and all output copied into the run's log."""
    from hydra.core.hydra_config import HydraConfig

    with output_into_log(hydra_log_file()), command_errors():
        config = build_config(cls, cfg, HydraConfig.get().runtime.choices, preset_group=preset_group)
        default_cpu_threads(config.run.device)
        run(config)  # validates the settings before building anything
