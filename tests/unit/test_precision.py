"""Device / precision resolution, autocast and the grad scaler (CPU; CUDA is faked off where it matters)."""

import contextlib

import pytest
import torch
from torch import nn

from simmim_swin.config import Precision
from simmim_swin.precision import autocast_context, build_grad_scaler, resolve_device, resolve_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="device=cpu"):
            resolve_device(name)


def test_resolve_device_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_resolve_precision() -> None:
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp16", CUDA) == "fp16"
    for name in ("fp32", "bf16"):
        assert resolve_precision(name, CPU) == name
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_precision("fp16", CPU)
    assert type(resolve_precision(Precision.bf16, CPU)) is str  # a config choice resolves to its plain string


def test_autocast_bf16_on_cpu() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast_context("bf16", CPU):
        assert layer(x).dtype == torch.bfloat16
    with autocast_context("fp32", CPU):
        assert layer(x).dtype == torch.float32
    assert isinstance(autocast_context("fp32", CPU), contextlib.nullcontext)


def test_grad_scaler() -> None:
    assert build_grad_scaler("fp32", CPU) is None
    assert build_grad_scaler("bf16", "cuda") is None
    scaler = build_grad_scaler("fp16", "cpu")  # only fp16 scales; building one needs no GPU
    assert isinstance(scaler, torch.amp.GradScaler)
