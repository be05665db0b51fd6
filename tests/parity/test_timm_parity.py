"""Parity with timm's swinv2 on converted weights (reference §1: same outputs for converted weights)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2  # noqa: E402

import simmim_swin  # noqa: E402
from simmim_swin.models.swinv2 import SwinTransformerV2  # noqa: E402

TOL = 1e-5

TINY_256 = dict(
    img_size=256, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8, num_classes=1000
)
CUSTOM_224 = dict(
    img_size=224,
    embed_dim=32,
    depths=(2, 2, 2, 2),
    num_heads=(2, 4, 8, 16),
    window_size=14,
    pretrained_window_sizes=(12, 12, 12, 6),
    num_classes=11,
)
# 32 px: a stage with a shift, clipped windows and a 1x1 last stage
SMALL_32 = dict(img_size=32, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=4, num_classes=5)


def _timm_model(config: dict) -> torch.nn.Module:
    if config is TINY_256:
        return timm.create_model("swinv2_tiny_window8_256", pretrained=False, drop_path_rate=0.0).eval()
    return TimmSwinV2(**config, drop_path_rate=0.0).eval()


def _ours(config: dict, fused: bool) -> torch.nn.Module:
    model = SwinTransformerV2(**config, drop_path_rate=0.0, fused_attn=fused).eval()
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "sdpa"])
@pytest.mark.parametrize(
    "config",
    [pytest.param(TINY_256, marks=pytest.mark.slow), CUSTOM_224, SMALL_32],  # the 28M-parameter tiny: slow
    ids=["tiny_w8_256", "custom_w14_224", "small_32"],
)
def test_forward_matches_timm(config, fused, randomize) -> None:
    ref = randomize(_timm_model(config))  # post-norms away from 0 so the blocks are not the identity
    ours = _ours(config, fused)
    ours.load_state_dict(simmim_swin.from_timm(ref.state_dict()), strict=True)
    size = config["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref_feats, our_feats = ref.forward_features(x), ours.forward_features(x)
        ref_logits, our_logits = ref.forward_head(ref_feats), ours(x)
    assert our_feats.shape == ref_feats.shape
    assert _max_diff(our_feats, ref_feats) <= TOL, _max_diff(our_feats, ref_feats)
    assert our_logits.shape == ref_logits.shape
    assert _max_diff(our_logits, ref_logits) <= TOL, _max_diff(our_logits, ref_logits)
    assert ref_feats.std() > 0.5  # a meaningful signal, not a collapsed output


def test_stage_windows_match_timm() -> None:
    ref = _timm_model(CUSTOM_224)
    ours = _ours(CUSTOM_224, fused=False)
    for ref_layer, our_layer in zip(ref.layers, ours.layers, strict=True):
        for ref_blk, our_blk in zip(ref_layer.blocks, our_layer.blocks, strict=True):
            assert tuple(our_blk.window_size) == tuple(ref_blk.window_size)
            assert tuple(our_blk.shift_size) == tuple(ref_blk.shift_size)


@pytest.mark.parametrize("config", [TINY_256, CUSTOM_224], ids=["tiny_w8_256", "custom_w14_224"])
def test_state_dict_round_trip(config, randomize) -> None:
    ref = randomize(_timm_model(config))
    sd = ref.state_dict()
    converted = simmim_swin.from_timm(sd)
    back = simmim_swin.to_timm(converted)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
    fresh = _timm_model(config)
    fresh.load_state_dict(back, strict=True)


def test_our_weights_load_into_timm(randomize) -> None:
    ours = randomize(_ours(SMALL_32, fused=False))
    ref = _timm_model(SMALL_32)
    ref.load_state_dict(simmim_swin.to_timm(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL


def test_gradients_match_timm(randomize) -> None:
    ref = randomize(_timm_model(SMALL_32))
    ours = _ours(SMALL_32, fused=False)
    ours.load_state_dict(simmim_swin.from_timm(ref.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    ref(x).square().sum().backward()
    ours(x).square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_from_timm_drops_derived_tables(randomize) -> None:
    """Original checkpoints carry the coords table, position index and shift mask; they are rebuilt, not loaded."""
    ref = randomize(_timm_model(SMALL_32))
    sd = dict(ref.state_dict())
    blk = "layers.0.blocks.1"
    sd[f"{blk}.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    sd[f"{blk}.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    sd[f"{blk}.attn_mask"] = torch.zeros(4, 16, 16)
    ours = _ours(SMALL_32, fused=False)
    ours.load_state_dict(simmim_swin.from_timm(sd), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL


def test_simmim_encoder_exports_to_timm(randomize) -> None:
    """A SimMIM state dict converts to a headless timm model: encoder. prefix, mask_token and decoder dropped."""
    from simmim_swin.models.simmim import SimMIM

    config = {**SMALL_32, "num_classes": 0}
    model = randomize(SimMIM(_ours(config, fused=False), norm_target=None)).eval()
    ref = _timm_model(config)
    ref.load_state_dict(simmim_swin.to_timm(model.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(model.encoder.forward_features(x), ref.forward_features(x)) <= TOL
