"""Training throughput of our CvT-13 against transformers' CvtModel (same config, random init).

Measures forward + backward images/s (no optimizer step) at 224 px, batch 16, on the CPU with a fixed thread
count, in fp32 or under CPU bf16 autocast (`--precision bf16`, both models alike, as bf16-mixed training
runs). transformers' model runs without its pooler and with drop-path off (it would apply it to a different
tensor); ours runs `forward_features` (its extra final LayerNorm is included). Both models live in the same
process and alternate round by round, so load from other processes hits both alike; the medians over rounds
are compared, and every round's ratio is printed.

    PYTHONPATH=. python benchmarks/bench_cvt.py [--precision fp32|bf16] [--batch-size 16] [--img-size 224]
        [--threads 2] [--iters 5] [--rounds 3] [--warmup 2]
"""
import argparse
import statistics
import time

import torch
import timm
from transformers import CvtConfig, CvtModel

import clip_hvt.models.cvt  # noqa: F401  (registers cvt_13 in timm)


def _step_hf(model, x):
    out = model(x)
    (out.last_hidden_state.float().mean() + out.cls_token_value.float().mean()).backward()


def _step_ours(model, x):
    model.forward_features(x).float().mean().backward()


def _sync(x):
    if x.device.type == 'cuda':
        torch.cuda.synchronize()


def _time(step, model, x, iters: int) -> float:
    _sync(x)
    start = time.perf_counter()
    for _ in range(iters):
        step(model, x)
        model.zero_grad(set_to_none=True)
    _sync(x)
    return x.shape[0] * iters / (time.perf_counter() - start)


def compare(precision: str = 'fp32', batch_size: int = 16, img_size: int = 224, iters: int = 5, rounds: int = 3,
            warmup: int = 2, device: str = 'cpu') -> dict[str, list[float]]:
    """Images/s per round of transformers' CvtModel and our cvt_13, alternating, in one process."""
    torch.manual_seed(0)
    # drop_path off in both: transformers applies it to a different tensor, which would skew the work done
    hf = CvtModel(CvtConfig(drop_path_rate=[0.0, 0.0, 0.0]), add_pooling_layer=False).train().to(device)
    ours = timm.create_model('cvt_13', num_classes=0).train().to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'bf16')
    with autocast:
        for _ in range(warmup):
            _step_hf(hf, x)
            _step_ours(ours, x)
        rates = {'transformers': [], 'ours': []}
        for _ in range(rounds):
            rates['transformers'].append(_time(_step_hf, hf, x, iters))
            rates['ours'].append(_time(_step_ours, ours, x, iters))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--iters', type=int, default=5, help='timed iterations per model and round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32',
                        help='bf16: CPU autocast for both models, as bf16-mixed training does')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = compare(args.precision, args.batch_size, args.img_size, args.iters, args.rounds, args.warmup)
    hf_rate, our_rate = statistics.median(rates['transformers']), statistics.median(rates['ours'])
    per_round = ' '.join(f'{o / h:.2f}x' for h, o in zip(rates['transformers'], rates['ours']))

    print(f'CvT-13 forward+backward, batch {args.batch_size}, {args.img_size}px, {args.threads} threads, '
          f'{args.precision} (median of {args.rounds} rounds x {args.iters} iters)')
    print(f'transformers CvtModel: {hf_rate:8.2f} img/s')
    print(f'clip_hvt cvt_13:       {our_rate:8.2f} img/s')
    print(f'ratio ours/transformers: {our_rate / hf_rate:.2f}x (per round: {per_round})')


if __name__ == '__main__':
    main()
