"""Load pretrained SwinV2 weights (ours, the reference implementation's, timm's, Hugging Face's) strictly into a model
at a new image size and window (docs/reference.md §3); the CPB carries over through `pretrained_window_sizes`."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv

from .checkpoint import load_weights_file, resolve_checkpoint
from .config import ConfigError, FinetuneModelConfig, ModelConfig, WeightFormat, from_dict, to_dict
from .hf import from_hf, hf_windows, is_hf_folder, read_hf_folder
from .models import SimMIM, build_encoder
from .models.swinv2 import SWINV2_SIZES, SwinTransformerV2, WindowAttention, is_derived_buffer, size_fields

_MAX_NAMES = 8  # keys listed per kind in error messages

log = logging.getLogger(__name__)


@dataclass
class PretrainedWeights:
    """Weights read from a file, converted to our layout (no `encoder.` prefix), plus what the file says about them."""

    state_dict: dict[str, torch.Tensor]
    source_format: str  # simmim | reference | timm | hf
    path: Path
    model_config: dict[str, Any] | None = None  # our ModelConfig fields, when the file carries them
    stage_window_sizes: list[int] | None = None  # the window each stage used when these weights were trained
    pretrained_window_sizes: list[int] | None = None  # the CPB normalisers those stages used (0: their own window)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys dropped while reading
    extra: dict[str, Any] = field(default_factory=dict)  # step, num_classes, class_names when known
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)  # a SimMIM decoder (decoder.0.*), when present

    def cpb_windows(self) -> list[int] | None:
        """Per stage, the window its CPB inputs were normalised by: what the new model's pretrained_window_sizes is."""
        if self.stage_window_sizes is None:
            return None
        pretrained = self.pretrained_window_sizes or [0] * len(self.stage_window_sizes)
        return [p if p > 0 else w for w, p in zip(self.stage_window_sizes, pretrained)]


def detect_format(weights: dict[str, Any]) -> str:
    """`hf` for Hugging Face's Swinv2 layout, `reference` for the reference implementation's, else `timm` (ours)."""
    if any(".patch_embeddings.projection." in f".{key}" for key in weights):
        return "hf"
    keys = [key.removeprefix("encoder.") for key in weights]
    reference_markers = ("layers.0.downsample.", ".rpe_mlp.")
    if any(marker in f".{key}" for key in keys for marker in reference_markers) or "head.weight" in keys:
        return "reference"
    return "timm"


def convert_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference implementation's SwinV2 / SimMIM layout -> ours (`encoder.` prefixes are kept as they are)."""
    # not timm's checkpoint_filter_fn: it needs the target model, drops the tables unreported and knows neither the
    # SimMIM `encoder.` prefix, `rpe_mlp` nor the flat position embedding
    out = {}
    for key, value in state_dict.items():
        prefix = "encoder." if key.startswith("encoder.") else ""
        name = key[len(prefix) :]
        # the reference merges patches at the end of stage i, timm and we at the start of stage i + 1
        name = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", name)
        name = name.replace(".rpe_mlp.", ".cpb_mlp.")
        if name in ("head.weight", "head.bias"):
            name = "head.fc." + name.split(".")[-1]
        if name == "absolute_pos_embed" and value.dim() == 3:
            side = math.isqrt(value.shape[1])
            if side * side != value.shape[1]:
                raise ValueError(
                    f"absolute_pos_embed of shape {tuple(value.shape)} is not a square token grid; only square "
                    "grids convert"
                )
            value = value.reshape(1, side, side, value.shape[2])  # 1, L, C -> 1, H, W, C
        out[prefix + name] = value
    return out


def _stage_ids(state_dict: dict[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := re.match(r"layers\.(\d+)\.blocks\.", key))})


def windows_from_tables(state_dict: dict[str, torch.Tensor]) -> tuple[list[int], list[int]] | None:
    """(stage windows, CPB normalisers) recovered from stored coords tables (the reference keeps them), or None."""
    windows, normalisers = [], []
    for i in _stage_ids(state_dict):
        table = state_dict.get(f"layers.{i}.blocks.0.attn.relative_coords_table")
        if table is None:
            return None
        # 1, 2W-1, 2W-1, 2; its largest entry log2(8(W-1)/(n-1) + 1)/3 gives the normaliser n back (W: none given)
        window = (table.shape[-2] + 1) // 2
        top = table.abs().max().item()
        normaliser = window if window == 1 or top == 0 else 1 + round(8 * (window - 1) / (2 ** (3 * top) - 1))
        windows.append(window)
        normalisers.append(0 if normaliser == window else normaliser)
    return (windows, normalisers) if windows else None


