#!/usr/bin/env python
"""Write the embedded shapes data set (train/val image-caption shards, a zero-shot set) to a directory.

The quickstart generates it into ~/.cache/clip_hvt on first use; this command writes it anywhere,
e.g. to share one copy between jobs. Deterministic by seed; no network. The output directory must be
new, empty, or hold a shapes set written here before (replaced when the parameters differ); a
directory with other files is refused and left as it is.

    python data_scripts/make_shapes.py data/shapes --seed 0 --train-samples 20000
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from clip_hvt.data import synthetic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory: new, empty, or an earlier shapes set (replaced); never one with other files")
    defaults = synthetic.ShapesConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="rendered image side in px")
    parser.add_argument("--train-samples", type=int, default=defaults.train_samples)
    parser.add_argument("--val-samples", type=int, default=defaults.val_samples)
    parser.add_argument("--zeroshot-per-class", type=int, default=defaults.zeroshot_per_class)
    opts = parser.parse_args(argv)
    cfg = synthetic.ShapesConfig(seed=opts.seed, image_size=opts.image_size, train_samples=opts.train_samples,
                                 val_samples=opts.val_samples, zeroshot_per_class=opts.zeroshot_per_class)
    try:
        root = synthetic.ensure(opts.out, cfg)
    except FileExistsError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"shapes data in {root}: train {cfg.train_samples}, val {cfg.val_samples}, "
          f"zero-shot {cfg.zeroshot_per_class} x {len(synthetic.CLASSNAMES)} classes. "
          f"Use it with --data.shapes.root {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
