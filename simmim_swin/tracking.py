"""Metrics sinks: metrics.jsonl (always), Weights & Biases (optional, rank 0 only) and a terminal progress line."""

from __future__ import annotations

import json
import math
import numbers
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image

from simmim_swin.config import LoggerConfig

WANDB_MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"


def _plain(value: Any) -> Any:
    """A JSON-ready Python scalar from a tensor / numpy scalar / number; other values pass through."""
    if isinstance(value, torch.Tensor):
        value = value.item()  # a host sync: the loop only logs every log_every steps
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


class MetricsLogger:
    """Appends one JSON object per `log` call to run_dir/metrics.jsonl and mirrors it to wandb when enabled.

    Args:
        run_dir: the run directory (created if missing).
        logger_cfg: wandb mode (online | offline | disabled) and project / entity / group / tags.
        config: the resolved run config as a plain dict, stored with the wandb run.
        run_id: wandb run id to resume; None reads run_dir/wandb_run_id, else wandb makes a new one.
        enabled: False on non-zero ranks: nothing is written anywhere.
    """

    def __init__(
        self,
        run_dir: str | Path,
        logger_cfg: LoggerConfig,
        config: dict,
        run_id: str | None = None,
        enabled: bool = True,
    ) -> None:
        if logger_cfg.wandb not in WANDB_MODES:
            raise ValueError(f"logger.wandb={logger_cfg.wandb!r} is unknown; use one of {list(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.run_id = run_id
        self._file: TextIO | None = None
        self._wandb_run = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if logger_cfg.wandb != "disabled":
            self._init_wandb(logger_cfg, config)

    def _init_wandb(self, logger_cfg: LoggerConfig, config: dict) -> None:
        """Start (or resume) the wandb run; its id is kept in self.run_id and run_dir/wandb_run_id."""
        import wandb  # imported here: a run with wandb disabled never pays its import time

        id_file = self.run_dir / RUN_ID_FILE
        if self.run_id is None and id_file.is_file():
            self.run_id = id_file.read_text().strip() or None
        self._wandb_run = wandb.init(
            mode=logger_cfg.wandb,  # from the config, never from WANDB_MODE: the environment is read only once
            dir=str(self.run_dir),
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            tags=list(logger_cfg.tags),
            config=config,
            id=self.run_id,  # None: wandb generates one
            resume="allow",
            settings=wandb.Settings(console="off", disable_git=True, x_disable_stats=True),
        )
        self.run_id = self._wandb_run.id
        id_file.write_text(self.run_id)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write {"step": step, **metrics} to metrics.jsonl and to wandb at `step` (which must not decrease)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{key: _plain(value) for key, value in metrics.items() if key != "step"}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({key: value for key, value in record.items() if key != "step"}, step=int(step))

    def log_image(self, step: int, key: str, png_path: str | Path) -> None:
        """Send the PNG at `png_path` to wandb under `key` (the PNG itself is the local record)."""
        if not self.enabled or self._wandb_run is None:
            return
        import wandb

        # uint8 pixels: wandb renders a float array in [0, 1] as black.
        with Image.open(png_path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # H, W, 3
        self._wandb_run.log({key: wandb.Image(pixels, caption=Path(png_path).name)}, step=int(step))

    def close(self) -> None:
        """Flush and close metrics.jsonl and finish the wandb run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _format_duration(seconds: float) -> str:
    """H:MM:SS, hours unbounded."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressPrinter:
    """One plain line per update (safe for Slurm logs): step, epoch, known metrics, then the rest, and the ETA.

    Known keys and their labels: loss, lr, grad_norm (grad), images_per_sec (img/s); other numeric metrics
    follow as `name value` (except `epoch`, shown as `ep`). The ETA extrapolates the rate since construction.
    """

    _KNOWN = (
        ("loss", "loss", ".4f"),
        ("lr", "lr", ".2e"),
        ("grad_norm", "grad", ".2f"),
        ("images_per_sec", "img/s", ".1f"),
    )

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        steps_per_epoch: int,
        stream: TextIO = sys.stdout,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.total_steps = total_steps
        self.start_step = start_step
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream
        self.clock = clock
        self.start_time = clock()

    def format(self, step: int, metrics: dict[str, Any]) -> str:
        """The progress line for `step` (without a newline)."""
        parts = [f"step {step}/{self.total_steps}", f"ep {step // self.steps_per_epoch}"]
        known = {key for key, _, _ in self._KNOWN} | {"step", "epoch"}
        for key, label, spec in self._KNOWN:
            if key in metrics:
                parts.append(f"{label} {_plain(metrics[key]):{spec}}")
        for key, value in metrics.items():
            value = _plain(value)
            if key not in known and isinstance(value, numbers.Number):
                parts.append(f"{key} {value:.4g}")
        done = step - self.start_step
        elapsed = self.clock() - self.start_time
        if done > 0 and elapsed > 0:
            eta = (self.total_steps - step) * elapsed / done
            parts.append(f"eta {_format_duration(eta) if math.isfinite(eta) else '?'}")
        else:
            parts.append("eta ?")
        return " ".join(parts)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Print the progress line for `step`."""
        print(self.format(step, metrics), file=self.stream, flush=True)
