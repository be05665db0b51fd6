"""One line on stderr, not a traceback, for every expected way a command can fail; the exit status says which.

Exit 2: bad input (a setting, a path, a file that cannot be read). Exit 1: the run itself failed (diverged, disk
full, run directory deleted). 130 / 143 / 138: stopped by Ctrl-C / SIGTERM / SIGUSR1 after saving a checkpoint.
With SIMMIM_DEBUG=1 the traceback is printed first; the exit status stays the same.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from ..launcher import launcher_rank
from ..progress import PACKAGE_LOGGER

BAD_INPUT = 2
RUN_FAILED = 1
DEBUG_ENV = "SIMMIM_DEBUG"

log = logging.getLogger(PACKAGE_LOGGER)


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    """Print `error: message` on stderr (and the run's log during a command), with the rank on ranks > 0; exit."""
    rank = launcher_rank()
    line = f"error{f' (rank {rank})' if rank else ''}: {message}"
    if log.handlers:  # a command's logging (progress.command_logging): stderr and the run's log
        log.error(line)
    else:  # before the command set its logging up (a bad command line)
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def describe_os_error(e: OSError) -> tuple[str, int]:
    """The message and exit status for an OSError: what failed, on which path, and what to do."""
    path = e.filename if e.filename is not None else ""
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on the device (ENOSPC) writing {path}; free space or choose another run.output_dir",
            RUN_FAILED,
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror}: {path}; choose a folder you can write to (e.g. run.output_dir=DIR)", BAD_INPUT
    if e.errno == errno.EISDIR:
        return f"{path} is a directory; give a file path", BAD_INPUT
    if e.errno == errno.ENOTDIR:
        return f"a part of {path} is a file, not a directory; check the path", BAD_INPUT
    if e.filename is None or e.strerror is None:  # our own FileNotFoundError messages name the path already
        return str(e), BAD_INPUT
    return f"{e.strerror}: {path}", BAD_INPUT


@contextmanager
def command_errors() -> Iterator[None]:
    """Map a command's expected failures to one line and an exit status (see the module docstring)."""
    try:
        yield
    except KeyboardInterrupt:
        fail("interrupted by a second Ctrl-C: no checkpoint was written for the steps since the last save", 130)
    except Exception as e:
        # imported when a command fails, so that the tools' start-up and `--help` never load torch
        from ..distributed import Preempted
        from ..engine import TrainingDiverged
        from ..run import RunDirectoryGone, RunLockedError

        if isinstance(e, Preempted):
            log.info(str(e))  # every rank stopped at the same step: rank 0 says so (the others show no messages)
            sys.exit(e.exit_code)
        # anything else (a RuntimeError from torch, a bug) keeps its traceback: that is what a report needs
        if not isinstance(e, (OSError, ValueError, TrainingDiverged, RunLockedError, RunDirectoryGone)):
            raise
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()  # then the same line and exit status as without the variable
        if isinstance(e, (TrainingDiverged, RunDirectoryGone)):
            fail(str(e), RUN_FAILED)
        if isinstance(e, OSError):
            fail(*describe_os_error(e))
        fail(str(e), BAD_INPUT)  # ConfigError, BadDataError, RunLockedError, unreadable checkpoints ...
