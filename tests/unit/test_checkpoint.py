"""Atomic checkpoints, keep-last pruning, the `latest` pointer, resume lookup and the RNG round trip."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from simmim_swin.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_and_prune,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((2, 3), float(step))}, "config": {"run": {"seed": 0}}}


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", _state(7))
    assert path == tmp_path / "sub" / "ckpt.pt"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.full((2, 3), 7.0))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_failed_save_keeps_previous_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(1))
    with pytest.raises(Exception):  # noqa: B017 (whatever pickling raises)
        save_checkpoint(path, {"bad": lambda: None})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_crash_leftovers_are_ignored(tmp_path: Path) -> None:
    save_and_prune(tmp_path, 10, _state(10), keep_last=2)
    folder = tmp_path / "checkpoints"
    # What a crash during the next save leaves: a half-written temp file with a higher step in its name.
    (folder / ".step_00000020.pt.abc123.tmp").write_bytes(b"PK\x03\x04 truncated")
    latest = find_latest_checkpoint(tmp_path)
    assert latest == folder / "step_00000010.pt"
    assert load_checkpoint(latest)["step"] == 10


def test_keep_last_and_pointer(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step in (100, 200, 300, 400):
        path = save_and_prune(tmp_path, step, _state(step), keep_last=2)
        assert path == folder / f"step_{step:08d}.pt"
        assert (folder / "latest").read_text() == path.name
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_00000300.pt", "step_00000400.pt"]
    assert find_latest_checkpoint(tmp_path) == folder / "step_00000400.pt"


def test_find_latest_fallbacks(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path) is None
    folder = tmp_path / "checkpoints"
    for step in (5, 30):
        save_checkpoint(folder / f"step_{step:08d}.pt", _state(step))
    assert find_latest_checkpoint(tmp_path) == folder / "step_00000030.pt"  # no pointer: highest step
    (folder / "latest").write_text("step_00000005.pt\n")
    assert find_latest_checkpoint(tmp_path) == folder / "step_00000005.pt"  # the pointer wins
    (folder / "latest").write_text("step_00000099.pt")
    assert find_latest_checkpoint(tmp_path) == folder / "step_00000030.pt"  # dangling pointer: highest step


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state": np.random.get_state()}, pickled)  # legacy numpy state: refused by weights_only
    with pytest.raises(ValueError, match="pickled.pt"):
        load_checkpoint(pickled)


def _draw() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3).tolist(),
    )


def test_rng_round_trip_through_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state: it must be restored too
    state = capture_rng_state()
    assert state["numpy"]["has_gauss"] == 1
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    first = _draw()
    _draw()
    restore_rng_state(load_checkpoint(path)["rng"])  # weights_only=True inside
    assert _draw() == first


def test_resuming_with_another_total_batch_is_refused_with_the_batch_to_use() -> None:
    from simmim_swin.checkpoint import check_total_batch

    check_total_batch({"total_batch": 8}, 8, "ckpt", images_per_batch_size=2)
    check_total_batch({}, 64, "ckpt", images_per_batch_size=1)  # older checkpoints record none
    with pytest.raises(ValueError, match=r"total batch of 8 .* this run has 4 .* data.batch_size=8"):
        check_total_batch({"total_batch": 8}, 4, "ckpt", images_per_batch_size=1)  # 2 processes -> 1
    with pytest.raises(ValueError, match="as before"):
        check_total_batch({"total_batch": 6}, 8, "ckpt", images_per_batch_size=4)
