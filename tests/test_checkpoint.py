"""Checkpoints survive a kill mid-write, and a resumed run restores its state without replaying data."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from clip_hvt import train
from clip_hvt.atomic import partial_path
from clip_hvt.checkpoint import AtomicCheckpointIO, atomic_torch_save
from test_distributed import write_uneven_shards

REPO = Path(__file__).resolve().parents[1]

# Saves a small checkpoint, then a large one through a file object that stalls half-way.
KILLED_WRITER = r"""
import os, sys, time, torch
import clip_hvt.atomic as atomic
import clip_hvt.checkpoint as ckpt
path, marker = sys.argv[1], sys.argv[2]
io = ckpt.AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.arange(10.0)}}, path)

class StallingFile:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        n = self.f.write(data)
        self.written += n
        if self.written > 4_000_000:
            self.f.flush()
            open(marker, "w").close()
            time.sleep(600)
        return n
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

atomic.open = lambda p, mode: StallingFile(open(p, mode))  # the file atomic_write opens
io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(4_000_000)}}, path)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(marker)], cwd=REPO)
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), f"writer exited with {proc.returncode} before stalling"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert Path(partial_path(path)).stat().st_size > 4_000_000  # killed in the middle of the big write
    previous = torch.load(path, weights_only=True)
    assert previous["global_step"] == 1 and torch.equal(previous["state_dict"]["w"], torch.arange(10.0))

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)  # the next save replaces the leftover
    assert torch.load(path, weights_only=True) == {"global_step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "stalled"]


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "step=5.ckpt"
    atomic_torch_save({"global_step": 5}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda does not pickle: the write fails
        atomic_torch_save({"global_step": 6, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 5}
    assert [p.name for p in tmp_path.iterdir()] == ["step=5.ckpt"]


def test_remote_paths_keep_lightnings_save(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr("lightning.pytorch.plugins.io.TorchCheckpointIO.save_checkpoint",
                        lambda self, checkpoint, path, storage_options=None: saved.append(path))
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, "memory://bucket/last.ckpt")
    assert saved == ["memory://bucket/last.ckpt"]


class BatchRecorder(pl.Callback):
    """Test-only: log, per step, a digest of the batch's captions (the data order) and the lr."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"],
                  "texts": hashlib.sha1(batch["text"].numpy().tobytes()).hexdigest()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


class CrashAt(pl.Callback):
    """Test-only: die at the start of one step, as a preempted job would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def _callback(cls: type, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"tests.test_checkpoint.{cls.__name__}",
                                                 "init_args": init_args})


def _fit(root: Path, shards: str, *extra: str) -> None:
    # cpu_ddp.yaml on one process writes under runs/cpu_ddp relative to the working directory.
    root.mkdir(exist_ok=True)
    os.chdir(root)
    train.main(["--config", str(REPO / "configs" / "cpu_ddp.yaml"), "--trainer.devices", "1",
                "--trainer.strategy", "auto", "--data.shapes", "null", "--data.train_shards", shards,
                "--data.sample_shuffle", "1",  # no in-worker shuffle: the order is the shard stream's alone
                "--trainer.max_steps", "8", "--final_validation", "false",
                _callback(BatchRecorder, path=str(root / "batches.jsonl")), *extra])


@pytest.mark.slow
def test_resume_restores_optimizer_schedule_and_step_and_draws_a_fresh_data_order(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    shards = write_uneven_shards(tmp_path / "shards")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _fit(straight, shards)
    with pytest.raises(RuntimeError, match="crash at step 6"):
        _fit(interrupted, shards, _callback(CrashAt, step=6))  # last checkpoint: step 5
    _fit(interrupted, shards, "--ckpt_path", "last")
    a, b = _records(straight / "batches.jsonl"), _records(interrupted / "batches.jsonl")
    assert sorted(a) == sorted(b) == list(range(8))
    assert [json.loads(line)["step"] for line in (interrupted / "batches.jsonl").read_text().splitlines()] == \
        [0, 1, 2, 3, 4, 5, 6, 5, 6, 7]  # crashed at the start of step 6, resumed from the step-5 checkpoint

    assert [a[s]["texts"] for s in range(5)] == [b[s]["texts"] for s in range(5)]  # same seed, same order
    resumed = [b[s]["texts"] for s in range(5, 8)]
    assert not set(resumed) & {r["texts"] for r in a.values()}  # neither a replay of 0..2 nor a copy of 5..7
    assert [b[s]["lr"] for s in range(8)] == pytest.approx([a[s]["lr"] for s in range(8)])  # schedule restored

    final = torch.load(interrupted / "runs" / "cpu_ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 8
    assert final["lr_schedulers"][0]["last_epoch"] == 8
    adam_steps = {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8.0}  # Adam's moments continued from step 5, not restarted
