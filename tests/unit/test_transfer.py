"""Loading pretrained weights at a new size and window (docs/reference.md §3-4): strict keys, CPB transfer, formats."""

from __future__ import annotations

import math
import re

import pytest
import torch

from simmim_swin.config import ConfigError, FinetuneModelConfig
from simmim_swin.models.simmim import SimMIM
from simmim_swin.models.swinv2 import SwinTransformerV2, is_derived_buffer, make_relative_coords_table
from simmim_swin.transfer import (
    convert_reference,
    infer_architecture,
    load_encoder_weights,
    load_pretrained,
    reinit_cpb_mlp,
    resolve_model_config,
    windows_from_tables,
)

# three stages, 16 wide: 32 px / window 4 -> stage windows [4, 4, 2]
ARCH = dict(patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0)


def make_simmim(randomize, img_size: int = 32, window: int = 4) -> SimMIM:
    encoder = SwinTransformerV2(img_size=img_size, window_size=window, num_classes=0, **ARCH)
    return randomize(SimMIM(encoder, norm_target=None)).eval()


def pretraining_checkpoint(model: SimMIM, img_size: int, window: int) -> dict:
    """What run_pretrain saves, reduced to the keys the loader reads."""
    model_cfg = dict(arch="pico", img_size=img_size, window_size=window, pretrained_window_sizes=None, **ARCH)
    model_cfg.update(depths=list(ARCH["depths"]), num_heads=list(ARCH["num_heads"]), in_chans=3, mlp_ratio=4.0)
    model_cfg.update(ape=False, grad_checkpointing=False, fused_attn=None)
    return {
        "model": model.state_dict(),
        "config": {"model": model_cfg},
        "stage_window_sizes": model.encoder.stage_window_sizes,
        "step": 7,
    }


def classifier(img_size: int, window: int, pretrained_windows, num_classes: int = 5) -> SwinTransformerV2:
    return SwinTransformerV2(
        img_size=img_size,
        window_size=window,
        pretrained_window_sizes=pretrained_windows,
        num_classes=num_classes,
        **ARCH,
    ).eval()


def test_simmim_into_larger_window_missing_and_unexpected_keys_are_spec(randomize):
    simmim = make_simmim(randomize)
    model = classifier(64, 8, simmim.encoder.stage_window_sizes)
    encoder_only = {k.removeprefix("encoder."): v for k, v in simmim.state_dict().items() if k.startswith("encoder.")}
    everything = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    derived = {k for k in everything if is_derived_buffer(k)}
    head = {k for k in everything if k.startswith("head.")}
    assert derived and head == {"head.fc.weight", "head.fc.bias"}
    # reference §4: missing exactly the derived buffers and head.*, unexpected exactly mask_token ...
    assert everything - set(encoder_only) == derived | head
    assert set(encoder_only) - everything == {"mask_token"}
    result = model.load_state_dict(encoder_only, strict=False)
    assert set(result.missing_keys) == head and set(result.unexpected_keys) == {"mask_token"}
    # ... and the decoder too when it is not stripped first
    unstripped = {k.removeprefix("encoder."): v for k, v in simmim.state_dict().items()}
    assert set(unstripped) - everything == {"mask_token", "decoder.0.weight", "decoder.0.bias"}

    report = load_encoder_weights(model, unstripped)
    assert report.dropped["SimMIM only"] == ["mask_token", "decoder.0.weight", "decoder.0.bias"]
    assert set(report.recreated["fresh classifier head"]) == head
    assert set(report.recreated["derived table for the new window"]) == derived
    assert set(report.loaded) == set(model.state_dict()) - head
    for key in report.loaded:
        assert torch.equal(model.state_dict()[key], encoder_only[key]), key


