"""SwinV2 encoder against docs/reference.md §1 and §4: CPB tables, shift masks, window clipping, init, block form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import gen_relative_position_index
from torch import nn

from simmim_swin.models.swinv2 import (
    SWINV2_SIZES,
    SwinTransformerV2,
    WindowAttention,
    create_swinv2,
    make_relative_coords_table,
    make_shift_attn_mask,
    window_partition,
    window_reverse,
)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [blk for layer in model.layers for blk in layer.blocks]


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# ---------------------------------------------------------------- continuous position bias tables (reference §4)


@pytest.mark.parametrize(
    ("window", "pretrained", "expected_max"),
    [
        (2, 0, math.log2(9) / 3),
        (7, 0, math.log2(9) / 3),
        (12, 0, math.log2(9) / 3),
        (16, 0, 1.056642),
        (14, 12, 1.128686),
        (16, 12, 1.191330),
        (24, 12, 1.382633),
        (7, 6, 1.135331),
    ],
)
def test_coords_table_maximum(window: int, pretrained: int, expected_max: float) -> None:
    table = make_relative_coords_table((window, window), (pretrained, pretrained))
    assert table.shape == (2 * window - 1, 2 * window - 1, 2)
    assert table.is_floating_point()
    assert table.abs().max().item() == pytest.approx(expected_max, abs=1e-6)


@pytest.mark.parametrize("window", [8, 12, 14, 16, 24])
def test_coords_table_small_offsets_fixed_by_pretrained_window(window: int) -> None:
    table = make_relative_coords_table((window, window), (12, 12))
    centre = window - 1  # index of offset 0
    for axis in (0, 1):
        for offset, expected in ((1, 0.262832), (2, 0.431819)):
            for sign in (1, -1):
                idx = [centre, centre]
                idx[axis] = centre + sign * offset
                assert table[idx[0], idx[1], axis].item() == pytest.approx(sign * expected, abs=1e-6)
                assert table[idx[0], idx[1], 1 - axis].item() == 0.0


@pytest.mark.parametrize(("window", "pretrained"), [(3, 0), (7, 0), (7, 6), (14, 12), (5, 8)])
def test_coords_table_matches_formula_in_ij_order(window, pretrained, reference_tables) -> None:
    ref_table, _ = reference_tables
    table = make_relative_coords_table((window, window), (pretrained, pretrained))
    torch.testing.assert_close(table.double(), ref_table(window, pretrained), atol=1e-6, rtol=0)
    # 'ij': channel 0 (dy) varies along rows only, channel 1 (dx) along columns only
    assert torch.equal(table[:, :1, 0].expand(-1, 2 * window - 1), table[:, :, 0])
    assert torch.equal(table[:1, :, 1].expand(2 * window - 1, -1), table[:, :, 1])
    assert table[0, 0, 0] < 0 and table[-1, 0, 0] > 0


@pytest.mark.parametrize(("window", "pretrained"), [(1, 0), (1, 6), (2, 1), (4, 0), (7, 6), (14, 12)])
def test_attention_buffers_are_the_tables(window: int, pretrained: int) -> None:
    """The tables a module builds for its own window are the functions' values (which serve other windows)."""
    attn = WindowAttention(dim=8, num_heads=2, window_size=(window, window), pretrained_window_size=(pretrained,) * 2)
    expected = make_relative_coords_table((window, window), (pretrained, pretrained))
    assert torch.equal(attn.relative_coords_table.reshape(expected.shape), expected)
    assert torch.equal(attn.relative_position_index, gen_relative_position_index((window, window)))
    for other in (window + 1, 2 * window + 3):  # a window the module was not built for: the functions' values
        bias = attn.position_bias((other, other))
        assert bias.shape == (2, other * other, other * other) and torch.isfinite(bias).all()


