""" Overhead of the multiscale attention head over plain last-stage average pooling.

Both image towers are open_clip TimmModels with the same Linear projection to the same embedding width:
  reference  `pvt_v2_b2`     timm_pool 'avg'   (last stage, global average)
  multiscale `pvt_v2_b2_ms`  timm_pool 'attn'  (all 4 stages, attention pooling)
Forward+backward repetitions alternate between the two so load drift hits both alike; the ratio of medians
is the figure to read (goal: <= 1.10). On a shared, loaded machine the ratio of minima (least disturbed runs)
is steadier, so is the ratio of process CPU time (time spent descheduled does not count), and the forward
FLOP ratio (torch FlopCounterMode, noise-free) bounds what the head can cost.

    PYTHONPATH=. python benchmarks/bench_multiscale_head.py --batch 8 --size 224 --reps 5  # or pip install -e .
"""
import argparse
import statistics
import time
from typing import Tuple

import torch
from open_clip.timm_model import TimmModel
from torch.utils.flop_counter import FlopCounterMode

import clip_hvt  # noqa: F401  (registers <trunk>_ms in timm)


def step_seconds(tower: torch.nn.Module, images: torch.Tensor) -> Tuple[float, float]:
    """Wall and process CPU seconds of one forward+backward."""
    start, start_cpu = time.perf_counter(), time.process_time()
    tower(images).square().mean().backward()
    if images.is_cuda:
        torch.cuda.synchronize()
    tower.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - start_cpu


def forward_flops(tower: torch.nn.Module, images: torch.Tensor) -> int:
    # forward only: FlopCounterMode counts depthwise-conv backward as if it were dense (torch 2.x)
    with FlopCounterMode(display=False) as counter:
        tower(images)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trunk', default='pvt_v2_b2')
    parser.add_argument('--pool', default='attn', help="multiscale timm_pool string, e.g. 'attn:grid=2'")
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--embed-dim', type=int, default=512)
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    towers = {
        'avg (last stage)': TimmModel(args.trunk, args.embed_dim, pool='avg', proj='linear'),
        f'{args.pool} (multiscale)': TimmModel(f'{args.trunk}_ms', args.embed_dim, pool=args.pool, proj='linear'),
    }
    towers = {name: tower.to(args.device).train() for name, tower in towers.items()}
    images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)

    times = {name: [] for name in towers}
    cpu_times = {name: [] for name in towers}
    for rep in range(args.warmup + args.reps):
        for name, tower in towers.items():
            seconds, cpu_seconds = step_seconds(tower, images)
            if rep >= args.warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)

    flops = {name: forward_flops(tower, images[:1]) for name, tower in towers.items()}

    print(f'{args.trunk} fwd+bwd, batch {args.batch}, {args.size}px, embed {args.embed_dim}, '
          f'{args.threads} threads, {args.device}, {args.reps} interleaved reps')
    print(f'  {"tower":<22} {"median ms":>10} {"min ms":>10} {"cpu s":>7} {"fwd GFLOP/img":>14} {"M params":>9}')
    for name, tower in towers.items():
        params = sum(p.numel() for p in tower.parameters()) / 1e6
        print(f'  {name:<22} {statistics.median(times[name]) * 1e3:10.1f} {min(times[name]) * 1e3:10.1f} '
              f'{statistics.median(cpu_times[name]):7.2f} {flops[name] / 1e9:14.3f} {params:9.2f}')
    reference, multiscale = towers
    ratios = {
        'median': statistics.median(times[multiscale]) / statistics.median(times[reference]),
        'min': min(times[multiscale]) / min(times[reference]),
        'cpu median': statistics.median(cpu_times[multiscale]) / statistics.median(cpu_times[reference]),
        'fwd FLOPs': flops[multiscale] / flops[reference],
    }
    for label, ratio in ratios.items():
        print(f'overhead ratio multiscale/reference ({label}): {ratio:.4f}')


if __name__ == '__main__':
    main()