def _model_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict inside a checkpoint (`model`, `state_dict`) or the file itself."""
    weights = state.get("model", state)
    return weights.get("state_dict", weights) if isinstance(weights.get("state_dict"), dict) else weights


def load_pretrained(path: str | Path, fmt: str = "auto") -> PretrainedWeights:
    """Read pretrained weights (run dir, .pt/.pth checkpoint or .safetensors) into our layout."""
    if fmt not in list(WeightFormat):  # a library caller's string; configs hold a WeightFormat already
        raise ValueError(f"pretrained_format={fmt!r} is unknown; use one of {[f.value for f in WeightFormat]}")
    hf_config = None
    if is_hf_folder(path):  # a Hugging Face model folder: config.json + model.safetensors
        hf_config, path = read_hf_folder(path)
    path = resolve_checkpoint(path)
    contents = load_weights_file(path)
    ours = "stage_window_sizes" in contents and isinstance(contents.get("config"), dict)  # a checkpoint or export
    if fmt == "auto":
        fmt = "simmim" if ours else detect_format(_model_weights(contents))
    if fmt == "reference":
        contents = {**contents, "model": convert_reference(_model_weights(contents))}
    elif fmt == "hf":
        contents = {"model": from_hf(_model_weights(contents))}
    state_dict = _model_weights(contents)
    weights = PretrainedWeights(state_dict=dict(state_dict), source_format=fmt, path=path)
    if any(key.startswith("encoder.") for key in state_dict):  # a SimMIM model: the decoder is set aside
        weights.state_dict = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        weights.decoder = {key: value for key, value in state_dict.items() if key.startswith("decoder.")}
        weights.dropped = {"SimMIM decoder": [key for key in state_dict if not key.startswith("encoder.")]}
    if ours:
        weights.model_config = dict(contents["config"]["model"])
        weights.stage_window_sizes = list(contents["stage_window_sizes"])
        weights.pretrained_window_sizes = contents.get("pretrained_window_sizes") or weights.model_config.get(
            "pretrained_window_sizes"
        )
        weights.extra = {k: contents[k] for k in ("step", "num_classes", "class_names") if k in contents}
    elif hf_config is not None:
        weights.stage_window_sizes, weights.pretrained_window_sizes = hf_windows(hf_config)
        weights.model_config = {"img_size": hf_config.get("image_size"), "window_size": hf_config.get("window_size")}
        if hf_config.get("id2label"):
            names = [hf_config["id2label"][str(i)] for i in range(len(hf_config["id2label"]))]
            weights.extra = {"num_classes": len(names), "class_names": names}
    else:
        found = windows_from_tables(weights.state_dict)
        if found is not None:
            weights.stage_window_sizes, weights.pretrained_window_sizes = found
    return weights


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture fields (arch, patch_size, in_chans, embed_dim, depths, num_heads, mlp_ratio, ape) from weights."""
    proj = state_dict.get("patch_embed.proj.weight")
    stages = _stage_ids(state_dict)
    if proj is None or not stages:
        sample = sorted(state_dict)[:_MAX_NAMES]
        raise ValueError(
            f"these weights are not a SwinV2 encoder: no patch_embed.proj.weight / layers.*.blocks.* (keys start "
            f"{sample}); pass a SimMIM, reference or timm swinv2 checkpoint"
        )
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    depths, num_heads = [], []
    for i in stages:
        blocks = {int(m.group(1)) for key in state_dict if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", key))}
        depths.append(max(blocks) + 1)
        scale = state_dict.get(f"layers.{i}.blocks.0.attn.logit_scale")
        if scale is None:
            raise ValueError(
                f"layers.{i}.blocks.0.attn.logit_scale is missing: not a SwinV2 checkpoint (a Swin V1 one has "
                "relative_position_bias_table instead); only SwinV2 weights transfer"
            )
        num_heads.append(scale.shape[0])
    fc1 = state_dict.get("layers.0.blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None else 4.0
    shape = (embed_dim, depths, num_heads)
    # any size name works (embed_dim / depths / num_heads override it); a matching one reads better in configs
    matches = [n for n, s in SWINV2_SIZES.items() if (s["embed_dim"], list(s["depths"]), list(s["num_heads"])) == shape]
    arch = matches[0] if matches else "tiny"
    return dict(
        arch=arch,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        ape="absolute_pos_embed" in state_dict,
    )


@dataclass
class TransferReport:
    """What a load did: keys loaded, dropped (by reason) and re-created (by reason)."""

    loaded: list[str]
    dropped: dict[str, list[str]]
    recreated: dict[str, list[str]]

    def summary(self) -> str:
        """A few lines for the terminal and the run log."""
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, groups in (("dropped", self.dropped), ("re-created", self.recreated)):
            for reason, keys in groups.items():
                if keys:
                    # per-block keys collapse to patterns (layers.*.blocks.*.attn.attn_mask)
                    shown = ", ".join(dict.fromkeys(re.sub(r"\.\d+(?=\.)", ".*", key) for key in keys))
                    lines.append(f"{title} ({reason}): {len(keys)}: {shown}")
        return "\n".join(lines)


def _match(
    model: SwinTransformerV2, state_dict: dict[str, torch.Tensor], keep_head: bool, source: str, advise: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], dict[str, list[str]], set[str]]:
    """(weights to load, dropped by reason, adapted by reason, expected keys); a ValueError names what does not fit."""
    weights: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    # an encoder with a mask token (SimMIM) takes the source's when it has one of the right shape, else keeps its own
    token = state_dict.get("mask_token", state_dict.get("encoder.mask_token"))
    fresh_mask_token = model.mask_token is not None and getattr(token, "shape", None) != model.mask_token.shape
    for key, value in state_dict.items():
        key = key.removeprefix("encoder.")  # a whole SimMIM state dict works too
        if is_derived_buffer(key):
            reason = "derived table, rebuilt for the new window"
        elif (key == "mask_token" and (model.mask_token is None or fresh_mask_token)) or key.startswith("decoder."):
            reason = "SimMIM only" if model.mask_token is None else "SimMIM mask token of another shape"
        elif key.startswith("head.") and not keep_head:
            reason = "classifier head, started fresh"
        else:
            weights[key] = value
            continue
        dropped.setdefault(reason, []).append(key)

    target = model.state_dict()  # derived tables are non-persistent buffers: not in here
    adapted = {}
    old, new = weights.get("patch_embed.proj.weight"), target["patch_embed.proj.weight"]
    if old is not None and old.shape != new.shape and old.shape[:1] + old.shape[2:] == new.shape[:1] + new.shape[2:]:
        # weights trained on another channel count (an RGB checkpoint fine-tuned on 1, 4 or 13 bands)
        weights["patch_embed.proj.weight"] = adapt_input_conv(new.shape[1], old)
        reason = f"patch embedding adapted from {old.shape[1]} to {new.shape[1]} input channels (timm adapt_input_conv)"
        adapted[reason] = ["patch_embed.proj.weight"]
    expected = {key for key in target if keep_head or not key.startswith("head.")}
    expected -= {"mask_token"} if fresh_mask_token else set()
    problems = {
        "missing": sorted(expected - set(weights)),
        "unexpected": sorted(set(weights) - expected),
        "mis-shaped": sorted(
            f"{key} {tuple(weights[key].shape)} vs {tuple(target[key].shape)}"
            for key in expected & set(weights)
            if weights[key].shape != target[key].shape
        ),
    }
    if any(problems.values()):
        hint = ""
        if any("relative_position_bias_table" in key for key in state_dict):
            hint = ". It looks like a Swin V1 checkpoint (relative_position_bias_table); only SwinV2 weights transfer"
        elif advise and (problems["mis-shaped"] or problems["unexpected"]):
            hint = ". Check the architecture (model.arch / embed_dim / depths / num_heads) against the checkpoint's"
        parts = []
        for title, keys in problems.items():
            if keys:
                more = f" and {len(keys) - _MAX_NAMES} more" if len(keys) > _MAX_NAMES else ""
                parts.append(f"{title} keys ({len(keys)}): {', '.join(keys[:_MAX_NAMES])}{more}")
        raise ValueError(f"{source} does not fit the model: {'; '.join(parts)}{hint}")
    return weights, dropped, adapted, expected


def load_encoder_weights(
    model: SwinTransformerV2, state_dict: dict[str, torch.Tensor], keep_head: bool = False, source: str = "checkpoint"
) -> TransferReport:
    """Load encoder weights strictly into `model` (any size / window); a ValueError names the keys that do not fit.
    Dropped: derived tables, the SimMIM decoder, a mask token it lacks or of another shape, head.* if not keep_head."""
    weights, dropped, adapted, expected = _match(model, state_dict, keep_head, source)
    target = model.state_dict()
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(target) - expected, result
    tables = sorted(name for name, _ in model.named_buffers() if is_derived_buffer(name))
    recreated = {"derived table for the new window": tables, **adapted}
    if not keep_head:
        recreated["fresh classifier head"] = sorted(key for key in target if key.startswith("head."))
    if "mask_token" in target and "mask_token" not in expected:
        recreated["fresh SimMIM mask token"] = ["mask_token"]
    return TransferReport(loaded=sorted(weights), dropped=dropped, recreated=recreated)


def reinit_cpb_mlp(model: SwinTransformerV2, seed: int = 0) -> list[str]:
    """Re-draw every CPB MLP as at init from `seed`, the global generators left as they were: the no-CPB ablation."""
    names = []
    # the CPU generator alone (torch.manual_seed would reseed CUDA too, which fork_rng(devices=[]) does not restore)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for name, module in model.named_modules():
            if isinstance(module, WindowAttention):
                module.cpb_mlp.apply(model._init_weights)  # timm's: trunc-normal 0.02 Linear weights, zero biases
                names.append(f"{name}.cpb_mlp")
    return names


def resolve_model_config(model_cfg: FinetuneModelConfig, pretrained: PretrainedWeights | None) -> ModelConfig:
    """The classifier's full ModelConfig: the user's non-null fields over what the pretrained weights say."""
    values: dict[str, Any] = to_dict(ModelConfig())
    values.update(arch=None, img_size=None, window_size=None, pretrained_window_sizes=None)
    if pretrained is not None:
        known = pretrained.model_config or {}
        values.update({key: known[key] for key in ("arch", "img_size", "window_size") if key in known})
        values.update(infer_architecture(pretrained.state_dict))
        if known.get("arch") in SWINV2_SIZES:  # keeps size-only settings (extra norms of huge / giant)
            values["arch"] = known["arch"]
        values["pretrained_window_sizes"] = pretrained.cpb_windows()  # 192 px / window 12 -> [12, 12, 12, 6]
    for key, value in to_dict(model_cfg).items():
        if value is not None or key == "fused_attn":
            values[key] = value
    for key, what in (("arch", "a size name"), ("img_size", "pixels"), ("window_size", "tokens")):
        if values[key] is None:
            raise ConfigError(
                f"model.{key} is not set and {'no pretrained weights' if pretrained is None else 'the checkpoint'}"
                f" does not give it; set model.{key}=<{what}>"
            )
    if pretrained is not None and values["pretrained_window_sizes"] is None:
        raise ConfigError(
            f"{pretrained.path} does not record the windows it was trained with; set model.pretrained_window_sizes"
            " to one window per stage (e.g. [12, 12, 12, 6] for 192 px / window 12) so the position bias transfers"
        )
    if values["arch"] not in SWINV2_SIZES:
        raise ConfigError(f"model.arch={values['arch']!r} is not a known size; choose one of {sorted(SWINV2_SIZES)}")
    sizes = size_fields(values["arch"], values["embed_dim"], values["depths"], values["num_heads"])
    if pretrained is not None and model_cfg.arch is not None:
        # the model is built from the weights: logs and the saved config would otherwise name another size
        named = size_fields(model_cfg.arch)
        mismatched = [f"{key} {sizes[key]} (not {named[key]})" for key in named if sizes[key] != named[key]]
        if mismatched:
            raise ConfigError(
                f"model.arch={model_cfg.arch} does not match the weights in {pretrained.path}: {'; '.join(mismatched)}."
                " Leave model.arch unset to take the checkpoint's size, or give a checkpoint of that size"
            )
    values.update(sizes)  # spelled out, so the saved config is complete
    return from_dict(ModelConfig, values, "model")


def build_classifier(
    model_cfg: ModelConfig,
    num_classes: int,
    pretrained: PretrainedWeights | None,
    keep_head: bool = False,
    verbose: bool = True,
) -> SwinTransformerV2:
    """The classifier at model_cfg's size and window, with the pretrained encoder (and head if keep_head) loaded."""
    model = build_encoder(**to_dict(model_cfg), num_classes=num_classes)
    if pretrained is not None:
        report = load_encoder_weights(model, pretrained.state_dict, keep_head=keep_head, source=str(pretrained.path))
        report.dropped = {**pretrained.dropped, **report.dropped}
        windows = f"windows {model.stage_window_sizes}, CPB normalised by {model.cpb_window_sizes}"
        if verbose:  # rank 0 of a multi-process job alone
            log.info(f"loaded {pretrained.source_format} weights from {pretrained.path} ({windows})")
            log.info(report.summary())
    return model


def _check_same_architecture(model_cfg: ModelConfig, pretrained: PretrainedWeights) -> None:
    """The configured encoder must have the weights' shape (only size, window and channels may change)."""
    found = infer_architecture(pretrained.state_dict)
    keys = ("embed_dim", "depths", "num_heads", "patch_size", "mlp_ratio", "ape")
    ours = to_dict(model_cfg) | size_fields(model_cfg.arch, model_cfg.embed_dim, model_cfg.depths, model_cfg.num_heads)
    differ = [key for key in keys if ours[key] != found[key]]
    if not differ:
        return  # load_encoder_weights names any key that still does not fit
    inferred = dataclasses.replace(model_cfg, arch=found["arch"], **{key: found[key] for key in keys})
    if not _misfit(inferred, pretrained):  # the advice below is checked before it is given
        fix = " ".join(f"model.{key}={found[key]}".replace(" ", "") for key in ["arch", *differ])
        raise ConfigError(
            f"init_from={pretrained.path} holds a different encoder: "
            + "; ".join(f"{key} {found[key]} (configured {ours[key]})" for key in differ)
            + f". Configure its architecture: {fix}"
        )
    # the shapes contradict each other (e.g. widths that fit no single embed_dim / mlp_ratio): no setting fits
    raise ConfigError(
        f"init_from={pretrained.path} does not fit the configured encoder (model.arch={model_cfg.arch}), and no "
        f"SwinV2 architecture fits all of its tensors (a damaged or edited file?): {_misfit(model_cfg, pretrained)}"
    )


def _misfit(model_cfg: ModelConfig, pretrained: PretrainedWeights) -> str:
    """Why the weights do not fit the encoder model_cfg builds, or ''; on the meta device: a giant costs no memory."""
    with torch.device("meta"):
        encoder = build_encoder(**to_dict(model_cfg), num_classes=0)
    try:
        _match(encoder, pretrained.state_dict, keep_head=False, source=str(pretrained.path), advise=False)
    except ValueError as e:
        return str(e)
    return ""


def resolve_init_from(
    model_cfg: ModelConfig, path: str | Path, fmt: str = "auto"
) -> tuple[ModelConfig, PretrainedWeights]:
    """The weights a new pretraining run starts from, and the model config (the CPB windows of the source's training,
    unless set) to build for them: only image size, window and channel count may differ from the source's."""
    pretrained = load_pretrained(path, fmt)
    _check_same_architecture(model_cfg, pretrained)
    if model_cfg.pretrained_window_sizes is None and pretrained.cpb_windows() is not None:
        model_cfg = dataclasses.replace(model_cfg, pretrained_window_sizes=pretrained.cpb_windows())
    return model_cfg, pretrained


def load_simmim_weights(model: SimMIM, pretrained: PretrainedWeights) -> TransferReport:
    """Load an encoder strictly, and the mask token and decoder when present and of the right shape, into SimMIM."""
    report = load_encoder_weights(model.encoder, pretrained.state_dict, source=str(pretrained.path))
    report.dropped = {**pretrained.dropped, **report.dropped}
    target = model.decoder.state_dict()
    decoder = {key.removeprefix("decoder."): value for key, value in pretrained.decoder.items()}
    if decoder and set(decoder) == set(target) and all(decoder[k].shape == target[k].shape for k in target):
        model.decoder.load_state_dict(decoder)
        report.loaded += sorted(pretrained.decoder)
        report.dropped.pop("SimMIM decoder", None)
    else:
        reason = "fresh SimMIM decoder" + (" (the source's has another shape)" if decoder else "")
        report.recreated[reason] = sorted(f"decoder.{key}" for key in target)
    return report
