"""`simmim-swin inspect`: a checkpoint's (or export's) step, settings, windows, classes and parameter counts."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser("inspect", help="print a checkpoint's step, config and parameter summary")
    p.add_argument("checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print a checkpoint's step, model settings and parameter counts."""
    from ..checkpoint import load_weights_file, resolve_checkpoint  # torch: loaded only when a command runs

    path = resolve_checkpoint(args.checkpoint)
    state = load_weights_file(path)
    weights = state.get("model", state)
    if "export_format" in state:
        print(f"export format: {state['export_format']}")
    print(f"checkpoint: {path}")
    if "step" in state:
        print(f"step: {state['step']}")
    config = state.get("config", {})
    for section in ("model", "mask"):
        if section in config:
            print(f"{section}: " + ", ".join(f"{k}={v}" for k, v in config[section].items()))
    if config.get("pretrained"):
        print(f"fine-tuned from: {config['pretrained']}")
    if "stage_window_sizes" in state:
        print(f"windows used per stage: {state['stage_window_sizes']}")
    if state.get("pretrained_window_sizes"):
        print(cpb_normalisers_line(state["pretrained_window_sizes"], state.get("stage_window_sizes")))
    if state.get("num_classes"):
        names = state.get("class_names") or []
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        print(f"classes: {state['num_classes']}" + (f" ({shown})" if names else ""))
    if state.get("best_top1") is not None and state["best_top1"] >= 0:
        print(f"best top-1: {state['best_top1']:.2f}%")
    groups: dict[str, int] = {}
    for key, tensor in weights.items():
        name = ".".join(key.split(".")[: 2 if key.startswith("encoder.") else 1])  # encoder.layers, head ...
        groups[name] = groups.get(name, 0) + tensor.numel()
    total = sum(groups.values())
    print(f"parameters: {total:,} ({total / 1e6:.2f}M) in {len(weights)} tensors")
    for name, count in groups.items():
        print(f"  {name:32s} {count:>14,}")


def cpb_normalisers_line(pretrained: list[int], stage_windows: list[int] | None) -> str:
    """What each stage divides its CPB offsets by: its pretrained window, or its own window where that is 0."""
    if all(p > 0 for p in pretrained):
        return f"CPB normalised by (pretrained windows): {list(pretrained)}"
    if stage_windows is None or len(stage_windows) != len(pretrained):
        return f"CPB normalised by: pretrained windows {list(pretrained)}, each stage's own window where 0"
    normalisers = [p if p > 0 else w for p, w in zip(pretrained, stage_windows, strict=True)]
    note = "the stages' own windows" if not any(pretrained) else "pretrained windows, the stage's own where 0"
    return f"CPB normalised by ({note}): {normalisers}"
