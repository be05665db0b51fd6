"""Helpers shared by the command-line tools."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf.errors import MissingMandatoryValue

from ..distributed import Preempted, launcher_rank
from ..engine import TrainingDiverged

# conf/ sits at the repository root next to the package (an editable install, as launch/*.sh does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@contextmanager
def training_exits() -> Iterator[None]:
    """Turn a training run's expected endings into exit statuses and one-line messages, without tracebacks."""
    try:
        yield
    except MissingMandatoryValue as e:
        sys.exit(f"error: {e.full_key} must be set on the command line, e.g. {e.full_key}=VALUE")
    except Preempted as e:
        if launcher_rank() == 0:  # every rank stopped at the same step; one line says so
            print(e, flush=True)
        sys.exit(128 + signal.SIGTERM)  # what a process killed by SIGTERM reports: the job did not finish
    except (TrainingDiverged, ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        # a failure can be one rank's own (a corrupt shard): every rank says it, the others with their rank
        rank = launcher_rank()
        sys.exit(f"error{f' (rank {rank})' if rank else ''}: {e}")


def quiet_hydra_on_other_ranks() -> None:
    """Under torchrun / srun every rank runs the entry point; only rank 0 writes Hydra's own output (.hydra/, the
    job log) into the run directory the ranks share."""
    if launcher_rank() > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
