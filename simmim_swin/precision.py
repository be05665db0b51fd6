"""Device and numeric precision: resolve the config strings, build the autocast context and the fp16 grad scaler."""

from __future__ import annotations

import contextlib
import re

import torch

from .config import PRECISIONS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """torch.device for "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"run.device={name!r} is unknown; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"run.device={name!r} but CUDA is not available here; use run.device=cpu (or auto)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(
            f"run.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            f"use an index below {torch.cuda.device_count()}"
        )
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision to run in (fp32, bf16 or fp16); "auto" is bf16 on CUDA and fp32 elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"run.precision={name!r} is unknown; use one of {list(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        # fp16 needs loss scaling and has no speed benefit off the GPU; bf16 autocast works on the CPU.
        raise ValueError(f"run.precision=fp16 needs CUDA, the device is {device}; use run.precision=bf16 or fp32")
    return name


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16 / fp16 on `device`; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is unknown; resolve it first (fp32, bf16 or fp16)")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def build_grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its gradients underflow without loss scaling); None for fp32 and bf16."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r} is unknown; resolve it first (fp32, bf16 or fp16)")
    if precision != "fp16":
        return None
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.amp.GradScaler(device_type)
