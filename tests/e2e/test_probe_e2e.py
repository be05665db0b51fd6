"""The online probe in real runs: metrics rows at the configured steps, training unchanged, two gloo ranks agree."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_main
from e2e_helpers import ONE_EPOCH, PICO, final_weights, max_weight_diff, run_cli

BASE = [
    *PICO,
    "data.num_workers=0",
    "data.batch_size=8",
    "data.samples_per_epoch=96",
    "optim.base_lr=0.05",
    "optim.warmup_lr=0.0005",
    "optim.min_lr=0.0005",
    *ONE_EPOCH,
    "logger.log_every=2",
    "logger.image_every=1000",
    "run.device=cpu",
    "run.max_steps=6",
]


def test_probe_rows_at_the_configured_steps_and_identical_training(tmp_path: Path, class_folder: Path) -> None:
    root = class_folder
    probe = ["probe.enabled=true", "probe.source=folder", f"probe.root={root}", "probe.every=4", "probe.k=5"]
    with_probe = run_cli(tmp_path, "pretrain", "run.name=probe_on", *BASE, *probe, "probe.linear=true")
    run_cli(tmp_path, "pretrain", "run.name=probe_off", *BASE)
    records = [json.loads(line) for line in (tmp_path / "probe_on" / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in records if "probe_knn_top1" in r]
    assert [r["step"] for r in probed] == [4, 6]  # every 4 steps and the last
    for record in probed:
        assert 0 <= record["probe_knn_top1"] <= 100 and 0 <= record["probe_knn_top1_last2"] <= 100
        assert "probe_linear_top1" in record and record["probe_seconds"] > 0
    assert "probe at step 4: knn_top1" in with_probe.stdout and "probe: folder: 24 labelled" in with_probe.stdout
    # the probe draws no random numbers and restores the model's mode: the same weights at the end
    assert max_weight_diff(final_weights(tmp_path / "probe_on"), final_weights(tmp_path / "probe_off")) == 0.0
    # simmim-swin plot draws the probe's curves
    out = tmp_path / "curves.png"
    plot = run_main("tools", "plot", str(tmp_path / "probe_on"), "--out", str(out))
    assert plot.returncode == 0 and out.is_file(), plot.stderr


PROBE_SCRIPT = """
import json, sys
import torch
from simmim_swin.config import ProbeConfig
from simmim_swin.distributed import cleanup, init_distributed
from simmim_swin.models import build_simmim
from simmim_swin.probe import build_probe_set, run_probe

root, out = sys.argv[1], sys.argv[2]
info = init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = build_simmim("pico", img_size=32, window_size=4)
cfg = ProbeConfig(enabled=True, source="folder", root=root, num_train=24, num_val=23, k=5, batch_size=4, linear=True)
metrics = run_probe(model, build_probe_set(cfg, 32, torch.device("cpu"), info), "fp32", info)
metrics.pop("probe_seconds")
with open(f"{out}.rank{info.rank}.json", "w") as f:
    json.dump(metrics, f)
cleanup(info)
"""


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_numbers(tmp_path: Path, class_folder: Path, monkeypatch) -> None:
    """Each rank embeds its share (23 validation images: uneven shares, padded); the gathered kNN is the same."""
    root = class_folder
    script = tmp_path / "probe_script.py"
    script.write_text(PROBE_SCRIPT)
    # one process: the script in this process (no torchrun, world size 1); two ranks: under torchrun
    monkeypatch.setattr(sys, "argv", [str(script), str(root), str(tmp_path / "n1")])
    runpy.run_path(str(script), run_name="__main__")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(root), str(tmp_path / "n2"),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {n: [json.loads((tmp_path / f"n{n}.rank{r}.json").read_text()) for r in range(n)] for n in (1, 2)}
    single = results[1][0]
    assert set(single) == {"probe_knn_top1", "probe_knn_top1_last2", "probe_linear_top1", "probe_linear_top1_last2"}
    assert results[2][0] == results[2][1]  # every rank returns the same numbers
    for key in ("probe_knn_top1", "probe_knn_top1_last2"):
        assert results[2][0][key] == single[key], (key, results)
    for key in ("probe_linear_top1", "probe_linear_top1_last2"):  # fitted on gathered features: float noise only
        assert abs(results[2][0][key] - single[key]) <= 100 / 23 + 1e-9, (key, results)
