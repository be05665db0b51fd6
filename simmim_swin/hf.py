"""Hugging Face transformers' Swinv2 layout: our (timm-layout) weights to and from `Swinv2Model` /
`Swinv2ForImageClassification` / `Swinv2ForMaskedImageModeling` state dicts, and the model folder they load from.
The function is the same; writing the folder needs no transformers, loading it does."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .models.swinv2 import is_derived_buffer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_CARD = "README.md"

# ours -> transformers' name prefixes, within a block (encoder.layers.i.blocks.j.) and outside the stages. The
# bookkeeping differs: transformers stores a stage's patch merging at the END of the stage (ours: the start of the
# next), splits qkv into query / key / value (the key has no bias, as ours is fixed at zero) and keeps the final
# norm as `layernorm` (eps 1e-5, as ours)
_BLOCK_NAMES = {
    "attn.logit_scale": "attention.self.logit_scale",
    "attn.cpb_mlp.": "attention.self.continuous_position_bias_mlp.",
    "attn.q_bias": "attention.self.query.bias",
    "attn.v_bias": "attention.self.value.bias",
    "attn.proj.": "attention.output.dense.",
    "norm1.": "layernorm_before.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
    "norm2.": "layernorm_after.",
}
_TOP_NAMES = {
    "patch_embed.proj.": "embeddings.patch_embeddings.projection.",
    "patch_embed.norm.": "embeddings.norm.",
    "mask_token": "embeddings.mask_token",
    "norm.": "layernorm.",
}
_QKV = ("query", "key", "value")


def _rename(name: str, names: dict[str, str]) -> str | None:
    """`name` with its prefix from `names` replaced by the prefix it maps to, or None when none matches."""
    for old, new in names.items():
        if name.startswith(old):
            return new + name.removeprefix(old)
    return None


def to_hf(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our encoder / classifier state dict (no `encoder.` prefix or derived tables) -> transformers' names; encoder
    keys get `prefix` (`swinv2.` for the task models)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        in_block = re.fullmatch(r"(layers\.\d+\.blocks\.\d+\.)(.+)", key)
        block, part = in_block.groups() if in_block else ("", "")
        if top := _rename(key, _TOP_NAMES):
            out[prefix + top] = value
        elif key.startswith("head.fc."):
            out["classifier." + key.removeprefix("head.fc.")] = value
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
            out[f"{prefix}encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = value
        elif part == "attn.qkv.weight":
            for name, chunk in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{prefix}encoder.{block}attention.self.{name}.weight"] = chunk.contiguous()
        elif block and (name := _rename(part, _BLOCK_NAMES)):
            out[f"{prefix}encoder.{block}{name}"] = value
        else:
            raise ValueError(
                f"{key} has no place in transformers' Swinv2, which lacks the absolute position embedding (ape) and "
                "the huge / giant extra norms; export such a model in our layout (--format simmim)"
            )
    return out


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Swinv2 state dict (Swinv2Model, or a task model with `swinv2.`) -> ours, SimMIM-style."""
    top_names = {hf: ours for ours, hf in _TOP_NAMES.items()}
    block_names = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("swinv2.")
        in_block = re.fullmatch(r"(encoder\.layers\.\d+\.blocks\.\d+\.)(.+)", name)  # the same prefix as ours
        block, part = in_block.groups() if in_block else ("", "")
        if name.startswith("decoder."):
            out[name] = value
        elif name.startswith("classifier."):
            out["encoder.head.fc." + name.removeprefix("classifier.")] = value
        elif top := _rename(name, top_names):
            out["encoder." + top] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", name):
            out[f"encoder.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = value
        elif block and (ours := _rename(part, block_names)):
            out[block + ours] = value
        elif block and part.removeprefix("attention.self.").removesuffix(".weight") in _QKV:
            qkv.setdefault(block, {})[part.split(".")[-2]] = value
        elif block and is_derived_buffer(part):
            continue  # derived tables (some exports carry them): rebuilt from the window
        elif name == "pooler" or name.startswith("embeddings.position_embeddings"):
            raise ValueError(f"{key}: absolute position embeddings do not convert; only ape=False models do")
        else:
            raise ValueError(f"{key} is not a transformers Swinv2 weight this loader knows")
    for block, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"{block}: transformers' query / key / value weights incomplete ({sorted(parts)})")
        out[block + "attn.qkv.weight"] = torch.cat([parts[name] for name in _QKV], dim=0)
    return out


def hf_config(model_cfg: dict[str, Any], num_classes: int, class_names: list[str] | None) -> dict[str, Any]:
    """transformers' Swinv2Config fields (config.json) for our model config (embed_dim, depths, num_heads given)."""
    img_size = model_cfg["img_size"]
    if not isinstance(img_size, int):
        raise ValueError(
            f"img_size {img_size} is not square: transformers' Swinv2 clips windows on the first axis only; "
            "export a model built at a square size (its weights work at any size)"
        )
    window = model_cfg["window_size"]
    if not isinstance(window, int):
        if len(set(window)) != 1:
            raise ValueError(f"window_size {window} differs per stage; transformers' Swinv2 takes one window")
        window = window[0]
    depths = model_cfg["depths"]
    config = {
        "architectures": ["Swinv2ForImageClassification" if num_classes else "Swinv2Model"],
        "model_type": "swinv2",
        "image_size": img_size,
        "patch_size": model_cfg["patch_size"],
        "num_channels": model_cfg["in_chans"],
        "embed_dim": model_cfg["embed_dim"],
        "depths": list(depths),
        "num_heads": list(model_cfg["num_heads"]),
        "window_size": window,
        "pretrained_window_sizes": list(model_cfg.get("pretrained_window_sizes") or [0] * len(depths)),
        "mlp_ratio": model_cfg["mlp_ratio"],
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": model_cfg.get("drop_path_rate", 0.1),
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "layer_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "encoder_stride": model_cfg["patch_size"] * 2 ** (len(depths) - 1),
    }
    if num_classes:
        names = class_names or [str(i) for i in range(num_classes)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    return config


def hf_windows(config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(the window each stage uses, the CPB normalisers) of a transformers Swinv2Config (square image sizes)."""
    size = config.get("image_size", 224)
    size = size if isinstance(size, int) else min(size)
    grid = size // config.get("patch_size", 4)
    depths = config.get("depths", [2, 2, 6, 2])
    window = config.get("window_size", 7)
    windows = [min(grid // 2**i, window) for i in range(len(depths))]
    return windows, list(config.get("pretrained_window_sizes") or [0] * len(depths))


def is_hf_folder(path: str | Path) -> bool:
    """A folder holding a transformers config.json and model.safetensors."""
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file()


def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(config.json contents, weights file) of a transformers model folder."""
    path = Path(path)
    config = json.loads((path / HF_CONFIG).read_text())
    if config.get("model_type") != "swinv2":
        raise ValueError(f"{path / HF_CONFIG} describes model_type={config.get('model_type')!r}, not swinv2")
    return config, path / HF_WEIGHTS
