"""`simmim-swin export`: a checkpoint's encoder or fine-tuned classifier as safetensors (ours or timm's layout, the
model config, stage windows, class names and timm's create_model arguments in its metadata), or as a Hugging Face
transformers Swinv2 folder (`--format hf`: config.json, model.safetensors, README.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# the functions import torch and the model code when they run: `simmim-swin --help` stays fast

# any swinv2 variant works with explicit sizes; this one is the plain (non-"cr") SwinV2 family
TIMM_MODEL_NAME = "swinv2_tiny_window8_256"
EXPORT_FORMATS = ("simmim", "timm", "hf")


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


def _read_weights(
    checkpoint: str | Path, use_ema: bool, encoder_only: bool
) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any], int]:
    """(checkpoint path, its contents, encoder / classifier weights without decoder and tables, model config with
    the CPB normalisers the weights were trained with, number of classes (0: no head))."""
    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..models.swinv2 import is_derived_buffer, size_fields

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "stage_window_sizes" not in state:
        raise ValueError(f"{path} is not a simmim-swin pretraining or fine-tuning checkpoint (no config / windows)")
    key = "ema" if use_ema else "model"
    if not state.get(key):
        raise ValueError(f"{path} holds no EMA weights (the run had train.ema=false); export without --ema")
    drop = ("decoder.", "head.") if encoder_only else ("decoder.",)
    weights = {name.removeprefix("encoder."): value for name, value in state[key].items()}
    weights = {k: v for k, v in weights.items() if not k.startswith(drop) and not is_derived_buffer(k)}
    model_cfg = dict(state["config"]["model"])
    sizes = (model_cfg.get("embed_dim"), model_cfg.get("depths"), model_cfg.get("num_heads"))
    model_cfg.update(size_fields(model_cfg["arch"], *sizes))  # a pretraining config leaves them to the arch
    # the CPB normalisers the weights were trained with: what a rebuilt model must use to give the same outputs
    model_cfg["pretrained_window_sizes"] = list(
        state.get("pretrained_window_sizes")
        or model_cfg.get("pretrained_window_sizes")
        or [0] * len(state["stage_window_sizes"])
    )
    num_classes = int(weights["head.fc.weight"].shape[0]) if "head.fc.weight" in weights else 0
    return path, state, weights, model_cfg, num_classes


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    timm_layout: bool = False,
    use_ema: bool = False,
    encoder_only: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint's encoder (pretraining) or classifier (fine-tuning) to `out`; returns the metadata."""
    from safetensors.torch import save as safetensors_bytes

    from ..checkpoint import EXPORT_CONFIG_KEY, EXPORT_FORMAT_KEY
    from ..files import atomic_write
    from ..models.swinv2 import to_timm

    path, state, weights, model_cfg, num_classes = _read_weights(checkpoint, use_ema, encoder_only)
    if timm_layout:
        weights = to_timm(weights)
    info = {
        "model": model_cfg,
        "stage_window_sizes": list(state["stage_window_sizes"]),
        "num_classes": num_classes,
        "class_names": state.get("class_names"),
        "step": state.get("step"),
        "source": str(path),
        "timm_create_model": timm_create_kwargs(model_cfg, num_classes, out) if timm_layout else None,
    }
    metadata = {EXPORT_FORMAT_KEY: "timm" if timm_layout else "simmim_swin", EXPORT_CONFIG_KEY: json.dumps(info)}
    tensors = {k: v.detach().contiguous() for k, v in weights.items()}  # safetensors needs contiguous storage
    atomic_write(out, safetensors_bytes(tensors, metadata=metadata))
    return info


