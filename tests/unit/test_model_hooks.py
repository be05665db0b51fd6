"""The models' timm hooks (no_weight_decay, group_matcher): timm's optimizer factory gives exactly the parameter
groups of the layer-decay and weight-decay rules (docs/reference.md), written out here independently as the oracle."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from typing import Any

import pytest
import timm.optim
from torch import nn

from simmim_swin.models import build_encoder, build_simmim

NO_WEIGHT_DECAY = ("*absolute_pos_embed", "*mask_token", "*cpb_mlp.*", "*logit_scale")


def reference_layer_id(name: str, depths: Sequence[int]) -> int:
    """Patch embedding 0; block j of stage i -> sum(depths[:i]) + j + 1; the merging stored as layers.{i+1}.downsample
    shares stage i's last block id; everything else (final norm, head, position embedding, decoder) sum(depths) + 1."""
    name = re.sub(r"^(?:module\.|_orig_mod\.|encoder\.)+", "", name)
    if name.startswith("patch_embed."):
        return 0
    if match := re.match(r"layers\.(\d+)\.(?:blocks|extra_norms)\.(\d+)\.", name):
        return sum(depths[: int(match.group(1))]) + int(match.group(2)) + 1
    if match := re.match(r"layers\.(\d+)\.downsample\.", name):
        return sum(depths[: int(match.group(1))])
    return sum(depths) + 1


def layer_decay_param_groups(
    model: nn.Module, depths: Sequence[int], weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Groups per (layer id, decay or not), lr_scale = layer_decay^(num_layers - 1 - id), num_layers = sum + 2."""
    num_layers = sum(depths) + 2
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in NO_WEIGHT_DECAY)
        lid = reference_layer_id(name, depths)
        scale = layer_decay ** (num_layers - 1 - lid)
        group = groups.setdefault(
            (lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        )
        group["params"].append(param)
    return list(groups.values())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Pretraining: one group with weight decay, one without (1-D parameters, biases, the names above)."""
    groups = layer_decay_param_groups(model, [0], weight_decay, 1.0)
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


WEIGHT_DECAY = 0.05

# (arch, keyword overrides): 3 and 4 stages, uneven depths, absolute position embedding, extra norms (huge/giant)
CONFIGS = [
    ("pico", dict(img_size=32, window_size=4)),
    ("nano", dict(img_size=64, window_size=4, depths=[2, 3, 1, 2], ape=True)),
    ("nano", dict(img_size=64, window_size=4, extra_norm_every=1)),
]


def _groups(groups: list[dict]) -> list[tuple[frozenset[int], float, float]]:
    """(parameter ids, weight_decay, lr_scale) per group, sorted, for an order-free comparison."""
    out = [
        (frozenset(id(p) for p in g["params"]), float(g["weight_decay"]), round(float(g.get("lr_scale", 1.0)), 12))
        for g in groups
        if g["params"]
    ]
    return sorted(out, key=lambda g: (g[2], g[1], min(g[0])))


def _names(model: nn.Module, ids: frozenset[int]) -> set[str]:
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _assert_same_groups(model: nn.Module, ours: list[dict], timms: list[dict]) -> None:
    ours_g, timm_g = _groups(ours), _groups(timms)
    assert len(ours_g) == len(timm_g), ([(sorted(_names(model, g[0])), g[1:]) for g in ours_g], timm_g)
    for a, b in zip(ours_g, timm_g):
        assert a == b, (sorted(_names(model, a[0])), a[1:], sorted(_names(model, b[0])), b[1:])


@pytest.mark.parametrize(("arch", "kwargs"), CONFIGS)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_layer_decay_groups_match_timms_factory(arch: str, kwargs: dict, num_classes: int) -> None:
    model = build_encoder(arch, num_classes=num_classes, **kwargs)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=WEIGHT_DECAY, layer_decay=0.75)
    ours = layer_decay_param_groups(model, model.depths, WEIGHT_DECAY, 0.75)
    _assert_same_groups(model, ours, optimizer.param_groups)
    # the layer ids themselves: patch embedding 0 ... final norm and head at sum(depths) + 1
    num_layers = sum(model.depths) + 2
    scales = {round(g["lr_scale"], 12) for g in optimizer.param_groups}
    assert scales == {round(0.75 ** (num_layers - 1 - i), 12) for i in range(num_layers)}


def test_layer_ids_of_named_parameters() -> None:
    model = build_encoder("nano", img_size=64, window_size=4, depths=[2, 3, 1, 2], num_classes=10)
    layer_id = model.group_matcher()
    assert layer_id("patch_embed.proj.weight") == 0
    assert layer_id("layers.0.blocks.1.attn.qkv.weight") == 2
    assert layer_id("layers.1.downsample.reduction.weight") == 2  # stage 0's merging: stage 0's last block
    assert layer_id("layers.1.blocks.0.mlp.fc1.weight") == 3
    assert layer_id("layers.3.downsample.norm.weight") == 2 + 3 + 1
    assert layer_id("layers.3.blocks.1.norm1.bias") == 8
    assert layer_id("norm.weight") == layer_id("head.fc.weight") == 9
    coarse = model.group_matcher(coarse=True)
    assert [coarse(n) for n in ("patch_embed.proj.weight", "layers.2.blocks.0.attn.proj.weight", "head.fc.bias")] == [
        0,
        3,
        5,
    ]


@pytest.mark.parametrize(("arch", "kwargs"), CONFIGS)
def test_simmim_layer_decay_groups_match(arch: str, kwargs: dict) -> None:
    model = build_simmim(arch, **kwargs)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=WEIGHT_DECAY, layer_decay=0.75)
    ours = layer_decay_param_groups(model, model.encoder.depths, WEIGHT_DECAY, 0.75)
    _assert_same_groups(model, ours, optimizer.param_groups)
    top = [g for g in optimizer.param_groups if math.isclose(g["lr_scale"], 1.0)]
    top_ids = {id(p) for g in top for p in g["params"]}
    assert {id(p) for p in model.decoder.parameters()} <= top_ids
    assert id(model.encoder.mask_token) in top_ids


@pytest.mark.parametrize(("arch", "kwargs"), CONFIGS)
@pytest.mark.parametrize("simmim", [False, True])
def test_pretraining_groups_match_without_layer_decay(arch: str, kwargs: dict, simmim: bool) -> None:
    model = build_simmim(arch, **kwargs) if simmim else build_encoder(arch, **kwargs)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=WEIGHT_DECAY)
    ours = param_groups(model, WEIGHT_DECAY)
    _assert_same_groups(model, ours, optimizer.param_groups)
    assert len(optimizer.param_groups) == 2  # decay and no decay
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = _names(model, frozenset(no_decay))
    # the >= 2-D exclusions: cpb_mlp (which the reference code decays by a name slip) and logit_scale
    assert any("cpb_mlp.0.weight" in n for n in names) and any(n.endswith("logit_scale") for n in names)
    assert ("encoder.mask_token" in names) == simmim
    assert not any(n.endswith("qkv.weight") or n.endswith("fc1.weight") for n in names)


def test_frozen_parameters_are_left_out() -> None:
    model = build_encoder("pico", img_size=32, window_size=4, num_classes=3)
    model.patch_embed.requires_grad_(False)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=WEIGHT_DECAY, layer_decay=0.75)
    ours = layer_decay_param_groups(model, model.depths, WEIGHT_DECAY, 0.75)
    _assert_same_groups(model, ours, optimizer.param_groups)
    assert not any(p is model.patch_embed.proj.weight for g in optimizer.param_groups for p in g["params"])
