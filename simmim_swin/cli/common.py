"""Helpers shared by the Hydra entry points: where conf/ is, one-line errors, the run directory of a job and of a
sweep, the preset name as W&B group, the messages on the terminal and in the run's log."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from ..config import ConfigError, describe_error, from_dict
from ..launcher import launcher_rank
from ..progress import command_logging
from .errors import command_errors, describe_os_error, fail
from .overrides import override_error

# the Hydra configs: simmim_swin/conf in an installed wheel, else conf/ at the repository root (a source tree or an
# editable install)
_PACKAGE = Path(__file__).resolve().parents[1]
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf" / "pretrain.yaml").is_file() else _PACKAGE.parent / "conf"

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


# Hydra's commands: at most one per call (Hydra itself answers two with a traceback)
HYDRA_COMMANDS = (("multirun", "-m/--multirun"), ("cfg", "--cfg"), ("info", "--info"), ("run", "-r/--run"),
                  ("shell_completion", "--shell-completion"))  # fmt: skip
SWEEP_SUFFIX = "_sweep"  # a sweep's jobs live in <run.output_dir>/<run.name>_sweep/<the job's overrides>


def _job_dir(override_dirname: str, num: Any) -> str:
    # a sweep job's folder: its overrides without path separators, else its number (a sweep of Hydra's keys only)
    return override_dirname.replace("/", "_") or str(num)


OmegaConf.register_new_resolver("simmim_job_dir", _job_dir, replace=True)


def hydra_arguments(argv: Sequence[str]) -> list[str]:
    """Check Hydra's command flags; returns the overrides to append to `argv` that lay out a sweep.

    With -m and swept values (`key=a,b`, `range(...)`, a sweeper plugin), each job runs in
    `<run.output_dir>/<run.name>_sweep/<its swept overrides>`, unless the command line sets run.name (which must then
    differ between the jobs) or Hydra's sweep folders.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "--version" in argv:
        return []
    try:
        args = get_args_parser().parse_args(list(argv))
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, HydraException):  # Hydra reports a malformed command line itself
        return []
    given = [flag for attr, flag in HYDRA_COMMANDS if getattr(args, attr) not in (None, False)]
    if len(given) > 1:
        hint = " (--cfg shows one job: drop -m and give one value per key)" if "--cfg" in given else ""
        fail(f"{' and '.join(given)} cannot be combined: use one of them{hint}")
    multirun = args.multirun or any(o.key_or_group == "hydra.mode" and o.value() == "MULTIRUN" for o in overrides)
    swept = [o for o in overrides if o.is_sweep_override()]
    if not multirun or args.help or not (swept or any(o.key_or_group == "hydra/sweeper" for o in overrides)):
        return []
    keys = {o.key_or_group: o for o in overrides}
    name = keys.get("run.name")
    if name is not None:
        if not name.is_sweep_override() and "${" not in str(name.value()):
            fail(
                f"run.name={name.value()} names every job of this sweep the same run: drop run.name (each job then "
                f"gets <run.output_dir>/<run.name>{SWEEP_SUFFIX}/<its overrides>) or put the swept values into it, "
                "e.g. 'run.name=lr${optim.base_lr}'"
            )
        return []
    fixed = sorted({o.key_or_group for o in overrides if not o.is_sweep_override() and not o.is_hydra_override()})
    extra = {
        "hydra.sweep.dir": f"${{run.output_dir}}/${{run.name}}{SWEEP_SUFFIX}",
        "hydra.sweep.subdir": "'${simmim_job_dir:${hydra.job.override_dirname},${hydra.job.num}}'",
        # the job's folder names only what differs between the jobs
        "hydra.job.config.override_dirname.exclude_keys": "[" + ",".join(f"'{k}'" for k in fixed) + "]",
    }
    return [f"{key}={value}" for key, value in extra.items() if key not in keys]


def place_run(run: dict[str, Any], hydra_cfg: DictConfig) -> bool:
    """Make run.output_dir / run.name the folder Hydra made for this job (hydra.run.dir, a sweep's, chdir=true), so
    the run's files and Hydra's log share it; returns whether the run moved."""
    job_dir = Path(hydra_cfg.runtime.output_dir)  # absolute
    launch_dir = Path(hydra_cfg.runtime.cwd)
    chdir = bool(hydra_cfg.job.chdir)
    configured = launch_dir / run["output_dir"] / run["name"]
    if os.path.realpath(configured) == os.path.realpath(job_dir) and not chdir:
        return False
    if not chdir and not Path(run["output_dir"]).is_absolute() and job_dir.is_relative_to(launch_dir):
        job_dir = job_dir.relative_to(launch_dir)  # keep a relative output folder relative
    run["output_dir"], run["name"] = str(job_dir.parent), job_dir.name
    return True


