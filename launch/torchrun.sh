#!/usr/bin/env bash
# One node, one process per GPU (or N CPU processes with gloo when there is no GPU).
#   bash launch/torchrun.sh experiment=swinv2_base_w12_192_800ep data=folder data.root=/data/imagenet/train
#   NPROC=2 bash launch/torchrun.sh run.device=cpu ...          # two CPU processes
#   ENTRY=finetune bash launch/torchrun.sh pretrained=outputs/... # fine-tuning instead of pretraining
# All ranks resolve the same run directory (<run.output_dir>/<run.name>): no per-process timestamps.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
ENTRY=${ENTRY:-pretrain}
# after a SIGTERM, give the ranks time to finish the step and save before torchrun kills them (its default: 30 s)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
exec torchrun --standalone --nproc_per_node="$NPROC" -m "simmim_swin.cli.$ENTRY" "$@"
