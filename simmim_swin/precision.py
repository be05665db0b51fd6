"""Device and numeric precision: the config strings resolved on this machine, autocast and the fp16 grad scaler."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """torch.device for "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"run.device={name!r} but CUDA is not available here; use run.device=cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"run.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            f"use an index below {torch.cuda.device_count()}"
        )
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision to run in (fp32, bf16 or fp16); "auto" is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":  # no speed benefit off the GPU; bf16 autocast works on the CPU
        raise ValueError(f"run.precision=fp16 needs CUDA, the device is {device}; use run.precision=bf16 or fp32")
    return str(name)  # the plain string of a config choice


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for a resolved bf16 / fp16 on `device`; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def build_grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its gradients underflow without loss scaling); None for fp32 and bf16."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
