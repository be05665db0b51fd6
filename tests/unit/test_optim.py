"""Parameter groups (docs/reference.md §2 weight-decay exclusions), lr scaling and the per-step lr schedules."""

import math

import pytest
import torch
from torch import nn

from simmim_swin.config import OptimConfig, ScheduleConfig
from simmim_swin.models import build_encoder, build_simmim
from simmim_swin.optim import build_optimizer, build_scheduler, scaled_lrs


def lr_at_step(scheduler, step: int) -> float:
    """The lr the loop trains update `step` with: what step_update(step) sets on the first group."""
    scheduler.step_update(step)
    return scheduler.optimizer.param_groups[0]["lr"]


def _excluded_2d(name: str) -> bool:
    return any(key in name for key in ("absolute_pos_embed", "mask_token", "cpb_mlp", "logit_scale"))


def _split(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, no_decay


def _model(kind: str) -> nn.Module:
    kwargs = dict(img_size=32, window_size=4, ape=True)
    return build_simmim("pico", **kwargs) if kind == "simmim" else build_encoder("pico", num_classes=10, **kwargs)


@pytest.mark.parametrize("kind", ["encoder", "simmim"])
def test_pretraining_optimizer_weight_decay_exclusions(kind: str) -> None:
    model = _model(kind)
    groups = build_optimizer(model, OptimConfig(weight_decay=0.05, fused=False), lr=1e-3).param_groups
    decay, no_decay = _split(model, groups)
    all_names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    for name, param in model.named_parameters():
        expect_no_decay = param.ndim <= 1 or name.endswith(".bias") or _excluded_2d(name)
        assert (name in no_decay) == expect_no_decay, name
    # The traps the exclusions exist for: >= 2-D parameters that the 1-D rule alone would decay.
    prefix = "encoder." if kind == "simmim" else ""
    for name in (
        "absolute_pos_embed",
        "layers.0.blocks.0.attn.cpb_mlp.0.weight",
        "layers.1.blocks.1.attn.cpb_mlp.2.weight",
        "layers.0.blocks.0.attn.logit_scale",
        *(["mask_token"] if kind == "simmim" else []),
    ):
        assert prefix + name in no_decay
    for name in (
        "patch_embed.proj.weight",
        "layers.0.blocks.0.attn.qkv.weight",
        "layers.1.downsample.reduction.weight",
        "layers.1.blocks.0.mlp.fc1.weight",
        *(["head.fc.weight"] if kind == "encoder" else []),
    ):
        assert prefix + name in decay
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}


def test_frozen_parameters_are_left_out_and_none_trainable_is_an_error() -> None:
    model = _model("encoder")
    model.head.fc.weight.requires_grad_(False)
    decay, no_decay = _split(model, build_optimizer(model, OptimConfig(fused=False), lr=1e-3).param_groups)
    assert "head.fc.weight" not in decay | no_decay and "head.fc.bias" in no_decay
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(), lr=1e-3)


def test_scaled_lrs() -> None:
    cfg = OptimConfig(base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, lr_reference_batch=512)
    lr, warmup_lr, min_lr = scaled_lrs(cfg, 2048)
    assert (lr, warmup_lr, min_lr) == pytest.approx((4e-4, 2e-6, 2e-5))
    assert scaled_lrs(cfg, 512) == pytest.approx((1e-4, 5e-7, 5e-6))
    with pytest.raises(ValueError, match="total_batch"):
        scaled_lrs(cfg, 0)


def test_build_optimizer_settings() -> None:
    model = _model("encoder")
    cfg = OptimConfig(weight_decay=0.1, betas=[0.8, 0.95], eps=1e-6, fused=None)
    opt = build_optimizer(model, cfg, lr=3e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert opt.defaults["fused"]  # the default, on the CPU too
    assert not build_optimizer(model, OptimConfig(fused=False), lr=1e-3).defaults["fused"]


def _scheduler(kind: str, **overrides):
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
    cfg = ScheduleConfig(**{"epochs": 10, "warmup_epochs": 2, "kind": kind, "decay_epochs": [6], **overrides})
    return opt, build_scheduler(opt, cfg, steps_per_epoch=5, warmup_lr=1e-6, min_lr=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "multistep"])
def test_warmup(kind: str) -> None:
    opt, sched = _scheduler(kind)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # set at construction
    assert lr_at_step(sched, 0) == pytest.approx(1e-6)
    warm = [lr_at_step(sched, s) for s in range(11)]
    assert all(b > a for a, b in zip(warm[:10], warm[1:10]))
    assert warm[5] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert warm[10] == pytest.approx(1e-3)  # first update after the 10 warm-up steps runs at the peak lr


def test_multistep_drops_exactly_at_milestone() -> None:
    _, sched = _scheduler("multistep", decay_epochs=[6, 8], decay_rate=0.1)
    assert lr_at_step(sched, 29) == pytest.approx(1e-3)
    assert lr_at_step(sched, 30) == pytest.approx(1e-4)  # epoch 6 * 5 steps
    assert lr_at_step(sched, 39) == pytest.approx(1e-4)
    assert lr_at_step(sched, 40) == pytest.approx(1e-5)
    assert lr_at_step(sched, 49) == pytest.approx(1e-5)


def test_cosine_shape_and_end() -> None:
    _, sched = _scheduler("cosine")
    lrs = [lr_at_step(sched, s) for s in range(10, 51)]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lr_at_step(sched, 30) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way through the cosine
    assert lr_at_step(sched, 50) == pytest.approx(1e-5)  # after the last of 50 updates
    last = lr_at_step(sched, 49)
    assert 1e-5 < last < 1e-5 + (1e-3 - 1e-5) * (1 - math.cos(math.pi / 40)) / 2 + 1e-12


@pytest.mark.parametrize("kind", ["cosine", "multistep"])
def test_the_lr_is_a_function_of_the_step(kind: str) -> None:
    opt, sched = _scheduler(kind)
    forward = [lr_at_step(sched, s) for s in range(50)]
    backward = [lr_at_step(sched, s) for s in reversed(range(50))][::-1]
    assert forward == backward  # no hidden state: a resumed run gets the same lr at the same step
    assert len(set(forward)) > 5


def test_step_update_honours_lr_scale() -> None:
    opt = torch.optim.AdamW(
        [{"params": [nn.Parameter(torch.zeros(2))], "lr_scale": 0.5}, {"params": [nn.Parameter(torch.zeros(2))]}],
        lr=1e-3,
    )
    sched = build_scheduler(opt, ScheduleConfig(epochs=4, warmup_epochs=0, kind="cosine"), 2, 0.0, 0.0)
    sched.step_update(0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])


# the schedule and betas values that cannot work are refused when the config is validated: tests/unit/test_validate.py


def test_reference_recipe_numbers() -> None:
    """SwinV2-B SimMIM: total batch 2048, 800 epochs, 10 warm-up, x0.1 at 700."""
    opt_cfg = OptimConfig()
    lr, warmup_lr, min_lr = scaled_lrs(opt_cfg, 2048)
    opt = build_optimizer(nn.Linear(4, 4), opt_cfg, lr)
    sched = build_scheduler(opt, ScheduleConfig(), steps_per_epoch=3, warmup_lr=warmup_lr, min_lr=min_lr)
    assert lr_at_step(sched, 0) == pytest.approx(2e-6)
    assert lr_at_step(sched, 30) == pytest.approx(4e-4)
    assert lr_at_step(sched, 2099) == pytest.approx(4e-4)
    assert lr_at_step(sched, 2100) == pytest.approx(4e-5)
