"""Helpers of the end-to-end tests: the tools' command lines (under torchrun when nproc > 1), runs, weight checks.

Imported as `from e2e_helpers import ...` (pytest puts this folder on sys.path: tests/ holds no packages).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cli_helpers import CommandResult, run_main

from simmim_swin.checkpoint import find_latest_checkpoint, load_checkpoint

# a 3-stage 16-wide SwinV2 at 32 px / window 4 (stage windows 4, 4, 2), masked in 8 px patches
PICO = ["model.arch=pico", "model.img_size=32", "model.window_size=4", "model.drop_path_rate=0.0",
        "mask.mask_patch_size=8"]  # fmt: skip
# one cosine epoch without warm-up
ONE_EPOCH = ["schedule=cosine", "schedule.epochs=1", "schedule.warmup_epochs=0"]


def cli_command(tmp_path: Path, module: str, *args: str, nproc: int = 1) -> list[str]:
    """`python -m simmim_swin.cli.<module> run.output_dir=<tmp_path> ...`, under torchrun when nproc > 1."""
    args = ("-m", f"simmim_swin.cli.{module}", f"run.output_dir={tmp_path}", *args)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def run_cli(tmp_path: Path, module: str, *args: str, nproc: int = 1) -> subprocess.CompletedProcess | CommandResult:
    """Run the tool to the end in tmp_path (in this process when nproc is 1, under torchrun otherwise); it must
    succeed (the output tails are the assertion message)."""
    if nproc == 1:
        result = run_main(module, f"run.output_dir={tmp_path}", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result
    result = subprocess.run(
        cli_command(tmp_path, module, *args, nproc=nproc), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run directory's latest checkpoint (FSDP folders consolidated)."""
    return load_checkpoint(find_latest_checkpoint(run_dir))["model"]


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def wait_for(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen) -> None:
    """Poll until predicate() holds; fail if the process ends first or the timeout passes (killing it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)
