"""glibc's malloc set up for long computations: training, evaluation and teacher targets call
``keep_freed_memory`` first."""
from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel.

    Every training step or inference batch frees and allocates again the same large activation buffers. By
    default glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings and trims a heap
    whose free top grows past twice that, so the kernel zero-fills the same pages again each time: one fault
    per 4 KiB, 1.7 us each on a 2-core CPU. PVTv2-B2 at 224 px: ~100,000 faults a training step at batch 8,
    2.3 million an inference batch of 64; its tower trained 23% faster at batch 16 and ran inference at batch
    64 in 4.0 s instead of 6.3-7.0 s once they were gone (benchmarks/README.md). With the mmap threshold
    raised and trimming off, freed blocks stay in the heap: the process keeps its peak memory, which it
    reaches every step anyway. Written here because no library sets this from inside a process (the field's
    advice, jemalloc or tcmalloc via LD_PRELOAD, has to be set up before Python starts). Returns whether it
    took effect: False where the C library is not glibc (macOS, musl), which keep their own.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    # some glibc versions refuse an mmap threshold above half their heap size (32 MiB on 64-bit): take that
    if not any(mallopt(M_MMAP_THRESHOLD, limit) == 1 for limit in (2**31 - 1, 1 << 25)):
        return False
    # -1: never trim (mallopt(3)). A finite threshold still lets a batch's worth of freed activations at the
    # heap's top go back: PVTv2-B2 inference at batch 64 kept 900,000 faults a batch with 1 GiB, 0 with -1.
    return mallopt(M_TRIM_THRESHOLD, -1) == 1
