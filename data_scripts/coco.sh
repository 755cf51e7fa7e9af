#!/usr/bin/env bash
# COCO Captions 2017 -> OUT/train (118k images, training shards) and OUT/val (5k images, a retrieval set
# for python -m clip_hvt.eval and ZeroShotEvaluation), one sample per image with all its captions in
# json["captions"] (txt = the first), then both checked with the training reader's own rules.
#
#   bash data_scripts/coco.sh ROOT OUT
#   then: python -m clip_hvt.train --config configs/gpu.yaml --data.train_shards 'OUT/train/*.tar' \
#             --data.caption_key json.captions
#         python -m clip_hvt.eval --model EXPORT --data OUT/val --out results/
#
# ROOT holds (or receives: about 19 GB, needs network) train2017/, val2017/ and annotations/ as
# cocodataset.org ships them; a part already there is not downloaded again. WORKERS (default: all cores)
# convert in parallel; RESIZE (384) is the shortest side of the stored images.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 ROOT OUT" >&2
    exit 2
fi
root=$1 out=$2
workers=${WORKERS:-$(nproc)}
mkdir -p "$root"
fetch() {  # fetch ZIP_URL PART: download and unpack PART into ROOT unless it is there
    [ -e "$root/$2" ] && return
    curl -fL --retry 3 -o "$root/$2.zip" "$1"
    unzip -q "$root/$2.zip" -d "$root" && rm "$root/$2.zip"
}
fetch http://images.cocodataset.org/annotations/annotations_trainval2017.zip annotations
for split in train val; do
    fetch "http://images.cocodataset.org/zips/${split}2017.zip" "${split}2017"
    python -m clip_hvt.data.convert coco --path "$root/annotations/captions_${split}2017.json" \
        --image_root "$root/${split}2017" --output "$out/$split" \
        --write.resize "${RESIZE:-384}" --write.workers "$workers"
    python -m clip_hvt.data.check --paths "$out/$split" --workers "$workers" --report "$out/$split/check.json"
done
