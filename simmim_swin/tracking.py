"""Metrics sinks: metrics.jsonl and summary.json (always), Weights & Biases (optional, rank 0 only), and the small
measurements the loops log (data-wait fraction, GPU memory, per-group lrs)."""

from __future__ import annotations

import json
import logging
import math
import netrc
import numbers
import os
import socket
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image

from simmim_swin.config import ConfigError, LoggerConfig
from simmim_swin.files import atomic_write
from simmim_swin.progress import plain

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
GIB = 2**30
log = logging.getLogger(__name__)


def _wandb_url() -> urllib.parse.SplitResult:
    return urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")


def check_wandb_credentials(logger_cfg: LoggerConfig) -> None:
    """Fail before any compute with logger.wandb=online when no W&B API key is set up (WANDB_API_KEY or the
    ~/.netrc entry that `wandb login` writes)."""
    if logger_cfg.wandb != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = _wandb_url().hostname or ""
    try:
        found = netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        found = False
    if not found:
        raise ConfigError(
            f"logger.wandb=online needs a W&B API key for {host}: run `wandb login` or set WANDB_API_KEY, "
            "or log locally with logger.wandb=offline (upload later with `wandb sync`)"
        )


# metric name prefixes and their W&B section; everything else is a training metric (train/loss, train/lr ...)
WANDB_SECTIONS = (("ema_val_", "val/ema_"), ("val_", "val/"), ("best_", "val/best_"), ("probe_", "probe/"))


def wandb_name(key: str) -> str:
    """The W&B name of a metrics.jsonl key: namespaced train/, val/ or probe/ (val_loss -> val/loss), as W&B
    dashboards group them; metrics.jsonl keeps the flat names that simmim-swin plot and the benchmarks read."""
    for prefix, section in WANDB_SECTIONS:
        if key.startswith(prefix):
            return section + key[len(prefix) :]
    return f"train/{key}"


