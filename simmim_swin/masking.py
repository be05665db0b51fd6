"""SimMIM's random patch mask: square mask patches chosen uniformly, expanded to the model's token grid."""

from __future__ import annotations

import math

import torch


class MaskGenerator:
    """Draw a 0/1 token mask with `ceil(num_mask_patches * mask_ratio)` masked patches of `mask_patch_size` px.

    Args:
        input_size: image side in pixels.
        mask_patch_size: side of one mask patch in pixels (32 in SimMIM); a multiple of model_patch_size that
            divides input_size.
        model_patch_size: the encoder's patch size in pixels (4 for Swin).
        mask_ratio: fraction of mask patches to mask, in (0, 1).
    """

    def __init__(
        self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4, mask_ratio: float = 0.6
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must lie strictly between 0 and 1 (SimMIM uses 0.6)")
        if model_patch_size <= 0 or mask_patch_size % model_patch_size != 0:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} must be a multiple of the model patch size {model_patch_size}; "
                f"use a multiple such as {8 * max(model_patch_size, 1)}"
            )
        if input_size % mask_patch_size != 0:
            raise ValueError(
                f"image size {input_size} is not divisible by mask_patch_size={mask_patch_size}; "
                "pick an image size that is a multiple of it"
            )
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid_size = input_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # tokens per mask patch side
        self.num_mask_patches = self.grid_size**2
        self.num_masked = int(math.ceil(self.num_mask_patches * mask_ratio))

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask of shape (input_size / model_patch_size,) * 2, dtype uint8, 1 = masked."""
        chosen = torch.randperm(self.num_mask_patches, generator=generator)[: self.num_masked]
        mask = torch.zeros(self.num_mask_patches, dtype=torch.uint8)
        mask[chosen] = 1
        mask = mask.view(self.grid_size, self.grid_size)
        # G, G -> G*scale, G*scale: each mask patch covers scale x scale tokens
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )
