"""SimMIM's random patch mask: square mask patches chosen uniformly, expanded to the model's token grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(eq=False)  # compared and hashed by identity
class MaskGenerator:
    """Draw a 0/1 token mask with `ceil(num_mask_patches * mask_ratio)` masked patches of `mask_patch_size` px.

    Sides in pixels: the mask patch (32 in SimMIM) is a multiple of the model's patch (4 for Swin) and divides the
    image's; mask_ratio lies in (0, 1).
    """

    input_size: int = 192
    mask_patch_size: int = 32
    model_patch_size: int = 4
    mask_ratio: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie strictly between 0 and 1 (SimMIM uses 0.6)")
        patch = self.model_patch_size
        if patch <= 0 or self.mask_patch_size % patch != 0:
            raise ValueError(
                f"mask_patch_size={self.mask_patch_size} must be a multiple of the model patch size {patch}; "
                f"use a multiple such as {8 * max(patch, 1)}"
            )
        if self.input_size % self.mask_patch_size != 0:
            raise ValueError(
                f"image size {self.input_size} is not divisible by mask_patch_size={self.mask_patch_size}; "
                "pick an image size that is a multiple of it"
            )
        self.grid_size = self.input_size // self.mask_patch_size  # mask patches per side
        self.scale = self.mask_patch_size // patch  # tokens per mask patch side
        self.num_mask_patches = self.grid_size**2
        self.num_masked = int(math.ceil(self.num_mask_patches * self.mask_ratio))

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask of shape (input_size / model_patch_size,) * 2, dtype uint8, 1 = masked."""
        chosen = torch.randperm(self.num_mask_patches, generator=generator)[: self.num_masked]
        mask = torch.zeros(self.num_mask_patches, dtype=torch.uint8)
        mask[chosen] = 1
        mask = mask.view(self.grid_size, self.grid_size)
        # G, G -> G*scale, G*scale: each mask patch covers scale x scale tokens
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
