"""`simmim-pretrain`: the Hydra entry point for SimMIM pretraining (the only pretraining module importing Hydra)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import PretrainConfig, from_dict
from ..pretrain import run_pretrain
from .common import CONF_DIR, quiet_hydra_on_other_ranks, training_exits


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def _main(cfg: DictConfig) -> None:
    with training_exits():
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        run_pretrain(from_dict(PretrainConfig, container))


def main() -> None:
    """Console entry point: `simmim-pretrain [group=option ...] [key=value ...]`."""
    quiet_hydra_on_other_ranks()
    _main()


if __name__ == "__main__":
    main()
