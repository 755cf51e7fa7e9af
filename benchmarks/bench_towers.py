"""Achieved GFLOP/s of image towers in training: hierarchical trunks against ViT-S/16, same process.

Forward + backward (no optimizer) of each timm trunk (``num_classes=0``) on one batch, repeated; achieved
GFLOP/s = 3 x forward FLOPs per image (``clip_hvt.flops.count_flops``, attention included) x images/s.
Models alternate round by round so load from other processes hits all alike; the median over rounds is
compared with ViT-S/16's in the same setting. Freed memory stays in the process, as in training
(``--malloc default`` for glibc's own behaviour). Settings: eager or ``torch.compile`` (``model.compile()``,
in place), fp32 or bf16 autocast. Under compile the bench also prints graph breaks and compiled graphs
(a fixed shape should give one graph each way, and no recompile after the warm-up).

``--matmuls`` also replays every matmul of one step (mm / addmm / bmm, same shapes) on its own and
prints the step time over the time of its matmuls: what the rest (convolutions, norms, activations,
softmax, layout copies) costs on top of the linear algebra. Fused attention (SDPA's CPU flash kernel)
counts as its six batched products (two forward, four backward), replayed as bmm.

    PYTHONPATH=. python benchmarks/bench_towers.py [--models vit_small_patch16_224 pvt_v2_b2 cvt_13 ...]
        [--settings eager-fp32 eager-bf16 compile-fp32 compile-bf16] [--batch-size 16] [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import clip_hvt  # noqa: F401  (registers cvt_* and *_ms in timm)
from clip_hvt.flops import count_flops
from clip_hvt.malloc import keep_freed_memory
from common import matmul_gflops

REFERENCE = "vit_small_patch16_224"
MODELS = [REFERENCE, "pvt_v2_b2", "pvt_v2_b2_ms", "cvt_13", "cvt_13_ms"]
SETTINGS = ["eager-fp32", "eager-bf16", "compile-fp32", "compile-bf16"]
aten = torch.ops.aten


def _step(model, x):
    model(x).float().mean().backward()
    model.zero_grad(set_to_none=True)


def create(name: str, size: int) -> torch.nn.Module:
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    return timm.create_model(name, num_classes=0, **kwargs).train()


def forward_gflops(name: str, size: int) -> float:
    model = create(name, size)
    with torch.enable_grad():
        return count_flops(model, torch.zeros(1, 3, size, size)) / 1e9


def _attention_products(q: torch.Size, k: torch.Size, v: torch.Size, backward: bool) -> list:
    """The batched matrix products of attention over (B, heads, L, D) q / k / v, as a fused kernel computes
    them inside: q k^T and P v forward; dv = P^T dO, dP = dO v^T, dq = dS k and dk = dS^T q backward."""
    bh, lq, lk, d, dv = q[0] * q[1], q[2], k[2], q[3], v[3]
    pairs = ([((lk, lq), (lq, dv)), ((lq, dv), (dv, lk)), ((lq, lk), (lk, d)), ((lk, lq), (lq, d))] if backward
             else [((lq, d), (d, lk)), ((lq, lk), (lk, dv))])
    return [(aten.bmm.default, [torch.Size((bh, *a)), torch.Size((bh, *b))], {}) for a, b in pairs]


_SDPA_FORWARD = (aten._scaled_dot_product_flash_attention_for_cpu.default,)
_SDPA_BACKWARD = (aten._scaled_dot_product_flash_attention_for_cpu_backward.default,)


class _Matmuls(TorchDispatchMode):
    """Records the shapes of every mm / addmm / bmm that runs, and of the products inside fused attention."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            self.calls.append((func, [a.shape if isinstance(a, torch.Tensor) else a for a in args], kwargs or {}))
        elif func in _SDPA_FORWARD:
            self.calls += _attention_products(args[0].shape, args[1].shape, args[2].shape, backward=False)
        elif func in _SDPA_BACKWARD:  # grad_out, q, k, v, ...
            self.calls += _attention_products(args[1].shape, args[2].shape, args[3].shape, backward=True)
        return func(*args, **(kwargs or {}))


