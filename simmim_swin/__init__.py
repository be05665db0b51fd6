"""SimMIM pretraining for Swin Transformer V2, with CPB-transfer fine-tuning. The model names below are imported on
first use (PEP 562): importing a submodule, such as the command-line entry points for `--help`, loads no torch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "MaskGenerator": "masking",
    "SWINV2_SIZES": "models",
    "SimMIM": "models",
    "SwinTransformerV2": "models",
    "build_encoder": "models",
    "build_simmim": "models",
    "create_swinv2": "models",
    "from_timm": "models",
    "to_timm": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
