#!/usr/bin/env python
"""CSV / TSV / parquet table (image path + caption columns) -> WebDataset shards.

The table is streamed in chunks of rows, so it may be far larger than memory.

    python data_scripts/csv_to_shards.py captions.tsv shards/ --image-col filepath --caption-col title \
        --image-root /data/images --val-fraction 0.01 --workers 16
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from clip_hvt.data.convert import add_writer_args, print_stats, read_table, write_shards, writer_options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('table', help='.csv, .tsv (optionally .gz/.bz2/.xz/.zst) or .parquet')
    parser.add_argument('output', help='output directory for shards, sizes.json and stats.json')
    parser.add_argument('--image-col', default='image', help='column with image paths (default %(default)s)')
    parser.add_argument('--caption-col', default='caption', help='column with captions (default %(default)s)')
    parser.add_argument('--image-root', help='directory relative image paths start from (default: the table\'s)')
    add_writer_args(parser)
    args = parser.parse_args(argv)
    try:
        samples = read_table(args.table, args.image_col, args.caption_col, args.image_root)
        stats = write_shards(samples, args.output, writer_options(args), source=str(args.table))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    print_stats(stats)
    return 0 if stats['written'] else 1


if __name__ == '__main__':
    sys.exit(main())
