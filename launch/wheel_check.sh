#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment and use it from a directory outside the
# repository: `--help` of both commands, 3 steps of pretraining a tiny SwinV2 and 3 steps of fine-tuning it on
# a generated class folder (CPU, a few minutes). Shows that an installed wheel carries its configs.
# The venv sees this Python's site-packages (torch is not downloaded again); the package itself and the console
# scripts come from the wheel, which the script checks.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH  # the source tree must not be importable

# build from a copy of the tracked and new files, so no build/ or *.egg-info lands in the checkout
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
git -C "$REPO" ls-files -z --cached --others --exclude-standard | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
if python -c "import setuptools" 2>/dev/null; then ISOLATION=--no-build-isolation; else ISOLATION=; fi
python -m pip wheel --quiet --disable-pip-version-check --no-deps $ISOLATION "$WORK/src" -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/simmim_swin-*.whl)"
echo "built $(basename "$WHEEL")"

python -m venv --system-site-packages "$WORK/venv"
VENV="$WORK/venv/bin"
"$VENV/python" -m pip install --quiet --disable-pip-version-check --no-deps --ignore-installed "$WHEEL"

cd "$WORK/run"
LOCATION="$("$VENV/python" -c 'import simmim_swin; print(simmim_swin.__file__)')"
case "$LOCATION" in
    "$WORK/venv/"*) echo "simmim_swin imported from the wheel: $LOCATION" ;;
    *) echo "error: simmim_swin was imported from $LOCATION, not from the wheel in $WORK/venv" >&2; exit 1 ;;
esac

# into files first: `grep -q` in a pipe exits at the first match and, under pipefail, a writer still printing
# fails with a broken pipe
"$VENV/simmim-pretrain" --help > "$WORK/pretrain_help.txt"
"$VENV/simmim-finetune" --help > "$WORK/finetune_help.txt"
grep -q "experiment   quickstart" "$WORK/pretrain_help.txt"
grep -q "finetune     few_labels | quickstart" "$WORK/finetune_help.txt"

# 3 optimizer steps of a 3-stage 16-wide SwinV2 at 32 px on the photographs bundled with scikit-image
"$VENV/simmim-pretrain" model.arch=pico model.img_size=32 model.window_size=4 mask.mask_patch_size=8 \
    data.batch_size=4 data.num_workers=0 data.samples_per_epoch=16 schedule=cosine schedule.epochs=1 \
    schedule.warmup_epochs=0 logger.log_every=1 run.max_steps=3 run.output_dir="$WORK/out" run.name=pre
test -f "$WORK/out/pre/checkpoints/step_00000003.pt"

# three classes of noisy colour patches: train/ with 4 images each, val/ with 2
"$VENV/python" - "$WORK/classes" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, count in (("train", 4), ("val", 2)):
    for c, name in enumerate(("red", "green", "blue")):
        folder = Path(sys.argv[1]) / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 80, (40, 40, 3))
            pixels[..., c] += 170
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
PY

# 3 steps of fine-tuning it at 64 px / window 8, with the position bias transferred from 32 px / window 4
"$VENV/simmim-finetune" pretrained="$WORK/out/pre" model.img_size=64 model.window_size=8 data.root="$WORK/classes" \
    data.batch_size=4 data.eval_batch_size=6 data.num_workers=0 schedule.epochs=1 schedule.warmup_epochs=0 \
    logger.log_every=1 run.max_steps=3 run.output_dir="$WORK/out" run.name=ft
test -f "$WORK/out/ft/checkpoints/best.pt"
echo "wheel check passed"
