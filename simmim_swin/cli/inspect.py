"""`simmim-swin inspect`: a checkpoint's step, settings and parameter counts."""

from __future__ import annotations

import argparse

from ..checkpoint import load_checkpoint
from .common import resolve_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser("inspect", help="print a checkpoint's step, config and parameter summary")
    p.add_argument("checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print a checkpoint's step, model settings and parameter counts."""
    path = resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    weights = state.get("model", state)
    print(f"checkpoint: {path}")
    if "step" in state:
        print(f"step: {state['step']}")
    config = state.get("config", {})
    for section in ("model", "mask"):
        if section in config:
            print(f"{section}: " + ", ".join(f"{k}={v}" for k, v in config[section].items()))
    if "stage_window_sizes" in state:
        print(f"windows used per stage: {state['stage_window_sizes']}")
    groups: dict[str, int] = {}
    for key, tensor in weights.items():
        top = key.split(".")[1] if key.startswith("encoder.") else key.split(".")[0]
        name = ("encoder." if key.startswith("encoder.") else "") + top
        groups[name] = groups.get(name, 0) + tensor.numel()
    total = sum(groups.values())
    print(f"parameters: {total:,} ({total / 1e6:.2f}M) in {len(weights)} tensors")
    for name, count in groups.items():
        print(f"  {name:32s} {count:>14,}")
