"""SimMIM pretraining for Swin Transformer V2, with CPB-transfer fine-tuning."""

from .masking import MaskGenerator
from .models import (
    SWINV2_SIZES,
    SimMIM,
    SwinTransformerV2,
    build_encoder,
    build_simmim,
    create_swinv2,
    from_timm,
    to_timm,
)

__version__ = "0.1.0"

__all__ = [
    "SWINV2_SIZES",
    "MaskGenerator",
    "SimMIM",
    "SwinTransformerV2",
    "build_encoder",
    "build_simmim",
    "create_swinv2",
    "from_timm",
    "to_timm",
]
