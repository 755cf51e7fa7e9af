""" Peak memory of the contrastive step: local-loss vs naive global loss, and GradCache vs plain.

Measurement (CPU, no GPU needed): torch's profiler with ``profile_memory=True`` records every
allocation and free of torch's CPU allocator with its size; the peak is the maximum of their
running sum over the measured region, i.e. the most bytes of tensors alive at once that the
region allocated (inputs and parameters made before the region are not counted, their
gradients are). This is the quantity the CUDA caching allocator's ``max_memory_allocated``
reports on a GPU, without the allocator's rounding.

1. Loss alone (forward + backward on given features), one rank's share of a simulated world:
   ``local``: open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)`` as ``build_loss('clip')``
   builds it (local x global logits); ``naive``: ``ClipLoss(local_loss=False)`` (every rank builds
   the global x global logits). The all-gather is simulated inside the region: the other ranks'
   features are allocated there, as all_gather's receive buffers would be.
2. GradCache vs plain at the same batch: a small open_clip CLIP (timm test ViT image tower,
   2-layer text transformer) over one batch, all activations kept vs micro-batches.

Run: python benchmarks/bench_loss_memory.py [--world-size 8] [--embed-dim 512]
"""
import argparse
from unittest import mock

import torch
import torch._C._profiler as _profiler
from open_clip import loss as open_clip_loss
from open_clip.model import CLIP
from torch.profiler import ProfilerActivity, profile

from clip_hvt.gradcache import gradcache_backward
from clip_hvt.loss import build_loss

MiB = 2 ** 20


def peak_bytes(fn) -> int:
    """ Peak bytes held at once by the allocations ``fn`` makes, from the profiler's allocator events. """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def collect(node):
        if node.tag == _profiler._EventType.Allocation and node.extra_fields.device.type == 'cpu':
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            collect(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        collect(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _simulated_gather(world_size):
    """ Stand-in for open_clip's gather_features on rank 0: the other ranks' features are new buffers. """

    def gather(image_features, text_features, **kwargs):
        others = (world_size - 1) * len(image_features)
        received = [torch.randn(others, f.shape[1], dtype=f.dtype) for f in (image_features, text_features)]
        return torch.cat([image_features, received[0]]), torch.cat([text_features, received[1]])

    return gather


def loss_step_peak(loss_fn, local_batch, embed_dim, world_size) -> int:
    features = [torch.nn.functional.normalize(torch.randn(local_batch, embed_dim), dim=-1).requires_grad_()
                for _ in range(2)]
    logit_scale = torch.tensor(100.)

    def step():
        loss_fn(*features, logit_scale).backward()

    with mock.patch.object(open_clip_loss, 'gather_features', _simulated_gather(world_size)):
        return peak_bytes(step)


def loss_table(batch_sizes, world_size, embed_dim):
    print(f'\nLoss forward+backward, one rank of {world_size}, embed_dim {embed_dim}, fp32 (peak MiB)')
    print(f"{'global':>7} {'local':>6} {'local-loss':>11} {'naive':>9} {'naive/local':>12}")
    for batch in batch_sizes:
        local = batch // world_size
        local_loss = build_loss('clip', rank=0, world_size=world_size)
        naive = open_clip_loss.ClipLoss(local_loss=False, gather_with_grad=True, rank=0, world_size=world_size)
        local_peak = loss_step_peak(local_loss, local, embed_dim, world_size)
        naive_peak = loss_step_peak(naive, local, embed_dim, world_size)
        print(f'{batch:>7} {local:>6} {local_peak / MiB:>11.1f} {naive_peak / MiB:>9.1f} {naive_peak / local_peak:>12.2f}')


def small_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        embed_dim=256,
        vision_cfg=dict(timm_model_name='test_vit', image_size=96, timm_drop_path=0.1),
        text_cfg=dict(context_length=32, vocab_size=1000, width=128, heads=2, layers=4),
    ).train()


def gradcache_table(batch, micro_batch_sizes):
    model = small_clip()
    images = torch.randn(batch, 3, 96, 96)
    texts = torch.randint(1, 1000, (batch, 32))
    loss_fn = build_loss('clip')

    def plain():
        image_f, text_f, logit_scale = model(images, texts)
        loss_fn(image_f, text_f, logit_scale).backward()

    def cached(micro):
        return lambda: gradcache_backward(
            lambda i, t: model(i, t)[:2], images, texts, loss_fn, model.logit_scale.exp(), micro_batch_size=micro)

    def measure(step):
        model.zero_grad(set_to_none=True)  # every step allocates its parameter gradients
        return peak_bytes(step)

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    plain_peak = measure(plain)
    print(f'\nCLIP step, batch {batch}, small CLIP ({params / MiB:.1f} MiB parameters), fp32 (peak MiB, includes gradients)')
    print(f"{'method':>16} {'peak':>8} {'vs plain':>9}")
    print(f"{'plain':>16} {plain_peak / MiB:>8.1f} {1:>9.2f}")
    for micro in micro_batch_sizes:
        peak = measure(cached(micro))
        print(f"{f'gradcache mb={micro}':>16} {peak / MiB:>8.1f} {peak / plain_peak:>9.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[256, 512, 1024, 2048, 4096])
    parser.add_argument('--world-size', type=int, default=8)
    parser.add_argument('--embed-dim', type=int, default=512)
    parser.add_argument('--gradcache-batch', type=int, default=256)
    parser.add_argument('--micro-batch-sizes', type=int, nargs='+', default=[128, 64, 32])
    args = parser.parse_args()
    torch.manual_seed(0)
    loss_table(args.batch_sizes, args.world_size, args.embed_dim)
    gradcache_table(args.gradcache_batch, args.micro_batch_sizes)


if __name__ == '__main__':
    main()
