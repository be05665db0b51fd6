"""`simmim-finetune`: the Hydra entry point for fine-tuning and for resolution-transfer evaluation."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..config import FinetuneConfig
from .common import CONF_DIR, run_command, run_hydra


def _finetune_or_evaluate(config: FinetuneConfig) -> None:
    from ..finetune import evaluate_transfer, run_finetune  # torch: loaded only when a run starts, never for --help

    evaluate_transfer(config) if config.evaluate else run_finetune(config)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def _main(cfg: DictConfig) -> None:
    run_command(cfg, FinetuneConfig, "finetune", _finetune_or_evaluate)


def main() -> None:
    """Console entry point: `simmim-finetune pretrained=RUN_DIR_OR_CHECKPOINT [key=value ...]` (torchrun works too;
    `--help` lists the presets)."""
    run_hydra(_main, "simmim-finetune")


if __name__ == "__main__":
    main()
