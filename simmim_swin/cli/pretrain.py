"""`simmim-pretrain`: the Hydra entry point for SimMIM pretraining (the only pretraining module importing Hydra)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..config import PretrainConfig
from .common import CONF_DIR, run_command, run_hydra


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def _main(cfg: DictConfig) -> None:
    from ..pretrain import run_pretrain  # torch and the model: loaded only when a run starts, never for --help

    run_command(cfg, PretrainConfig, "experiment", run_pretrain)


def main() -> None:
    """Console entry point: `simmim-pretrain [group=option ...] [key=value ...]` (`--help` lists the groups)."""
    run_hydra(_main, "simmim-pretrain")


if __name__ == "__main__":
    main()
