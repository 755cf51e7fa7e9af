#!/usr/bin/env bash
# CLIP_benchmark's evaluation sets in its WebDataset layout (the clip-benchmark/wds_* datasets on the
# Hugging Face hub), test split only, read by python -m clip_hvt.eval and ZeroShotEvaluation as they are.
#
#   bash data_scripts/clip_benchmark.sh OUT imagenet1k mscoco_captions flickr30k cifar10
#   then: python -m clip_hvt.eval --model EXPORT --data OUT/wds_imagenet1k --data OUT/wds_mscoco_captions
#
# Needs network and huggingface_hub's `hf` command (huggingface_hub >= 0.34).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 OUT SET [SET ...]   (SET: imagenet1k, mscoco_captions, flickr30k, cifar10, ...)" >&2
    exit 2
fi
out=$1
shift
command -v hf >/dev/null || { echo "$0: hf not found: pip install -U huggingface_hub" >&2; exit 2; }
for set in "$@"; do
    hf download "clip-benchmark/wds_$set" --repo-type dataset --local-dir "$out/wds_$set" \
        --include 'test/*' --include '*.txt'
done
