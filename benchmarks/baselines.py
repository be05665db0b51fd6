"""The models benchmarks/throughput.py compares: our SimMIM, and timm's and Hugging Face's SwinV2 encoders inside
the same SimMIM mask token, linear decoder and loss.

  ours        simmim_swin's SimMIM + SwinTransformerV2, eager attention (matmul, softmax, matmul)
  ours-fused  the same model with model.encoder.set_fused_attn(True): scaled_dot_product_attention
  timm        timm.models.swin_transformer_v2.SwinTransformerV2 (num_classes=0) with our mask token, decoder and
              loss, and our weights loaded: only the encoder code differs
  hf          transformers.Swinv2ForMaskedImageModeling's encoder and decoder (its own init) with our loss
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from collections.abc import Callable

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from torch import nn

from simmim_swin.models import SWINV2_SIZES, SimMIM, build_simmim
from simmim_swin.models.swinv2 import is_derived_buffer

VARIANTS = ("ours", "ours-fused", "timm", "hf")


class TimmSimMIM(nn.Module):
    """timm's SwinV2 encoder inside SimMIM: mask token after timm's patch_embed, timm's stages and norm, our decoder."""

    # the very same target and loss code as simmim_swin's SimMIM, so that only the encoder differs
    target = SimMIM.target
    loss = SimMIM.loss

    def __init__(self, encoder: TimmSwinV2, norm_target: int | None, patch_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.norm_target = norm_target
        self.patch_size = patch_size
        self.in_chans = encoder.patch_embed.proj.in_channels
        # on the encoder so that the state-dict keys are ours (encoder.mask_token) and our weights load directly
        self.encoder.mask_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, encoder.embed_dim), std=0.02))
        stride = patch_size * 2 ** (len(encoder.layers) - 1)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, stride**2 * self.in_chans, kernel_size=1), nn.PixelShuffle(stride)
        )

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), mask (B, H/p, W/p) -> (B, H/s, W/s, C_last)."""
        x = self.encoder.patch_embed(images)  # B, H/p, W/p, C (timm's swinv2 is channels-last)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.encoder.mask_token.to(x.dtype) * w
        return self.encoder.norm(self.encoder.layers(x))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reconstruction), as SimMIM.forward."""
        reconstruction = self.decoder(self.forward_features(images, mask).permute(0, 3, 1, 2))
        return self.loss(reconstruction, self.target(images), mask), reconstruction


class HFSimMIM(nn.Module):
    """Hugging Face's Swinv2ForMaskedImageModeling (encoder with mask token, decoder) with our target and loss.

    HF's own forward computes an L1 loss against the raw input; SwinV2's recipe uses the normalised target, so
    the encoder and decoder are called directly and the loss is ours, as for the other variants.
    """

    target = SimMIM.target
    loss = SimMIM.loss

    def __init__(self, hf_model: nn.Module, norm_target: int | None, patch_size: int, stride: int) -> None:
        super().__init__()
        self.hf = hf_model
        self.norm_target = norm_target
        self.patch_size = patch_size
        self.stride = stride
        self.in_chans = hf_model.config.num_channels

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), mask (B, H/p, W/p) -> (B, H/s, W/s, C_last)."""
        tokens = self.hf.swinv2(images, bool_masked_pos=mask.flatten(1).bool(), return_dict=False)[0]  # B, L, C
        B, _, H, W = images.shape
        return tokens.view(B, H // self.stride, W // self.stride, -1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reconstruction), as SimMIM.forward."""
        reconstruction = self.hf.decoder(self.forward_features(images, mask).permute(0, 3, 1, 2))
        return self.loss(reconstruction, self.target(images), mask), reconstruction


def build_reference(args: argparse.Namespace, img_size: int) -> SimMIM:
    """Our SimMIM at `img_size`, eager attention; every variant starts from its weights (hf: same dims only)."""
    torch.manual_seed(args.seed)
    return build_simmim(
        args.arch,
        norm_target=args.norm_target or None,
        img_size=img_size,
        patch_size=args.patch_size,
        window_size=args.window,
        drop_path_rate=args.drop_path,
        fused_attn=False,
    )


def build_variant(name: str, reference: SimMIM, args: argparse.Namespace, img_size: int) -> nn.Module:
    """The model of variant `name` at `img_size` (on the CPU, in train mode)."""
    size = SWINV2_SIZES[args.arch]
    num_stages = len(size["depths"])
    if name in ("ours", "ours-fused"):
        model = copy.deepcopy(reference)
        model.encoder.set_fused_attn(name == "ours-fused")
        return model
    if name == "timm":
        encoder = TimmSwinV2(
            img_size=img_size,
            patch_size=args.patch_size,
            num_classes=0,
            embed_dim=size["embed_dim"],
            depths=size["depths"],
            num_heads=size["num_heads"],
            window_size=args.window,
            drop_path_rate=args.drop_path,
            pretrained_window_sizes=(0,) * num_stages,
        )
        model = TimmSimMIM(encoder, reference.norm_target, args.patch_size)
        state = {k: v for k, v in reference.state_dict().items() if not is_derived_buffer(k)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(is_derived_buffer(k) for k in missing), (missing, unexpected)
        return model
    import transformers

    config = transformers.Swinv2Config(
        image_size=img_size,
        patch_size=args.patch_size,
        num_channels=3,
        embed_dim=size["embed_dim"],
        depths=list(size["depths"]),
        num_heads=list(size["num_heads"]),
        window_size=args.window,
        drop_path_rate=args.drop_path,
        encoder_stride=reference.encoder_stride,
        pretrained_window_sizes=[0] * num_stages,
    )
    hf_model = transformers.Swinv2ForMaskedImageModeling(config)
    return HFSimMIM(hf_model, reference.norm_target, args.patch_size, reference.encoder_stride)


def skip_reason(name: str, arch: str) -> str | None:
    """Why variant `name` cannot run here, or None."""
    if name == "hf" and importlib.util.find_spec("transformers") is None:
        return "hf skipped: transformers is not installed (pip install transformers to include it)"
    if name in ("timm", "hf") and SWINV2_SIZES[arch].get("extra_norm_every"):
        return f"{name} skipped: its SwinV2 has no extra main-branch norms, which arch={arch} uses"
    return None


def encoder_fn(model: nn.Module) -> Callable:
    """The encoder forward (images, mask) -> features of any variant."""
    return model.encoder.forward_features if isinstance(model, SimMIM) else model.forward_features
