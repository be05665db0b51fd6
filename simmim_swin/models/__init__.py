"""SwinV2 encoder and the SimMIM model."""

from .simmim import SimMIM, build_encoder, build_simmim, make_norm_target
from .swinv2 import SWINV2_SIZES, SwinTransformerV2, create_swinv2, from_timm, to_timm

__all__ = [
    "SWINV2_SIZES",
    "SimMIM",
    "SwinTransformerV2",
    "build_encoder",
    "build_simmim",
    "create_swinv2",
    "from_timm",
    "make_norm_target",
    "to_timm",
]