def run_hydra(entry: Callable[[], None], command: str) -> None:
    """Run the @hydra.main function of `command` (simmim-pretrain / simmim-finetune) on the command line; a bad
    argument or a composition error (unknown key, wrong type, missing option) ends in one line."""
    check_command_groups(command, sys.argv[1:])
    sys.argv += hydra_arguments(sys.argv[1:])
    if launcher_rank() > 0:  # under torchrun / srun only rank 0 writes Hydra's job log into the shared run directory
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    # Hydra prints a composition error over several lines; with HYDRA_FULL_ERROR set it reaches this function instead
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except OverrideParseException as e:  # an unquoted value with spaces or non-ASCII letters (a HydraException too)
        fail(override_error(e.override, sys.argv[1:]))
    except (HydraException, OmegaConfBaseException) as e:  # composition, a malformed override, a missing config
        fail(composition_error(e))
    except BrokenPipeError:  # the reader went away (`--help | head`): no error line, as any command-line tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush of stdout would fail again
        sys.exit(1)
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
    unknown = isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and isinstance(cause.object_type, type)
    if unknown and cause.full_key:
        return f"unknown key {cause.full_key} ({cause.object_type.__name__} has no such key); check the spelling"
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return describe_error(cause)  # a value outside an Enum-typed field's choices lists them
    text = str(e).split("Config search path:")[0]  # Hydra appends its search path to a missing option
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    override = getattr(e, "override", None)  # a malformed key=value
    return f"cannot parse the argument {override!r}: {text}" if override else text


def default_cpu_threads(device: str) -> None:
    """One torch thread for a CPU run on a machine of at most 2 cores, unless OMP_NUM_THREADS chooses."""
    import torch

    # on a shared 2-core machine the tests' pico pretraining took 8-9 s with one thread against 20-32 s with torch's
    # two, the quickstart 50 img/s against 6-60 (loader workers compete for the cores; busy-waiting threads stall)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ or cores > 2:
        return
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(1)


def name_logger_after_preset(
    logger: dict[str, Any], preset: str | None, environ: Mapping[str, str] | None = None, group: str | None = None
) -> None:
    """W&B group and tag of the preset (or `group`, a sweep's folder): logger.group unless it or WANDB_RUN_GROUP is
    set, and the preset as a tag next to logger.tags, or next to WANDB_TAGS when those are empty."""
    environ = os.environ if environ is None else environ
    group = group or preset
    if group and logger.get("group") is None and not environ.get("WANDB_RUN_GROUP"):
        logger["group"] = group
    if not preset:
        return
    tags = list(logger.get("tags") or [])
    if not tags and environ.get("WANDB_TAGS"):
        tags = [tag.strip() for tag in environ["WANDB_TAGS"].split(",") if tag.strip()]
    logger["tags"] = tags if preset in tags else [*tags, preset]


def build_config(
    cls: type,
    cfg: DictConfig,
    choices: Mapping[str, str | None],
    preset_group: str,
    hydra_cfg: DictConfig | None = None,
) -> Any:
    """The typed config of a composed Hydra config, with the W&B group / tag of the preset in `preset_group`; with
    `hydra_cfg` (a launched job) the run directory is the job's (see `place_run`) and a sweep is the W&B group."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except OmegaConfBaseException as e:  # an interpolation resolving to a bad value (logger=wandb: WANDB_MODE)
        raise ConfigError(describe_error(e)) from None
    sweep = None
    if hydra_cfg is not None and place_run(container["run"], hydra_cfg) and hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = Path(container["run"]["output_dir"]).name
    name_logger_after_preset(container["logger"], choices.get(preset_group), group=sweep)
    return from_dict(cls, container)


def run_command(cfg: DictConfig, cls: type, preset_group: str, run: Callable[[Any], Any]) -> None:
    """The body of both Hydra entry points: build the typed config, then `run(config)`, every expected failure in one
    line and every message also in the run's log."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    log_file = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"  # Hydra's job log: pretrain.log ...
    with command_logging(log_file), command_errors():
        config = build_config(cls, cfg, hydra_cfg.runtime.choices, preset_group, hydra_cfg)
        default_cpu_threads(config.run.device)
        run(config)  # validates the settings before building anything
