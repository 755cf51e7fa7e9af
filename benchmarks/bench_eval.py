"""Zero-shot evaluation throughput and numbers: ``clip_hvt.eval`` vs CLIP_benchmark's own evaluation.

Both sides evaluate the same open_clip export (a plain-timm PVTv2-B0 image tower, avg pooling, 224 px,
random init: CLIP_benchmark loads it with open_clip alone) on the same set in CLIP_benchmark's
webdataset layout (``test/{0..3}.tar`` lossless WebP + ``cls``, ``classnames.txt``,
``zeroshot_classification_templates.txt``), with the same batch size and number of workers, fp32 on
the CPU (CLIP_benchmark with ``amp=False``; its default autocasts to bf16 on the CPU). Timed: from
the set description to the metrics, text classifier included, model loading excluded. Rounds
alternate (ours, theirs, ...); medians are compared. Prints images/s, the ratio ours / CLIP_benchmark
and both sides' acc1, acc5 and mean_per_class_recall (which must agree within 0.1 point).

CLIP_benchmark (``pip install clip_benchmark``: scikit-learn, pycocoevalcap, transformers) runs in
its own interpreter, e.g. a venv that sees this one's packages::

    python -m venv /tmp/cbvenv --system-site-packages
    /tmp/cbvenv/bin/pip install clip_benchmark==1.6.2 'numpy<2.3'   # its accuracy() calls float() on a
                                                                    # 1-element array: an error from numpy 2.3
    python benchmarks/bench_eval.py --clip-benchmark-python /tmp/cbvenv/bin/python [--images 1000 --rounds 2]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import checkout_env, matmul_gflops

MODEL_CFG = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "timm_pool": "avg", "image_size": 224},
             "text_cfg": {"context_length": 77, "width": 512, "heads": 8, "layers": 12}}


def make_set(root: Path, images: int, shards: int = 4, size: int = 256) -> Path:
    """The embedded shapes (30 colour x shape classes) drawn at ``size`` px, written as CLIP_benchmark's
    ``convert_dataset`` writes a set (webdataset's default encoder, ``%d.tar``, nshards.txt)."""
    import webdataset as wds
    from clip_hvt.data import synthetic

    if (root / "test" / "nshards.txt").is_file():
        return root
    (root / "test").mkdir(parents=True)
    rng = random.Random(0)
    per_shard = -(-images // shards)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(images):
            label = i % len(synthetic.CLASSNAMES)
            colour, shape = synthetic.CLASSNAMES[label].split(" ")
            image, _ = synthetic.render(rng, size, colour=colour, shape=shape)
            buf = io.BytesIO()
            image.save(buf, format="webp", lossless=True)
            sink.write({"__key__": "s%07d" % i, "webp": buf.getvalue(), "cls": label})
        count = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{count}\n")
    (root / "classnames.txt").write_text("\n".join(synthetic.CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in synthetic.ZEROSHOT_TEMPLATES) + "\n")
    return root


def make_export(out: Path) -> Path:
    import torch
    from clip_hvt import factory
    from clip_hvt.export import export_model

    if not (out / "open_clip_config.json").is_file():
        torch.manual_seed(0)
        export_model(factory.create_model(MODEL_CFG), MODEL_CFG, out)
    return out


def run_ours(export: str, data: str, batch_size: int, workers: int) -> dict:
    from clip_hvt import eval as ev

    loaded = ev.load_model(export)
    start = time.perf_counter()
    evalset = ev.load_set(data)
    result = ev.evaluate_set(loaded.model, loaded.tokenizer, loaded.transform, evalset, batch_size=batch_size,
                             num_workers=workers)
    return {"seconds": time.perf_counter() - start, "images": result["samples"], "metrics": result["metrics"]}


def run_clip_benchmark(export: str, data: str, batch_size: int, workers: int) -> dict:
    """CLIP_benchmark's ``cli.run`` for ``--dataset wds/...`` with ``--no_amp``, minus the file dump."""
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    start = time.perf_counter()
    dataset = build_dataset(dataset_name="wds/bench", root=data, transform=transform, split="test", download=True,
                            task="zeroshot_classification")
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers)
    metrics = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates,
                                               device="cpu", amp=False, verbose=False)
    seconds = time.perf_counter() - start
    import tarfile  # CLIP_benchmark returns no count: the labels in the shards, counted untimed
    images = sum(name.endswith(".cls") for tar in Path(data, "test").glob("*.tar")
                 for name in tarfile.open(tar).getnames())
    return {"seconds": seconds, "images": images, "metrics": metrics}


def _side(python: str, side: str, args: argparse.Namespace, export: Path, data: Path) -> dict:
    cmd = [python, __file__, "--side", side, "--export", str(export), "--data", str(data),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=checkout_env())
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-benchmark-python", default=sys.executable,
                        help="interpreter where `import clip_benchmark` works")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "clip_hvt_bench_eval"))
    parser.add_argument("--side", choices=["ours", "clip_benchmark"], help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one timed evaluation in this process; the last stdout line is the result
        run = run_ours if args.side == "ours" else run_clip_benchmark
        print(json.dumps(run(args.export, args.data, args.batch_size, args.workers)))
        return

    import torch
    work = Path(args.work)
    data = make_set(work / f"set-{args.images}", args.images)
    export = make_export(work / "export")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"2048^2 fp32 matmul {matmul_gflops():.0f} GFLOP/s; {args.images} WebP images 256 px -> 224 px, "
          f"PVTv2-B0 CLIP (avg pool, embed 512), batch {args.batch_size}, {args.workers} workers, fp32")
    results = {"ours": [], "clip_benchmark": []}
    for round_ in range(args.rounds):
        for side, python in (("ours", sys.executable), ("clip_benchmark", args.clip_benchmark_python)):
            result = _side(python, side, args, export, data)
            results[side].append(result)
            print(f"round {round_ + 1} {side:>14}: {result['images'] / result['seconds']:7.1f} images/s "
                  f"({result['images']} in {result['seconds']:.1f} s)")
    speed = {side: statistics.median(r["images"] / r["seconds"] for r in rs) for side, rs in results.items()}
    print(f"median images/s: ours {speed['ours']:.1f}, CLIP_benchmark {speed['clip_benchmark']:.1f}, "
          f"ratio {speed['ours'] / speed['clip_benchmark']:.2f}x")
    ours, theirs = results["ours"][0]["metrics"], results["clip_benchmark"][0]["metrics"]
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        diff = 100 * abs(ours[name] - theirs[name])
        print(f"{name:>22}: ours {100 * ours[name]:.2f}  CLIP_benchmark {100 * theirs[name]:.2f}  "
              f"|diff| {diff:.2f} point ({'ok' if diff <= 0.1 else 'OVER 0.1'})")


if __name__ == "__main__":
    main()
