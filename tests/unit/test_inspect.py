"""`simmim-swin inspect`: what it prints about a checkpoint's windows and CPB normalisers."""

from __future__ import annotations

from pathlib import Path

import pytest

from simmim_swin.checkpoint import save_checkpoint
from simmim_swin.cli.tools import main as tools_main
from simmim_swin.models import build_encoder


def _finetune_checkpoint(path: Path, pretrained_window_sizes) -> Path:
    model = build_encoder(
        "pico", num_classes=3, img_size=64, window_size=8, pretrained_window_sizes=pretrained_window_sizes
    )
    state = {
        "model": model.state_dict(),
        "step": 7,
        "config": {"model": {"arch": "pico", "img_size": 64, "window_size": 8}},
        "stage_window_sizes": model.stage_window_sizes,
        "pretrained_window_sizes": list(model.pretrained_window_sizes),
        "num_classes": 3,
    }
    return save_checkpoint(path, state)


@pytest.mark.parametrize(
    ("pretrained", "line"),
    [
        (None, "CPB normalised by (the stages' own windows): [8, 8, 4]"),  # trained at its own windows, not [0, 0, 0]
        ([4, 4, 2], "CPB normalised by (pretrained windows): [4, 4, 2]"),
        ([4, 0, 0], "CPB normalised by (pretrained windows, the stage's own where 0): [4, 8, 4]"),
    ],
)
def test_inspect_prints_the_windows_the_cpb_is_normalised_by(tmp_path: Path, capsys, pretrained, line: str) -> None:
    path = _finetune_checkpoint(tmp_path / "step_00000007.pt", pretrained)
    tools_main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "windows used per stage: [8, 8, 4]" in out
    assert line + "\n" in out
    model = build_encoder("pico", img_size=64, window_size=8, pretrained_window_sizes=pretrained)
    assert f"{model.cpb_window_sizes}" == line.rsplit(": ", 1)[1]
