"""What a command shows while it works: the package's messages (the terminal and the run's log file) and the progress
of long loops (training steps, make-shards and scan items, evaluation batches): a tqdm bar on a terminal, else plain
lines logged every so often; the log file gets plain lines always."""

from __future__ import annotations

import logging
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .launcher import launcher_rank

log = logging.getLogger(__name__)
PACKAGE_LOGGER = "simmim_swin"  # the parent of every module's logger: the one a command shows and writes
FILE_ONLY = {"terminal": False}  # `extra` of a record for the log file only: the terminal shows a bar instead


def plain(value: Any) -> Any:
    """A Python number from a tensor or numpy scalar (`.item()`); other values pass through."""
    return value.item() if hasattr(value, "item") else value


class Progress:
    """Progress of a loop over `total` items: a tqdm bar if `stream` (default stderr) is a terminal or `tty` says so;
    else the line `desc: n/total (rate/s)` every `every` items and at the last. A bar ends with that line in the log
    file. `initial` is the count the loop starts from; the bar is redrawn at most every `redraw_s`."""

    final_line = True  # the log file gets the count when a bar ends

    def __init__(
        self, total: int, desc: str, every: int = 1, stream: TextIO | None = None, tty: bool | None = None,
        initial: int = 0, clock: Callable[[], float] = time.monotonic, redraw_s: float = 0.1,
    ) -> None:  # fmt: skip
        stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)()) if tty is None else tty
        self.total, self.desc, self.every = total, desc, max(1, every)
        self.count = self.start_count = initial
        self.clock, self.start_time = clock, clock()
        options = dict(total=total, initial=initial, desc=desc, file=stream, mininterval=redraw_s, dynamic_ncols=True)
        # no tqdm off a terminal: it still redraws with carriage returns there, which a log must never hold
        self.bar = tqdm(**options) if self.tty else None

    def eta(self) -> str:
        """The time left at the rate since the start: H:MM:SS, hours shown even at 0 (unlike tqdm's); '?' at first."""
        done, elapsed = self.count - self.start_count, self.clock() - self.start_time
        if done <= 0 or elapsed <= 0:
            return "?"
        seconds = round((self.total - self.count) * elapsed / done)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def line(self) -> str:
        """The plain line of the current count."""
        rate = (self.count - self.start_count) / max(self.clock() - self.start_time, 1e-9)
        return f"{self.desc}: {self.count}/{self.total} ({rate:.0f}/s)"

    def update(self, n: int = 1) -> None:
        """Count n more items."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.count % self.every < n or self.count == self.total:
            log.info(self.line())

    def close(self) -> None:
        """End the bar (later output starts on a fresh line) and put its last state into the log file."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if self.final_line:
                log.info(self.line(), extra=FILE_ONLY)


class StepProgress(Progress):
    """Progress of a training run, shown at the log steps: `step N/M ep E`, the KNOWN metrics, the other numeric
    ones, then the ETA. A bar (on stdout by default, next to the messages) shows the KNOWN ones as its postfix."""

    final_line = False  # the log file has the line of every `show`
    KNOWN = {"loss": "loss {:.4f}", "lr": "lr {:.2e}", "grad_norm": "grad {:.2f}", "images_per_sec": "img/s {:.1f}"}

    def __init__(
        self, total_steps: int, start_step: int, steps_per_epoch: int, stream: TextIO | None = None,
        tty: bool | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        stream = sys.stdout if stream is None else stream
        # redrawn at every show: the log steps are few
        super().__init__(total_steps, "train", stream=stream, tty=tty, initial=start_step, clock=clock, redraw_s=0)
        self.steps_per_epoch = steps_per_epoch

    def known(self, metrics: dict[str, Any]) -> str:
        """The known metrics, labelled: the bar's postfix."""
        return " ".join(text.format(plain(metrics[key])) for key, text in self.KNOWN.items() if key in metrics)

    def format(self, step: int, metrics: dict[str, Any]) -> str:
        """The plain progress line of `step` (its ETA from the count as it stands)."""
        parts = [f"step {step}/{self.total}", f"ep {step // self.steps_per_epoch}", self.known(metrics)]
        skip = {*self.KNOWN, "step", "epoch"}
        for key, value in metrics.items():
            value = plain(value)
            if key not in skip and isinstance(value, numbers.Number):
                parts.append(f"{key} {value:.4g}")
        return " ".join(part for part in [*parts, f"eta {self.eta()}"] if part)

    def show(self, step: int, metrics: dict[str, Any]) -> None:
        """Show the progress at `step` with its metrics."""
        self.count = step
        line = self.format(step, metrics)
        if self.bar is None:
            log.info(line)
            return
        self.bar.set_description(f"ep {step // self.steps_per_epoch}", refresh=False)
        self.bar.set_postfix_str(self.known(metrics), refresh=False)
        self.bar.update(step - self.bar.n)
        log.info(line, extra=FILE_ONLY)


class _Terminal(logging.StreamHandler):
    """A console handler that writes through tqdm (a message never breaks a progress bar) and leaves out the records
    a bar shows instead (FILE_ONLY)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "terminal", True):
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()  # a pipe (a Slurm log) buffers otherwise
        except Exception:
            self.handleError(record)


class _Lines(logging.Formatter):
    """The message alone, without the newline a captured warning ends with (a handler adds its own)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip("\n")


@contextmanager
def command_logging(log_file: Path | None = None, messages: TextIO | None = None) -> Iterator[None]:
    """Show the package's messages during one command: on `messages` (default stdout; a tool whose stdout is its
    result passes stderr), warnings and errors on stderr (all that ranks > 0 show), on rank 0 in `log_file` too."""
    rank = launcher_rank()
    out, err = _Terminal(sys.stdout if messages is None else messages), _Terminal(sys.stderr)
    out.addFilter(lambda record: rank == 0 and record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    handlers: list[logging.Handler] = [out, err]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(_Lines())
    # the package's messages and Python warnings (warnings.warn, through logging.captureWarnings); Hydra's job logging
    # puts a console and a file handler on the root logger: propagating there would repeat each line
    loggers = [logging.getLogger(PACKAGE_LOGGER), logging.getLogger("py.warnings")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    # a host program's own captureWarnings(True) stays on after the command (logging offers no getter of the state)
    capturing = warnings.showwarning is logging._showwarning
    logging.captureWarnings(True)
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for handler in handlers:
            logger.addHandler(handler)
    try:
        yield
    finally:
        logging.captureWarnings(capturing)
        for logger, (level, propagate) in zip(loggers, saved):
            for handler in handlers:
                logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        for handler in handlers:
            handler.close()
