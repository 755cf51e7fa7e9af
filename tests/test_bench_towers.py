"""benchmarks/bench_towers.py's matmul replay (``--matmuls``): fused attention counts as the products an
explicit attention runs, so a model does not look cheaper in matmuls for using SDPA's fused CPU kernel."""
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_towers imports its sibling common.py
_spec = importlib.util.spec_from_file_location("bench_towers", ROOT / "benchmarks" / "bench_towers.py")
bench_towers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_towers)
sys.path.remove(str(ROOT / "benchmarks"))


def _recorded_matmul_flops(attention) -> tuple[int, int]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (40, 24, 24))
    recorder = bench_towers._Matmuls()
    with recorder:
        attention(q, k, v).sum().backward()
    flops = 0
    for func, shapes, _ in recorder.calls:
        assert func == torch.ops.aten.bmm.default
        (b, m, kk), (_, _, n) = shapes
        flops += 2 * b * m * kk * n
    return len(recorder.calls), flops


def test_fused_attention_replays_the_products_of_explicit_attention():
    explicit = _recorded_matmul_flops(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
    fused = _recorded_matmul_flops(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert explicit == fused == (6, 6 * 2 * 6 * 40 * 24 * 8)
