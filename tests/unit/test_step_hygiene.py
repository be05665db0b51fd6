"""The training step is written for the GPU even when tested on the CPU: one compiled graph, no host syncs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from simmim_swin.config import OptimConfig
from simmim_swin.engine import StepStats, train_step
from simmim_swin.masking import MaskGenerator
from simmim_swin.models import build_simmim
from simmim_swin.optim import build_optimizer
from simmim_swin.pretrain import masked_pixel_loss

# ops that copy a device value to the host (item(), bool(), int()) or need the host to size their output
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}


def tiny_simmim(**model_overrides) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = build_simmim("pico", img_size=32, window_size=4, drop_path_rate=0.1, **model_overrides)
    generator = MaskGenerator(32, 8, 4, 0.6)
    masks = torch.stack([generator(generator=torch.Generator().manual_seed(k)) for k in range(2)])  # 2, 8, 8
    return model, torch.randn(2, 3, 32, 32), masks


class SyncRecorder(TorchDispatchMode):
    """Records every aten op that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # indexing with a boolean mask computes the output size from the mask's contents: a sync too
        bool_index = name in ("index", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in SYNCING_OPS or bool_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_simmim_forward_is_one_graph_without_breaks(fused_attn, grad_checkpointing):
    """torch.compile sees the whole SimMIM forward (encoder, mask token, decoder, loss) as one graph."""
    model, images, masks = tiny_simmim(fused_attn=fused_attn, grad_checkpointing=grad_checkpointing)
    model.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(images, masks)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("clip_grad", [5.0, None])
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_training_step_has_no_host_syncs(accum_steps, clip_grad):
    """Forward, loss, backward, clipping, the non-finite check, fused AdamW's step and the loop's counts: nothing
    reads a device value on the host (no .item() per step), so on a GPU the host can queue the next step meanwhile."""
    model, images, masks = tiny_simmim(fused_attn=True)
    optimizer = build_optimizer(model, OptimConfig(fused=True), lr=1e-3)
    micro_batches = [(images, masks)] * accum_steps
    device = torch.device("cpu")
    # the first step creates the Adam state
    train_step(model, micro_batches, masked_pixel_loss, optimizer, None, "fp32", device, clip_grad)
    stats = StepStats(device)
    with SyncRecorder() as recorder:
        loss, grad_norm, skipped = train_step(
            model, micro_batches, masked_pixel_loss, optimizer, None, "fp32", device, clip_grad
        )
        stats.update(loss, skipped)  # the loop's running counts (TrainingRun.step_done) stay on the device too
    assert recorder.syncs == []
    assert not bool(skipped) and torch.isfinite(loss)  # read here, outside the recorded step


def test_sync_recorder_sees_an_item_call():
    """The recorder itself works: .item() and boolean indexing are seen."""
    x = torch.randn(4)
    with SyncRecorder() as recorder:
        x.sum().item()
        x[x > 0]
    assert recorder.syncs == ["_local_scalar_dense", "index"]
