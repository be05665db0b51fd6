"""Multi-scale feature maps (timm's forward_intermediates / features_only) at any size, square or not."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from simmim_swin.models.swinv2 import SwinTransformerV2, create_swinv2, to_timm


def _randomized(model: SwinTransformerV2, seed: int = 0) -> SwinTransformerV2:
    """Non-trivial weights (the res-post-norm init zeroes every block's norms, which would hide attention bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def test_intermediates_shapes_and_last_map_equals_forward_features() -> None:
    model = _randomized(create_swinv2("nano", img_size=64, window_size=4, num_classes=0))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last, feats = model.forward_intermediates(x, norm=True)
        plain = model.forward_intermediates(x, intermediates_only=True)
        final = model.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert [info["num_chs"] for info in model.feature_info] == [32, 64, 128, 256]
    torch.testing.assert_close(feats[-1], final.permute(0, 3, 1, 2))  # norm=True: the final norm on the last map
    torch.testing.assert_close(last, final)
    assert not torch.allclose(plain[-1], feats[-1])  # without norm the last map is the raw stage output
    for a, b in zip(plain[:-1], feats[:-1], strict=True):
        torch.testing.assert_close(a, b)


def test_indices_select_stages_and_stop_early() -> None:
    model = _randomized(create_swinv2("nano", img_size=64, window_size=4, num_classes=0))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        some = model.forward_intermediates(x, indices=[0, 2], stop_early=True, intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(some, [every[0], every[2]])
    torch.testing.assert_close(last_two, every[2:])


@pytest.mark.parametrize(
    ("built", "run", "window"),
    [
        ((64, 64), (96, 160), [8, 4, 2]),  # non-square, 96 x 160: stage maps (24, 40), (12, 20), (6, 10)
        ((96, 160), (64, 64), [8, 4, 2]),
        ((32, 32), (64, 128), 4),  # 32 px: stage 1 one unshifted window; 64 x 128: shifted ones
    ],
)
def test_features_at_another_size_match_a_model_built_there(built, run, window) -> None:
    """Windows are clipped and shift masks built for the actual size, without rebuilding the model."""
    kwargs = dict(patch_size=4, window_size=window, num_classes=0)
    model = _randomized(create_swinv2("pico", img_size=built, **kwargs))
    there = create_swinv2("pico", img_size=run, **kwargs).eval()
    there.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, *run)
    with torch.no_grad():
        ours = model.forward_intermediates(x, intermediates_only=True)
        reference = there.forward_intermediates(x, intermediates_only=True)
        again = model.forward_intermediates(x, intermediates_only=True)  # the second call uses the cached tables
    assert [f.shape[-2:] for f in ours] == [(run[0] // 4 // 2**i, run[1] // 4 // 2**i) for i in range(3)]
    for a, b, c in zip(ours, reference, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    # and the model still computes its own size with the tables it was built with
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, *built))


def test_tables_are_cached_per_size_not_rebuilt_each_call() -> None:
    model = create_swinv2("pico", img_size=32, window_size=4, num_classes=0).eval()
    block = model.layers[2].blocks[1]
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 64, 64))
        first = dict(block._other_sizes), dict(block.attn._other_tables)
        model.forward_features(torch.randn(1, 3, 64, 64))
    assert set(block._other_sizes) == {(4, 4)}
    assert block._other_sizes[(4, 4)] is first[0][(4, 4)]
    assert block.attn._other_tables[(4, 4)] is first[1][(4, 4)]


def test_unfit_input_size_names_the_fix() -> None:
    model = create_swinv2("pico", img_size=32, window_size=4, num_classes=0)
    with pytest.raises(ValueError, match=r"divisible by patch_size \* 2\*\*\(stages-1\) = 16"):
        model.forward_intermediates(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="not divisible by window"):
        model.forward_features(torch.randn(1, 3, 48, 80))  # stage 1 map (6, 10) is no multiple of window 4


def test_timm_features_only_equals_ours_on_exported_weights(tmp_path) -> None:
    """timm.create_model(..., features_only=True) on our timm-layout weights gives our stage maps."""
    model = _randomized(create_swinv2("nano", img_size=64, window_size=4, num_classes=0))
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in to_timm(model.state_dict()).items()}, str(path))
    features = timm.create_model(
        "swinv2_tiny_window8_256", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
        features_only=True, img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = features(x)  # timm's swinv2 feature maps are NHWC
        ours = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert features.feature_info.channels() == [f["num_chs"] for f in model.feature_info]
    for a, b in zip(theirs, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra", [dict(ape=True), dict(extra_norm_every=1)])
def test_models_timm_cannot_hold_are_refused_naming_the_key(extra) -> None:
    model = create_swinv2("pico", img_size=32, window_size=4, num_classes=0, **extra)
    with pytest.raises(ValueError, match=r"(absolute_pos_embed|extra_norms\.0\.weight) has no place in timm"):
        to_timm(model.state_dict())