@pytest.mark.parametrize("pretrained", [0, 6, 12])
def test_window_of_one_gives_finite_zero_table(pretrained: int) -> None:
    table = make_relative_coords_table((1, 1), (pretrained, pretrained))
    assert table.shape == (1, 1, 2)
    assert torch.isfinite(table).all()
    assert torch.equal(table, torch.zeros_like(table))


def test_relative_position_index_window_12() -> None:
    index = gen_relative_position_index((12, 12))
    assert index.shape == (144, 144)
    assert index.dtype == torch.long
    assert index.min().item() == 0
    assert index.max().item() == 528
    assert index[0, 0].item() == 264
    assert index[0, 1].item() == 263
    assert index[1, 0].item() == 265


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_relative_position_index_matches_loops(window, reference_tables) -> None:
    _, ref_index = reference_tables
    assert torch.equal(gen_relative_position_index((window, window)), ref_index(window))


# ---------------------------------------------------------------- windows and shift masks


def test_window_partition_order_and_round_trip() -> None:
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, (4, 3))
    assert windows.shape == (2 * 2 * 4, 4, 3, 3)
    # window k = b * nW + row * nW_cols + col, row-major over the window grid
    assert torch.equal(windows[0], x[0, 0:4, 0:3])
    assert torch.equal(windows[1], x[0, 0:4, 3:6])
    assert torch.equal(windows[4], x[0, 4:8, 0:3])
    assert torch.equal(windows[8 + 7], x[1, 4:8, 9:12])
    assert torch.equal(window_reverse(windows, (4, 3), (8, 12)), x)


def _reference_shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """reference §1 region labelling: 3x3 regions cut at [0, -W), [-W, -shift), [-shift, end) on each axis."""
    cuts = [(0, size - window), (size - window, size - shift), (size - shift, size)]
    labels = torch.zeros(size, size, dtype=torch.long)
    for r, (y0, y1) in enumerate(cuts):
        for c, (x0, x1) in enumerate(cuts):
            labels[y0:y1, x0:x1] = 3 * r + c
    n = size // window
    mask = torch.zeros(n * n, window * window, window * window)
    for wy in range(n):
        for wx in range(n):
            lab = labels[wy * window : (wy + 1) * window, wx * window : (wx + 1) * window].reshape(-1)
            mask[wy * n + wx] = (lab[:, None] != lab[None, :]).float() * -100.0
    return mask


@pytest.mark.parametrize(
    ("size", "window", "shift", "num_windows", "nonzero", "first", "last"),
    [
        (48, 12, 6, 16, 77_760, 0, 15_552),
        (56, 14, 7, 16, 144_060, 0, None),
        (64, 16, 8, 16, 245_760, 0, None),
        (48, 6, 3, 64, 10_044, 0, None),
    ],
)
def test_shift_mask_counts(size, window, shift, num_windows, nonzero, first, last) -> None:
    mask = make_shift_attn_mask((size, size), (window, window), (shift, shift))
    n = window * window
    assert mask.shape == (num_windows, n, n)
    assert mask.is_floating_point()
    values = set(mask.unique().tolist())
    assert values <= {0.0, -100.0}
    assert int((mask != 0).sum()) == nonzero
    assert int((mask[0] != 0).sum()) == first
    if last is not None:
        assert int((mask[-1] != 0).sum()) == last
    assert torch.equal(mask, mask.transpose(1, 2))


@pytest.mark.parametrize(("size", "window", "shift"), [(8, 4, 2), (12, 4, 2), (9, 3, 1)])
def test_shift_mask_matches_region_labelling(size, window, shift) -> None:
    mask = make_shift_attn_mask((size, size), (window, window), (shift, shift))
    torch.testing.assert_close(mask.float(), _reference_shift_mask(size, window, shift), atol=0, rtol=0)


# ---------------------------------------------------------------- window attention


def _attention(dim=32, heads=4, window=4, pretrained=0, **kwargs) -> WindowAttention:
    attn = WindowAttention(
        dim=dim,
        num_heads=heads,
        window_size=(window, window),
        pretrained_window_size=(pretrained, pretrained),
        **kwargs,
    )
    with torch.no_grad():
        attn.q_bias.normal_(0, 0.3)
        attn.v_bias.normal_(0, 0.3)
        attn.qkv.weight.normal_(0, 0.3)
    return attn.eval()