def matmul_seconds(model, x, reps: int = 3) -> float:
    """Seconds of the matmuls of one forward+backward step, replayed alone on random tensors."""
    recorder = _Matmuls()
    with recorder:
        _step(model, x)
    dtype = x.dtype
    calls = [(f, [torch.randn(s, dtype=dtype) if isinstance(s, torch.Size) else s for s in shapes], kw)
             for f, shapes, kw in recorder.calls]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for f, args, kw in calls:
            f(*args, **kw)
        best = min(best, time.perf_counter() - start)
    return best


def run_setting(setting: str, args) -> dict:
    mode, precision = setting.split("-")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    models, graphs = {}, {}
    for name in args.models:
        torch.manual_seed(0)
        model = create(name, args.img_size)
        if mode == "compile":
            model.compile()
        before = _compile_counts()
        start = time.perf_counter()
        with autocast:
            for _ in range(args.warmup):
                _step(model, x)
        warm = time.perf_counter() - start
        if mode == "compile":
            graphs[name] = tuple(b - a for a, b in zip(before, _compile_counts()))
        models[name] = (model, warm)
        print(f"  {setting} {name}: warm-up {warm:.1f} s" + (
            f", graph breaks {graphs[name][0]}, graphs {graphs[name][1]}" if name in graphs else ""), flush=True)
    warmed = _compile_counts()
    rates = {name: [] for name in models}
    with autocast:
        for _ in range(args.rounds):
            for name, (model, _) in models.items():
                start = time.perf_counter()
                for _ in range(args.iters):
                    _step(model, x)
                rates[name].append(args.batch_size * args.iters / (time.perf_counter() - start))
    recompiled = _compile_counts()[1] - warmed[1]  # graphs compiled during the timed rounds: should be 0
    return {name: statistics.median(r) for name, r in rates.items()}, graphs, recompiled


def _compile_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) so far in this process."""
    counters = torch._dynamo.utils.counters
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation included)")
    parser.add_argument("--matmuls", nargs="*", default=[], help="models whose step is compared with its matmuls")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: freed memory stays in the process, as the training command has it "
                             "(clip_hvt.malloc.keep_freed_memory); default: glibc's own thresholds")
    args = parser.parse_args()
    if args.malloc == "keep" and not keep_freed_memory():
        print("keep_freed_memory() took no effect (the C library is not glibc): --malloc keep changes nothing")
    torch.set_num_threads(args.threads)
    if REFERENCE not in args.models:
        args.models.insert(0, REFERENCE)
    flops = {name: forward_gflops(name, args.img_size) for name in args.models}
    print(f"forward GFLOPs/image at {args.img_size} px: " + ", ".join(f"{n} {f:.2f}" for n, f in flops.items()))
    print(f"batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds x {args.iters} steps "
          f"(medians), malloc {args.malloc}, matmul 2048² fp32 {matmul_gflops():.0f} GFLOP/s at start", flush=True)
    table = []
    for setting in args.settings:
        rates, graphs, recompiled = run_setting(setting, args)
        if setting.startswith("compile"):
            print(f"  {setting}: {recompiled} graph(s) compiled during the timed rounds", flush=True)
        gflops = {name: 3 * flops[name] * rate for name, rate in rates.items()}
        for name in rates:
            table.append((setting, name, rates[name], gflops[name], gflops[name] / gflops[REFERENCE],
                          graphs.get(name)))
    print(f"matmul 2048² fp32 {matmul_gflops():.0f} GFLOP/s at end")
    print(f"| setting | model | img/s | achieved GFLOP/s | vs {REFERENCE} | graph breaks / graphs |")
    print("|---|---|---|---|---|---|")
    for setting, name, rate, gf, ratio, graphs in table:
        g = f"{graphs[0]} / {graphs[1]}" if graphs else ""
        print(f"| {setting} | {name} | {rate:.2f} | {gf:.1f} | {ratio:.2f}x | {g} |")
    for name in args.matmuls:
        torch.manual_seed(0)
        model = create(name, args.img_size)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        _step(model, x)
        steps = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            _step(model, x)
            steps.append(time.perf_counter() - start)
        mm = matmul_seconds(model, x)
        print(f"{name} eager fp32: step {min(steps):.2f} s, its matmuls alone {mm:.2f} s: "
              f"step / matmuls {min(steps) / mm:.2f}x (best of {args.rounds})")


if __name__ == "__main__":
    main()
