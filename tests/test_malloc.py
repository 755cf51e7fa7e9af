"""clip_hvt.malloc: freed memory stays in the process, and the compute commands set it up first."""
import platform
import subprocess
import sys

import pytest

from clip_hvt import eval as eval_cmd, train
from clip_hvt.data import teacher_features


KEEP_FREED_MEMORY = """
import resource, torch
from clip_hvt.malloc import keep_freed_memory

def faults(*mib):  # buffers of these sizes, written, then freed together: activations across steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        buffers = [torch.empty(n << 18).fill_(1.0) for n in mib]
        del buffers
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults(64)
kept = keep_freed_memory()
faults(64, *[256] * 5)  # the heap grows once
print(default, kept, faults(64), faults(64, *[256] * 5))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """Freed blocks stay in the heap: the pages of buffers freed and allocated again are not zero-filled by the
    kernel again, even when more than 1 GiB is freed at once (a batch's activations; a finite trim threshold
    would hand those back). In a fresh process: the setting is process-wide."""
    out = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY], capture_output=True, text=True, check=True)
    default, kept, after, after_large = out.stdout.split()
    assert kept == "True"
    assert int(default) > 3 * 16384 * 0.9  # every 64 MiB allocation mapped afresh: a fault per 4 KiB page
    assert int(after) < 1000
    assert int(after_large) < 1000


@pytest.mark.parametrize("command", [train.main, eval_cmd.cli_main, teacher_features.main],
                         ids=["train", "eval", "teacher_features"])
def test_compute_commands_keep_freed_memory_first(command, monkeypatch):
    calls = []
    for module in (train, eval_cmd, teacher_features):
        monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        command(["--help"])
    assert calls == [True]
