#!/usr/bin/env python
"""Image folder (recursive) with a sidecar caption per image (`a/b/cat.jpg` + `a/b/cat.txt`)
-> WebDataset shards.

    python data_scripts/folder_to_shards.py /data/my_images shards/ --val-fraction 0.01 --workers 16
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from clip_hvt.data.convert import (
    IMAGE_SUFFIXES, add_writer_args, print_stats, read_folder, write_shards, writer_options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', help='image folder, searched recursively')
    parser.add_argument('output', help='output directory for shards, sizes.json and stats.json')
    parser.add_argument('--suffixes', nargs='+', default=list(IMAGE_SUFFIXES),
                        help='image file suffixes (default: %(default)s)')
    add_writer_args(parser)
    args = parser.parse_args(argv)
    try:
        samples = read_folder(args.folder, args.suffixes)
        stats = write_shards(samples, args.output, writer_options(args), source=str(args.folder))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    print_stats(stats)
    return 0 if stats['written'] else 1


if __name__ == '__main__':
    sys.exit(main())
