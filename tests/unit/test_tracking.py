"""metrics.jsonl and summary.json content, wandb offline runs (existence and images only: offline runs write no
summary), the step timer, system metrics and the progress display on a terminal and in a log."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_swin.config import ConfigError, LoggerConfig
from simmim_swin.data import build_eval_transform
from simmim_swin.figures import MASK_GREY, make_panel_tiles, save_reconstruction_panel, tile_box
from simmim_swin.masking import MaskGenerator
from simmim_swin.models import build_simmim
from simmim_swin.tracking import (
    MetricsLogger,
    StepTimer,
    check_wandb_credentials,
    load_metrics,
    lr_metrics,
    system_metrics,
)


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
    logger.log_images(0, {"panel": tmp_path / "missing.png"})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_online_wandb_without_an_api_key_is_refused_before_any_compute(tmp_path, monkeypatch) -> None:
    """An unknown logger.wandb / logger.console is refused when the config is validated (test_validate.py); what
    is left here depends on the machine: an API key for logger.wandb=online."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="logger.wandb=online needs a W&B API key .* logger.wandb=offline"):
        check_wandb_credentials(LoggerConfig(wandb="online"))
    check_wandb_credentials(LoggerConfig(wandb="offline"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_wandb_credentials(LoggerConfig(wandb="online"))


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
    Image.MAX_IMAGE_PIXELS = 20  # a run's tiny data.max_image_pixels (PIL's limit is process-wide) ...
    logger.log_images(2, {"reconstruction": png})  # ... does not refuse the run's own 64-pixel panel
    assert Image.MAX_IMAGE_PIXELS == 20
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


def test_resumed_logger_keeps_its_generated_run_id(tmp_path: Path, wandb_env: None) -> None:
    import wandb

    cfg = LoggerConfig(wandb="offline")
    first = MetricsLogger(tmp_path / "run", cfg, config={})
    first.log(10, {"loss": 1.0})
    run_id = first.run_id
    first.close()
    wandb.teardown()  # a new process in real life
    resumed = MetricsLogger(tmp_path / "run", cfg, config={})
    resumed.log(20, {"loss": 0.5})
    resumed.close()
    assert resumed.run_id == run_id and (tmp_path / "run" / "wandb_run_id").read_text() == run_id
    assert {p.name for p in (tmp_path / "run" / "wandb").glob("*run-*/run-*.wandb")} == {f"run-{run_id}.wandb"}
    assert [r["step"] for r in load_metrics(tmp_path / "run")] == [10, 20]


def test_summary_and_best_values_survive_a_restart(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(), config={})
    assert logger.update_best(10, "best_val_loss", torch.tensor(0.5)) is True
    assert logger.update_best(20, "best_val_loss", 0.7) is False  # worse
    assert logger.update_best(30, "best_val_loss", float("nan")) is False
    assert logger.update_best(30, "best_val_top1", 61.5, mode="max") is True
    assert logger.update_best(40, "best_val_top1", 60.0, mode="max") is False
    logger.log_summary({"final_loss": np.float32(0.25)})
    logger.close()
    expected = {"best_val_loss": 0.5, "best_val_loss_step": 10, "best_val_top1": 61.5, "best_val_top1_step": 30}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {**expected, "final_loss": 0.25}
    # a restarted run compares against the stored best values
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(), config={})
    assert logger.update_best(50, "best_val_loss", 0.6) is False
    assert logger.update_best(60, "best_val_loss", 0.4) is True
    logger.close()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["best_val_loss"], summary["best_val_loss_step"], summary["best_val_top1"]) == (0.4, 60, 61.5)
    with pytest.raises(ValueError, match="mode='mean'"):
        logger.update_best(0, "x", 1.0, mode="mean")


def test_disabled_rank_writes_no_summary(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(), config={}, enabled=False)
    assert logger.update_best(1, "best_val_loss", 1.0) is True  # tracked in memory on every rank
    logger.close()
    assert not (tmp_path / "run").exists()


