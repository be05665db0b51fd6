"""Fine-tuning parts: layer ids and lr scales (docs/reference.md), the optimizer and scheduler they feed, data,
metrics."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from simmim_swin.config import (
    AugmentConfig,
    ConfigError,
    FinetuneConfig,
    OptimConfig,
    ScheduleConfig,
    from_dict,
    validate_finetune,
)
from simmim_swin.data.classification import (
    balanced_subset,
    build_train_transform,
)
from simmim_swin.data.transforms import build_eval_transform
from simmim_swin.engine import evaluate_classifier
from simmim_swin.finetune import (
    build_mixup_and_loss,
    evaluate_transfer,
    run_finetune,
)
from simmim_swin.models import build_simmim
from simmim_swin.models.swinv2 import create_swinv2
from simmim_swin.optim import build_optimizer, build_scheduler

BASE_DEPTHS = (2, 2, 18, 2)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("patch_embed.proj.weight", 0),
        ("patch_embed.norm.bias", 0),
        ("layers.0.blocks.0.attn.qkv.weight", 1),
        ("layers.0.blocks.1.norm2.weight", 2),
        ("layers.1.downsample.reduction.weight", 2),  # the merging after stage 0 shares stage 0's last block id
        ("layers.1.blocks.0.attn.cpb_mlp.0.weight", 3),
        ("layers.2.downsample.norm.weight", 4),
        ("layers.2.blocks.17.mlp.fc2.bias", 22),
        ("layers.3.downsample.reduction.weight", 22),
        ("layers.3.blocks.1.attn.logit_scale", 24),
        ("norm.weight", 25),
        ("head.fc.weight", 25),
    ],
)
def test_layer_ids_follow_spec(name, expected, base_model):
    assert base_model.group_matcher()(name) == expected


def test_simmim_layer_ids_skip_the_encoder_prefix():
    model = build_simmim("base", img_size=32, window_size=4, embed_dim=8, num_heads=(1, 1, 1, 1))
    assert model.group_matcher()("encoder.layers.0.blocks.0.attn.proj.bias") == 1
    assert model.group_matcher()("decoder.0.weight") == sum(BASE_DEPTHS) + 1


@pytest.fixture(scope="module")
def base_model():
    # base's depths (what the layer ids depend on) at a width of 8: the same parameter names, 0.1% of the size
    return create_swinv2("base", img_size=32, window_size=4, num_classes=1000, embed_dim=8, num_heads=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def base_groups(base_model):
    model = base_model
    optim_cfg = OptimConfig(weight_decay=0.05, fused=False)
    groups = build_optimizer(model, optim_cfg, lr=1e-3, layer_decay=0.75).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    return model, groups, {names[id(p)]: g for g in groups for p in g["params"]}


def test_layer_decay_scales_for_base_match_spec(base_groups):
    model, groups, by_name = base_groups
    assert set(by_name) == {n for n, _ in model.named_parameters()}  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(by_name)
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75**25)
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.000753, abs=5e-7)  # the reference's number
    assert by_name["head.fc.weight"]["lr_scale"] == 1.0 and by_name["norm.weight"]["lr_scale"] == 1.0
    assert by_name["layers.1.downsample.reduction.weight"]["lr_scale"] == pytest.approx(0.75**23)
    assert by_name["layers.2.blocks.17.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75**3)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 26  # num_layers = sum(depths) + 2


def test_layer_decay_groups_keep_the_pretraining_weight_decay_exclusions(base_groups):
    _, _, by_name = base_groups
    no_decay = [
        "layers.0.blocks.0.attn.cpb_mlp.0.weight",  # 2-D, excluded by name
        "layers.0.blocks.0.attn.cpb_mlp.2.weight",
        "layers.0.blocks.0.attn.logit_scale",  # (heads, 1, 1), excluded by name
        "layers.0.blocks.0.attn.q_bias",
        "layers.0.blocks.0.norm1.weight",
        "head.fc.bias",
        "patch_embed.proj.bias",
    ]
    for name in no_decay:
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ("layers.0.blocks.0.attn.qkv.weight", "layers.3.downsample.reduction.weight", "head.fc.weight"):
        assert by_name[name]["weight_decay"] == 0.05, name


def test_timm_optimizer_and_scheduler_apply_the_scales():
    model = create_swinv2("pico", img_size=32, window_size=4, num_classes=3)
    optim_cfg = OptimConfig(base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-6, fused=False)
    optimizer = build_optimizer(model, optim_cfg, lr=1e-3, layer_decay=0.5)
    assert isinstance(optimizer, torch.optim.AdamW)
    schedule = ScheduleConfig(epochs=10, warmup_epochs=1, kind="cosine")
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=5, warmup_lr=1e-6, min_lr=1e-6)
    scheduler.step_update(5)  # end of warm-up: the peak lr
    for group in optimizer.param_groups:
        layer_id = {model.layer_id(n) for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        assert len(layer_id) == 1
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (7 - layer_id.pop()))
        assert group["lr_scale"] == pytest.approx(group["lr"] / 1e-3)
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(1e-3)


def test_mixup_and_loss_selection():
    mixup, loss = build_mixup_and_loss(AugmentConfig(), num_classes=10)
    assert mixup is not None and isinstance(loss, SoftTargetCrossEntropy)
    assert mixup.label_smoothing == 0.1 and mixup.mixup_alpha == 0.8 and mixup.cutmix_alpha == 1.0
    mixup, loss = build_mixup_and_loss(AugmentConfig(mixup=0.0, cutmix=0.0), num_classes=10)
    assert mixup is None and isinstance(loss, LabelSmoothingCrossEntropy) and loss.smoothing == 0.1
    mixup, loss = build_mixup_and_loss(AugmentConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.0), num_classes=10)
    assert mixup is None and isinstance(loss, nn.CrossEntropyLoss)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data": {"batch_size": 7}}, "batch_size=7 must be even"),
        ({"train": {"ema_decay": 1.0}}, "ema_decay=1.0"),
        ({"train": {"eval_every": 0}}, "eval_every"),
        ({"augment": {"mixup_mode": "both"}}, "mixup_mode='both'"),
        ({"run": {"parallel": "zero3"}}, "run.parallel='zero3' is unknown"),
        ({"run": {"max_consecutive_skips": 0}}, "max_consecutive_skips=0"),
        ({"train": {"ema": True}, "run": {"parallel": "fsdp"}}, "train.ema=true does not work with run.parallel=fsdp"),
    ],
)
def test_bad_finetune_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):  # an unknown choice already in from_dict
        data = {"root": "imgs", **overrides.get("data", {})}  # source=folder needs one (never read here)
        validate_finetune(from_dict(FinetuneConfig, {**overrides, "data": data}))


def test_missing_pretrained_weights_or_evaluate_checkpoint_are_named(tmp_path):
    data_and_cpu = {"data": {"root": str(tmp_path)}, "run": {"device": "cpu"}}
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_finetune(from_dict(FinetuneConfig, {"pretrained": str(tmp_path / "nowhere"), **data_and_cpu}))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run holds no checkpoints"):
        evaluate_transfer(from_dict(FinetuneConfig, {"evaluate": str(tmp_path / "empty_run"), **data_and_cpu}))


def test_balanced_subset_is_balanced_and_seeded():
    targets = [c for c in range(10) for _ in range(60 + 7 * c)]
    picked = balanced_subset(targets, 1000 // 2, seed=0)
    counts = Counter(targets[i] for i in picked)
    assert len(picked) == len(set(picked)) == 500 and set(counts.values()) == {50}
    assert picked == balanced_subset(targets, 500, seed=0)
    assert picked != balanced_subset(targets, 500, seed=1)
    uneven = Counter(targets[i] for i in balanced_subset(targets, 95, seed=3))
    assert max(uneven.values()) - min(uneven.values()) == 1
    with pytest.raises(ValueError, match="num_labelled=10000"):
        balanced_subset(targets, 10000, seed=0)


def test_eval_transform_resizes_then_centre_crops():
    from PIL import Image

    transform = build_eval_transform(64, crop_pct=0.875, interpolation="bicubic")
    sizes = [type(t).__name__ for t in transform.transforms]
    assert sizes[1:3] == ["Resize", "CenterCrop"] and transform.transforms[1].size == 73  # floor(64 / 0.875)
    assert transform.transforms[2].size == (64, 64) and transform.transforms[1].interpolation.value == "bicubic"
    assert transform(Image.new("L", (28, 28))).shape == (3, 64, 64)  # grey becomes RGB first
    with pytest.raises(ValueError, match="crop_pct=1.5"):
        build_eval_transform(64, crop_pct=1.5)


def test_rand_augment_posterize_with_zero_bits_gives_black_not_an_error():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    transform = build_train_transform(48, AugmentConfig())
    (rand_augment,) = [t for t in transform.transforms if isinstance(t, RandAugment)]
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    image = Image.new("RGB", (28, 28), (200, 120, 40))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))  # magnitude 10 -> 0 bits kept
    assert posterize.aug_fn(image, 4).getpixel((0, 0)) == (192, 112, 32)


class FixedLogits(nn.Module):
    """Returns the logits stored for each input index (the image's first pixel)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images[:, 0, 0, 0].long()]


def test_evaluate_classifier_top1_top5():
    logits = torch.arange(6, dtype=torch.float32).repeat(8, 1)  # every row ranks class 5 first, then 4, 3, 2, 1, 0
    labels = torch.tensor([5, 5, 4, 0, 1, 3, 2, 0])  # top-1 right for 2 of 8; top-5 misses only class 0 (2 images)
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 4, 4)
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    metrics = evaluate_classifier(FixedLogits(logits), batches, "fp32", torch.device("cpu"))
    assert metrics["top1"] == pytest.approx(25.0) and metrics["top5"] == pytest.approx(75.0)
    assert metrics["num_images"] == 8
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_evaluation_shards_with_padding_add_up_to_the_whole_set():
    """EvalShard splits 7 images over 3 ranks as 3 + 3 + 3 with two padded (label -1, ignored); the summed counts
    of the shards are the whole set's top-1 / top-5 / loss / confusion matrix."""
    from torch.utils.data import DataLoader

    from simmim_swin.data.loader import EvalShard

    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    labels = [5, 5, 4, 0, 1, 3, 2]
    images = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1).expand(7, 3, 4, 4)
    dataset = list(zip(images, labels, strict=True))
    model, cpu = FixedLogits(logits), torch.device("cpu")
    whole = evaluate_classifier(model, DataLoader(dataset, batch_size=3), "fp32", cpu, confusion=True)

    shards = [EvalShard(dataset, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3] and [s[2][1] for s in shards] == [2, -1, -1]
    assert sorted(s.indices[k] for s in shards for k in range(len(s.indices))) == list(range(7))
    parts = [evaluate_classifier(model, DataLoader(s, batch_size=2), "fp32", cpu, confusion=True) for s in shards]
    assert sum(p["num_images"] for p in parts) == whole["num_images"] == 7
    for key in ("top1", "top5", "loss"):
        combined = sum(p[key] * p["num_images"] for p in parts) / 7
        assert combined == pytest.approx(whole[key], rel=1e-6)
    assert torch.equal(sum(p["confusion"] for p in parts), whole["confusion"])
    assert int(whole["confusion"].sum()) == 7
