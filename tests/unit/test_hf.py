"""Hugging Face transformers interoperability: export folders load in Swinv2Model / Swinv2ForImageClassification
with no missing or unexpected keys and give our features / logits; transformers weights load through our loader."""

from __future__ import annotations

import json

import pytest
import torch

from simmim_swin.cli.export import export_hf
from simmim_swin.config import FinetuneModelConfig, ModelConfig, from_dict, to_dict
from simmim_swin.models import build_encoder, build_simmim
from simmim_swin.transfer import build_classifier, load_pretrained, resolve_model_config

transformers = pytest.importorskip("transformers")

MODEL = dict(arch="nano", img_size=64, window_size=4, drop_path_rate=0.0)


def checkpoint(model: torch.nn.Module, **extra) -> dict:
    model_cfg = to_dict(from_dict(ModelConfig, MODEL))
    encoder = getattr(model, "encoder", model)
    config = {"model": model_cfg, "data": {"source": "photos"}, **extra.pop("config", {})}
    return {"model": model.state_dict(), "config": config, "stage_window_sizes": encoder.stage_window_sizes, **extra}


def test_pretraining_export_loads_in_swinv2model_with_our_features(tmp_path, randomize) -> None:
    source = randomize(build_simmim(**to_dict(from_dict(ModelConfig, MODEL)), norm_target=None)).eval()
    torch.save(checkpoint(source, step=12), tmp_path / "step.pt")
    export_hf(tmp_path / "step.pt", tmp_path / "hf")
    model, info = transformers.Swinv2Model.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = model.eval()(images, output_hidden_states=True)
        ours = source.encoder.forward_features(images)  # B, 2, 2, 256 after the final norm
        maps = source.encoder.forward_intermediates(images, intermediates_only=True)
    assert (theirs.last_hidden_state - ours.flatten(1, 2)).abs().max() <= 1e-4
    assert (theirs.pooler_output - ours.mean(dim=(1, 2))).abs().max() <= 1e-4
    for i, feat in enumerate(maps[:-1]):  # HF's reshaped_hidden_states[i + 1]: after stage i and its merging ...
        assert feat.shape[1] * 2 == theirs.reshaped_hidden_states[i + 1].shape[1]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "12 steps" in card and "pretrained_window_sizes=[4, 4, 4, 2]" in card
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pretrained_window_sizes"] == [0, 0, 0, 0]


def test_finetuned_export_loads_in_image_classification_with_our_logits(tmp_path, randomize) -> None:
    pretrained_windows = [4, 4, 4, 2]
    model_cfg = {**MODEL, "pretrained_window_sizes": pretrained_windows}
    classifier = randomize(build_encoder(**to_dict(from_dict(ModelConfig, model_cfg)), num_classes=3)).eval()
    state = checkpoint(classifier, step=5, class_names=["a", "b", "c"], config={"pretrained": "x"})
    state["config"]["model"]["pretrained_window_sizes"] = pretrained_windows
    torch.save(state, tmp_path / "step.pt")
    config = export_hf(tmp_path / "step.pt", tmp_path / "hf")
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    model, info = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval()(images).logits - classifier(images)).abs().max() <= 1e-4


def test_hf_weights_load_into_ours_with_equal_outputs(tmp_path) -> None:
    """transformers' own random Swinv2ForImageClassification -> our loader -> the same logits."""
    torch.manual_seed(0)
    config = transformers.Swinv2Config(
        image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4,
        num_labels=4, pretrained_window_sizes=[4, 4, 4, 2],
    )  # fmt: skip
    theirs = transformers.Swinv2ForImageClassification(config).eval()
    with torch.no_grad():  # move the post-norms away from their zero init
        for name, param in theirs.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    theirs.save_pretrained(tmp_path / "hf")
    pretrained = load_pretrained(tmp_path / "hf")
    assert pretrained.source_format == "hf" and pretrained.cpb_windows() == [4, 4, 4, 2]
    model_cfg = resolve_model_config(from_dict(FinetuneModelConfig, {"drop_path_rate": 0.0}), pretrained)
    ours = build_classifier(model_cfg, 4, pretrained, keep_head=True, verbose=False).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (theirs(images).logits - ours(images)).abs().max() <= 1e-4


@pytest.mark.parametrize("extra", [dict(ape=True), dict(extra_norm_every=1)])
def test_models_transformers_cannot_hold_are_refused_naming_the_key(tmp_path, extra) -> None:
    encoder = build_encoder(**{**to_dict(from_dict(ModelConfig, MODEL)), **extra})
    torch.save(checkpoint(encoder), tmp_path / "step.pt")
    with pytest.raises(ValueError, match=r"(absolute_pos_embed|extra_norms\.0\.weight) has no place.*--format simmim"):
        export_hf(tmp_path / "step.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
