"""`simmim-swin plot`: loss, lr, throughput (and validation / accuracy) curves of runs from their metrics.jsonl."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the sub-command."""
    p = sub.add_parser(
        "plot",
        help="draw metric curves of one or more runs (overlaid) to a PNG, without wandb",
        description="Reads RUN_DIR/metrics.jsonl of each run and draws one panel per metric present (training and "
        "validation loss, learning rate, throughput, top-1 / top-5, probe accuracies, data wait, GPU memory). "
        "Several runs are overlaid, labelled by their directory name.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", required=True, metavar="PNG", help="the PNG to write")
    p.set_defaults(func=run)


def run_labels(paths: list[Path]) -> list[str]:
    """Legend labels: each run directory's name, with parent folders added until the labels are unique."""
    dirs = [p.resolve().parent if p.is_file() else p.resolve() for p in paths]
    for depth in range(1, max(len(d.parts) for d in dirs) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"the same run is given twice: {[str(p) for p in paths]}")


def run(args: argparse.Namespace) -> None:
    """Read the runs' metrics and write the curves PNG."""
    from ..figures import plot_metric_curves
    from ..tracking import load_metrics  # torch and matplotlib: loaded only when the command runs

    paths = [Path(r) for r in args.runs]
    runs = {}
    for label, path in zip(run_labels(paths), paths):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = load_metrics(path)  # FileNotFoundError names the run without a metrics.jsonl
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        if not records:
            print(f"warning: {path} has no metric records yet", file=sys.stderr)
        runs[label] = records
    out = plot_metric_curves(runs, args.out)
    print(f"wrote {out} ({len(runs)} runs, {sum(len(r) for r in runs.values())} records)")
