"""`simmim-swin export`: a checkpoint's encoder or fine-tuned classifier as safetensors, optionally in timm's layout.

The file's metadata holds the model config (JSON under the `simmim_swin` key), the windows each stage used, the
class names and the keyword arguments that rebuild it in timm. `--timm` files load with
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=N), **kwargs)`;
both kinds load as `simmim-finetune pretrained=PATH`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..checkpoint import load_checkpoint, resolve_checkpoint
from ..models.swinv2 import is_derived_buffer, to_timm
from ..transfer import EXPORT_CONFIG_KEY, EXPORT_FORMAT_KEY

# any swinv2 variant works with explicit sizes; this one is the plain (non-"cr") SwinV2 family
TIMM_MODEL_NAME = "swinv2_tiny_window8_256"


def timm_create_kwargs(model_cfg: dict[str, Any], num_classes: int, path: str | Path) -> dict[str, Any]:
    """Keyword arguments of timm.create_model that rebuild the exported model and load the file."""
    return dict(
        model_name=TIMM_MODEL_NAME,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes),
        img_size=model_cfg["img_size"],
        patch_size=model_cfg["patch_size"],
        in_chans=model_cfg["in_chans"],
        window_size=model_cfg["window_size"],
        pretrained_window_sizes=tuple(model_cfg["pretrained_window_sizes"]),
        embed_dim=model_cfg["embed_dim"],
        depths=tuple(model_cfg["depths"]),
        num_heads=tuple(model_cfg["num_heads"]),
        mlp_ratio=model_cfg["mlp_ratio"],
        num_classes=num_classes,
    )


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    timm_layout: bool = False,
    use_ema: bool = False,
    encoder_only: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint's encoder (pretraining) or classifier (fine-tuning) to `out`; returns the metadata."""
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "stage_window_sizes" not in state:
        raise ValueError(f"{path} is not a simmim-swin pretraining or fine-tuning checkpoint (no config / windows)")
    key = "ema" if use_ema else "model"
    if not state.get(key):
        raise ValueError(f"{path} holds no EMA weights (the run had train.ema=false); export without --ema")
    weights = {name.removeprefix("encoder."): value for name, value in state[key].items()}
    weights = {k: v for k, v in weights.items() if not k.startswith("decoder.") and not is_derived_buffer(k)}
    if encoder_only:
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    if timm_layout:
        if any(".extra_norms." in k for k in weights):
            raise ValueError(
                "this model has the huge/giant extra norms, which timm's swinv2 lacks; export without --timm"
            )
        weights = to_timm(weights)
    num_classes = int(weights["head.fc.weight"].shape[0]) if "head.fc.weight" in weights else 0
    model_cfg = dict(state["config"]["model"])
    stage_windows = list(state["stage_window_sizes"])
    # the CPB normalisers the weights were trained with: what a rebuilt model must use to give the same outputs
    model_cfg["pretrained_window_sizes"] = list(
        state.get("pretrained_window_sizes") or model_cfg.get("pretrained_window_sizes") or [0] * len(stage_windows)
    )
    info = {
        "model": model_cfg,
        "stage_window_sizes": stage_windows,
        "num_classes": num_classes,
        "class_names": state.get("class_names"),
        "step": state.get("step"),
        "source": str(path),
        "timm_create_model": timm_create_kwargs(model_cfg, num_classes, out) if timm_layout else None,
    }
    metadata = {EXPORT_FORMAT_KEY: "timm" if timm_layout else "simmim_swin", EXPORT_CONFIG_KEY: json.dumps(info)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in weights.items()}  # safetensors needs contiguous storage
    save_file(tensors, str(out), metadata=metadata)
    return info


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser("export", help="write a checkpoint's encoder or classifier as safetensors (optionally for timm)")
    p.add_argument("checkpoint", help="a pretraining or fine-tuning checkpoint, or a run directory (its latest)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--timm", action="store_true", help="timm's swinv2 layout (no mask token), loadable by timm")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a fine-tuning checkpoint")
    p.add_argument("--encoder-only", action="store_true", help="leave out a fine-tuned classifier's head")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Export and print how to load the file."""
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out} must end in .safetensors")
    info = export_checkpoint(args.checkpoint, args.out, args.timm, args.ema, args.encoder_only)
    model = info["model"]
    what = f"classifier ({info['num_classes']} classes)" if info["num_classes"] else "encoder"
    print(
        f"wrote {args.out}: {what} of {info['source']} (step {info['step']}), {model['img_size']} px, window "
        f"{model['window_size']}, stage windows {info['stage_window_sizes']}, pretrained_window_sizes "
        f"{model['pretrained_window_sizes']}"
    )
    if info["timm_create_model"]:
        kwargs = dict(info["timm_create_model"])
        name = kwargs.pop("model_name")
        print("load it in timm with:")
        print(f"  timm.create_model({name!r}, " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
    else:
        print(f"fine-tune from it with: simmim-finetune pretrained={args.out} model.img_size=... model.window_size=...")
