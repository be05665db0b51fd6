"""SimMIM training-step throughput: our SwinV2 against timm's and Hugging Face's, same inputs, same process.

Variants (--variants; benchmarks/baselines.py builds them):
  ours        our SimMIM + SwinTransformerV2 with eager attention; ours-fused: set_fused_attn(True), SDPA
  timm        timm's SwinTransformerV2 encoder with our mask token, decoder, loss and weights
  hf          transformers' Swinv2ForMaskedImageModeling encoder + decoder with our loss (skipped if not installed)

Phases (--phases), each timed per call after warm-up, the median over rounds x repeats calls:
  step    the training step of simmim_swin.engine.train_step: autocast forward, masked L1 loss (norm target),
          backward, gradient clipping at 5, fused AdamW step, zero_grad(set_to_none=True)
  fwd     the encoder forward alone (mask token in), under torch.no_grad
  fwdbwd  the encoder forward and backward (of the output's sum), gradients cleared after

Rounds interleave the variants (A B A B ...) so that a change in machine load hits them alike. On CUDA each call
is timed with CUDA events recorded back to back (no host sync between calls), on the CPU with perf_counter.
Peak memory (CUDA only) is max_memory_allocated during a phase minus what was allocated before it, plus the
variant's own parameters, buffers and (step) optimizer state: what the variant would peak at alone. MFU divides
the FLOPs counted by torch's FlopCounterMode (see benchmarks/flops.py) by the time and by the peak of the device.

Cost growth: the step is also timed at every size of --sizes with the batch scaled by (img_size / size)^2, so a
step always holds the same number of tokens; window attention should make the cost per pixel flat
(column px-cost = cost per pixel relative to --img-size).

    python benchmarks/throughput.py                      # SwinV2-B, 192 px, window 12, batch 128, bf16 on CUDA
    python benchmarks/throughput.py --compile --profile-dir benchmarks/results/profiles
    python benchmarks/throughput.py --device cpu --arch tiny --batch 4 --variants ours,timm --phases fwdbwd \\
        --sizes 192
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from baselines import VARIANTS, build_reference, build_variant, encoder_fn, skip_reason
from flops import default_peak_tflops, environment, flops_at_batch, mfu, profile_steps, state_bytes, time_calls

from simmim_swin.config import ConfigError, OptimConfig, check_device
from simmim_swin.engine import train_step
from simmim_swin.masking import MaskGenerator
from simmim_swin.models import SWINV2_SIZES, SimMIM
from simmim_swin.optim import build_optimizer
from simmim_swin.precision import autocast_context, resolve_device, resolve_precision
from simmim_swin.pretrain import masked_pixel_loss

PHASES = ("step", "fwd", "fwdbwd")
CLIP_GRAD = 5.0  # the SwinV2 recipe's clipping: part of the step's cost
GIB = 2**30


def make_inputs(batch: int, img_size: int, args: argparse.Namespace, device: torch.device) -> tuple:
    """Random normalised images (B, 3, H, W) and SimMIM masks (B, H/p, W/p), the same for every variant."""
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=generator)
    mask_generator = MaskGenerator(img_size, args.mask_patch, args.patch_size, args.mask_ratio)
    masks = torch.stack([mask_generator(generator) for _ in range(batch)])
    return images.to(device), masks.to(device)


def phase_fns(model, encode, optimizer, inputs, precision: str, device: torch.device) -> dict[str, Callable]:
    """One call per phase; `model` and `encode` may be compiled, `optimizer` holds the uncompiled parameters."""

    def step() -> None:
        train_step(model, [inputs], masked_pixel_loss, optimizer, None, precision, device, CLIP_GRAD)

    def fwd() -> None:
        with torch.no_grad(), autocast_context(precision, device):
            encode(*inputs)

    def fwdbwd() -> None:
        with autocast_context(precision, device):
            out = encode(*inputs)
        out.float().sum().backward()
        optimizer.zero_grad(set_to_none=True)

    return {"step": step, "fwd": fwd, "fwdbwd": fwdbwd}


def count_phase_flops(reference: SimMIM, phase: str, batch: int, img_size: int, args, device) -> int:
    """FLOPs of one call of `phase` at `batch`, counted on our eager model in fp32 (the same math for every variant)."""
    model = copy.deepcopy(reference).to(device)

    def make_fn(b: int) -> Callable[[], object]:
        images, masks = make_inputs(b, img_size, args, device)
        if phase == "step":
            return lambda: model(images, masks)[0].backward()  # optimizer and clipping: elementwise, not counted
        if phase == "fwd":
            return lambda: torch.no_grad()(model.encoder.forward_features)(images, masks)
        return lambda: model.encoder.forward_features(images, masks).float().sum().backward()

    return flops_at_batch(make_fn, batch)


def build_runs(reference: SimMIM, inputs: tuple, args, device, precision: str, notes: list[str]) -> list[dict]:
    """One run per variant and mode: the model, its optimizer, the phase functions and its loss before training."""
    img_size = inputs[0].shape[-1]
    runs = []
    for name in args.variants:
        reason = skip_reason(name, args.arch)
        if reason:
            if reason not in notes:
                notes.append(reason)
            continue
        model = build_variant(name, reference, args, img_size).to(device)
        with torch.no_grad():  # the loss before any update, in eval mode (no drop path): ours and timm must agree
            loss0 = model.eval()(*inputs)[0].item()
        model.train()
        optimizer = build_optimizer(model, OptimConfig(fused=True), lr=1e-4)
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            runner = torch.compile(model, mode=args.compile_mode) if mode == "compiled" else model
            encode = encoder_fn(model)
            encode = torch.compile(encode, mode=args.compile_mode) if mode == "compiled" else encode
            fns = phase_fns(runner, encode, optimizer, inputs, precision, device)
            runs.append(dict(variant=name, mode=mode, model=model, optimizer=optimizer, fns=fns, loss0=loss0))
    return runs


def _out_of_memory(run: dict, img_size: int, batch: int, notes: list[str]) -> None:
    """Record that `run` ran out of CUDA memory and free what it holds; the other variants go on."""
    notes.append(f"{run['variant']} {run['mode']} at {img_size}px batch {batch}: CUDA out of memory, no row")
    run.clear()
    gc.collect()
    torch.cuda.empty_cache()


def measure(runs: list[dict], phases: list[str], args, device, img_size: int, batch: int, notes: list[str]) -> None:
    """Warm every run up, then time rounds x repeats calls per phase, interleaved; adds "times" and "peaks"."""
    for run in runs:  # warm-up (and compilation) before any timing
        try:
            for phase in phases:
                for _ in range(args.warmup):
                    run["fns"][phase]()
        except torch.OutOfMemoryError:
            _out_of_memory(run, img_size, batch, notes)
            continue
        run.update(times={p: [] for p in phases}, peaks={})
        print(f"[{img_size}px] {run['variant']} {run['mode']}: warmed up", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for run in runs:  # A B A B ...: the variants share the machine's good and bad moments
            for phase in phases if run else ():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    run["times"][phase] += time_calls(run["fns"][phase], args.repeats, device)
                except torch.OutOfMemoryError:
                    _out_of_memory(run, img_size, batch, notes)
                    break
                if device.type == "cuda" and phase not in run["peaks"]:
                    own = state_bytes(run["model"], run["optimizer"] if phase == "step" else None)
                    run["peaks"][phase] = (torch.cuda.max_memory_allocated(device) - before + own) / GIB
        print(f"[{img_size}px] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)


def run_size(img_size: int, batch: int, phases: list[str], args, device, precision, notes: list[str]) -> list[dict]:
    """Time every variant (and mode) at one image size; returns one row per variant, mode and phase."""
    if args.compile:
        torch._dynamo.reset()  # compiled graphs of the previous size would only count against the recompile limit
    reference = build_reference(args, img_size)
    inputs = make_inputs(batch, img_size, args, device)
    runs = build_runs(reference, inputs, args, device, precision, notes)
    measure(runs, phases, args, device, img_size, batch, notes)
    runs = [run for run in runs if run]  # those that ran out of memory were cleared

    rows = []
    for phase in phases:
        flops = count_phase_flops(reference, phase, batch, img_size, args, device) if not args.no_flops else None
        for run in runs:
            times = run["times"][phase]
            median_ms = statistics.median(times)
            row = dict(
                img_size=img_size,
                batch=batch,
                variant=run["variant"],
                mode=run["mode"],
                phase=phase,
                ms=median_ms,
                ms_min=min(times),
                ms_max=max(times),
                num_calls=len(times),
                images_per_s=batch / median_ms * 1e3,
                ms_per_image=median_ms / batch,
                peak_mem_gib=run["peaks"].get(phase),
                gflops_per_image=None if flops is None else flops / batch / 1e9,
                tflops_per_s=None if flops is None else flops / median_ms / 1e9,
                mfu=mfu(flops, median_ms / 1e3, args.peak_tflops),
                loss0=run["loss0"],
            )
            rows.append(row)
    if args.profile_dir and "step" in phases and img_size == args.img_size:
        for run in runs:
            path = Path(args.profile_dir) / f"{run['variant']}-{run['mode']}-{img_size}px.txt"
            kernels = profile_steps(run["fns"]["step"], 3, device, path)
            for row in rows:
                if (row["variant"], row["mode"], row["phase"]) == (run["variant"], run["mode"], "step"):
                    row["attention_kernels"], row["profile"] = kernels, str(path)
    del runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_comparisons(rows: list[dict], main_size: int) -> None:
    """Per row: images/s against timm and hf (same size, mode, phase), memory against timm, cost per pixel growth."""
    index = {(r["img_size"], r["variant"], r["mode"], r["phase"]): r for r in rows}
    for row in rows:
        key = (row["img_size"], row["mode"], row["phase"])
        for base in ("timm", "hf"):
            other = index.get((key[0], base, key[1], key[2]))
            row[f"vs_{base}"] = None if other is None else row["images_per_s"] / other["images_per_s"]
        timm_row = index.get((key[0], "timm", key[1], key[2]))
        if row["peak_mem_gib"] is not None and timm_row is not None:
            row["mem_vs_timm"] = row["peak_mem_gib"] / timm_row["peak_mem_gib"]
        else:
            row["mem_vs_timm"] = None
        main = index.get((main_size, row["variant"], row["mode"], row["phase"]))
        row["px_cost"] = None
        if row["phase"] == "step" and main is not None:
            # 1.0 = the cost per image grows exactly with the pixel count (linear), as window attention should
            row["px_cost"] = row["ms_per_image"] / main["ms_per_image"] / (row["img_size"] / main_size) ** 2


def check_goals(rows: list[dict], main_size: int, device: torch.device) -> list[dict]:
    """The issue's goals that this run can judge, each with its measured value and whether it is met."""
    index = {(r["variant"], r["mode"], r["phase"]): r for r in rows if r["img_size"] == main_size}

    def goal(text: str, value: float | None, target: float, at_most: bool = False) -> dict:
        met = None if value is None else (value <= target if at_most else value >= target)
        return dict(goal=text, value=value, target=("<= " if at_most else ">= ") + str(target), met=met)

    def field(variant: str, mode: str, phase: str, name: str) -> float | None:
        row = index.get((variant, mode, phase))
        return None if row is None else row[name]

    if device.type != "cuda":
        ratio = None
        ours, timm_ms = field("ours", "eager", "fwdbwd", "ms"), field("timm", "eager", "fwdbwd", "ms")
        if ours is not None and timm_ms is not None:
            ratio = ours / timm_ms
        return [goal("CPU encoder fwd+bwd time, ours (eager attention) / timm", ratio, 1.0, at_most=True)]
    ours = "ours-fused"  # the default path on CUDA (fused_attn=None -> SDPA)
    best_mfu = [v for v in (field(ours, m, "step", "mfu") for m in ("eager", "compiled")) if v is not None]
    return [
        goal(f"step images/s, eager: {ours} / timm", field(ours, "eager", "step", "vs_timm"), 1.5),
        goal(f"step images/s, compiled: {ours} / timm", field(ours, "compiled", "step", "vs_timm"), 1.3),
        goal(f"step images/s, eager: {ours} / hf", field(ours, "eager", "step", "vs_hf"), 2.0),
        goal(f"step images/s, compiled: {ours} / hf", field(ours, "compiled", "step", "vs_hf"), 2.0),
        goal(f"step peak memory, eager: {ours} / timm", field(ours, "eager", "step", "mem_vs_timm"), 1.0, True),
        goal(f"step peak memory, compiled: {ours} / timm", field(ours, "compiled", "step", "mem_vs_timm"), 1.0, True),
        goal(f"step MFU, best of eager/compiled ({ours}) (aim)", max(best_mfu) if best_mfu else None, 0.40),
    ]


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or a dash as wide as a formatted number."""
    return "-".rjust(len(format(0.0, spec))) if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """One line per row, fixed-width columns."""
    header = (
        f"{'px':>4} {'batch':>5} {'variant':<10} {'mode':<8} {'phase':<6} {'ms':>9} {'img/s':>8} {'ms/img':>8} "
        f"{'GiB':>6} {'GF/img':>7} {'TF/s':>7} {'MFU':>6} {'vs timm':>7} {'vs hf':>6} {'px-cost':>7} {'loss0':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['img_size']:>4} {r['batch']:>5} {r['variant']:<10} {r['mode']:<8} {r['phase']:<6} "
            f"{r['ms']:>9.2f} {r['images_per_s']:>8.1f} {r['ms_per_image']:>8.3f} {_fmt(r['peak_mem_gib'], '6.2f')} "
            f"{_fmt(r['gflops_per_image'], '7.2f')} {_fmt(r['tflops_per_s'], '7.2f')} {_fmt(r['mfu'], '6.1%')} "
            f"{_fmt(r['vs_timm'], '7.2f')} {_fmt(r['vs_hf'], '6.2f')} {_fmt(r['px_cost'], '7.2f')} {r['loss0']:>8.4f}"
        )
    return "\n".join(lines)


NOTES = dict(
    timing="median over rounds x repeats calls after warm-up; CUDA events back to back on CUDA, perf_counter on CPU",
    memory="CUDA: max_memory_allocated in the phase - allocated before it + the variant's own params, buffers "
    "and (step) optimizer state; CPU: not measured (null)",
    flops="torch.utils.flop_counter.FlopCounterMode on our eager-attention model in fp32, at batch 1 and 2, "
    "extrapolated linearly to the batch; counts mm/addmm/bmm/convolution (attention matmuls included as bmm; "
    "SDPA kernels are registered too and count the same); elementwise ops, clipping and the optimizer excluded; "
    "the same count is used for every variant (same model function)",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every flag is described in --help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model and masking")
    model.add_argument("--arch", default="base", choices=sorted(SWINV2_SIZES), help="SwinV2 size (default base)")
    model.add_argument("--img-size", type=int, default=192, help="image side in pixels for all phases (192)")
    model.add_argument("--window", type=int, default=12, help="attention window in tokens (12)")
    model.add_argument("--patch-size", type=int, default=4, help="the encoder's patch size in pixels (4)")
    model.add_argument("--mask-patch", type=int, default=32, help="SimMIM mask patch size in pixels (32)")
    model.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of mask patches masked (0.6)")
    model.add_argument("--norm-target", type=int, default=47, help="norm-target window (47); 0 for the raw image")
    model.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate (0.1, the recipe's)")
    run = parser.add_argument_group("what to run")
    run.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} (all)")
    run.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)} (all)")
    run.add_argument(
        "--batch", type=int, default=128, help="images per step at --img-size (128: the recipe's 2048 over 16 GPUs)"
    )
    run.add_argument(
        "--sizes",
        default=None,
        help="comma list of image sides for the cost-growth rows (step phase only), batch scaled by "
        "(img-size/size)^2; default: img-size, 2x and 4x (192,384,768)",
    )
    run.add_argument("--compile", action="store_true", help="also time every variant under torch.compile")
    run.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    run.add_argument("--no-flops", action="store_true", help="skip the FLOP count (no GF/img, TF/s, MFU)")
    run.add_argument(
        "--profile-dir",
        default=None,
        help="write a per-kernel profile of 3 steps per variant and mode here (at --img-size); the attention "
        "kernels seen (which SDPA backend ran) go into the step rows of the JSON",
    )
    env = parser.add_argument_group("device and timing")
    env.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    env.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16",
    )  # fmt: skip
    env.add_argument("--warmup", type=int, default=3, help="untimed calls per variant and phase first (3)")
    env.add_argument("--repeats", type=int, default=10, help="timed calls per variant and phase per round (10)")
    env.add_argument("--rounds", type=int, default=2, help="rounds over all variants, interleaved A B A B (2)")
    env.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s for MFU; default from flops.PEAK_TFLOPS by GPU name and precision (bf16: "
        "H100 SXM 989, H200 989, H100 PCIe 756, A100 312); none on the CPU or fp32, so MFU is n/a",
    )
    env.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    env.add_argument("--seed", type=int, default=0, help="seed of the weights, images and masks (0)")
    parser.add_argument(
        "--out",
        default="benchmarks/results/throughput.json",
        help="JSON report: environment (device, torch, date, command, load), notes, goals and every row",
    )
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.phases = [p for p in args.phases.split(",") if p]
    for value, allowed, flag in ((args.variants, VARIANTS, "--variants"), (args.phases, PHASES, "--phases")):
        unknown = sorted(set(value) - set(allowed))
        if unknown or not value:
            raise ValueError(f"{flag} {unknown or value} is not valid; choose from {', '.join(allowed)}")
    sizes = args.sizes or f"{args.img_size},{2 * args.img_size},{4 * args.img_size}"
    args.sizes = [int(s) for s in sizes.split(",") if s]
    for name in ("batch", "repeats", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and the goals, write the JSON report; returns the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_device(args.device, "--device")
    except ConfigError as e:
        raise SystemExit(f"throughput.py: error: {e}") from None
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.peak_tflops is None:
        args.peak_tflops = default_peak_tflops(device, precision)
    report = dict(environment=environment(device, precision, args.peak_tflops), notes=dict(NOTES), skipped=[])
    report["config"] = {k: v for k, v in vars(args).items()}

    rows = run_size(args.img_size, args.batch, args.phases, args, device, precision, report["skipped"])
    if "step" in args.phases:
        for size in args.sizes:
            if size != args.img_size:
                batch = max(1, round(args.batch * (args.img_size / size) ** 2))  # same tokens per step
                rows += run_size(size, batch, ["step"], args, device, precision, report["skipped"])
    add_comparisons(rows, args.img_size)
    report["environment"]["load_average_end"] = os.getloadavg()
    report["goals"] = check_goals(rows, args.img_size, device)
    report["rows"] = rows

    env = report["environment"]
    print(f"{env['device_name']} | torch {env['torch']} | timm {env['timm']} | {precision} | {env['date']}")
    print(f"arch={args.arch} window={args.window} mask={args.mask_ratio}/{args.mask_patch}px peak={args.peak_tflops}")
    print(format_table(rows))
    for note in report["skipped"]:
        print("note:", note)
    for g in report["goals"]:
        status = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        print(f"goal: {g['goal']}: {_fmt(g['value'], '.3f')} (target {g['target']}): {status}")
    print(f"load average: start {env['load_average_start']}, end {env['load_average_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
