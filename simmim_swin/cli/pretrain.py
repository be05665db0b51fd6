"""`simmim-pretrain`: the Hydra entry point for SimMIM pretraining (the only pretraining module importing Hydra)."""

from __future__ import annotations

import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..config import PretrainConfig, from_dict
from ..distributed import launcher_rank
from ..pretrain import Preempted, TrainingDiverged, run_pretrain
from .common import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def _main(cfg: DictConfig) -> None:
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        config = from_dict(PretrainConfig, container)
        run_pretrain(config)
    except MissingMandatoryValue as e:
        sys.exit(f"error: {e.full_key} must be set on the command line, e.g. {e.full_key}=VALUE")
    except Preempted as e:
        print(e, flush=True)
        sys.exit(128 + signal.SIGTERM)  # what a process killed by SIGTERM reports: the job did not finish
    except TrainingDiverged as e:
        sys.exit(f"error: {e}")
    except (ValueError, FileNotFoundError) as e:  # user errors (ConfigError included): the message, no traceback
        sys.exit(f"error: {e}")


def main() -> None:
    """Console entry point: `simmim-pretrain [group=option ...] [key=value ...]`."""
    # under torchrun / srun every rank runs this entry point; only rank 0 writes Hydra's own output (.hydra/, the
    # job log) into the run directory the ranks share
    if launcher_rank() > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    _main()


if __name__ == "__main__":
    main()
