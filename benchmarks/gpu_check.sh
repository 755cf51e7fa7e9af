#!/usr/bin/env bash
# One-GPU check, under 8 minutes, one table at the end (details: benchmarks/gpu_check.py):
#   bf16-mixed CLIP training at 224 px, batch 256, of ViT-B/16, PVTv2-B2, PVTv2-B2-ms, CvT-13 (samples/s,
#   MFU, peak memory; eager, then torch.compile while the budget lasts); CvT-13 vs transformers' CvtModel
#   in bf16; FSDP on one GPU (20 steps, checkpoint, resume, export parity); DDP on one GPU.
# Run from anywhere in the checkout, on a machine with one GPU and the package's dependencies:
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# Check the script itself on a CPU (tiny sizes, FSDP replaced by DDP):
#   bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1
if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# 420 s of sections plus start-up and teardown stays under 8 minutes; the hard stop is the promise.
# (A dry run on a CPU takes longer: its sections are not skipped.)
limit=470; [[ " $* " == *" --dry-run "* ]] && limit=3600
timeout --kill-after=10 "$limit" python benchmarks/gpu_check.py --budget 420 "$@"
