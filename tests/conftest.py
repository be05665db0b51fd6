"""Shared fixtures: the commands' torch thread count, a fixed seed per test, a tiny SwinV2 factory, parameter
randomisation, reference attention."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# The smallest encoder that still has four stages, a shifted stage, window clipping and a 1x1 last stage:
# 32 px / patch 4 -> token grids 8, 4, 2, 1; window 4 -> (4, shift 2), (4, 0), (2, 0), (1, 0).
TINY_ENCODER_KWARGS = dict(
    img_size=32,
    patch_size=4,
    embed_dim=16,
    depths=(2, 2, 2, 2),
    num_heads=(2, 2, 4, 4),
    window_size=4,
    num_classes=10,
    drop_path_rate=0.0,
)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads_as_the_commands_set_them() -> Iterator[None]:
    """One torch thread on a machine of at most 2 cores unless OMP_NUM_THREADS chooses, as the commands give a CPU
    run there: two threads on two busy cores spin-wait (heavy unit tests took 85 s against 37 s with one thread at
    load 4, and used a third less CPU time on a quiet machine)."""
    from simmim_swin.cli.common import default_cpu_threads

    threads = torch.get_num_threads()
    default_cpu_threads("cpu")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _root_logging():
    """A command run in-process leaves Hydra's job logging on the root logger (handlers bound to that test's captured
    streams): put the root logger back, so later tests see the package's warnings on their own stderr."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture(autouse=True)
def _pil_pixel_limit() -> Iterator[None]:
    """Reading an image sets PIL's process-wide pixel limit to the caller's max_pixels (loader workers and timm's
    crops read it there): put it back, so a test's small limit never refuses the next test's images."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.fixture
def tiny_encoder() -> Callable[..., nn.Module]:
    """Factory: a tiny SwinTransformerV2 in eval mode; keyword arguments override TINY_ENCODER_KWARGS."""
    from simmim_swin.models.swinv2 import SwinTransformerV2

    def make(**overrides) -> nn.Module:
        kwargs = {**TINY_ENCODER_KWARGS, **overrides}
        return SwinTransformerV2(**kwargs).eval()

    return make


def randomize_parameters(model: nn.Module, seed: int = 1, linear_std: float | None = None) -> nn.Module:
    """Move every parameter away from its init so that no block is the identity (post-norms start at zero).

    LayerNorm weights ~ 1 + 0.2 N(0,1), biases (LayerNorm, Linear, q/v) ~ 0.05 N(0,1), logit_scale around ln 10
    with the first head above the ln 100 clamp; Linear weights are redrawn with std `linear_std` if given.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn_like(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(1.0 + 0.2 * randn_like(module.weight))
                module.bias.copy_(0.05 * randn_like(module.bias))
            elif isinstance(module, nn.Linear):
                if linear_std is not None:
                    module.weight.copy_(linear_std * randn_like(module.weight))
                if module.bias is not None:
                    module.bias.copy_(0.05 * randn_like(module.bias))
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q_bias", "v_bias"):
                p.copy_(0.05 * randn_like(p))
            elif leaf == "logit_scale":
                p.copy_(math.log(10) + 0.5 * randn_like(p))
                p.view(-1)[0] = 5.0  # above ln 100 = 4.605: exercises the clamp
            elif leaf in ("mask_token", "absolute_pos_embed"):
                p.copy_(0.5 * randn_like(p))
    return model


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    """The randomize_parameters function, as a fixture."""
    return randomize_parameters


def reference_coords_table(window: int, pretrained_window: int = 0) -> torch.Tensor:
    """reference §1 log-spaced CPB input for a square window, float64, shape (2W-1, 2W-1, 2), 'ij' order."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float64)
    denom = pretrained_window - 1 if pretrained_window > 0 else window - 1
    offsets = offsets / max(denom, 1) * 8  # W = 1 has the single offset 0: any non-zero divisor gives 0
    offsets = torch.sign(offsets) * torch.log2(offsets.abs() + 1) / math.log2(8)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    return torch.stack([dy, dx], dim=-1)


def reference_position_index(window: int) -> torch.Tensor:
    """reference §1 relative_position_index[i, j] for tokens i, j of a square window, built with explicit loops."""
    n = window * window
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dy = i // window - j // window
            dx = i % window - j % window
            index[i, j] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
    return index


def reference_window_attention(
    attn: nn.Module,
    x: torch.Tensor,
    window: int,
    pretrained_window: int = 0,
    mask: torch.Tensor | None = None,
    logit_cap: float | None = math.log(100),
) -> torch.Tensor:
    """reference §1 cosine window attention computed from `attn`'s parameters alone (no calls into its code).

    x: (B*nW, N, C); mask: (nW, N, N) or None; logit_cap None means no clamp (to show the clamp matters).
    """
    b_, n, c = x.shape
    heads = attn.logit_scale.shape[0]
    q_bias = attn.q_bias
    qkv_bias = torch.cat([q_bias, torch.zeros_like(q_bias), attn.v_bias])  # k has no bias
    qkv = x @ attn.qkv.weight.t() + qkv_bias  # B*nW, N, 3C
    q, k, v = qkv.view(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # each B*nW, h, N, d
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # B*nW, h, N, N
    scale = attn.logit_scale if logit_cap is None else attn.logit_scale.clamp(max=logit_cap)
    logits = cos * scale.exp()  # no 1/sqrt(d)

    table = reference_coords_table(window, pretrained_window).to(x.dtype)  # 2W-1, 2W-1, 2
    fc1, fc2 = attn.cpb_mlp[0], attn.cpb_mlp[2]
    cpb = F.relu(table @ fc1.weight.t() + fc1.bias) @ fc2.weight.t()  # 2W-1, 2W-1, h
    cpb = cpb.reshape(-1, heads)[reference_position_index(window).view(-1)].view(n, n, heads)
    logits = logits + 16 * torch.sigmoid(cpb.permute(2, 0, 1))
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    out = logits.softmax(-1) @ v  # B*nW, h, N, d
    out = out.transpose(1, 2).reshape(b_, n, c)
    return out @ attn.proj.weight.t() + attn.proj.bias


@pytest.fixture
def reference_attention() -> Callable[..., torch.Tensor]:
    """The reference_window_attention function, as a fixture."""
    return reference_window_attention


@pytest.fixture
def reference_tables() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(reference_coords_table, reference_position_index), as a fixture."""
    return reference_coords_table, reference_position_index


PROBE_COLOURS = {"blue": (30, 40, 200), "green": (40, 190, 50), "red": (210, 30, 30)}


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """A tiny labelled set: train/ and val/ with one sub-folder per colour of 8 noisy 24 px images of it."""
    root, rng = tmp_path / "class_folder", np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in PROBE_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(8):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
