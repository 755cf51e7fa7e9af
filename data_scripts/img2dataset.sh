#!/usr/bin/env bash
# An image-text URL list (CC3M, CC12M, a LAION subset, ...) -> WebDataset shards clip_hvt trains on as they
# are, downloaded by img2dataset (the field's downloader: retries, rate limits, resizing, stats), then
# checked with the training reader's own rules; the check writes sizes.json (sample counts per shard).
#
#   bash data_scripts/img2dataset.sh URL_LIST OUT [more img2dataset flags]
#   bash data_scripts/img2dataset.sh cc3m_train.tsv shards/cc3m --input_format tsv --url_col url --caption_col caption
#   then: python -m clip_hvt.train --config configs/gpu.yaml --data.train_shards 'shards/cc3m/*.tar'
#
# Needs network and `pip install img2dataset` (not a clip_hvt dependency). Images: shortest side resized
# to IMAGE_SIZE (default 384, as clip_hvt.data.convert), never enlarged, JPEG quality 95. PROCESSES (16)
# and THREADS (64) set img2dataset's parallelism; the flags you add come last and win.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 URL_LIST OUT [img2dataset flags]" >&2
    exit 2
fi
url_list=$1 out=$2
shift 2
command -v img2dataset >/dev/null || { echo "$0: img2dataset not found: pip install img2dataset" >&2; exit 2; }
img2dataset --url_list "$url_list" --output_folder "$out" --output_format webdataset \
    --resize_mode keep_ratio --image_size "${IMAGE_SIZE:-384}" --resize_only_if_bigger True \
    --encode_format jpg --encode_quality 95 \
    --processes_count "${PROCESSES:-16}" --thread_count "${THREADS:-64}" --enable_wandb False "$@"
# every shard against img2dataset's NNNNN_stats.json; exit 1 (and check.json) on any problem
python -m clip_hvt.data.check --paths "$out" --workers "${PROCESSES:-16}" --write_sizes true --report "$out/check.json"
