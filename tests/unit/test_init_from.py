"""Continued pretraining (init_from=): a new SimMIM run starts from ours, reference, timm or Hugging Face weights."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from simmim_swin.config import ConfigError, ModelConfig, PretrainConfig, from_dict, to_dict
from simmim_swin.hf import to_hf
from simmim_swin.masking import MaskGenerator
from simmim_swin.models import SimMIM, build_simmim
from simmim_swin.models.swinv2 import to_timm
from simmim_swin.pretrain import run_pretrain
from simmim_swin.transfer import load_simmim_weights, resolve_init_from

MODEL = dict(arch="pico", img_size=32, window_size=4, drop_path_rate=0.0)


def source_model(randomize, **overrides) -> SimMIM:
    model = build_simmim(**to_dict(from_dict(ModelConfig, {**MODEL, **overrides})), norm_target=None)
    return randomize(model).eval()


def ours(model: SimMIM, finetuned: bool = False) -> dict:
    """What run_pretrain (or run_finetune, a classifier without mask token and decoder) saves."""
    model_cfg = to_dict(from_dict(ModelConfig, MODEL))
    weights = model.state_dict()
    if finetuned:
        weights = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
        weights.pop("mask_token")
        weights["head.fc.weight"], weights["head.fc.bias"] = torch.randn(5, 64), torch.zeros(5)
    return {"model": weights, "config": {"model": model_cfg}, "stage_window_sizes": model.encoder.stage_window_sizes}


def reference_layout(model: SimMIM) -> dict:
    """The authors' SimMIM layout: patch merging at the end of a stage, `rpe_mlp`, derived tables stored."""
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[key.replace(".cpb_mlp.", ".rpe_mlp.")] = value
    for name, buffer in model.named_buffers():  # the reference keeps its coords tables in the checkpoint
        if name.endswith("relative_coords_table"):
            out[name] = buffer.unsqueeze(0)
    return {"model": out}


def hf_layout(model: SimMIM) -> dict:
    """A transformers Swinv2ForMaskedImageModeling state dict."""
    encoder = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    return {**to_hf(encoder, prefix="swinv2."), **decoder}


def batch(img_size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    masks = torch.stack([MaskGenerator(img_size, 8, 4, 0.6)() for _ in range(2)])
    return torch.randn(2, channels, img_size, img_size), masks


def start_from(path, **model_overrides) -> tuple[SimMIM, object]:
    model_cfg, pretrained = resolve_init_from(from_dict(ModelConfig, {**MODEL, **model_overrides}), path)
    model = build_simmim(**to_dict(model_cfg), norm_target=None)
    return model.eval(), load_simmim_weights(model, pretrained)


@pytest.mark.parametrize(
    ("name", "write", "carries_decoder"),
    [
        ("ours.pt", ours, True),
        ("reference.pth", reference_layout, True),
        ("hf.pt", hf_layout, True),
        ("timm.pth", lambda m: to_timm(m.state_dict()), False),
        ("finetuned.pt", lambda m: ours(m, finetuned=True), False),
    ],
)
def test_same_size_and_window_reproduces_the_source(tmp_path, randomize, name, write, carries_decoder) -> None:
    source = source_model(randomize)
    torch.save(write(source), tmp_path / name)
    model, report = start_from(tmp_path / name)
    assert model.encoder.cpb_window_sizes == [4, 4, 2]  # the source's CPB windows (or its own): identical tables
    images, masks = batch()
    with torch.no_grad():
        features = model.encoder.forward_features(images)
        torch.testing.assert_close(features, source.encoder.forward_features(images), rtol=0, atol=1e-5)
        if carries_decoder:  # step 0 of the new run has the source's loss
            torch.testing.assert_close(model(images, masks)[0], source(images, masks)[0], rtol=0, atol=1e-5)
    recreated = {reason for reason, keys in report.recreated.items() if keys}
    assert ("fresh SimMIM decoder" in recreated) != carries_decoder
    assert "mask_token" in report.loaded or not carries_decoder


def test_new_size_window_and_channels(tmp_path, randomize) -> None:
    source = source_model(randomize)
    torch.save(ours(source), tmp_path / "ours.pt")
    model, report = start_from(tmp_path / "ours.pt", img_size=64, window_size=8, in_chans=1)
    assert model.encoder.stage_window_sizes == [8, 8, 4]
    assert model.encoder.cpb_window_sizes == [4, 4, 2]  # CPB offsets normalised as in pretraining
    torch.testing.assert_close(
        model.encoder.layers[1].blocks[0].attn.cpb_mlp[0].weight,
        source.encoder.layers[1].blocks[0].attn.cpb_mlp[0].weight,
    )
    summed = source.encoder.patch_embed.proj.weight.sum(dim=1, keepdim=True)  # adapt_input_conv for one channel
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight, summed)
    assert "fresh SimMIM decoder (the source's has another shape)" in report.recreated
    assert any(reason.startswith("patch embedding adapted from 3 to 1 input channels") for reason in report.recreated)
    images, masks = batch(64, channels=1)
    with torch.no_grad():
        assert torch.isfinite(model(images, masks)[0])


