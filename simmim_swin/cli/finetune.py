"""`simmim-finetune`: the Hydra entry point for fine-tuning and for resolution-transfer evaluation."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..config import FinetuneConfig, from_dict
from ..distributed import launcher_rank
from ..finetune import evaluate_transfer, run_finetune
from .common import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def _main(cfg: DictConfig) -> None:
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        config = from_dict(FinetuneConfig, container)
        if config.evaluate:
            evaluate_transfer(config)
        else:
            run_finetune(config)
    except MissingMandatoryValue as e:
        sys.exit(f"error: {e.full_key} must be set on the command line, e.g. {e.full_key}=VALUE")
    except (ValueError, FileNotFoundError) as e:  # user errors (ConfigError included): the message, no traceback
        sys.exit(f"error: {e}")


def main() -> None:
    """Console entry point: `simmim-finetune pretrained=RUN_DIR_OR_CHECKPOINT [key=value ...]`."""
    # fine-tuning has no process group: several ranks would each train a copy into the same run directory
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or launcher_rank() > 0:
        sys.exit("error: simmim-finetune runs in one process (the CPU or one GPU); start it without torchrun / srun")
    _main()


if __name__ == "__main__":
    main()
