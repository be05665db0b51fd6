"""What every training run does, whatever it trains: the run directory and its lock, resume, the save policy, the
endings (stop signal, divergence), and the metrics sinks and progress display. The loops hand each optimizer step to
`TrainingRun.step_done` and call `TrainingRun.end_of_step`, which decides whether to save and whether to stop."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import (
    CHECKPOINT_DIR,
    check_total_batch,
    find_latest_checkpoint,
    read_resume_meta,
    restore_training_state,
    save_training_state,
)
from .config import ConfigError, LoggerConfig, RunConfig
from .distributed import DistInfo, Preempted, StopSignal, process_alive
from .engine import StepStats, TrainingDiverged
from .files import FILE_MODE, atomic_write
from .progress import StepProgress
from .tracking import MetricsLogger, StepTimer, lr_metrics, system_metrics

log = logging.getLogger(__name__)


def check_same_settings(saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...], path: Path) -> None:
    """Refuse to resume a checkpoint whose `sections` of the config differ from this run's, naming each change."""
    diffs = []
    for section in sections:
        old, new = saved.get(section, {}), current[section]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    if diffs:
        raise ConfigError(
            f"{path} was written by a run with different settings ({', '.join(diffs)}); resume with the same "
            "settings or start a new run with run.name=<new name>"
        )


LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunDirectoryGone(RuntimeError):
    """The run directory was deleted (or replaced by another folder) while the run was going."""


class RunLock:
    """An advisory lock file in the run directory: one live process (rank 0 of one job) trains a run at a time.

    The file names the holder (host, pid, start time), linked into place already written; its modification time is
    the holder's heartbeat. A lock whose process is gone (same host) or whose heartbeat is older than `stale_after_s`
    (another host: a requeued Slurm job on a new node; or unreadable) is taken over under flock, with a warning."""

    def __init__(self, run_dir: Path, stale_after_s: float) -> None:
        self.path = run_dir / LOCK_FILE
        self.stale_after_s = stale_after_s
        self._inode: int | None = None  # of the file this process created, while it holds it

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError naming the holder and what to do."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a stale lock is removed, then taken like a free one (another start may be faster)
            if self._create(json.dumps(holder)):
                return
            self._take_over_if_stale()
        raise RunLockedError(f"could not take {self.path}: other processes took it at the same time")

    def _create(self, content: str) -> bool:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{LOCK_FILE}.", suffix=".new")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(content)
            os.chmod(tmp, FILE_MODE)
            try:
                os.link(tmp, self.path)
            except OSError as e:  # a file system without hard links: exclusive creation, then the content
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    raise
                with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE), "w") as f:
                    f.write(content)
            self._inode = os.stat(self.path).st_ino
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its holder is gone; raise RunLockedError if it is alive (or may be)."""
        try:
            fd = os.open(self.path, os.O_RDWR)  # read-write: NFS implements flock with write locks
        except FileNotFoundError:
            return  # released meanwhile
        try:
            with contextlib.suppress(OSError):  # no flock on this file system: the check below runs unguarded
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:  # else taken over while this process waited
                    reason = self._stale_reason(os.pread(fd, 1 << 16, 0), time.time() - os.fstat(fd).st_mtime)
                    warnings.warn(f"taking over the lock {self.path}: {reason}", stacklevel=3)
                    self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock

    def _stale_reason(self, content: bytes, age: float) -> str:
        """Why the lock holding `content`, touched `age` s ago, is stale; RunLockedError if it is not."""
        try:
            holder = json.loads(content)
        except ValueError:
            holder = None
        if not isinstance(holder, dict):  # not written by this class: whoever left it may be writing it still
            if age > self.stale_after_s:
                return f"unreadable and untouched for {age:.0f} s (run.lock_stale_after_s={self.stale_after_s:g})"
            raise RunLockedError(
                f"{self.path} exists but cannot be read (modified {age:.0f} s ago): another process may be starting "
                f"this run. Wait, start another run with run.name=<new name>, or delete {self.path} if no process "
                "uses this run"
            )
        host, pid = holder.get("host"), holder.get("pid")
        same_host = host == socket.gethostname()
        if same_host and pid == os.getpid():
            return "left by this process"
        if same_host and isinstance(pid, int) and not process_alive(pid):
            return f"process {pid} on {host} is gone"
        if not same_host and age > self.stale_after_s:
            return f"no heartbeat from {host} for {age:.0f} s (run.lock_stale_after_s={self.stale_after_s:g})"
        raise RunLockedError(
            f"{self.path.parent} is in use by process {pid} on {host} (started {holder.get('started')}, last "
            f"heartbeat {age:.0f} s ago); wait for it to finish, stop it, or start another run with "
            f"run.name=<new name>. If that process is really gone, delete {self.path}"
        )

    def heartbeat(self) -> None:
        """Tell other hosts this process is alive (the file's modification time)."""
        if self._inode is not None:
            os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if this process holds it (and it is still the file this process created)."""
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of `folder`, None if it does not exist."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what an interrupted save left: hidden `.*.tmp` files and folders in the run and checkpoint folders."""
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / "images"):
        for path in folder.glob(".*.tmp") if folder.is_dir() else ():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def run_directory(run_cfg: RunConfig) -> Path:
    """Where a run lives: run.output_dir / run.name (starting the same run again resumes it)."""
    return Path(run_cfg.output_dir) / run_cfg.name


