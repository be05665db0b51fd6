"""engine.train_step: non-finite steps are skipped, the grad scaler unscales before clipping."""

import pytest
import torch

from simmim_swin.config import OptimConfig
from simmim_swin.optim import build_optimizer


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_step_changes_nothing(fused) -> None:
    """engine.train_step skips a step whose loss or gradient is not finite: weights and moments stay."""
    from simmim_swin.engine import train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, OptimConfig(fused=fused), lr=1e-2)

    def loss_fn(model, batch):
        (x,) = batch
        return model(x).square().mean()

    good = [(torch.randn(3, 4),)]
    train_step(model, good, loss_fn, optimizer, None, "fp32", torch.device("cpu"), 5.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]

    bad = [(torch.full((3, 4), float("nan")),)]
    loss, grad_norm, skipped = train_step(model, bad, loss_fn, optimizer, None, "fp32", torch.device("cpu"), 5.0)
    assert bool(skipped) and not torch.isfinite(loss)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for p, m in zip(model.parameters(), moments, strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg"], m)
        assert float(optimizer.state[p]["step"]) == 1.0

    _, _, skipped = train_step(model, good, loss_fn, optimizer, None, "fp32", torch.device("cpu"), 5.0)
    assert not bool(skipped)
    assert not torch.equal(model.weight, before["weight"])


def test_scaler_unscales_before_clipping_and_accumulates_like_no_scaler() -> None:
    """With a grad scaler (fp16's path; it runs on the CPU too) the clipped update equals the unscaled one: clipping
    sees the true gradients. SGD, not Adam, so a wrongly scaled gradient would show in the update."""
    from simmim_swin.engine import train_step

    def loss_fn(model, batch):
        x, y = batch
        return (model(x) - y).square().mean()

    gen = torch.Generator().manual_seed(0)
    micro_batches = [(torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)) for _ in range(2)]
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, grad_norm, skipped = train_step(
            model, micro_batches, loss_fn, optimizer, scaler, "fp32", torch.device("cpu"), clip_grad=0.05
        )
        assert not bool(skipped) and float(grad_norm) > 0.05  # the clip was active
        results.append((model.weight.detach().clone(), float(loss), float(grad_norm)))
    (w_plain, loss_plain, norm_plain), (w_scaled, loss_scaled, norm_scaled) = results
    torch.testing.assert_close(w_scaled, w_plain, rtol=0, atol=1e-7)
    assert loss_scaled == pytest.approx(loss_plain) and norm_scaled == pytest.approx(norm_plain, rel=1e-6)


def test_scaler_skips_an_overflowing_step_and_lowers_the_scale() -> None:
    from simmim_swin.engine import train_step

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = model.weight.detach().clone()
    bad = [(torch.full((3, 4), float("inf")), torch.zeros(3, 2))]
    _, _, skipped = train_step(
        model, bad, lambda m, b: (m(b[0]) - b[1]).square().mean(), optimizer, scaler, "fp32", torch.device("cpu"), 1.0
    )
    assert bool(skipped) and torch.equal(model.weight, before) and scaler.get_scale() == 2.0**11


def test_without_clipping_the_norm_is_reported_and_the_gradients_are_untouched() -> None:
    """clip_grad=None: the returned norm is the gradients' own and the update is the plain one (nothing rescaled)."""
    from simmim_swin.engine import train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    (reference(x) - y).square().mean().backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    expected_norm = torch.cat([g.flatten() for g in grads]).norm()
    before = [p.detach().clone() for p in model.parameters()]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = lambda m, b: (m(b[0]) - b[1]).square().mean()  # noqa: E731
    _, grad_norm, skipped = train_step(model, [(x, y)], loss_fn, optimizer, None, "fp32", torch.device("cpu"), None)
    assert not bool(skipped)
    torch.testing.assert_close(grad_norm, expected_norm)
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)
