"""Loader throughput: our WebDataModule train loader vs open_clip's own ``get_wds_dataset``.

Both read the same shards of 512-px JPEGs through the same open_clip train transform (224 px)
and tokenizer, with the same workers and batch size, resampled shards on both sides; runs
alternate (ours, theirs, ours, ...) and the median of each is compared. Prints samples/s and
the ratio ours / open_clip.

open_clip's pipeline needs webdataset <= 0.2.86, so its rounds run in another interpreter
(``--open-clip-python``; how to make it: ``benchmarks/common.py``)::

    python benchmarks/bench_loader.py [--samples 2000] [--batch-size 64] [--workers 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from clip_hvt import factory
from common import OPEN_CLIP_PYTHON, check_open_clip_python
from clip_hvt.data.datamodule import WebDataModule

MODEL_CFG = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 224},
             "text_cfg": {"context_length": 77, "width": 512, "heads": 8, "layers": 12}}
WORDS = "a photo of the red blue green small large dog cat car house tree sky on in near with".split()


def _image(rng: random.Random, size: int = 512) -> Image.Image:
    """Varied photo-like content: a smooth colour field, shapes, texture, a little blur."""
    field = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    img = Image.fromarray(field).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(5, 25)):
        box = sorted(rng.uniform(0, size) for _ in range(2)), sorted(rng.uniform(0, size) for _ in range(2))
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(xy, fill=colour)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def make_shards(root: Path, samples: int, per_shard: int = 500) -> str:
    """Write (once) ``samples`` 512-px JPEGs (quality 90) with captions; returns the shard spec."""
    shards = math.ceil(samples / per_shard)
    spec = str(root / f"bench-{{000000..{shards - 1:06d}}}.tar")
    if (root / "sizes.json").is_file() and sum(json.loads((root / "sizes.json").read_text()).values()) == samples:
        return spec
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sizes = {}
    with wds.ShardWriter(str(root / "bench-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(samples):
            buf = io.BytesIO()
            _image(rng).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": " ".join(rng.choices(WORDS, k=8))})
            name = os.path.basename(sink.fname)
            sizes[name] = sizes.get(name, 0) + 1
    (root / "sizes.json").write_text(json.dumps(sizes))
    return spec


def ours(spec: str, batch_size: int, workers: int):
    dm = WebDataModule(train_shards=spec, model_cfg=MODEL_CFG, batch_size=batch_size, num_workers=workers,
                       train_num_samples=10**7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    # Our workers ship uint8; the normalization Lightning runs after transfer (on the GPU in training)
    # is counted here, on the CPU, so both sides deliver the same normalized float batches.
    return (dm.on_after_batch_transfer(batch, 0) for batch in _forever(loader))


def _forever(loader):
    while True:
        yield from loader


def open_clip_loader(spec: str, batch_size: int, workers: int):
    from open_clip_train.data import get_wds_dataset
    train_transform, _ = factory.image_transforms(MODEL_CFG)
    args = Namespace(train_data=spec, val_data=None, dataset_resampled=True, train_num_samples=10**7,
                     train_data_upsampling_factors=None, seed=0, batch_size=batch_size, world_size=1,
                     workers=workers)
    return get_wds_dataset(args, train_transform, is_train=True, tokenizer=factory.create_tokenizer(MODEL_CFG)).dataloader


def measure(loader, batches: int, warmup: int) -> tuple[float, float]:
    """(samples/s wall clock, CPU ms per sample of this process) over ``batches`` after ``warmup``."""
    it = iter(loader)
    for _ in range(warmup):  # worker start-up and shuffle-buffer fill
        next(it)
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    for _ in range(batches):
        batch = next(it)
        n += (batch["image"] if isinstance(batch, dict) else batch[0]).shape[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    del it
    return n / wall, 1000 * cpu / n


def run_round(build, spec: str, args) -> tuple[float, float]:
    """Loader samples/s with ``workers`` processes, and CPU ms/sample in-process (load-independent)."""
    rate, _ = measure(build(spec, args.batch_size, args.workers), args.batches, args.warmup)
    _, cpu_ms = measure(build(spec, args.batch_size, 0), max(2, args.batches // 4), 2)
    return rate, cpu_ms


def _open_clip_round(args, spec: str) -> tuple[float, float]:
    """One open_clip round in the interpreter that has a webdataset it works with."""
    cmd = [args.open_clip_python, __file__, "--only-open-clip", "--root", args.root, "--samples", str(args.samples),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--batches", str(args.batches),
           "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/clip_hvt_bench_loader", help="where the shards are written once")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--open-clip-python", default=OPEN_CLIP_PYTHON,
                        help="interpreter with webdataset<=0.2.86 for open_clip's pipeline")
    parser.add_argument("--only-open-clip", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = make_shards(Path(args.root), args.samples)
    if args.only_open_clip:
        print(json.dumps(run_round(open_clip_loader, spec, args)))
        return
    check_open_clip_python(args.open_clip_python)
    print(f"shards {spec}: {args.samples} JPEGs 512x512 q90; transform open_clip train 224 (RandomResizedCrop "
          f"scale 0.9-1, bicubic); batch {args.batch_size}, workers {args.workers}, "
          f"{args.batches} timed batches after {args.warmup} warm-up, {args.rounds} alternating rounds")
    rates, cpu = {"ours": [], "open_clip": []}, {"ours": [], "open_clip": []}
    for r in range(args.rounds):
        for name, result in (("ours", lambda: run_round(ours, spec, args)),
                             ("open_clip", lambda: _open_clip_round(args, spec))):
            rate, cpu_ms = result()
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
        print(f"round {r}: samples/s ours {rates['ours'][-1]:.1f}, open_clip {rates['open_clip'][-1]:.1f}; "
              f"CPU ms/sample ours {cpu['ours'][-1]:.2f}, open_clip {cpu['open_clip'][-1]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"webdataset {wds.__version__} (open_clip side 0.2.86), Pillow {Image.__version__}")
    print(f"median samples/s ({args.workers} workers): ours {med['ours']:.1f}, open_clip {med['open_clip']:.1f}; "
          f"ratio ours/open_clip {med['ours'] / med['open_clip']:.2f}x")
    print(f"median CPU ms/sample (in-process): ours {med_cpu['ours']:.2f}, open_clip {med_cpu['open_clip']:.2f}; "
          f"ratio open_clip/ours {med_cpu['open_clip'] / med_cpu['ours']:.2f}x")


if __name__ == "__main__":
    main()
