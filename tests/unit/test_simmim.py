"""SimMIM model against docs/reference.md §2: mask token, linear decoder, masked L1 loss, norm_target."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simmim_swin.masking import MaskGenerator
from simmim_swin.models.simmim import SimMIM, make_norm_target

IMG = 64  # 16x16 tokens, 2x2 after four stages


class ConstantDecoder(nn.Module):
    """Stands in for the decoder: returns a fixed prediction, so the loss path can be fed chosen values."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.value


@pytest.fixture
def simmim(tiny_encoder, randomize):
    """Factory: SimMIM around a randomised tiny 4-stage encoder (64 px) in eval mode."""

    def make(norm_target: int | None = None, **encoder_overrides) -> SimMIM:
        encoder = tiny_encoder(**{"img_size": IMG, "num_classes": 0, **encoder_overrides})
        model = SimMIM(encoder, norm_target=norm_target)
        randomize(model)
        return model.eval()

    return make


def _masks(batch: int, img: int = IMG, seed: int = 0) -> torch.Tensor:
    """(B, img/4, img/4) float 0/1 token masks from the real generator (16 px mask patches, ratio 0.6)."""
    gen = MaskGenerator(input_size=img, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    rng = torch.Generator().manual_seed(seed)
    return torch.stack([gen(rng) for _ in range(batch)]).float()


def _pixel_mask(mask: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """(B, h, w) token mask -> (B, 1, h*patch, w*patch) pixel mask."""
    return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


def _direct_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """reference §2: sum |pred - target| over masked pixels and channels / (masked pixels + 1e-5) / in_chans."""
    m = _pixel_mask(mask)
    return ((pred - target).abs() * m).sum() / (m.sum() + 1e-5) / pred.shape[1]


def _target(images: torch.Tensor, norm_target: int | None) -> torch.Tensor:
    return images if norm_target is None else make_norm_target(images, norm_target)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("overrides", "c_last", "stride"),
    [({}, 128, 32), ({"img_size": 32, "depths": (2, 2, 2), "num_heads": (2, 2, 4)}, 64, 16)],
)
def test_decoder_is_1x1_conv_and_pixel_shuffle(simmim, overrides, c_last, stride) -> None:
    model = simmim(**overrides)
    conv, shuffle = model.decoder[0], model.decoder[1]
    assert len(model.decoder) == 2, "the decoder is linear: no hidden layers"
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (1, 1)
    assert conv.in_channels == c_last and conv.out_channels == stride * stride * 3
    assert isinstance(shuffle, nn.PixelShuffle) and shuffle.upscale_factor == stride
    assert model.patch_size == 4
    img = overrides.get("img_size", IMG)
    images = torch.randn(2, 3, img, img)
    loss, rec = model(images, _masks(2, img))
    assert rec.shape == images.shape
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_mask_token_shape_and_init(tiny_encoder) -> None:
    model = SimMIM(tiny_encoder(img_size=IMG, num_classes=0, embed_dim=96, num_heads=(3, 6, 12, 24)))
    token = model.encoder.mask_token
    assert isinstance(token, nn.Parameter)
    assert token.shape == (1, 1, 96)
    assert 0.01 < token.std().item() < 0.03  # truncated normal, std 0.02
    assert "encoder.mask_token" in model.state_dict()


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("norm_target", [None, 47])
def test_perfect_reconstruction_gives_zero_loss(simmim, norm_target) -> None:
    model = simmim(norm_target=norm_target)
    images = torch.randn(2, 3, IMG, IMG)
    model.decoder = ConstantDecoder(_target(images, norm_target))
    loss, _ = model(images, _masks(2))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("norm_target", [None, 47])
def test_unmasked_pixels_do_not_change_loss(simmim, norm_target) -> None:
    model = simmim(norm_target=norm_target)
    images = torch.randn(2, 3, IMG, IMG)
    mask = _masks(2)
    pix = _pixel_mask(mask)
    pred = torch.randn(2, 3, IMG, IMG)
    losses = []
    for candidate in (pred, pred + 5 * torch.randn_like(pred) * (1 - pix), pred + 5 * torch.randn_like(pred) * pix):
        model.decoder = ConstantDecoder(candidate)
        losses.append(model(images, mask)[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert abs(losses[2] - losses[0]) > 0.1  # the masked pixels do count


@pytest.mark.parametrize("norm_target", [None, 47])
def test_loss_normalisation_by_hand(simmim, norm_target) -> None:
    """An error of 1 on every pixel gives n / (n + 1e-5); an error of 2 on one channel of three gives 2/3 of that."""
    model = simmim(norm_target=norm_target)
    images = torch.randn(2, 3, IMG, IMG)
    mask = _masks(2)
    n = _pixel_mask(mask).sum().item()
    target = _target(images, norm_target)
    model.decoder = ConstantDecoder(target + 1.0)
    assert model(images, mask)[0].item() == pytest.approx(n / (n + 1e-5), rel=1e-5)
    one_channel = target.clone()
    one_channel[:, 0] -= 2.0
    model.decoder = ConstantDecoder(one_channel)
    assert model(images, mask)[0].item() == pytest.approx(2 / 3 * n / (n + 1e-5), rel=1e-5)


@pytest.mark.parametrize("norm_target", [None, 47])
def test_loss_equals_direct_computation(simmim, norm_target) -> None:
    model = simmim(norm_target=norm_target)
    images = torch.randn(3, 3, IMG, IMG)
    mask = _masks(3)
    loss, rec = model(images, mask)
    expected = _direct_loss(rec, _target(images, norm_target), mask)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert loss.item() > 0.1


def test_no_masked_tokens_gives_zero_loss(simmim) -> None:
    model = simmim()
    loss, _ = model(torch.randn(2, 3, IMG, IMG), torch.zeros(2, IMG // 4, IMG // 4))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_uint8_and_float_masks_agree(simmim) -> None:
    model = simmim(norm_target=47)
    images = torch.randn(2, 3, IMG, IMG)
    mask = _masks(2)
    loss_f, rec_f = model(images, mask)
    loss_u, rec_u = model(images, mask.to(torch.uint8))
    torch.testing.assert_close(loss_u, loss_f)
    torch.testing.assert_close(rec_u, rec_f)


# ---------------------------------------------------------------- encoder input and gradients


def test_gradient_reaches_mask_token(simmim) -> None:
    model = simmim(norm_target=47).train()
    loss, _ = model(torch.randn(2, 3, IMG, IMG), _masks(2))
    loss.backward()
    grad = model.encoder.mask_token.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ape", [False, True])
def test_masked_tokens_replaced_after_patch_embedding_norm(simmim, ape) -> None:
    """Input to the first stage = patch_embed(x) * (1 - m) + mask_token * m (+ the absolute position embedding)."""
    model = simmim(ape=ape)
    encoder = model.encoder
    seen = {}
    h1 = encoder.patch_embed.register_forward_hook(lambda m, args, out: seen.__setitem__("embed", out.detach()))
    h2 = encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("stage0", args[0].detach()))
    images = torch.randn(2, 3, IMG, IMG)
    mask = _masks(2)
    model(images, mask)
    h1.remove()
    h2.remove()
    c = encoder.mask_token.shape[-1]
    embed = seen["embed"].reshape(2, -1, c)  # B, L, C whatever the module's layout
    m = mask.reshape(2, -1, 1)
    expected = embed * (1 - m) + encoder.mask_token.detach() * m
    if ape:
        expected = expected + encoder.absolute_pos_embed.detach().reshape(1, -1, c)
    torch.testing.assert_close(seen["stage0"].reshape(2, -1, c), expected, atol=1e-6, rtol=1e-6)


def test_decoder_reads_encoder_features_as_nchw(simmim) -> None:
    model = simmim()
    seen = {}
    handle = model.decoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].detach()))
    images = torch.randn(2, 3, IMG, IMG)
    mask = _masks(2)
    model(images, mask)
    handle.remove()
    with torch.no_grad():
        feats = model.encoder.forward_features(images, mask)  # B, H/32, W/32, C (NHWC)
    assert seen["z"].shape == (2, 128, 2, 2)
    torch.testing.assert_close(seen["z"], feats.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- norm_target


def _norm_target_loops(images: torch.Tensor, window: int) -> torch.Tensor:
    """reference §2 per-pixel normalisation by the window x window neighbourhood, padded cells not counted, float64."""
    r = window // 2
    x = images.double()
    out = torch.empty_like(x)
    b_, c_, h_, w_ = x.shape
    for b in range(b_):
        for c in range(c_):
            for y in range(h_):
                for xx in range(w_):
                    vals = x[b, c, max(0, y - r) : y + r + 1, max(0, xx - r) : xx + r + 1].reshape(-1)
                    mean = vals.mean()
                    var = ((vals - mean) ** 2).sum() / (vals.numel() - 1)  # unbiased
                    out[b, c, y, xx] = (x[b, c, y, xx] - mean) / math.sqrt(max(var.item(), 0.0) + 1e-6)
    return out


@pytest.mark.parametrize(("shape", "window"), [((1, 3, 20, 20), 47), ((1, 3, 20, 20), 5), ((2, 2, 9, 13), 3)])
def test_make_norm_target_matches_loops(shape, window) -> None:
    images = torch.randn(shape) * 2 + 0.5
    got = make_norm_target(images, window)
    assert got.shape == images.shape and got.dtype == images.dtype
    torch.testing.assert_close(got.double(), _norm_target_loops(images, window), atol=2e-4, rtol=1e-4)


def test_make_norm_target_default_window_is_47() -> None:
    images = torch.randn(1, 3, 60, 60)
    torch.testing.assert_close(make_norm_target(images), make_norm_target(images, 47))
    assert not torch.allclose(make_norm_target(images, 47), make_norm_target(images, 5))


def test_make_norm_target_constant_region_is_finite() -> None:
    images = torch.zeros(1, 3, 16, 16)
    images[..., 8:, 8:] = 1.0
    got = make_norm_target(images, 5)
    assert torch.isfinite(got).all()
    assert got[..., :4, :4].abs().max() < 1e-3  # flat neighbourhood: x - mean = 0, var clamped at 0


@pytest.mark.parametrize("norm_target", [None, 47])
def test_target_to_image_inverts_the_target(simmim, norm_target) -> None:
    model = simmim(norm_target=norm_target)
    images = torch.randn(2, 3, IMG, IMG)
    no_mask = torch.zeros(2, IMG // 4, IMG // 4)  # every pixel visible: the statistics of the target itself
    back = model.target_to_image(images, _target(images, norm_target), no_mask)
    torch.testing.assert_close(back, images, atol=1e-4, rtol=1e-4)
