"""`simmim-finetune`: the Hydra entry point for fine-tuning and for resolution-transfer evaluation."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import FinetuneConfig, from_dict
from ..finetune import evaluate_transfer, run_finetune
from .common import CONF_DIR, quiet_hydra_on_other_ranks, training_exits


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def _main(cfg: DictConfig) -> None:
    with training_exits():
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        config = from_dict(FinetuneConfig, container)
        if config.evaluate:
            evaluate_transfer(config)
        else:
            run_finetune(config)


def main() -> None:
    """Console entry point: `simmim-finetune pretrained=RUN_DIR_OR_CHECKPOINT [key=value ...]` (torchrun works too)."""
    quiet_hydra_on_other_ranks()
    _main()


if __name__ == "__main__":
    main()
