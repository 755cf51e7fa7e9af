#!/usr/bin/env python
"""COCO captions JSON (images[] with id/file_name, annotations[] with image_id/caption)
-> WebDataset shards, one sample per image.

All captions of an image are kept: json["captions"] lists them in file order and txt holds the
first, so a reader can draw one per epoch. Images without a caption are skipped (stats.json).

    python data_scripts/coco_to_shards.py annotations/captions_train2017.json shards/coco_train \
        --image-root train2017 --workers 16
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from clip_hvt.data.convert import add_writer_args, print_stats, read_coco, write_shards, writer_options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('annotations', help='COCO captions JSON, e.g. captions_train2017.json')
    parser.add_argument('output', help='output directory for shards, sizes.json and stats.json')
    parser.add_argument('--image-root', help='directory file_name is relative to (default: the JSON\'s)')
    add_writer_args(parser)
    args = parser.parse_args(argv)
    try:
        samples, problems = read_coco(args.annotations, args.image_root)
        stats = write_shards(samples, args.output, writer_options(args), problems, source=str(args.annotations))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    print_stats(stats)
    return 0 if stats['written'] else 1


if __name__ == '__main__':
    sys.exit(main())
