"""`simmim-swin`: plain tools around runs and checkpoints (no Hydra here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import find_latest_checkpoint, load_checkpoint
from ..config import MaskConfig, ModelConfig, from_dict


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no checkpoints (looked in {path / 'checkpoints'})")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def cmd_inspect(args: argparse.Namespace) -> None:
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


def cmd_reconstruct(args: argparse.Namespace) -> None:
    """Mask the user's images and write the checkpoint's reconstructions as a PNG panel."""
    from PIL import Image

    from ..data import build_eval_transform
    from ..masking import MaskGenerator
    from ..models import build_simmim
    from ..pretrain import write_panel

    path = resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    if "encoder.mask_token" not in state.get("model", {}):
        raise ValueError(f"{path} is not a SimMIM pretraining checkpoint (it has no encoder.mask_token)")
    model_cfg = from_dict(ModelConfig, state["config"]["model"], "model")
    mask_cfg = from_dict(MaskConfig, state["config"]["mask"], "mask")
    if args.mask_ratio is not None:
        mask_cfg.mask_ratio = args.mask_ratio
    model = build_simmim(model_cfg, mask_cfg)
    model.load_state_dict(state["model"])
    transform = build_eval_transform(model_cfg.img_size)
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in args.images])
    mask_generator = MaskGenerator(
        model_cfg.img_size, mask_cfg.mask_patch_size, model_cfg.patch_size, mask_cfg.mask_ratio
    )
    generator = torch.Generator().manual_seed(args.seed)
    masks = torch.stack([mask_generator(generator) for _ in args.images])
    out = write_panel(model, (images, masks), Path(args.out), precision="fp32")
    print(f"wrote {out} ({len(args.images)} images, checkpoint step {state.get('step', '?')})")


def build_parser() -> argparse.ArgumentParser:
    """The `simmim-swin` argument parser with one sub-command per tool."""
    parser = argparse.ArgumentParser(
        prog="simmim-swin",
        description="Tools for simmim-swin runs and checkpoints. Pretraining itself is `simmim-pretrain`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a checkpoint's step, config and parameter summary")
    p.add_argument("checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("reconstruct", help="show a pretraining checkpoint's reconstructions of your own images")
    p.add_argument("--checkpoint", required=True, help="a SimMIM checkpoint file or a run directory")
    p.add_argument("--images", nargs="+", required=True, help="image files (resized and centre-cropped)")
    p.add_argument("--out", required=True, help="PNG to write: original | masked | reconstruction per image")
    p.add_argument("--mask-ratio", type=float, default=None, help="override the run's mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.set_defaults(func=cmd_reconstruct)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
