#!/usr/bin/env bash
# Install simmim-swin into the current Python environment and run a short real SimMIM pretraining of a small
# SwinV2 on the photographs bundled with scikit-image (a few minutes on a 2-core CPU). The last line printed is
# the path of the reconstruction panel. Extra arguments are Hydra overrides (e.g. `run.device=cuda`).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e .
simmim-pretrain experiment=quickstart "$@"