def test_another_architecture_names_the_overrides(tmp_path, randomize) -> None:
    torch.save(ours(source_model(randomize)), tmp_path / "ours.pt")
    with pytest.raises(ConfigError, match=r"model.arch=pico.*") as info:
        resolve_init_from(from_dict(ModelConfig, {**MODEL, "arch": "nano"}), tmp_path / "ours.pt")
    assert "embed_dim 16 (configured 32)" in str(info.value)


def test_shapes_that_fit_no_architecture_are_listed_without_advice(tmp_path, randomize) -> None:
    state = ours(source_model(randomize))
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight"):
        old = state["model"][f"encoder.{key}"]
        state["model"][f"encoder.{key}"] = torch.zeros(24, *old.shape[1:])  # 24 wide here, 16 everywhere else
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ConfigError, match="no SwinV2 architecture fits all of its tensors") as info:
        resolve_init_from(from_dict(ModelConfig, MODEL), tmp_path / "edited.pt")
    message = str(info.value)
    assert "patch_embed.proj.weight (24, 3, 4, 4) vs (16, 3, 4, 4)" in message
    assert "patch_embed.norm.weight (24,) vs (16,)" in message
    assert "mlp_ratio" not in message and "Configure" not in message  # no advice that leads to the next error


def test_unknown_format_is_a_config_error() -> None:
    from simmim_swin.config import validate_pretrain

    with pytest.raises(ConfigError, match="init_from_format='caffe'"):
        validate_pretrain(from_dict(PretrainConfig, {"model": MODEL, "init_from_format": "caffe"}))


def test_pretraining_run_starts_from_weights_and_a_resume_ignores_them(tmp_path, randomize, caplog) -> None:
    caplog.set_level(logging.INFO, logger="simmim_swin")
    source = source_model(randomize)
    torch.save(ours(source), tmp_path / "source.pt")
    settings = {
        "model": {**MODEL, "img_size": 64, "window_size": 8},
        "mask": {"mask_patch_size": 16, "norm_target": False},
        "data": {"batch_size": 4, "num_workers": 0, "samples_per_epoch": 16},
        "schedule": {"epochs": 2, "warmup_epochs": 0, "kind": "cosine"},
        "logger": {"log_every": 2, "image_every": 100, "num_images": 1},
        "run": {"output_dir": str(tmp_path), "name": "continued", "save_every": 2, "max_steps": 2},
        "init_from": str(tmp_path / "source.pt"),
    }
    run_dir = run_pretrain(from_dict(PretrainConfig, settings))
    first = caplog.text
    caplog.clear()
    assert "init_from: simmim weights from" in first and "CPB normalised by [4, 4, 2]" in first
    saved = torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert saved["config"]["model"]["pretrained_window_sizes"] == [4, 4, 2]
    assert saved["step"] == 2

    torch.save({"model": {}}, tmp_path / "source.pt")  # a resume that read init_from again would fail on this
    settings["run"]["max_steps"] = 4
    run_pretrain(from_dict(PretrainConfig, settings))
    second = caplog.text
    assert "its own checkpoint wins; init_from=" in second and "init_from: simmim weights" not in second
    assert torch.load(run_dir / "checkpoints" / "step_00000004.pt", weights_only=True)["step"] == 4
