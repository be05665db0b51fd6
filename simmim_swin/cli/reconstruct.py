"""`simmim-swin reconstruct`: a pretraining checkpoint's reconstructions of the user's own images."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..checkpoint import load_checkpoint, resolve_checkpoint
from ..config import MaskConfig, ModelConfig, from_dict, to_dict
from ..data import build_eval_transform
from ..masking import MaskGenerator
from ..models import build_simmim
from ..pretrain import write_panel


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser("reconstruct", help="show a pretraining checkpoint's reconstructions of your own images")
    p.add_argument("--checkpoint", required=True, help="a SimMIM checkpoint file or a run directory")
    p.add_argument("--images", nargs="+", required=True, help="image files (resized and centre-cropped)")
    p.add_argument("--out", required=True, help="PNG to write: original | masked | reconstruction per image")
    p.add_argument("--mask-ratio", type=float, default=None, help="override the run's mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.set_defaults(func=run)


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, with an error that names the file when it is missing or not an image."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not an image PIL can read ({e}); pass PNG, JPEG or other image files") from e


def run(args: argparse.Namespace) -> None:
    """Mask the user's images and write the checkpoint's reconstructions as a PNG panel."""
    path = resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    if "encoder.mask_token" not in state.get("model", {}):
        raise ValueError(f"{path} is not a SimMIM pretraining checkpoint (it has no encoder.mask_token)")
    model_cfg = from_dict(ModelConfig, state["config"]["model"], "model")
    mask_cfg = from_dict(MaskConfig, state["config"]["mask"], "mask")
    if args.mask_ratio is not None:
        mask_cfg.mask_ratio = args.mask_ratio
    norm_target = mask_cfg.norm_target_window if mask_cfg.norm_target else None
    model = build_simmim(**to_dict(model_cfg), norm_target=norm_target)
    model.load_state_dict(state["model"])
    transform = build_eval_transform(model_cfg.img_size)
    images = torch.stack([transform(load_image(f)) for f in args.images])
    mask_generator = MaskGenerator(
        model_cfg.img_size, mask_cfg.mask_patch_size, model_cfg.patch_size, mask_cfg.mask_ratio
    )
    generator = torch.Generator().manual_seed(args.seed)
    masks = torch.stack([mask_generator(generator) for _ in args.images])
    out = write_panel(model, (images, masks), Path(args.out), precision="fp32")
    print(f"wrote {out} ({len(args.images)} images, checkpoint step {state.get('step', '?')})")