def test_transferred_coords_table_matches_spec(randomize):
    # pretrained at 48 px / window 12 (stage windows 12, 6, 3), fine-tuned at 64 px / window 16
    simmim = make_simmim(randomize, img_size=48, window=12)
    assert simmim.encoder.stage_window_sizes == [12, 6, 3]
    model = classifier(64, 16, simmim.encoder.stage_window_sizes)
    load_encoder_weights(model, simmim.state_dict())
    table = model.layers[0].blocks[0].attn.relative_coords_table[0]  # timm keeps a leading 1
    assert table.shape == (31, 31, 2)
    assert table.abs().max().item() == pytest.approx(1.191330, abs=1e-6)  # reference §4: W 16 from 12
    offsets = table[15, :, 1]  # dy = 0 row: dx from -15 to 15
    assert offsets[16].item() == pytest.approx(0.262832, abs=1e-6)  # +1
    assert offsets[17].item() == pytest.approx(0.431819, abs=1e-6)  # +2
    for stage, (window, pretrained) in zip(model.layers, [(16, 12), (8, 6), (4, 3)]):
        attn = stage.blocks[0].attn
        expected = make_relative_coords_table((window, window), (pretrained, pretrained))
        assert torch.equal(attn.relative_coords_table[0], expected)
        top = math.log2(8 * (window - 1) / (pretrained - 1) + 1) / 3
        assert attn.relative_coords_table.abs().max().item() == pytest.approx(top, abs=1e-6)