def test_load_metrics_skips_malformed_lines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = ['{"step": 1, "loss": 2.0}', "", "[1, 2]", '{"loss": 1.0}', '{"step": true}', '{"step": 3, "lo']
    (run_dir / "metrics.jsonl").write_text("\n".join([*lines[:2], '{"step": 2, "loss": 1.5}', *lines[2:]]))
    with pytest.warns(UserWarning) as caught:
        records = load_metrics(run_dir)
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4 and all("metrics.jsonl:" in m for m in messages)
    assert "metrics.jsonl:7: skipped a malformed line" in messages[-1]
    with pytest.warns(UserWarning):
        assert load_metrics(run_dir / "metrics.jsonl")[0]["step"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no metrics.jsonl"):
        load_metrics(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl does not exist"):
        load_metrics(tmp_path / "missing.jsonl")


def test_lr_metrics_per_group_only_when_they_differ() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    same = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    assert lr_metrics(same) == {"lr": 0.1}
    layered = torch.optim.SGD([{"params": [p], "lr": 0.1 * 0.5**i} for i, p in enumerate(params)], lr=0.1)
    assert lr_metrics(layered) == {"lr": 0.1, "lr/group0": 0.1, "lr/group1": 0.05, "lr/group2": 0.025}


def test_system_metrics_report_gpu_memory_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert system_metrics("cpu") == {}
    assert system_metrics(torch.device("cpu")) == {}
    # on a CUDA device the three numbers come from torch.cuda, in GiB (faked here so the CPU runs the branch)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**29)
    assert system_metrics("cuda:0") == {"gpu_mem_alloc_gib": 2.0, "gpu_mem_peak_gib": 3.0, "gpu_mem_reserved_gib": 0.5}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_system_metrics_on_cuda() -> None:
    x = torch.empty(256, 2**20, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    metrics = system_metrics("cuda")
    assert metrics["gpu_mem_alloc_gib"] >= 0.25 and metrics["gpu_mem_peak_gib"] >= metrics["gpu_mem_alloc_gib"]
    assert metrics["gpu_mem_reserved_gib"] >= metrics["gpu_mem_alloc_gib"]
    del x


def test_step_timer_splits_data_wait_from_compute() -> None:
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    for _ in range(4):  # 1 s waiting for data, 3 s computing, per step
        with timer.measure("data"):
            now[0] += 1.0
        now[0] += 3.0
    with timer.measure("excluded"):  # a checkpoint: in neither part
        now[0] += 100.0
    metrics = timer.pop(images_per_step=32, world_size=4)
    assert metrics == {
        "data_wait_frac": 0.25,
        "step_time_s": 4.0,
        "images_per_sec": 8.0,
        "images_per_sec_per_gpu": 2.0,
    }
    with timer.measure("data"):  # the next interval starts at the pop
        now[0] += 2.0
    now[0] += 2.0
    assert timer.pop() == {"data_wait_frac": 0.5, "step_time_s": 4.0}


def _real_photo_panel(path: Path, img_size: int = 64, patch: int = 4) -> Path:
    """A panel of scikit-image's astronaut, masked, with a tiny untrained SimMIM's reconstruction."""
    skimage_data = pytest.importorskip("skimage.data")
    image = build_eval_transform(img_size)(Image.fromarray(skimage_data.astronaut()))[None]  # 1, 3, H, W
    mask = MaskGenerator(img_size, 16, patch, 0.6)(torch.Generator().manual_seed(0))[None]  # 1, H/4, W/4
    model = build_simmim("pico", img_size=img_size, window_size=4, drop_path_rate=0.0).eval()
    with torch.no_grad():
        _, reconstruction = model(image, mask)
        reconstruction = model.target_to_image(image, reconstruction, mask)
    return save_reconstruction_panel(path, *make_panel_tiles(image, mask, reconstruction, patch_size=patch))


def test_wandb_offline_logs_images_and_the_jsonl_holds_the_scalars(tmp_path: Path, wandb_env: None) -> None:
    panel = _real_photo_panel(tmp_path / "recon.png")
    with Image.open(panel) as png:
        pixels = np.asarray(png.convert("RGB"))
    top, left, bottom, right = tile_box(0, 0, 64, 64)  # _real_photo_panel: one 64 px image
    original = pixels[top:bottom, left:right].astype(float)
    top, left, bottom, right = tile_box(0, 1, 64, 64)
    masked = pixels[top:bottom, left:right]
    assert original.std() > 20  # a photograph, not a blank tile
    grey = (masked == MASK_GREY).all(axis=-1).mean()
    assert 0.5 < grey < 0.7  # mask ratio 0.6: the masked column is mostly grey ...
    assert np.abs(masked - original).mean() > 20  # ... so its pixel statistics differ from the original's
    bias = tmp_path / "bias.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(bias)

    cfg = LoggerConfig(wandb="offline", project="test", group="swinv2_tiny_w8", tags=["swinv2_tiny_w8"])
    logger = MetricsLogger(tmp_path / "run", cfg, config={}, run_name="tiny-run")
    assert logger.wandb_run.group == "swinv2_tiny_w8" and list(logger.wandb_run.tags) == ["swinv2_tiny_w8"]
    assert logger.wandb_run.name == "tiny-run"
    scalars = [{"loss": 1.0 / (s + 1), "lr/group0": 1e-3, "data_wait_frac": 0.1, "skipped_steps": 0} for s in range(3)]
    for step, metrics in enumerate(scalars):
        logger.log(step * 10, metrics)
    logger.log_images(20, {"reconstruction": panel, "position_bias": bias})
    logger.log_summary({"best_val_loss": 0.5})
    run_id = logger.run_id
    logger.close()

    run_folder = next((tmp_path / "run" / "wandb").glob(f"*run-*-{run_id}"))
    recon = list(run_folder.glob("files/media/images/reconstruction_20_*.png"))
    assert len(recon) == 1 and list(run_folder.glob("files/media/images/position_bias_20_*.png"))
    assert recon[0].read_bytes() == Path(panel).read_bytes()  # the PNG itself, not decoded and encoded again
    with Image.open(recon[0]) as logged:
        assert np.array_equal(np.asarray(logged.convert("RGB")), pixels)  # uint8 as drawn, not a black image
    assert load_metrics(tmp_path / "run") == [{"step": s * 10, **m} for s, m in enumerate(scalars)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"best_val_loss": 0.5}


def test_wandb_tags_and_group_come_from_the_config(tmp_path: Path, wandb_env: None) -> None:
    cfg = LoggerConfig(wandb="offline", group="ablation", tags=["a", "b"])
    logger = MetricsLogger(tmp_path / "run", cfg, config={})
    assert logger.wandb_run.group == "ablation" and list(logger.wandb_run.tags) == ["a", "b"]
    logger.close()
    logger = MetricsLogger(tmp_path / "run2", LoggerConfig(wandb="offline"), config={})
    assert not logger.wandb_run.group and list(logger.wandb_run.tags) == []
    logger.close()


class FakeWandbRun:
    """What MetricsLogger uses of a wandb Run, recording each log call."""

    def __init__(self, **init_kwargs: Any) -> None:
        self.init_kwargs, self.id, self.logged, self.summary = init_kwargs, init_kwargs.get("id") or "fake1", [], {}

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        pass


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[FakeWandbRun]:
    """wandb.init replaced by FakeWandbRun (the runs it made, in order); no W&B environment variable is set."""
    wandb = pytest.importorskip("wandb")
    runs: list[FakeWandbRun] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1])
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(name, raising=False)
    return runs


def test_wandb_environment_variables_fill_what_the_config_leaves_open(
    tmp_path: Path, fake_wandb: list[FakeWandbRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = MetricsLogger(tmp_path / "a", LoggerConfig(wandb="offline"), config={})
    logger.close()
    init = fake_wandb[-1].init_kwargs
    assert init["project"] == "simmim-swin"  # the project's own default without WANDB_PROJECT
    assert (init["group"], init["tags"], init["job_type"], init["notes"], init["entity"]) == (None,) * 5  # W&B's env
    # W&B's defaults: system metrics, git state and console capture on
    settings = init["settings"]
    auto = pytest.importorskip("wandb").Settings(console="auto").console  # wandb resolves "auto" itself
    assert (settings.console, settings.disable_git, settings.x_disable_stats) == (auto, False, False)

    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    MetricsLogger(tmp_path / "b", LoggerConfig(wandb="offline"), config={}).close()
    assert fake_wandb[-1].init_kwargs["project"] == "from-env"
    explicit = LoggerConfig(
        wandb="offline", project="mine", group="g", tags=["t"], job_type="pretrain", notes="n",
        system_metrics=False, git=False, console="off",
    )  # fmt: skip
    MetricsLogger(tmp_path / "c", explicit, config={}).close()
    init = fake_wandb[-1].init_kwargs
    assert (init["project"], init["group"], init["tags"], init["job_type"], init["notes"]) == (
        "mine", "g", ["t"], "pretrain", "n",
    )  # fmt: skip
    settings = init["settings"]
    assert (settings.console, settings.disable_git, settings.x_disable_stats) == ("off", True, True)


def test_wandb_reads_its_environment_in_an_offline_run(
    tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real wandb: what the config leaves open comes from W&B's own variables, a config value wins."""
    env = {"WANDB_PROJECT": "p-env", "WANDB_RUN_GROUP": "g-env", "WANDB_TAGS": "a,b", "WANDB_JOB_TYPE": "j-env",
           "WANDB_NOTES": "n-env"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    quiet = dict(wandb="offline", system_metrics=False, git=False, console="off")
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(**quiet), config={})
    run = logger.wandb_run
    assert (run.project, run.group, tuple(run.tags), run.job_type, run.notes) == ("p-env", "g-env", ("a", "b"),
                                                                               "j-env", "n-env")  # fmt: skip
    logger.close()
    logger = MetricsLogger(tmp_path / "run2", LoggerConfig(**quiet, group="mine", job_type="pretrain"), config={})
    assert (logger.wandb_run.group, logger.wandb_run.job_type) == ("mine", "pretrain")
    logger.close()


def test_wandb_names_are_namespaced_and_the_jsonl_keeps_flat_names(
    tmp_path: Path, fake_wandb: list[FakeWandbRun]
) -> None:
    logger = MetricsLogger(tmp_path / "run", LoggerConfig(wandb="offline"), config={})
    metrics = {"loss": 0.5, "lr/group0": 1e-3, "val_loss": 0.4, "val_top1": 50.0, "ema_val_top1": 51.0,
               "best_top1": 51.0, "probe_knn_top1": 30.0, "gpu_mem_peak_gib": 1.0}  # fmt: skip
    logger.log(10, metrics)
    logger.close()
    assert fake_wandb[-1].logged == [(10, {
        "train/loss": 0.5, "train/lr/group0": 1e-3, "val/loss": 0.4, "val/top1": 50.0, "val/ema_top1": 51.0,
        "val/best_top1": 51.0, "probe/knn_top1": 30.0, "train/gpu_mem_peak_gib": 1.0,
    })]  # fmt: skip
    assert load_metrics(tmp_path / "run") == [{"step": 10, **metrics}]


def test_a_resumed_run_never_logs_a_step_twice(tmp_path: Path, fake_wandb: list[FakeWandbRun]) -> None:
    """A hard kill at step 150 with the last checkpoint at 100: the restarted process trains 110-150 again."""
    cfg = LoggerConfig(wandb="offline")
    first = MetricsLogger(tmp_path / "run", cfg, config={})
    for step in range(10, 160, 10):
        first.log(step, {"loss": 1.0})
    first.log(150, {"val_loss": 2.0})  # an evaluation at the last logged step
    first.close()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 160, "lo')  # the kill cut this line short

    resumed = MetricsLogger(tmp_path / "run", cfg, config={})
    for step in range(110, 210, 10):
        resumed.log(step, {"loss": 0.5})
        if step == 150:
            resumed.log(step, {"val_loss": 1.5, "val_top1": 10.0})  # val_top1 was not logged before the kill
    resumed.log_images(150, {"panel": tmp_path / "never_read.png"})  # W&B has step 150 already: not sent
    resumed.close()

    with pytest.warns(UserWarning, match="metrics.jsonl:17: skipped a malformed line"):
        records = load_metrics(tmp_path / "run")
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)  # never back in step
    assert records[:15] == [{"step": s, "loss": 1.0} for s in range(10, 160, 10)]  # the first process's lines
    assert records[15:] == [
        {"step": 150, "val_loss": 2.0},
        {"step": 150, "val_top1": 10.0},  # what the first process had not logged at its last step
        *({"step": s, "loss": 0.5} for s in range(160, 210, 10)),
    ]
    wandb_steps = [step for run in fake_wandb for step, _ in run.logged]
    assert wandb_steps == [*range(10, 160, 10), 150, *range(160, 210, 10)]  # never lower than a step it has
