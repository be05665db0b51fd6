"""What the launcher (torchrun, Slurm) tells a process through its environment, read without importing torch:
the command-line edge needs the rank before it decides to print anything, and `--help` must stay fast."""

from __future__ import annotations

import os


def launcher_rank() -> int:
    """This process's global rank as the launcher set it, before any process group exists (0 if none)."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ and (name == "RANK" or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            return int(os.environ[name])
    return 0