def test_window_attention_structure() -> None:
    attn = WindowAttention(dim=32, num_heads=4, window_size=(4, 4), fused_attn=False)
    assert attn.qkv.in_features == 32 and attn.qkv.out_features == 96
    assert attn.qkv.bias is None  # q and v carry their own biases, k none
    assert attn.q_bias.shape == (32,) and attn.v_bias.shape == (32,)
    assert "k_bias" not in dict(attn.named_parameters())
    assert attn.logit_scale.shape == (4, 1, 1)
    fc1, relu, fc2 = attn.cpb_mlp
    assert (fc1.in_features, fc1.out_features) == (2, 512) and fc1.bias is not None
    assert isinstance(relu, nn.ReLU)
    assert (fc2.in_features, fc2.out_features) == (512, 4) and fc2.bias is None
    assert attn.proj.in_features == 32 and attn.proj.out_features == 32 and attn.proj.bias is not None
    state = attn.state_dict()
    for derived in ("relative_coords_table", "relative_position_index"):
        assert hasattr(attn, derived)
        assert derived not in state, f"{derived} must be a non-persistent buffer"


@pytest.mark.parametrize(
    ("window", "pretrained", "with_mask"), [(4, 0, False), (4, 0, True), (4, 6, True), (3, 2, False)]
)
def test_window_attention_matches_reference(window, pretrained, with_mask, reference_attention) -> None:
    attn = _attention(window=window, pretrained=pretrained, fused_attn=False)
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1))
    size = 2 * window
    mask = make_shift_attn_mask((size, size), (window, window), (window // 2, window // 2)) if with_mask else None
    x = torch.randn(2 * 4, window * window, 32)
    got = attn(x, mask)
    expected = reference_attention(attn, x, window, pretrained, mask)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_logit_scale_clamped_at_ln_100(reference_attention) -> None:
    attn = _attention(fused_attn=False)
    with torch.no_grad():
        attn.logit_scale.fill_(10.0)
    x = torch.randn(4, 16, 32)
    got = attn(x, None)
    torch.testing.assert_close(got, reference_attention(attn, x, 4, logit_cap=math.log(100)), atol=1e-5, rtol=1e-5)
    # the clamp must matter here: without it the scale would be e^10, not 100
    unclamped = reference_attention(attn, x, 4, logit_cap=None)
    assert (got - unclamped).abs().max() > 1e-3


def test_window_of_one_attention_is_finite() -> None:
    attn = WindowAttention(dim=16, num_heads=2, window_size=(1, 1), fused_attn=False)
    x = torch.randn(5, 1, 16, requires_grad=True)
    out = attn(x, None)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)


# ---------------------------------------------------------------- stages: window clipping and shifts


@pytest.mark.parametrize(
    ("img_size", "window", "expected"),
    [
        (192, 12, [(12, 6), (12, 6), (12, 0), (6, 0)]),
        (224, 14, [(14, 7), (14, 7), (14, 0), (7, 0)]),
    ],
)
def test_stage_windows_and_shifts(img_size, window, expected) -> None:
    model = SwinTransformerV2(
        img_size=img_size,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=window,
        num_classes=0,
        drop_path_rate=0.0,
    )
    assert list(model.stage_window_sizes) == [w for w, _ in expected]
    for layer, (w, shift) in zip(model.layers, expected, strict=True):
        for j, blk in enumerate(layer.blocks):
            assert _as_tuple(blk.window_size) == (w, w)
            assert _as_tuple(blk.shift_size) == ((0, 0) if j % 2 == 0 else (shift, shift)), f"block {j}"


@pytest.mark.parametrize("batch", [1, 2])
def test_non_square_image_builds_and_runs(batch) -> None:
    """64x128 px, window 4: the third stage's 4x8 map is one window high and two wide."""
    model = SwinTransformerV2(
        img_size=(64, 128), embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, num_classes=3
    ).eval()
    feats = model.forward_features(torch.randn(batch, 3, 64, 128))
    assert feats.shape == (batch, 2, 4, 128)
    assert torch.isfinite(feats).all()


def test_non_square_stage_clipping_follows_min_resolution() -> None:
    """Reference §1: if min(stage resolution) <= window, the stage uses window min(resolution), shift 0 (both axes)."""
    model = SwinTransformerV2(
        img_size=(64, 128), embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, num_classes=0
    )
    # stage maps (16, 32), (8, 16), (4, 8), (2, 4)
    expected = [((4, 4), (2, 2)), ((4, 4), (2, 2)), ((4, 4), (0, 0)), ((2, 2), (0, 0))]
    for layer, (window, shift) in zip(model.layers, expected, strict=True):
        assert _as_tuple(layer.blocks[1].window_size) == window
        assert _as_tuple(layer.blocks[1].shift_size) == shift


def test_base_depths_at_192_window_12() -> None:
    model = create_swinv2("base", img_size=192, window_size=12, embed_dim=16, num_heads=(1, 2, 4, 8), num_classes=0)
    assert [len(layer.blocks) for layer in model.layers] == [2, 2, 18, 2]
    assert list(model.stage_window_sizes) == [12, 12, 12, 6]
    shifts = [_as_tuple(blk.shift_size)[0] for blk in model.layers[2].blocks]
    assert shifts == [0] * 18  # the 12x12 stage fits one window: no shift in any block


def test_clipped_stage_keeps_pretrained_window(reference_tables) -> None:
    """A stage clipped from 12 to 6 keeps normalising its offsets by the pretrained window 12, not by 6."""
    ref_table, _ = reference_tables
    model = SwinTransformerV2(
        img_size=192,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=12,
        pretrained_window_sizes=(12, 12, 12, 12),
        num_classes=0,
    )
    table = model.layers[3].blocks[0].attn.relative_coords_table
    torch.testing.assert_close(table.reshape(11, 11, 2).double(), ref_table(6, 12), atol=1e-6, rtol=0)


def test_stage_widths_and_resolutions(tiny_encoder) -> None:
    model = tiny_encoder(img_size=64, window_size=4)
    x = torch.randn(2, 3, 64, 64)
    resolutions = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, store=resolutions: store.append(tuple(o.shape)))
        for layer in model.layers
    ]
    model.forward_features(x)
    for h in hooks:
        h.remove()
    # (B, H', W', C) per stage: 16, 8, 4, 2 tokens; width 16 * 2^i
    assert resolutions == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]