class MetricsLogger:
    """Appends one JSON object per `log` call to run_dir/metrics.jsonl and mirrors it to wandb (logger_cfg.wandb).

    `config` is stored with the wandb run; `run_id` (None: the one in run_dir/wandb_run_id, else a new one) resumes
    it; `run_name` is its display name. Not `enabled` (ranks > 0), nothing is written anywhere."""

    def __init__(
        self,
        run_dir: str | Path,
        logger_cfg: LoggerConfig,
        config: dict,
        run_id: str | None = None,
        enabled: bool = True,
        run_name: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.run_id = run_id
        self._file: TextIO | None = None
        self.wandb_run: Any = None  # the wandb Run (None when wandb is disabled or on other ranks)
        self._logged_until, self._logged_keys = -1, set()  # see log()
        summary_path = self.run_dir / SUMMARY_FILE
        # a restarted run keeps its best values: update_best compares against them
        self.summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._file.seek(0)
        text = self._file.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lines cut short by a crash: load_metrics warns about them
            records = _parse_metrics(text, self.run_dir / METRICS_FILE)
        self._logged_until = max((record["step"] for record in records), default=-1)
        self._logged_keys = {key for r in records if r["step"] == self._logged_until for key in r} - {"step"}
        if text and not text.endswith("\n"):  # a line cut by a crash stays on its own
            self._file.write("\n")
        if logger_cfg.wandb != "disabled":
            self._init_wandb(logger_cfg, config, run_name)

    def _init_wandb(self, logger_cfg: LoggerConfig, config: dict, run_name: str | None) -> None:
        """Start (or resume) the wandb run, its id kept in run_dir/wandb_run_id. An online run whose server cannot be
        reached logs offline instead, with a warning naming the upload command: a lost network never costs the run."""
        import wandb  # imported here: a run with wandb disabled never pays its import time

        mode = str(logger_cfg.wandb)
        if mode == "online":
            url = _wandb_url()
            host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
            try:  # a 5 s TCP check: wandb itself waits about 110 s for an unreachable server, then kills the run
                socket.create_connection((host, port), timeout=5.0).close()
            except OSError as e:
                mode = "offline"
                where = self.run_dir / "wandb"
                log.warning(
                    f"warning: W&B server {host}:{port} ({e.strerror or type(e).__name__}) is unreachable: logging "
                    f"offline into {where}; upload later with `wandb sync {where}/offline-run-*`"
                )

        id_file = self.run_dir / "wandb_run_id"
        if self.run_id is None and id_file.is_file():
            self.run_id = id_file.read_text().strip() or None
        # a null field is left to W&B, which reads its environment variable (WANDB_RUN_GROUP, WANDB_TAGS ...); the
        # project alone has a default of its own
        self.wandb_run = wandb.init(
            mode=mode,  # from the config (the logger=wandb preset reads WANDB_MODE): never left to the environment
            dir=str(self.run_dir),
            project=logger_cfg.project or os.environ.get("WANDB_PROJECT") or "simmim-swin",
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            tags=list(logger_cfg.tags) or None,
            job_type=logger_cfg.job_type,
            notes=logger_cfg.notes,
            name=run_name,
            config=config,
            id=self.run_id,  # None: wandb generates one
            resume="allow",
            settings=wandb.Settings(
                console=str(logger_cfg.console),  # the plain string: W&B's settings validate its type
                disable_git=not logger_cfg.git,
                x_disable_stats=not logger_cfg.system_metrics,
            ),
        )
        self.run_id = self.wandb_run.id
        id_file.write_text(self.run_id)
        if self.summary:  # an offline restart starts a fresh local run file: carry the best values over
            self.wandb_run.summary.update(self.summary)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write {"step": step, **metrics} to metrics.jsonl and to wandb (names namespaced, see `wandb_name`).

        What an earlier process of this run logged already (steps up to its last line, and that line's keys) is
        skipped: a run resumed from an older checkpoint repeats those steps, and neither sink goes back in step."""
        if not self.enabled or step < self._logged_until:
            return
        values = {key: plain(value) for key, value in metrics.items() if key != "step"}
        if step == self._logged_until:  # only what the earlier process did not log at its last step
            values = {key: value for key, value in values.items() if key not in self._logged_keys}
            if not values:
                return
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self.wandb_run is not None and step > self._logged_until:  # W&B drops a step it has passed
            self.wandb_run.log({wandb_name(key): value for key, value in values.items()}, step=int(step))

    def log_images(self, step: int, images: Mapping[str, str | Path]) -> None:
        """Send PNGs ({wandb key: png path}) to wandb at `step` in one call (the PNGs are the local record)."""
        if self.wandb_run is None or not images or step <= self._logged_until:  # None on other ranks too
            return
        import wandb

        # the run's own PNGs (wandb opens them with PIL, then logs the files as they are): the pixel limit the data
        # set on PIL (data.max_image_pixels, process-wide) is not for them
        pixel_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            payload = {key: wandb.Image(str(path), caption=Path(path).name) for key, path in images.items()}
        finally:
            Image.MAX_IMAGE_PIXELS = pixel_limit
        self.wandb_run.log(payload, step=int(step))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Merge `values` into run_dir/summary.json and the wandb run summary (final or best numbers of the run)."""
        values = {key: plain(value) for key, value in values.items()}
        self.summary.update(values)
        if not self.enabled:
            return
        atomic_write(self.run_dir / SUMMARY_FILE, json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def update_best(self, step: int, key: str, value: Any, mode: str = "min") -> bool:
        """Record `value` as summary[key] (the step as summary[key + "_step"]) and return True if it beats the stored
        one: lower with mode "min" (losses), higher with "max" (accuracies)."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        value = plain(value)
        if not isinstance(value, numbers.Number) or not math.isfinite(value):
            return False
        best = self.summary.get(key)
        if best is not None and (value >= best if mode == "min" else value <= best):
            return False
        self.log_summary({key: value, f"{key}_step": int(step)})
        return True

    def close(self) -> None:
        """Flush and close metrics.jsonl and finish the wandb run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the one in run directory `path`), in file order; lines that are not a
    JSON object with an integer "step" (a line cut short by a crash, say) are skipped with a warning."""
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {METRICS_FILE}" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"{where}; pass a run directory written by simmim-pretrain or simmim-finetune")
    return _parse_metrics(file.read_text(encoding="utf-8", errors="replace"), file)


def _parse_metrics(text: str, file: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            warnings.warn(f"{file}:{lineno}: skipped a malformed line ({e.msg})", stacklevel=3)
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if type(step) is not int:  # not isinstance: True is an int
            warnings.warn(f"{file}:{lineno}: skipped a line without an integer 'step'", stacklevel=3)
            continue
        records.append(record)
    return records


def lr_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{"lr": the largest group lr} plus "lr/group{i}" per parameter group when the groups' lrs differ."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    metrics = {"lr": max(lrs)}
    if len(set(lrs)) > 1:  # layer decay: one lr per depth; equal lrs (pretraining's two groups) add nothing
        metrics.update({f"lr/group{i}": lr for i, lr in enumerate(lrs)})
    return metrics


def system_metrics(device: torch.device | str) -> dict[str, float]:
    """GPU memory allocated now, at peak since the start (or the last reset) and reserved (GiB) on a CUDA device,
    {} elsewhere. No device sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {
        "gpu_mem_alloc_gib": torch.cuda.memory_allocated(device) / GIB,
        "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
    }


class StepTimer:
    """Splits the wall time between two `pop` calls into waiting for data (`measure("data")`) and the rest.

    Host clocks, no device sync: with CUDA the split is exact only over a whole interval, so `pop` belongs right after
    the log step's sync. Time inside `measure("excluded")` (checkpoints, panels, evaluation) counts in neither part."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._start = clock()
        self._seconds = {"data": 0.0, "excluded": 0.0}
        self._steps = 0

    @contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Wrap the fetch of one optimizer step's batches, all its micro-batches ("data", which counts a step), or
        work that is neither training nor data loading ("excluded")."""
        start = self.clock()
        try:
            yield
        finally:
            self._seconds[part] += self.clock() - start
            self._steps += part == "data"

    def pop(self, images_per_step: int | None = None, world_size: int = 1) -> dict[str, float]:
        """data_wait_frac, step_time_s (and images_per_sec[_per_gpu] given the global batch) since the last pop."""
        now = self.clock()
        elapsed = max(now - self._start - self._seconds["excluded"], 1e-9)
        steps = max(self._steps, 1)
        metrics = {"data_wait_frac": min(self._seconds["data"] / elapsed, 1.0), "step_time_s": elapsed / steps}
        if images_per_step is not None:
            metrics["images_per_sec"] = self._steps * images_per_step / elapsed
            metrics["images_per_sec_per_gpu"] = metrics["images_per_sec"] / world_size
        self._start = now
        self._seconds = {"data": 0.0, "excluded": 0.0}
        self._steps = 0
        return metrics
