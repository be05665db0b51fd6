"""metrics.jsonl content, wandb offline runs (existence only: offline runs write no summary), the progress line."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.config import LoggerConfig
from simmim_swin.tracking import MetricsLogger, ProgressPrinter


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Quiet wandb; mode comes from the config (WANDB_MODE is removed so the test cannot lean on it)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield
    wandb.teardown()  # settings and the service are per process: reset between tests


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_content(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(), config={"a": 1})
    logger.log(0, {"loss": torch.tensor(0.5), "lr": np.float32(1e-4), "grad_norm": 2, "step": 99})
    logger.log(20, {"loss": 0.25, "name": "x"})
    logger.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines[0].startswith('{"step": 0,')
    records = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[0] == {"step": 0, "loss": 0.5, "lr": pytest.approx(1e-4), "grad_norm": 2}
    assert type(records[0]["loss"]) is float and type(records[0]["lr"]) is float
    assert records[1] == {"step": 20, "loss": 0.25, "name": "x"}
    assert not (tmp_path / "run" / "wandb").exists()  # logger.wandb defaults to disabled
    # A restarted run appends.
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(), config={})
    logger.log(40, {"loss": 0.125})
    logger.close()
    assert [r["step"] for r in _read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 20, 40]


def test_disabled_rank_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(wandb="offline"), config={}, enabled=False)
    logger.log(0, {"loss": 1.0})
    logger.log_image(0, "panel", tmp_path / "missing.png")
    logger.close()
    assert not (tmp_path / "run").exists()


def test_unknown_wandb_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"logger.wandb='offlne'.*\['online', 'offline', 'disabled'\]"):
        MetricsLogger(tmp_path, LoggerConfig(wandb="offlne"), config={})


def test_wandb_offline_run(tmp_path: Path, wandb_env: None) -> None:
    run_dir = tmp_path / "run"
    png = tmp_path / "panel.png"
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(png)
    cfg = LoggerConfig(wandb="offline", project="test", tags=["unit"])
    logger = MetricsLogger(run_dir, cfg, config={"model": {"arch": "pico"}})
    run_id = logger.run_id
    assert run_id and (run_dir / "wandb_run_id").read_text() == run_id
    for step in range(3):
        logger.log(step, {"loss": 1.0 / (step + 1), "lr": 1e-3})
    logger.log_image(2, "reconstruction", png)
    logger.close()
    run_folders = list((run_dir / "wandb").glob(f"*run-*-{run_id}"))
    assert len(run_folders) == 1 and (run_folders[0] / f"run-{run_id}.wandb").is_file()
    assert list(run_folders[0].glob("files/media/images/reconstruction_*.png"))
    records = _read_jsonl(run_dir / "metrics.jsonl")
    assert records == [{"step": s, "loss": pytest.approx(1.0 / (s + 1)), "lr": 1e-3} for s in range(3)]


def test_wandb_run_id_reused(tmp_path: Path, wandb_env: None) -> None:
    import wandb

    cfg = LoggerConfig(wandb="offline")
    logger = MetricsLogger(tmp_path / "a", cfg, config={}, run_id="given123")
    assert logger.run_id == "given123"
    logger.close()
    wandb.teardown()
    # A restart in the same run directory without an id finds the stored one.
    logger = MetricsLogger(tmp_path / "a", cfg, config={})
    assert logger.run_id == "given123"
    logger.close()
    # Both starts wrote under the same id (the folder names vary: timestamps in seconds, "-1" on a clash).
    run_files = list((tmp_path / "a" / "wandb").glob("*run-*/run-*.wandb"))
    assert len(run_files) == 2 and {p.name for p in run_files} == {"run-given123.wandb"}


def test_progress_printer_format() -> None:
    now = [100.0]
    stream = io.StringIO()
    printer = ProgressPrinter(total_steps=400, start_step=100, steps_per_epoch=40, stream=stream, clock=lambda: now[0])
    printer.update(100, {"loss": 1.0})
    now[0] = 110.0  # 20 steps in 10 s -> 2 steps/s; 280 steps left -> 140 s
    metrics = {"loss": 0.81234, "lr": 1.2e-4, "grad_norm": torch.tensor(1.234), "images_per_sec": 85.24}
    printer.update(120, {**metrics, "data_s": 0.01, "epoch": 3.0})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "step 100/400 ep 2 loss 1.0000 eta ?"
    assert lines[1] == "step 120/400 ep 3 loss 0.8123 lr 1.20e-04 grad 1.23 img/s 85.2 data_s 0.01 eta 0:02:20"


def test_progress_printer_long_eta() -> None:
    stream = io.StringIO()
    now = [0.0]
    printer = ProgressPrinter(100_000, start_step=0, steps_per_epoch=1000, stream=stream, clock=lambda: now[0])
    now[0] = 100.0
    printer.update(10, {})
    assert stream.getvalue() == "step 10/100000 ep 0 eta 277:45:00\n"  # 99990 steps at 0.1 step/s
