"""benchmarks/throughput.py in its smallest configuration on the CPU, in this process: the report has every row (no
timing checks)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
SMOKE_ARGS = [
    "--device", "cpu", "--arch", "pico", "--img-size", "64", "--window", "4", "--batch", "2",
    "--repeats", "2", "--warmup", "1", "--rounds", "1", "--sizes", "64,128",
    "--threads", "1",  # two threads on two busy cores spin-wait: the run took 68 s instead of 9 under load 3
]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The JSON report of one smoke run of the command line (its main(), in this process)."""
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    threads, printed = torch.get_num_threads(), io.StringIO()  # --threads sets the process's thread count
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import throughput

        with contextlib.redirect_stdout(printed):
            throughput.main([*SMOKE_ARGS, "--out", str(out)])
    finally:
        sys.path.remove(str(BENCH_DIR))
        torch.set_num_threads(threads)
    assert "goal: CPU encoder fwd+bwd time" in printed.getvalue()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_report_has_every_row(report: dict) -> None:
    """Every variant x phase at the main size, the step at the second size; hf present or skipped with a note."""
    have_hf = any(row["variant"] == "hf" for row in report["rows"])
    variants = ["ours", "ours-fused", "timm"] + (["hf"] if have_hf else [])
    if not have_hf:
        assert any("transformers" in note for note in report["skipped"])
    keys = {(r["img_size"], r["variant"], r["mode"], r["phase"]) for r in report["rows"]}
    expected = {(64, v, "eager", p) for v in variants for p in ("step", "fwd", "fwdbwd")}
    expected |= {(128, v, "eager", "step") for v in variants}
    assert keys == expected
    assert {r["batch"] for r in report["rows"] if r["img_size"] == 128} == {1}  # 2 * (64/128)^2, at least 1
    for row in report["rows"]:
        assert row["num_calls"] == 2 and row["ms"] > 0 and row["images_per_s"] > 0
        assert row["peak_mem_gib"] is None and row["mfu"] is None  # CPU: no memory or peak to report
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["date"]
    assert [g["goal"] for g in report["goals"]] == ["CPU encoder fwd+bwd time, ours (eager attention) / timm"]
    assert report["goals"][0]["value"] > 0


@pytest.mark.slow
def test_baseline_shares_weights_and_loss(report: dict) -> None:
    """timm's encoder inside our SimMIM wrapper, loaded with our weights, gives our loss before any update."""
    for size in (64, 128):
        losses = {r["variant"]: r["loss0"] for r in report["rows"] if r["img_size"] == size and r["phase"] == "step"}
        assert losses["ours-fused"] == pytest.approx(losses["ours"], rel=1e-5)
        assert losses["timm"] == pytest.approx(losses["ours"], rel=1e-5)


@pytest.mark.slow
def test_flops_and_comparisons(report: dict) -> None:
    """FLOPs per image: step > encoder fwd+bwd > encoder fwd, the same for every variant; ratios against timm."""
    main = {(r["variant"], r["phase"]): r for r in report["rows"] if r["img_size"] == 64}
    step, fwdbwd, fwd = (main["ours", p]["gflops_per_image"] for p in ("step", "fwdbwd", "fwd"))
    assert step > fwdbwd > 2 * fwd > 0  # the backward costs about twice the forward
    assert {main[v, "step"]["gflops_per_image"] for v in ("ours", "timm")} == {step}
    assert main["timm", "step"]["vs_timm"] == pytest.approx(1.0)
    assert main["ours", "step"]["px_cost"] == pytest.approx(1.0)
    big = [r for r in report["rows"] if r["img_size"] == 128]
    assert all(r["px_cost"] is not None and r["gflops_per_image"] > step for r in big)


def test_flops_extrapolation_is_exact(monkeypatch) -> None:
    """Counting at batch 1 and 2 and extrapolating gives the count at batch 3 (the CPB MLP runs once per batch)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    from flops import count_flops, flops_at_batch

    from simmim_swin.models import create_swinv2

    model = create_swinv2("pico", img_size=32, window_size=4, num_classes=0)

    def make_fn(batch: int):
        images = torch.randn(batch, 3, 32, 32)
        return lambda: model.forward_features(images).sum().backward()

    assert flops_at_batch(make_fn, 3) == count_flops(make_fn(3))


def test_bad_variant_is_a_clear_error(monkeypatch) -> None:
    """An unknown --variants name raises ValueError naming it and the choices."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    from throughput import parse_args

    with pytest.raises(ValueError, match="ours-fused"):
        parse_args(["--variants", "ours,tim"])