@dataclass(eq=False)
class TrainingRun:
    """One run's lifecycle around a training loop; `run_dir` = run.output_dir / run.name.

    `config` (a plain dict) goes to config.yaml and into every checkpoint with `model` (unwrapped, uncompiled), the
    optimizer, the scaler and `extra_meta(step)` (windows, classes, EMA weights ...); `sharded` (FSDP): every rank
    writes its shards into step_N.dcp/. A resume with another `total_batch` (images per step, all ranks) is refused.
    """

    config: dict[str, Any]
    run_cfg: RunConfig
    logger_cfg: LoggerConfig
    info: DistInfo
    stop: StopSignal
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sharded: bool
    total_batch: int
    steps_per_epoch: int
    total_steps: int
    extra_meta: Callable[[int], dict[str, Any]]

    def __post_init__(self) -> None:
        self.run_dir = run_directory(self.run_cfg)
        max_steps = self.run_cfg.max_steps
        self.stop_step = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        self.step = 0
        self.state: dict[str, Any] = {}  # the resumed checkpoint's meta
        self.timer = StepTimer()
        device = next(self.model.parameters()).device
        # the divergence check reads a device counter: every step on the CPU, where a read is free
        self.check_every = 1 if device.type == "cpu" else self.logger_cfg.log_every
        self.stats = StepStats(device)
        self.logger: MetricsLogger | None = None
        self.progress: StepProgress | None = None  # rank 0's
        self.lock = RunLock(self.run_dir, self.run_cfg.lock_stale_after_s)
        self._run_dir_identity: tuple[int, int] | None = None  # (device, inode) of the run directory at the start

    @contextlib.contextmanager
    def running(self, check: Callable[[dict[str, Any], Path], None]) -> Iterator[TrainingRun]:
        """Lock the run directory, resume from its latest checkpoint (`check(meta, path)` refuses other settings
        first), write config.yaml, open the metrics sinks and the progress display; close them all on the way out."""
        if self.info.is_main:
            self.lock.acquire()
        try:
            self._run_dir_identity = _identity(self.run_dir)
            if self.info.is_main:
                for path in remove_stale_temporaries(self.run_dir):
                    log.info(f"removed {path}, left by an interrupted save")
            self._resume(check)
            if self.info.is_main:
                atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
            self.logger = MetricsLogger(
                self.run_dir,
                self.logger_cfg,
                self.config,
                run_id=self.state.get("wandb_run_id"),
                enabled=self.info.is_main,
                run_name=self.run_cfg.name,
            )
            if self.info.is_main:
                self.progress = StepProgress(self.stop_step, self.step, self.steps_per_epoch)
            try:
                yield self
            except OSError:  # e.g. "No such file" on a temporary file: say what happened to the folder
                self.check_run_dir()
                raise
        finally:
            if self.progress is not None:
                self.progress.close()
            if self.logger is not None:
                self.logger.close()
            self.lock.release()

    def check_run_dir(self) -> None:
        """Raise RunDirectoryGone if the run directory is not the folder the run started in (deleted, or recreated)."""
        if self._run_dir_identity is None or _identity(self.run_dir) == self._run_dir_identity:
            return
        raise RunDirectoryGone(
            f"the run directory {self.run_dir} was deleted while the run was going (at step {self.step}); nothing "
            "more can be saved there. Start the run again to begin anew, or restore the folder to resume it"
        )

    def _resume(self, check: Callable[[dict[str, Any], Path], None]) -> None:
        latest = find_latest_checkpoint(self.run_dir)
        if latest is None:
            return
        state = read_resume_meta(latest)
        check(state, latest)
        check_total_batch(state, self.total_batch, latest, self.total_batch // self.config["data"]["batch_size"])
        restore_training_state(latest, state, self.model, self.optimizer, self.scaler, self.info.rank, self.sharded)
        self.step, self.state = state["step"], state
        device = self.stats.loss_sum.device
        self.stats = StepStats(device, state.get("skipped_steps", 0), state.get("consecutive_skips", 0))
        log.info(f"resuming {self.run_dir} from {latest.name} at step {self.step}")

    def step_done(self, loss: torch.Tensor, skipped: torch.Tensor) -> int:
        """Count one optimizer step (what train_step returned, still on the device); returns the new step."""
        self.step += 1
        self.stats.update(loss, skipped)
        return self.step

    @property
    def epoch_done(self) -> bool:
        """The step just done ended an epoch."""
        return self.step % self.steps_per_epoch == 0

    def log_due(self) -> bool:
        """Metrics are logged every logger.log_every steps and at the last step."""
        return self.step % self.logger_cfg.log_every == 0 or self.step == self.stop_step

    def training_metrics(self, grad_norm: torch.Tensor) -> dict[str, Any]:
        """What both loops log each log step: loss (a device sync), lrs, gradient norm, speed, epoch, skips."""
        return {
            "loss": self.stats.mean_loss(self.info),  # syncs the device: only here, every log_every steps
            **lr_metrics(self.optimizer),  # lr: the largest; lr/groupN per layer group under layer decay
            "grad_norm": float(grad_norm),
            **self.timer.pop(images_per_step=self.total_batch, world_size=self.info.world_size),
            **system_metrics(self.stats.loss_sum.device),
            "epoch": self.step / self.steps_per_epoch,
            "skipped_steps": int(self.stats.skipped_total),
        }

    def log(self, metrics: dict[str, Any], show: bool = True) -> None:
        """metrics.jsonl (+ W&B) at this step; `show` also puts them on the terminal (rank 0)."""
        if self.info.is_main:
            self.check_run_dir()  # metrics.jsonl is an open file: writing to it would not notice
        self.logger.log(self.step, metrics)
        self.lock.heartbeat()
        if show and self.progress is not None:
            self.progress.show(self.step, {k: v for k, v in metrics.items() if not k.startswith("lr/")})

    def end_of_step(self, save_now: bool = False) -> None:
        """After the loop's logging and evaluation of this step: save every run.save_every steps, at the last and
        when `save_now` (e.g. an epoch's end), never right after a skipped step (the last good checkpoint stays the
        newest); raise TrainingDiverged after run.max_consecutive_skips, Preempted (after saving) on a stop signal."""
        in_a_row = self.stats.in_a_row() if self.step % self.check_every == 0 else 0
        if in_a_row >= self.run_cfg.max_consecutive_skips:
            raise TrainingDiverged(in_a_row, self.step, find_latest_checkpoint(self.run_dir))
        due = save_now or self.step % self.run_cfg.save_every == 0 or self.step == self.stop_step
        stopping = self.stop.should_stop()  # a stop saves whatever the step
        if stopping or (due and self.stats.in_a_row() == 0):
            self.save()
        if stopping:
            raise Preempted(self.step, self.stop.name)

    def save(self) -> None:
        """The resume checkpoint of the current step (every rank calls it)."""
        self.check_run_dir()  # a save would create the folder again, empty but for this checkpoint
        meta = {
            "step": self.step,
            "config": self.config,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "wandb_run_id": self.logger.run_id,
            "total_batch": self.total_batch,
            **self.stats.counts(),
            **self.extra_meta(self.step),
        }
        with self.timer.measure("excluded"):
            save_training_state(
                self.run_dir, self.step, self.model, self.optimizer, meta, self.run_cfg.keep_last, self.info,
                self.sharded,
            )  # fmt: skip
