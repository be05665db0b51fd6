"""`simmim-finetune`: the Hydra entry point for fine-tuning and for resolution-transfer evaluation."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..config import FinetuneConfig
from ..finetune import evaluate_transfer, run_finetune
from .common import (
    CONF_DIR,
    build_config,
    check_command_groups,
    default_cpu_threads,
    hydra_log_file,
    output_into_log,
    quiet_hydra_on_other_ranks,
    run_hydra,
)
from .errors import command_errors


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def _main(cfg: DictConfig) -> None:
    with output_into_log(hydra_log_file()), command_errors():
        config = build_config(FinetuneConfig, cfg, HydraConfig.get().runtime.choices, preset_group="finetune")
        default_cpu_threads(config.run.device)
        # each validates the settings that apply to it before building anything
        evaluate_transfer(config) if config.evaluate else run_finetune(config)


def main() -> None:
    """Console entry point: `simmim-finetune pretrained=RUN_DIR_OR_CHECKPOINT [key=value ...]` (torchrun works too;
    `--help` lists the presets)."""
    check_command_groups("simmim-finetune", sys.argv[1:])
    quiet_hydra_on_other_ranks()
    run_hydra(_main)


if __name__ == "__main__":
    main()
