"""SimMIM (Xie et al., 2021, arXiv 2111.09886): mask token, one-layer linear pixel decoder, L1 on masked pixels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .swinv2 import SwinTransformerV2, create_swinv2

NORM_TARGET_EPS = 1e-6
LOSS_EPS = 1e-5


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over the window x window neighbourhood of each pixel, cells outside the image counting 0."""
    # pooled as rows then columns: 2*window instead of window**2 taps per pixel (the 2-D pool at window 47 was most
    # of a CPU training step)
    pad = window // 2
    x = F.avg_pool2d(x, (window, 1), stride=1, padding=(pad, 0), divisor_override=1)
    return F.avg_pool2d(x, (1, window), stride=1, padding=(0, pad), divisor_override=1)


def _local_mean_var(
    images: torch.Tensor, window: int, visible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and unbiased variance over each window x window neighbourhood's pixels inside the image.

    With `visible` (B, 1, H, W), 1 = visible, only the visible pixels count; a neighbourhood without one takes its
    image's visible statistics, an image without one 0 / 1.
    """
    weight = torch.ones_like(images[:1, :1]) if visible is None else visible
    count = _box_sum(weight, window)  # pixels per neighbourhood
    x = images if visible is None else images * visible
    mean = _box_sum(x, window) / count.clamp(min=1.0)
    mean_sq = _box_sum(x * images, window) / count.clamp(min=1.0)
    # the count/(count-1) factor makes the variance unbiased
    var = ((mean_sq - mean**2) * count / (count - 1).clamp(min=1.0)).clamp(min=0.0)
    if visible is None:
        return mean, var
    n = visible.sum(dim=(-2, -1), keepdim=True)  # B, 1, 1, 1
    g_mean = x.sum(dim=(-2, -1), keepdim=True) / n.clamp(min=1.0)
    g_var = ((images - g_mean) ** 2 * visible).sum(dim=(-2, -1), keepdim=True) / (n - 1).clamp(min=1.0)
    g_var = torch.where(n > 1, g_var, torch.ones_like(g_var))
    empty = count < 0.5
    return torch.where(empty, g_mean, mean), torch.where(empty, g_var, var)


def make_norm_target(images: torch.Tensor, window: int = 47) -> torch.Tensor:
    """SwinV2's reconstruction target: each pixel normalised by the mean / std of its window x window neighbourhood."""
    mean, var = _local_mean_var(images.float(), window)
    return (images.float() - mean) / (var + NORM_TARGET_EPS).sqrt()


def upsample_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask (B, H/p, W/p) -> pixel mask (B, 1, H, W)."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


class SimMIM(nn.Module):
    """SwinV2 encoder (headless; its mask token created if missing) with a linear decoder of the masked pixels.

    Args:
        norm_target: odd window of the per-pixel target normalisation (47 for SwinV2), or None for the input itself.
    """

    def __init__(self, encoder: SwinTransformerV2, norm_target: int | None = 47) -> None:
        super().__init__()
        if encoder.num_classes != 0:
            raise ValueError(
                f"SimMIM needs a headless encoder, got num_classes={encoder.num_classes}; build it with num_classes=0"
            )
        if norm_target is not None and (norm_target < 3 or norm_target % 2 == 0):
            raise ValueError(f"norm_target window must be an odd size >= 3 (47 in SwinV2), got {norm_target}")
        self.encoder = encoder
        encoder.enable_mask_token()
        self.norm_target = norm_target
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size
        self.encoder_stride = encoder.patch_size * 2 ** (encoder.num_layers - 1)  # total downsampling
        # the paper's decoder is linear: a 1x1 conv to stride^2 * C pixel values, rearranged to full resolution
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

    def no_weight_decay(self) -> set[str]:
        """The encoder's no-weight-decay patterns under its `encoder.` prefix (mask_token among them)."""
        return {f"encoder.{pattern}" for pattern in self.encoder.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer ordinals of the encoder's parameters (prefix `encoder.`); the decoder gets the top id."""
        encoder_matcher = self.encoder.group_matcher(coarse)
        top = encoder_matcher("norm.weight")  # the final norm is always in the top group

        def matcher(name: str) -> int:
            return encoder_matcher(name[len("encoder.") :]) if name.startswith("encoder.") else top

        return matcher

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder is trained to output for `images`."""
        return images if self.norm_target is None else make_norm_target(images, self.norm_target)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) normalised, mask (B, H/p, W/p) 0/1 -> (loss, reconstruction (B, C, H, W))."""
        z = self.encoder.forward_features(images, mask)  # B, H/s, W/s, C_last
        # contiguous NCHW (a small copy of the last stage): a channels-last input would give the 1x1 conv a
        # channels-last weight gradient, which DDP's gradient buckets then copy with a warning every step
        reconstruction = self.decoder(z.permute(0, 3, 1, 2).contiguous())  # B, C, H, W
        loss = self.loss(reconstruction, self.target(images), mask)
        return loss, reconstruction

    def loss(self, reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 summed over masked pixels and channels / (masked pixels + 1e-5) / channels; visible pixels add 0."""
        pixel_mask = upsample_mask(mask, self.patch_size).to(torch.float32)  # B, 1, H, W
        l1 = F.l1_loss(reconstruction.float(), target.float(), reduction="none")
        return (l1 * pixel_mask).sum() / (pixel_mask.sum() + LOSS_EPS) / self.in_chans

    @torch.no_grad()
    def target_to_image(self, images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Map a reconstruction made with token `mask` back to the normalised-image space of `images`, for display."""
        # the statistics undoing norm_target come from the VISIBLE pixels only: with the masked ones, a model that
        # predicts nothing (all zeros) would still be shown with the hidden content's mean and contrast
        if self.norm_target is None:
            return reconstruction.float()
        visible = 1.0 - upsample_mask(mask, self.patch_size).to(torch.float32)  # B, 1, H, W
        mean, var = _local_mean_var(images.float(), self.norm_target, visible)
        return reconstruction.float() * (var + NORM_TARGET_EPS).sqrt() + mean


def build_encoder(arch: str, num_classes: int = 0, **kwargs: Any) -> SwinTransformerV2:
    """create_swinv2 with no classifier unless `num_classes` is given."""
    return create_swinv2(arch, num_classes=num_classes, **kwargs)


def build_simmim(arch: str, norm_target: int | None = 47, **encoder_kwargs: Any) -> SimMIM:
    """SimMIM around a headless encoder of a named size (a key of SWINV2_SIZES), create_swinv2's keyword arguments."""
    return SimMIM(build_encoder(arch, num_classes=0, **encoder_kwargs), norm_target=norm_target)
