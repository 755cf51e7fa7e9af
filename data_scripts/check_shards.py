#!/usr/bin/env python
"""Check WebDataset shards and optionally (re)write their sizes.json.

Counts samples per shard; fully decodes every image (PIL's decompression-bomb limit counts as a
failure); flags missing, empty and non-UTF-8 captions, bad json, members with pickle-like suffixes
(listed, never loaded), duplicate keys, truncated or unreadable tars, and sizes.json entries that
disagree with the shards. sizes.json counts samples with an image member: what the reader attempts.

Exit status: 0 clean, 1 problems found (summary by reason), 2 usage error.

    python data_scripts/check_shards.py shards/ --workers 16 --write-sizes --report check.json
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from PIL import Image

from clip_hvt.data.check import check_shards, find_shards, report_dict, sizes_problems, summarize, write_sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', help='shard directories (searched recursively) or .tar files')
    parser.add_argument('--workers', type=int, default=max(1, os.cpu_count() or 1),
                        help='processes checking shards in parallel (default: CPU count)')
    parser.add_argument('--max-pixels', type=int, default=Image.MAX_IMAGE_PIXELS,
                        help='images with more pixels fail as decompression bombs; 0 disables '
                             '(default: PIL\'s %(default)s)')
    parser.add_argument('--write-sizes', action='store_true',
                        help='(re)write sizes.json in each shard directory from the counts found')
    parser.add_argument('--list', type=int, default=20, metavar='N',
                        help='problems listed per reason (default %(default)s, 0: all)')
    parser.add_argument('--report', type=Path, help='write every count and problem to this JSON file')
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_pixels < 0 or args.list < 0:
        parser.error('--workers must be >= 1, --max-pixels and --list >= 0')
    try:
        groups = find_shards(args.paths)
    except FileNotFoundError as e:
        parser.error(str(e))

    tars = [t for group in groups.values() for t in group]
    reports = dict(zip(tars, check_shards(tars, args.workers, args.max_pixels or None)))
    problems = [p for r in reports.values() for p in r.problems]
    for directory, group in groups.items():
        if args.write_sizes:
            write_sizes(directory, [reports[t] for t in group])
            print(f'wrote {directory / "sizes.json"}')
        problems += sizes_problems(directory, [reports[t] for t in group])
    print(summarize(list(reports.values()), problems, args.list))
    if args.report:
        with open(args.report, 'w') as f:
            json.dump(report_dict(list(reports.values()), problems), f, indent=1)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
