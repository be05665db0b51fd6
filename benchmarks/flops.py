"""Measurement helpers for benchmarks/throughput.py: FLOP counts, the accelerator peaks MFU is taken against,
per-call timing, the memory a model holds, a per-kernel profile of a few training steps, and what the numbers
were measured on.

FLOPs are counted by torch's own FlopCounterMode (torch.utils.flop_counter) rather than an analytic Swin formula:
it sees exactly the matmuls, convolutions and attention kernels that run (aten mm/addmm/bmm/convolution and, on
CUDA, the SDPA flash / memory-efficient / cuDNN kernels, forward and backward). Elementwise work (LayerNorm,
softmax, GELU, the optimizer update) is not counted, as is usual for model FLOP utilisation.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, by (device-name fragment,
# precision); the first fragment found in torch.cuda.get_device_name() wins, so specific names come first.
# fp32 is left out on purpose: whether it runs as TF32 depends on torch.backends flags; pass --peak-tflops.
PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", "bf16", 756.0),
    ("H100 NVL", "bf16", 835.0),
    ("H100", "bf16", 989.0),  # SXM (the "H100 80GB HBM3" name)
    ("H200", "bf16", 989.0),
    ("A100", "bf16", 312.0),
    ("H100 PCIe", "fp16", 756.0),
    ("H100 NVL", "fp16", 835.0),
    ("H100", "fp16", 989.0),
    ("H200", "fp16", 989.0),
    ("A100", "fp16", 312.0),
)

ATTENTION_KERNEL_HINTS = ("attention", "fmha", "flash", "cudnn_sdpa", "sdpa")


def default_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The peak TFLOP/s of `device` at `precision` from PEAK_TFLOPS, or None (CPU or unknown: MFU is n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table_precision, peak in PEAK_TFLOPS:
        if fragment in name and table_precision == precision:
            return peak
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmul / convolution / attention kernels that one call of `fn` runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_at_batch(make_fn: Callable[[int], Callable[[], object]], batch_size: int) -> int:
    """FLOPs of `make_fn(batch_size)()`, counted at batch 1 and 2 and extrapolated linearly.

    Every kernel of the step is linear in the batch except the CPB MLP, which runs once per block whatever the
    batch: f(B) = f(1) + (B - 1) * (f(2) - f(1)) is exact, and counting at a small batch keeps it cheap.
    """
    one = count_flops(make_fn(1))
    if batch_size == 1:
        return one
    two = count_flops(make_fn(2))
    return one + (batch_size - 1) * (two - one)


def mfu(flops: int | None, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak, or None when either is unknown."""
    if flops is None or peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def time_calls(fn: Callable[[], None], repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `repeats` back-to-back calls of `fn`."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        events[0].record()
        for i in range(repeats):
            fn()
            events[i + 1].record()
        torch.cuda.synchronize(device)  # one sync per round, none between calls
        return [events[i].elapsed_time(events[i + 1]) for i in range(repeats)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes held by the model's parameters and buffers, plus the optimizer state if given."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def profile_steps(fn: Callable[[], object], steps: int, device: torch.device, path: Path) -> list[str]:
    """Profile `steps` calls of `fn`, write the per-kernel table to `path`, return the attention kernels' names.

    The names tell which SDPA backend ran (flash, memory-efficient `fmha`/`efficient_attention`, or cuDNN).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort_by, row_limit=40, max_name_column_width=90) + "\n")
    return sorted({e.key for e in events if any(h in e.key.lower() for h in ATTENTION_KERNEL_HINTS)})


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, precision: str, peak_tflops: float | None) -> dict:
    """What the numbers were measured on."""
    transformers_version = None
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        transformers_version = transformers.__version__
    return dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        cpu_model=cpu_model(),
        num_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        precision=precision,
        peak_tflops=peak_tflops,
        torch=torch.__version__,
        timm=timm.__version__,
        transformers=transformers_version,
        python=platform.python_version(),
        load_average_start=os.getloadavg(),
    )
