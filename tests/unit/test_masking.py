"""MaskGenerator against docs/reference.md §2: count, shape, block structure, uniformity, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from simmim_swin.masking import MaskGenerator


def _mask_patch_grid(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(T, T) token mask -> (G, G) mask-patch mask, asserting every mask patch is a uniform scale x scale block."""
    t = mask.shape[0]
    g = t // scale
    blocks = mask.reshape(g, scale, g, scale).permute(0, 2, 1, 3).reshape(g, g, scale * scale)
    assert torch.equal(blocks.min(-1).values, blocks.max(-1).values), "a mask patch is not uniform"
    return blocks[..., 0]


def test_reference_setting_192_32_ratio_06() -> None:
    gen = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    for seed in range(5):
        mask = gen(torch.Generator().manual_seed(seed))
        assert mask.shape == (48, 48)
        assert mask.dtype == torch.uint8
        assert set(mask.unique().tolist()) <= {0, 1}
        grid = _mask_patch_grid(mask, 8)
        assert grid.shape == (6, 6)
        assert int(grid.sum()) == 22
        assert int(mask.sum()) == 22 * 64


@pytest.mark.parametrize(
    ("input_size", "mask_patch", "patch", "ratio", "tokens", "num_masked"),
    [
        (224, 32, 4, 0.6, 56, 30),  # 49 patches, ceil(29.4)
        (64, 16, 4, 0.5, 16, 8),  # 16 patches, exactly half
        (96, 32, 4, 0.75, 24, 7),  # 9 patches, ceil(6.75)
        (32, 8, 4, 0.6, 8, 10),  # 16 patches, ceil(9.6)
        (64, 32, 2, 0.1, 32, 1),  # 4 patches, ceil(0.4); scale 16
        (192, 32, 4, 0.99, 48, 36),  # ceil(35.64): everything
    ],
)
def test_other_sizes(input_size, mask_patch, patch, ratio, tokens, num_masked) -> None:
    gen = MaskGenerator(input_size=input_size, mask_patch_size=mask_patch, model_patch_size=patch, mask_ratio=ratio)
    mask = gen(torch.Generator().manual_seed(1))
    assert mask.shape == (tokens, tokens)
    grid = _mask_patch_grid(mask, mask_patch // patch)
    assert grid.shape == (input_size // mask_patch,) * 2
    assert int(grid.sum()) == num_masked


def test_deterministic_given_generator() -> None:
    gen = MaskGenerator(192, 32, 4, 0.6)
    a = gen(torch.Generator().manual_seed(123))
    b = gen(torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    others = [gen(torch.Generator().manual_seed(s)) for s in range(124, 130)]
    assert any(not torch.equal(a, o) for o in others)


def test_global_rng_without_generator() -> None:
    gen = MaskGenerator(192, 32, 4, 0.6)
    torch.manual_seed(7)
    a = gen()
    torch.manual_seed(7)
    b = gen()
    assert torch.equal(a, b)


@pytest.mark.slow  # many draws: seconds
def test_patches_chosen_uniformly() -> None:
    """Each of the 36 mask patches is masked with frequency 22/36 over many draws (uniform, no replacement)."""
    gen = MaskGenerator(192, 32, 4, 0.6)
    rng = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, 6)
    draws = 2000
    for _ in range(draws):
        counts += _mask_patch_grid(gen(rng), 8).float()
    freq = counts / draws
    # binomial std at p = 0.61, n = 2000 is 0.011: 5 sigma
    assert (freq - 22 / 36).abs().max() < 0.055


@pytest.mark.parametrize("mask_patch", [30, 6, 2])
def test_mask_patch_not_multiple_of_patch_raises(mask_patch) -> None:
    with pytest.raises(ValueError, match=str(mask_patch)):
        MaskGenerator(input_size=192, mask_patch_size=mask_patch, model_patch_size=4, mask_ratio=0.6)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_mask_ratio_outside_open_interval_raises(ratio) -> None:
    with pytest.raises(ValueError, match="mask_ratio") as info:
        MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=ratio)
    assert str(ratio) in str(info.value)


def test_image_size_not_divisible_by_mask_patch_raises() -> None:
    with pytest.raises(ValueError, match="200"):
        MaskGenerator(input_size=200, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
