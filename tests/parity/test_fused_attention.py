"""The fused (SDPA) attention path computes the same function and gradients as the eager one."""

from __future__ import annotations

import copy

import pytest
import torch

from simmim_swin.models.swinv2 import WindowAttention, make_shift_attn_mask


def _blocks(model):
    return [blk for layer in model.layers for blk in layer.blocks]


def _attention_pair(window: int, pretrained: int, heads: int = 4, dim: int = 32):
    eager = WindowAttention(
        dim=dim,
        num_heads=heads,
        window_size=(window, window),
        pretrained_window_size=(pretrained, pretrained),
        fused_attn=False,
    )
    with torch.no_grad():
        eager.q_bias.normal_(0, 0.3)
        eager.v_bias.normal_(0, 0.3)
        eager.qkv.weight.normal_(0, 0.2)
        eager.logit_scale.copy_(torch.linspace(1.0, 5.0, heads).view(heads, 1, 1))  # last head above ln 100
    fused = copy.deepcopy(eager)
    fused.fused_attn = True
    assert eager.fused_attn is False
    return eager, fused


def _assert_close_scaled(
    got: torch.Tensor, expected: torch.Tensor, name: str = "", rel: float = 5e-5, atol: float = 1e-7
) -> None:
    """max |got - expected| <= rel * max |expected| + atol.

    fp32 gradients summed over many windows carry rounding noise that grows with their magnitude: both paths sit
    about 5e-6 (relative to the largest entry) from a float64 eager reference.
    """
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    assert diff <= rel * scale + atol, f"{name}: max abs diff {diff:.3g} vs max abs {scale:.3g}"


def _run(attn, x, mask, grad_out):
    x = x.clone().requires_grad_(True)
    out = attn(x, mask)
    (out * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(
    ("window", "pretrained", "shifted"), [(4, 0, False), (4, 0, True), (4, 6, True), (6, 12, False)]
)
def test_window_attention_fused_matches_eager(window, pretrained, shifted, mode) -> None:
    eager, fused = _attention_pair(window, pretrained)
    for module in (eager, fused):
        module.train(mode == "train")  # dropout rates are 0: the training path must agree too
    size = 2 * window
    mask = make_shift_attn_mask((size, size), (window, window), (window // 2,) * 2) if shifted else None
    x = torch.randn(3 * 4, window * window, 32)  # B=3 images x 4 windows
    grad_out = torch.randn_like(x)
    out_e, gx_e, g_e = _run(eager, x, mask, grad_out)
    out_f, gx_f, g_f = _run(fused, x, mask, grad_out)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-4)
    _assert_close_scaled(gx_f, gx_e, "input")
    for name in g_e:
        _assert_close_scaled(g_f[name], g_e[name], name)


def test_set_fused_attn_switches_every_block(tiny_encoder) -> None:
    model = tiny_encoder(img_size=64)
    for enabled in (True, False, True):
        model.set_fused_attn(enabled)
        assert all(blk.attn.fused_attn is enabled for blk in _blocks(model))


@pytest.mark.parametrize("flag", [True, False])
def test_constructor_flag_reaches_every_block(tiny_encoder, flag) -> None:
    model = tiny_encoder(fused_attn=flag)
    assert all(blk.attn.fused_attn is flag for blk in _blocks(model))


@pytest.mark.parametrize("cuda", [True, False])
def test_default_flag_follows_cuda(tiny_encoder, monkeypatch, cuda) -> None:
    # fused_attn=None: SDPA where CUDA is available, the eager path elsewhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    model = tiny_encoder(fused_attn=None)
    assert all(blk.attn.fused_attn is cuda for blk in _blocks(model))


@pytest.mark.parametrize("pretrained", [(0, 0, 0, 0), (6, 6, 4, 2)])
def test_model_fused_matches_eager(tiny_encoder, randomize, pretrained) -> None:
    eager = randomize(tiny_encoder(img_size=64, pretrained_window_sizes=pretrained, fused_attn=False)).train()
    fused = copy.deepcopy(eager)
    fused.set_fused_attn(True)
    x = torch.randn(2, 3, 64, 64)
    out_e, out_f = eager(x), fused(x)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-4)
    out_e.square().sum().backward()
    out_f.square().sum().backward()
    fused_params = dict(fused.named_parameters())
    # some gradients are pure rounding noise (q, k and logit_scale of the 1x1-window stage are exactly 0 in
    # exact arithmetic): allow noise at 1e-6 of the largest gradient in the model besides 1e-4 of each tensor's
    global_scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for name, p in eager.named_parameters():
        _assert_close_scaled(fused_params[name].grad, p.grad, name, rel=1e-4, atol=1e-6 * global_scale)


def _check_low_precision_agreement(eager, fused, x: torch.Tensor, dtype: torch.dtype) -> None:
    """Under autocast both paths stay about as close to the fp32 result as each other, and close to each other."""
    device = x.device.type
    with torch.no_grad():
        ref32 = eager.forward_features(x)
        with torch.autocast(device, dtype=dtype):
            out_e = eager.forward_features(x)
            out_f = fused.forward_features(x)
    assert out_f.shape == ref32.shape and torch.isfinite(out_f).all()
    err_e = (out_e.float() - ref32).abs().mean().item()
    err_f = (out_f.float() - ref32).abs().mean().item()
    # features have unit scale (final LayerNorm); bf16 keeps 8 mantissa bits, so a few 1e-2 of mean error is normal
    assert err_f <= 1.5 * err_e + 1e-3, (err_f, err_e)
    assert (out_f.float() - out_e.float()).abs().mean().item() <= 2 * err_e + 1e-3
    assert err_f < 0.1


def test_model_fused_matches_eager_bf16_autocast_cpu(tiny_encoder, randomize) -> None:
    eager = randomize(tiny_encoder(img_size=64, fused_attn=False))
    fused = copy.deepcopy(eager)
    fused.set_fused_attn(True)
    _check_low_precision_agreement(eager, fused, torch.randn(2, 3, 64, 64), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_fused_matches_eager_low_precision_cuda(tiny_encoder, randomize, dtype) -> None:
    eager = randomize(tiny_encoder(img_size=128, fused_attn=False)).cuda()
    fused = copy.deepcopy(eager)
    fused.set_fused_attn(True)
    _check_low_precision_agreement(eager, fused, torch.randn(4, 3, 128, 128, device="cuda"), dtype)
    # and the backward pass runs through SDPA with a float mask that needs gradients (no flash backend)
    with torch.autocast("cuda", dtype=dtype):
        fused.train()(torch.randn(4, 3, 128, 128, device="cuda")).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)
