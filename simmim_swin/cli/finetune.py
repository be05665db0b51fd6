"""`simmim-finetune`: the Hydra entry point for fine-tuning and for resolution-transfer evaluation."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..config import FinetuneConfig, check_run_config, validate_finetune
from ..finetune import evaluate_transfer, run_finetune
from .common import (
    CONF_DIR,
    build_config,
    check_command_groups,
    default_cpu_threads,
    quiet_hydra_on_other_ranks,
    run_hydra,
    training_exits,
)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def _main(cfg: DictConfig) -> None:
    with training_exits():
        config = build_config(FinetuneConfig, cfg, HydraConfig.get().runtime.choices, preset_group="finetune")
        default_cpu_threads(config.run.device)
        if config.evaluate:
            check_run_config(config.run)  # no training: the batch / augmentation / EMA checks do not apply
            evaluate_transfer(config)
        else:
            validate_finetune(config)
            run_finetune(config)


def main() -> None:
    """Console entry point: `simmim-finetune pretrained=RUN_DIR_OR_CHECKPOINT [key=value ...]` (torchrun works too;
    `--help` lists the presets)."""
    check_command_groups("simmim-finetune", sys.argv[1:])
    quiet_hydra_on_other_ranks()
    run_hydra(_main)


if __name__ == "__main__":
    main()