def export_hf(checkpoint: str | Path, out_dir: str | Path, use_ema: bool = False, encoder_only: bool = False) -> dict:
    """Write a transformers folder to `out_dir`: Swinv2Model (encoder) or Swinv2ForImageClassification; its config."""
    from safetensors.torch import save as safetensors_bytes

    from ..files import atomic_write
    from ..hf import HF_CARD, HF_CONFIG, HF_WEIGHTS, hf_config, to_hf

    path, state, weights, model_cfg, num_classes = _read_weights(checkpoint, use_ema, encoder_only)
    weights.pop("mask_token", None)  # Swinv2Model has none; the MIM decoder is not exported
    config = hf_config(model_cfg, num_classes, state.get("class_names"))
    tensors = to_hf(weights, prefix="swinv2." if num_classes else "")
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / HF_WEIGHTS, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write(out_dir / HF_CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write(out_dir / HF_CARD, model_card(state, path, config, use_ema))
    return config


def model_card(state: dict[str, Any], path: Path, config: dict[str, Any], use_ema: bool) -> str:
    """README.md of an exported folder: architecture, data and steps, CPB windows, how to load and fine-tune."""
    run_config, kind = state["config"], config["architectures"][0]
    stage_windows = list(state["stage_window_sizes"])
    data = run_config.get("data", {})
    source = data.get("source", "?")
    where = data.get("root") or data.get("urls") or ""
    history = (
        f"fine-tuned for {state.get('step')} steps on `{source}` {where} from `{run_config['pretrained']}`"
        if "pretrained" in run_config
        else f"SimMIM pretraining, {state.get('step')} steps on `{source}` {where}"
    )
    size = config["image_size"]
    normalisers = [p if p > 0 else w for p, w in zip(config["pretrained_window_sizes"], stage_windows, strict=True)]
    return f"""---
library_name: transformers
tags: [swinv2, simmim, image-feature-extraction]
---
# SwinV2 exported by simmim-swin

- Architecture: SwinV2 (res-post-norm, scaled cosine attention, log-spaced continuous position bias), embed_dim
  {config["embed_dim"]}, depths {config["depths"]}, heads {config["num_heads"]}, patch {config["patch_size"]},
  {config["num_channels"]} input channels; `{kind}`{" (EMA weights)" if use_ema else ""}.
- Training: {history}; source checkpoint `{path}`.
- Input: {size} x {size} px, window {config["window_size"]}; the stages use windows {stage_windows}. The
  position-bias MLPs were trained with offsets normalised by {normalisers} (`pretrained_window_sizes` here:
  {config["pretrained_window_sizes"]}, 0 = the stage's own window).
- Normalisation: ImageNet mean / std.

```python
from transformers import {kind}
model = {kind}.from_pretrained("path/to/this/folder")
```

To fine-tune at another size or window, keep the position bias as trained: build the model with
`image_size=<new size>, window_size=<new window>, pretrained_window_sizes={normalisers}` (the windows listed
above), e.g. `{kind}.from_pretrained(folder, image_size=256, window_size=16,
pretrained_window_sizes={normalisers})`, or with simmim-swin: `simmim-finetune pretrained=<this folder>
model.img_size=... model.window_size=...`.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser(
        "export", help="write a checkpoint's encoder or classifier as safetensors (ours, timm's) or an HF folder"
    )
    p.add_argument("checkpoint", help="a pretraining or fine-tuning checkpoint, or a run directory (its latest)")
    p.add_argument("out", nargs="?", help="the .safetensors file (a folder for --format hf) to write")
    p.add_argument("--out", dest="out_option", help="the same as the positional OUT")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument(
        "--format", choices=EXPORT_FORMATS, default="simmim",
        help="simmim (ours, default), timm (timm's swinv2 layout) or hf (a transformers Swinv2 folder)",
    )  # fmt: skip
    layout.add_argument("--timm", dest="format", action="store_const", const="timm", help="the same as --format timm")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a fine-tuning checkpoint")
    p.add_argument("--encoder-only", action="store_true", help="leave out a fine-tuned classifier's head")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Export and print how to load the result."""
    out = args.out or args.out_option
    if not out or (args.out and args.out_option and args.out != args.out_option):
        raise ValueError("give one output path: simmim-swin export CHECKPOINT OUT (or --out OUT)")
    if args.format == "hf":
        if out.endswith(".safetensors"):
            raise ValueError(f"--format hf writes a folder; give a directory, not {out}")
        config = export_hf(args.checkpoint, out, args.ema, args.encoder_only)
        kind = config["architectures"][0]
        print(f"wrote {out}: {kind}, {config['image_size']} px, window {config['window_size']}, "
              f"pretrained_window_sizes {config['pretrained_window_sizes']}")  # fmt: skip
        print(f"load it with: transformers.{kind}.from_pretrained({out!r})")
        return
    if not out.endswith(".safetensors"):
        raise ValueError(f"the output {out} must end in .safetensors (or use --format hf for a folder)")
    info = export_checkpoint(args.checkpoint, out, args.format == "timm", args.ema, args.encoder_only)
    model = info["model"]
    what = f"classifier ({info['num_classes']} classes)" if info["num_classes"] else "encoder"
    print(
        f"wrote {out}: {what} of {info['source']} (step {info['step']}), {model['img_size']} px, window "
        f"{model['window_size']}, stage windows {info['stage_window_sizes']}, pretrained_window_sizes "
        f"{model['pretrained_window_sizes']}"
    )
    if info["timm_create_model"]:
        kwargs = dict(info["timm_create_model"])
        name = kwargs.pop("model_name")
        print("load it in timm with (add features_only=True for the stage feature maps):")
        print(f"  timm.create_model({name!r}, " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
    else:
        print(f"fine-tune from it with: simmim-finetune pretrained={out} model.img_size=... model.window_size=...")