# ---------------------------------------------------------------- init (reference §1 and §4)


def test_init_values() -> None:
    model = SwinTransformerV2(
        img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4, num_classes=10
    )
    blocks = _blocks(model)
    post_norms = set()
    for blk in blocks:
        for norm in (blk.norm1, blk.norm2):
            post_norms.add(id(norm))
            assert torch.equal(norm.weight, torch.zeros_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
        attn = blk.attn
        heads = attn.logit_scale.shape[0]
        torch.testing.assert_close(attn.logit_scale, torch.full((heads, 1, 1), math.log(10)))
        assert torch.equal(attn.q_bias, torch.zeros_like(attn.q_bias))
        assert torch.equal(attn.v_bias, torch.zeros_like(attn.v_bias))
        k_bias = getattr(attn, "k_bias", None)
        if isinstance(k_bias, torch.Tensor):
            assert torch.equal(k_bias, torch.zeros_like(k_bias))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            assert w.std().item() == pytest.approx(0.02, rel=0.2), name
            assert abs(w.mean().item()) < 0.005, name
            if module.bias is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.LayerNorm) and id(module) not in post_norms:
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name


def test_drop_path_rates_rise_linearly() -> None:
    model = SwinTransformerV2(
        img_size=32, embed_dim=16, depths=(2, 1, 3, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.3
    )
    expected = torch.linspace(0, 0.3, 8).tolist()
    rates = []
    for blk in _blocks(model):
        found = None
        for attr in ("drop_path1", "drop_path2", "drop_path"):
            module = getattr(blk, attr, None)
            if module is None:
                continue
            rate = 0.0 if isinstance(module, nn.Identity) else getattr(module, "drop_prob", None)
            if rate is None:
                continue
            assert found is None or found == pytest.approx(rate), "both residual branches share the block's rate"
            found = rate
        if found is None:
            pytest.skip("blocks expose no drop_path1/drop_path2 module with a drop_prob")
        rates.append(found)
    assert rates == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- block form: res-post-norm


def _record_blocks(model: nn.Module) -> tuple[list, list]:
    """Forward hooks on every block that store (input, output)."""
    records, handles = [], []
    for blk in _blocks(model):
        hook = blk.register_forward_hook(lambda m, args, out, s=records: s.append((args[0].detach(), out.detach())))
        handles.append(hook)
    return records, handles


def test_blocks_are_identity_at_init(tiny_encoder) -> None:
    model = tiny_encoder(img_size=64)
    records, handles = _record_blocks(model)
    model.forward_features(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(records) == 8
    for x_in, x_out in records:
        torch.testing.assert_close(x_out, x_in, atol=0, rtol=0)


@pytest.mark.parametrize("branch", ["norm1", "norm2"])
def test_post_norm_normalises_each_residual_branch(tiny_encoder, randomize, branch) -> None:
    """With one post-norm at weight 2 / bias 0.5 and the other at 0, out - in is LN(branch): per-token 0.5 / 2."""
    model = tiny_encoder(img_size=64)
    randomize(model, linear_std=0.3)
    blk = model.layers[0].blocks[1]  # a shifted block
    with torch.no_grad():
        for name in ("norm1", "norm2"):
            norm = getattr(blk, name)
            norm.weight.fill_(2.0 if name == branch else 0.0)
            norm.bias.fill_(0.5 if name == branch else 0.0)
    store = []
    handle = blk.register_forward_hook(lambda m, args, out: store.append(out - args[0]))
    model.forward_features(torch.randn(2, 3, 64, 64))
    handle.remove()
    delta = store[0]
    assert delta.shape[-1] == 16
    torch.testing.assert_close(delta.mean(-1), torch.full(delta.shape[:-1], 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(delta.std(-1, unbiased=False), torch.full(delta.shape[:-1], 2.0), atol=1e-2, rtol=0)


def test_no_pre_norm_on_mlp_branch(tiny_encoder, randomize) -> None:
    """x -> x + LN2(MLP(x)) is not invariant to the scale of x; a pre-norm MLP(LN(x)) would be."""
    model = tiny_encoder(img_size=64)
    randomize(model, linear_std=0.3)
    blk = model.layers[0].blocks[0]
    with torch.no_grad():
        blk.norm1.weight.zero_()
        blk.norm1.bias.zero_()
    deltas = []
    for scale in (1.0, 3.0):
        pre = blk.register_forward_pre_hook(lambda m, args, s=scale: (args[0] * s, *args[1:]))
        post = blk.register_forward_hook(lambda m, args, out: deltas.append(out - args[0]))
        model.forward_features(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
        pre.remove()
        post.remove()
    assert (deltas[0] - deltas[1]).abs().max() > 1e-2


def test_mlp_shape(tiny_encoder) -> None:
    model = tiny_encoder()
    for i, layer in enumerate(model.layers):
        dim = 16 * 2**i
        for blk in layer.blocks:
            assert (blk.mlp.fc1.in_features, blk.mlp.fc1.out_features) == (dim, 4 * dim)
            assert (blk.mlp.fc2.in_features, blk.mlp.fc2.out_features) == (4 * dim, dim)


# ---------------------------------------------------------------- patch embedding, merging, head


def test_patch_embedding_structure(tiny_encoder) -> None:
    model = tiny_encoder(patch_size=4)
    proj = model.patch_embed.proj
    assert isinstance(proj, nn.Conv2d)
    assert proj.kernel_size == (4, 4) and proj.stride == (4, 4) and proj.out_channels == 16
    assert isinstance(model.patch_embed.norm, nn.LayerNorm) and model.patch_embed.norm.normalized_shape == (16,)


def test_patch_merging_v2_order_and_norm_after_reduction(tiny_encoder, randomize) -> None:
    model = randomize(tiny_encoder())
    merge = model.layers[1].downsample
    c = 16
    assert merge.reduction.in_features == 4 * c and merge.reduction.out_features == 2 * c
    assert merge.reduction.bias is None
    assert merge.norm.normalized_shape == (2 * c,)
    x = torch.randn(2, 4, 6, c)  # B, H, W, C
    got = merge(x)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)  # B, 2, 3, 4C
    expected = F.layer_norm(cat @ merge.reduction.weight.t(), (2 * c,), merge.norm.weight, merge.norm.bias, eps=1e-5)
    assert got.shape == (2, 2, 3, 2 * c)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_patch_merging_hand_built_2x2(tiny_encoder) -> None:
    """Token (h, w) carries the constant 1 + h + 2w on every channel: the concatenation order shows in 4C."""
    model = tiny_encoder()
    merge = model.layers[1].downsample
    c = 16
    x = torch.zeros(1, 2, 2, c)
    for h in range(2):
        for w in range(2):
            x[0, h, w] = 1 + h + 2 * w
    with torch.no_grad():
        # reduction reads channel 0 of each of the four C-wide chunks into outputs 0..3
        merge.reduction.weight.zero_()
        for k in range(4):
            merge.reduction.weight[k, k * c] = 1.0
    captured = []
    handle = merge.reduction.register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    merge(x)
    handle.remove()
    # reference order [0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2] -> (h,w) = (0,0), (1,0), (0,1), (1,1)
    assert captured[0].reshape(-1)[:4].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_forward_features_and_head(tiny_encoder, randomize) -> None:
    model = randomize(tiny_encoder(img_size=64, num_classes=7))
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 128)  # B, H/32, W/32, C_last (NHWC)
    logits = model(x)
    assert logits.shape == (2, 7)
    expected = feats.mean(dim=(1, 2)) @ model.head.fc.weight.t() + model.head.fc.bias
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_final_norm_applied(tiny_encoder) -> None:
    model = tiny_encoder(img_size=64)
    with torch.no_grad():
        model.norm.weight.fill_(3.0)
        model.norm.bias.fill_(-1.0)
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(feats.mean(-1), torch.full(feats.shape[:-1], -1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(-1, unbiased=False), torch.full(feats.shape[:-1], 3.0), atol=1e-2, rtol=0)


def test_one_by_one_last_stage_is_finite(tiny_encoder, randomize) -> None:
    # three stages at 16 px: token grids 4, 2, 1 -> the last stage runs a 1x1 window
    model = randomize(tiny_encoder(img_size=16, depths=(2, 2, 2), num_heads=(2, 2, 4)))
    assert list(model.stage_window_sizes) == [4, 2, 1]
    table = model.layers[2].blocks[0].attn.relative_coords_table
    assert torch.isfinite(table).all()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_same_values(tiny_encoder, randomize) -> None:
    model = randomize(tiny_encoder(img_size=64)).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


# ---------------------------------------------------------------- options and construction errors


def test_absolute_position_embedding_option(tiny_encoder) -> None:
    plain = tiny_encoder(img_size=64)
    with_ape = tiny_encoder(img_size=64, ape=True)
    assert "absolute_pos_embed" not in plain.state_dict()
    ape = with_ape.state_dict()["absolute_pos_embed"]
    assert ape.numel() == 16 * 16 * 16  # one C-vector per token of the 16x16 grid
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with_ape.absolute_pos_embed.zero_()
        zero_out = with_ape.forward_features(x)
        with_ape.absolute_pos_embed.normal_()
        assert (with_ape.forward_features(x) - zero_out).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("img_size", "depths", "heads"), [(40, (2, 2, 2, 2), (1, 2, 4, 8)), (24, (2, 2, 2), (1, 2, 4))]
)
def test_image_size_not_divisible_raises(img_size, depths, heads) -> None:
    with pytest.raises(ValueError, match=str(img_size)):
        SwinTransformerV2(img_size=img_size, embed_dim=16, depths=depths, num_heads=heads, window_size=4)


def test_three_stage_model_accepts_multiple_of_16() -> None:
    model = SwinTransformerV2(img_size=48, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=3)
    assert model.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 3, 3, 64)


def test_unknown_arch_raises_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="no_such_arch") as info:
        create_swinv2("no_such_arch")
    for name in ("tiny", "base", "giant"):
        assert name in str(info.value)


# ---------------------------------------------------------------- named sizes (reference §1 table)


def _size_field(entry, name: str):
    value = entry[name] if isinstance(entry, dict) else getattr(entry, name)
    return tuple(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize(
    ("name", "embed_dim", "depths", "heads"),
    [
        ("tiny", 96, (2, 2, 6, 2), (3, 6, 12, 24)),
        ("small", 96, (2, 2, 18, 2), (3, 6, 12, 24)),
        ("base", 128, (2, 2, 18, 2), (4, 8, 16, 32)),
        ("large", 192, (2, 2, 18, 2), (6, 12, 24, 48)),
        ("huge", 352, (2, 2, 18, 2), (11, 22, 44, 88)),
        ("giant", 512, (2, 2, 42, 4), (16, 32, 64, 128)),
    ],
)
def test_named_sizes(name, embed_dim, depths, heads) -> None:
    entry = SWINV2_SIZES[name]
    assert _size_field(entry, "embed_dim") == embed_dim
    assert _size_field(entry, "depths") == depths
    assert _size_field(entry, "num_heads") == heads


@pytest.mark.parametrize(
    ("name", "embed_dim", "depths"), [("pico", 16, (2, 2, 2)), ("nano", 32, (1, 1, 2, 1)), ("micro", 48, (2, 2, 2, 2))]
)
def test_test_sizes_build(name, embed_dim, depths) -> None:
    entry = SWINV2_SIZES[name]
    heads = _size_field(entry, "num_heads")
    assert _size_field(entry, "embed_dim") == embed_dim and _size_field(entry, "depths") == depths
    assert len(heads) == len(depths)
    assert all((embed_dim * 2**i) % h == 0 for i, h in enumerate(heads))
    img = 4 * 2 ** (len(depths) - 1) * 2
    model = create_swinv2(name, img_size=img, window_size=4, num_classes=5)
    assert model.patch_embed.proj.out_channels == embed_dim
    assert tuple(len(layer.blocks) for layer in model.layers) == depths
    assert model(torch.randn(1, 3, img, img)).shape == (1, 5)


@pytest.mark.slow  # a full-size model: seconds
def test_tiny_preset_matches_timm_parameter_count() -> None:
    timm = pytest.importorskip("timm")
    ours = create_swinv2("tiny", img_size=256, window_size=8)
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.slow  # a full-size model: seconds
def test_huge_adds_extra_norms() -> None:
    """reference §1: huge and giant add a LayerNorm on the main branch every 6 blocks (narrowed here to stay fast)."""
    kwargs = dict(img_size=64, embed_dim=22, window_size=4, num_classes=0)
    huge = create_swinv2("huge", **kwargs)
    plain = create_swinv2("huge", extra_norm_every=0, **kwargs)

    def count(m: nn.Module) -> int:
        return sum(isinstance(mod, nn.LayerNorm) for mod in m.modules())

    assert count(huge) > count(plain)
    assert torch.isfinite(huge.forward_features(torch.randn(1, 3, 64, 64))).all()
