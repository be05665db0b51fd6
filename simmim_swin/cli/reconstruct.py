"""`simmim-swin reconstruct`: a pretraining checkpoint's reconstructions of the user's own images."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser("reconstruct", help="show a pretraining checkpoint's reconstructions of your own images")
    p.add_argument("--checkpoint", required=True, help="a SimMIM checkpoint file or a run directory")
    p.add_argument("--images", nargs="+", required=True, help="image files (resized and centre-cropped)")
    p.add_argument("--out", required=True, help="PNG to write: original | masked | reconstruction per image")
    p.add_argument("--mask-ratio", type=float, default=None, help="override the run's mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument(
        "--bands", type=int, nargs="+", default=None,
        help="bands to show (three as RGB or one in grey); default: the run's logger.panel_bands",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Mask the user's images and write the checkpoint's reconstructions as a PNG panel."""
    import torch  # here, not at the top: `simmim-swin --help` must not wait for torch

    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..config import MaskConfig, ModelConfig, from_dict, to_dict
    from ..data import EvalView, Normalizer
    from ..data.images import open_source
    from ..figures import build_display
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
    norm_target = mask_cfg.norm_target_window if mask_cfg.norm_target else None
    model = build_simmim(**to_dict(model_cfg), norm_target=norm_target)
    model.load_state_dict(state["model"])
    data_cfg = state["config"].get("data", {})
    normalize = Normalizer(data_cfg.get("mean"), data_cfg.get("std"))  # the statistics the run trained with
    view = EvalView(model_cfg.img_size, model_cfg.in_chans)
    images = []
    for f in args.images:
        try:
            source = open_source(f, max_pixels=None)
            if hasattr(source, "load"):
                source.load()  # decoded now: a file that is not an image fails here, not in the view
        except Exception as e:  # PIL, tifffile and numpy raise several types
            if isinstance(e, OSError) and e.errno is not None:
                raise  # a missing file or a directory: the tools' error line names the path (cli.errors)
            raise ValueError(f"{f} is not an image that can be read ({e}); pass PNG, JPEG, TIFF or .npy files") from e
        try:
            images.append(view(source))
        except ValueError as e:  # a band count that does not fit the model
            raise ValueError(f"{f}: {e}") from e
    images = normalize(torch.stack(images))
    bands = args.bands if args.bands is not None else state["config"].get("logger", {}).get("panel_bands")
    display = build_display(model_cfg.in_chans, normalize.is_default, bands)
    mask_generator = MaskGenerator(
        model_cfg.img_size, mask_cfg.mask_patch_size, model_cfg.patch_size, mask_cfg.mask_ratio
    )
    generator = torch.Generator().manual_seed(args.seed)
    masks = torch.stack([mask_generator(generator) for _ in args.images])
    out = write_panel(model, (images, masks), Path(args.out), precision="fp32", display=display)
    print(f"wrote {out} ({len(args.images)} images, checkpoint step {state.get('step', '?')})")