def test_same_size_and_window_reproduces_the_pretrained_features(randomize):
    simmim = make_simmim(randomize)
    model = classifier(32, 4, simmim.encoder.stage_window_sizes)
    load_encoder_weights(model, simmim.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = simmim.encoder.forward_features(x)
        got = model.forward_features(x)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_larger_window_changes_the_bias_only_beyond_the_old_window(randomize):
    """Offsets within the pretrained window get exactly the pretrained bias; the MLP extrapolates the rest."""
    simmim = make_simmim(randomize)
    model = classifier(64, 8, simmim.encoder.stage_window_sizes)
    load_encoder_weights(model, simmim.state_dict())
    old = simmim.encoder.layers[0].blocks[0].attn
    new = model.layers[0].blocks[0].attn
    with torch.no_grad():
        old_bias = old.cpb_mlp(old.relative_coords_table[0])  # 7, 7, heads: offsets -3..3
        new_bias = new.cpb_mlp(new.relative_coords_table[0])  # 15, 15, heads: offsets -7..7
    torch.testing.assert_close(new_bias[4:11, 4:11], old_bias, rtol=0, atol=1e-6)


def test_truncated_checkpoint_names_the_missing_key(randomize):
    weights = make_simmim(randomize).state_dict()
    del weights["encoder.layers.1.blocks.0.attn.cpb_mlp.2.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers\.1\.blocks\.0\.attn\.cpb_mlp\.2\.weight"):
        load_encoder_weights(classifier(64, 8, [4, 4, 2]), weights)


def test_swin_v1_style_checkpoint_is_refused_with_the_keys(randomize):
    weights = {k.removeprefix("encoder."): v for k, v in make_simmim(randomize).state_dict().items()}
    v1 = {}
    for key, value in weights.items():
        if ".cpb_mlp." in key or key.endswith("logit_scale"):
            continue  # V1 has a bias table instead of the CPB MLP and plain scaled attention
        if re.fullmatch(r"layers\.\d+\.downsample\.norm\.(weight|bias)", key):
            value = torch.ones(2 * value.shape[0])  # V1 normalises the 4C concatenation before the reduction
        v1[key] = value
    v1["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(49, 1)
    with pytest.raises(ValueError) as info:
        load_encoder_weights(classifier(64, 8, [4, 4, 2]), v1)
    message = str(info.value)
    assert "Swin V1" in message and "relative_position_bias_table" in message
    assert "layers.0.blocks.0.attn.cpb_mlp.0.weight" in message and "logit_scale" in message
    assert "layers.1.downsample.norm.weight (64,) vs (32,)" in message


def test_wrong_architecture_is_refused(randomize):
    weights = make_simmim(randomize).state_dict()
    wider = SwinTransformerV2(img_size=32, window_size=4, num_classes=5, **{**ARCH, "embed_dim": 32})
    with pytest.raises(ValueError, match=r"mis-shaped keys \(\d+\): .*qkv.weight \(48, 16\) vs \(96, 32\).*embed_dim"):
        load_encoder_weights(wider, weights)


def to_reference_layout(state_dict: dict, tables: dict[int, torch.Tensor]) -> dict:
    """Our SimMIM state dict renamed to the reference implementation's layout, with its persistent tables."""
    out = {}
    for key, value in state_dict.items():
        name = key.replace(".cpb_mlp.", ".rpe_mlp.")
        name = re.sub(r"layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)
        name = name.replace("head.fc.", "head.")
        if name.endswith("absolute_pos_embed"):
            value = value.flatten(1, 2)  # 1, H, W, C -> 1, L, C
        out[name] = value
    prefix = "encoder." if any(k.startswith("encoder.") for k in state_dict) else ""
    for stage, table in tables.items():
        for block in range(2):
            out[f"{prefix}layers.{stage}.blocks.{block}.attn.relative_coords_table"] = table[None]
            out[f"{prefix}layers.{stage}.blocks.{block}.attn.relative_position_index"] = torch.zeros(1)
    return out


def test_reference_simmim_checkpoint_loads_and_matches(tmp_path, randomize):
    simmim = make_simmim(randomize)
    tables = {i: make_relative_coords_table((w, w)) for i, w in enumerate(simmim.encoder.stage_window_sizes)}
    path = tmp_path / "simmim_swinv2_ref.pth"
    torch.save({"model": to_reference_layout(simmim.state_dict(), tables)}, path)

    weights = load_pretrained(path)
    assert weights.source_format == "reference"
    assert weights.stage_window_sizes == [4, 4, 2] and weights.cpb_windows() == [4, 4, 2]
    assert weights.dropped == {"SimMIM decoder": ["decoder.0.weight", "decoder.0.bias"]}
    model_cfg = resolve_model_config(FinetuneModelConfig(img_size=32, window_size=4, drop_path_rate=0.0), weights)
    assert (model_cfg.embed_dim, model_cfg.depths, model_cfg.num_heads) == (16, [2, 2, 2], [1, 2, 4])
    model = classifier(32, 4, model_cfg.pretrained_window_sizes)
    load_encoder_weights(model, weights.state_dict)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), simmim.encoder.forward_features(x), rtol=0, atol=1e-6)


def test_reference_classifier_conversion_head_merging_and_flat_position_embedding(randomize):
    ours = randomize(SwinTransformerV2(img_size=32, window_size=4, num_classes=5, ape=True, **ARCH))
    reference = to_reference_layout(ours.state_dict(), {})
    assert "layers.0.downsample.reduction.weight" in reference and "head.weight" in reference
    assert reference["absolute_pos_embed"].shape == (1, 64, 16)
    converted = convert_reference(reference)
    assert set(converted) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(converted[key], value), key


def test_windows_recovered_from_fine_tuned_reference_tables():
    """A fine-tuned reference model keeps tables normalised by its pretrained windows; both come back."""
    tables = {0: make_relative_coords_table((16, 16), (12, 12)), 1: make_relative_coords_table((8, 8), (6, 6))}
    tables[2] = make_relative_coords_table((4, 4))
    state = {f"layers.{i}.blocks.0.attn.relative_coords_table": t[None] for i, t in tables.items()}
    assert windows_from_tables(state) == ([16, 8, 4], [12, 6, 0])


def test_timm_checkpoint_needs_pretrained_windows_then_matches(tmp_path, randomize):
    timm = pytest.importorskip("timm")
    ref = timm.create_model(
        "swinv2_tiny_window8_256",
        pretrained=False,
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(2, 2, 2),
        num_heads=(1, 2, 4),
        num_classes=5,
    )
    ref = randomize(ref).eval()
    path = tmp_path / "timm_swinv2.pth"
    torch.save(ref.state_dict(), path)
    weights = load_pretrained(path)
    assert weights.source_format == "timm" and weights.stage_window_sizes is None
    with pytest.raises(ConfigError, match="pretrained_window_sizes"):
        resolve_model_config(FinetuneModelConfig(img_size=32, window_size=4), weights)
    user = FinetuneModelConfig(img_size=32, window_size=4, pretrained_window_sizes=[0, 0, 0], drop_path_rate=0.0)
    model_cfg = resolve_model_config(user, weights)
    model = classifier(32, 4, model_cfg.pretrained_window_sizes)
    load_encoder_weights(model, weights.state_dict, keep_head=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_our_checkpoint_sets_windows_and_architecture(tmp_path, randomize):
    simmim = make_simmim(randomize)
    path = tmp_path / "step_00000007.pt"
    torch.save(pretraining_checkpoint(simmim, 32, 4), path)
    weights = load_pretrained(path)
    assert weights.source_format == "simmim" and weights.extra == {"step": 7}
    model_cfg = resolve_model_config(FinetuneModelConfig(img_size=64, window_size=8), weights)
    assert model_cfg.pretrained_window_sizes == [4, 4, 2]
    assert (model_cfg.arch, model_cfg.img_size, model_cfg.window_size) == ("pico", 64, 8)
    overridden = resolve_model_config(FinetuneModelConfig(pretrained_window_sizes=[0, 0, 0]), weights)
    assert overridden.pretrained_window_sizes == [0, 0, 0] and overridden.img_size == 32  # the checkpoint's size
    with pytest.raises(ConfigError, match="model.arch"):
        resolve_model_config(FinetuneModelConfig(img_size=32, window_size=4), None)


def test_infer_architecture_and_reinit_cpb(randomize):
    model = randomize(SwinTransformerV2(img_size=32, window_size=4, num_classes=5, **ARCH))
    arch = infer_architecture(model.state_dict())
    assert arch == dict(
        arch="pico", patch_size=4, in_chans=3, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], mlp_ratio=4.0,
        ape=False,
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = reinit_cpb_mlp(model)
    assert len(names) == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != (".cpb_mlp." in key and not key.endswith("2.bias")), key


def test_exports_round_trip_into_finetuning_and_timm(tmp_path, randomize):
    timm = pytest.importorskip("timm")
    from simmim_swin.cli.export import export_checkpoint

    simmim = make_simmim(randomize)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000007.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(pretraining_checkpoint(simmim, 32, 4), checkpoint)

    ours = export_checkpoint(tmp_path / "run", tmp_path / "encoder.safetensors")
    assert ours["num_classes"] == 0 and ours["model"]["pretrained_window_sizes"] == [0, 0, 0]
    weights = load_pretrained(tmp_path / "encoder.safetensors")
    assert weights.source_format == "simmim" and weights.cpb_windows() == [4, 4, 2]
    assert "mask_token" in weights.state_dict and "decoder.0.weight" not in weights.state_dict
    model_cfg = resolve_model_config(FinetuneModelConfig(img_size=64, window_size=8), weights)
    assert model_cfg.pretrained_window_sizes == [4, 4, 2]

    info = export_checkpoint(checkpoint, tmp_path / "encoder_timm.safetensors", timm_layout=True)
    kwargs = dict(info["timm_create_model"])
    timm_encoder = timm.create_model(kwargs.pop("model_name"), **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = simmim.encoder.forward_features(x)
        torch.testing.assert_close(timm_encoder.forward_features(x), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not a simmim-swin"):
        export_checkpoint(tmp_path / "encoder.safetensors", tmp_path / "again.safetensors")


def test_load_pretrained_refuses_an_unknown_format_naming_the_choices(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"pretrained_format='refrence' is unknown; use one of \['auto', 'simmim'"):
        load_pretrained(tmp_path / "model.pt", "refrence")
