"""What every benchmark shares: the machine's matmul rate for scale, and the interpreter open_clip_train runs in.

open_clip_train's webdataset reader needs webdataset <= 0.2.86 (its ``group_by_keys_nothrow`` fails on
1.x's end-of-shard marker), while clip_hvt uses 1.x, so open_clip's side of a comparison runs in a second
interpreter: a venv over the system packages with the old webdataset::

    python -m venv /tmp/ocvenv --system-site-packages && /tmp/ocvenv/bin/pip install 'webdataset<=0.2.86'

Only the standard library is imported at module level: bench_train.py times whole processes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

OPEN_CLIP_PYTHON = "/tmp/ocvenv/bin/python"
OPEN_CLIP_SETUP = ("python -m venv /tmp/ocvenv --system-site-packages && "
                   "/tmp/ocvenv/bin/pip install 'webdataset<=0.2.86'")


def checkout_env(**extra: str) -> dict:
    """The environment for a subprocess that must import this checkout's clip_hvt: the checkout first on
    PYTHONPATH, the caller's PYTHONPATH kept after it (where packages installed with --target live)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def check_open_clip_python(python: str) -> None:
    """Exit with the setup command when ``python`` is missing or its webdataset is too new for open_clip_train."""
    if not os.path.isfile(python):
        sys.exit(f"no interpreter at {python} for open_clip_train; make one: {OPEN_CLIP_SETUP}")
    version = subprocess.run([python, "-c", "import webdataset; print(webdataset.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    if not version or tuple(int(p) for p in version.split(".")[:3]) > (0, 2, 86):
        sys.exit(f"{python} has webdataset {version or 'missing'}; open_clip_train needs <= 0.2.86: {OPEN_CLIP_SETUP}")


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matmul (best of ``reps``): the machine's scale for every other figure."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
