"""Two-rank DDP on CPU through the real CLI: uneven shards never desynchronise the ranks, and a rank
that fails stops the whole job with its error instead of leaving the others waiting forever."""
import csv
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import pytest
import torch
import webdataset as wds

from clip_hvt.data import synthetic

REPO = Path(__file__).resolve().parents[1]
CPU_DDP = REPO / "configs" / "cpu_ddp.yaml"
SHARD_SIZES = (7, 60, 13, 90, 30)
JOB_TIMEOUT_S = 420  # bounds a hang; a healthy run takes well under a minute

pytestmark = pytest.mark.slow


class StepRecorder(pl.Callback):
    """Test-only: each rank writes how many batches it trained and its final global step."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"batches": self.batches, "global_step": trainer.global_step, "world_size": trainer.world_size}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class FailOnRank(pl.Callback):
    """Test-only: raise on one rank at one step, as a data or numerics error would."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


def write_uneven_shards(root: Path, sizes=SHARD_SIZES) -> str:
    root.mkdir(parents=True)
    rng = random.Random(0)
    table = {}
    for index, count in enumerate(sizes):
        name = f"uneven-{index:06d}.tar"
        with wds.TarWriter(str(root / name), encoder=False) as sink:
            for i in range(count):
                image, attrs = synthetic.render(rng, 40)
                buf = io.BytesIO()
                image.save(buf, format="JPEG")
                sink.write({"__key__": f"{index}-{i:04d}", "jpg": buf.getvalue(),
                            "txt": synthetic.caption(attrs, rng).encode()})
        table[name] = count
    (root / "sizes.json").write_text(json.dumps(table))
    return str(root / f"uneven-{{000000..{len(sizes) - 1:06d}}}.tar")


def callback_arg(cls: type, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"tests.test_distributed.{cls.__name__}",
                                                 "init_args": init_args})


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore::FutureWarning"}
    for key in [k for k in env if k.startswith("SLURM_")]:  # never mistake a test run for a SLURM step
        del env[key]
    cmd = [sys.executable, "-m", "clip_hvt.train", "--config", str(CPU_DDP), "--final_validation", "false", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_uneven_shards(tmp_path_factory.mktemp("uneven") / "shards")


def test_two_ranks_on_uneven_shards_train_the_same_number_of_steps(shards, tmp_path):
    # 200 samples, 2 ranks x batch 8: 12 batches per rank per epoch, so 15 steps cross an epoch boundary.
    result = run_cli(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--data.shapes", "null", "--data.train_shards", shards, "--trainer.max_steps", "15",
                     callback_arg(StepRecorder, out_dir=str(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1] == {"batches": 15, "global_step": 15, "world_size": 2}


@pytest.mark.parametrize("failing_rank", [1])
def test_a_failing_rank_stops_the_whole_job_with_its_error(shards, tmp_path, failing_rank):
    result = run_cli(tmp_path, "--data.shapes", "null", "--data.train_shards", shards, "--trainer.max_steps", "15",
                     callback_arg(FailOnRank, rank=failing_rank, step=3))
    assert result.returncode != 0
    assert f"injected failure on rank {failing_rank} at step 3" in result.stderr


def test_validation_with_uneven_shares_of_the_val_shards_neither_hangs_nor_drops_rows(shards, tmp_path):
    # The one validation shard goes to rank 0: rank 1 has no validation batch at all, which hung in
    # DDP's per-forward buffer broadcast before validation paused it.
    only = shards.replace("{000000..000004}", "000003")  # 90 samples
    result = run_cli(tmp_path, "--data.shapes", "null", "--data.train_shards", shards, "--data.val_shards", only,
                     "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--final_validation", "true",
                     "--trainer.strategy.init_args.timeout", "0:00:45", "--export_dir", str(tmp_path / "export"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "runs" / "cpu_ddp" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/image_to_text_R@1")]
    assert len(rows) == 2  # the validation inside fit and the final one
    assert all(float(r["val_data/samples"]) == 90 for r in rows)  # every row, from both ranks' shares
    assert "val/image_to_text_R@1" in result.stdout  # the final summary
    # exported from the DDP run (state dict collected through the strategy), loadable with strict keys
    final = torch.load(tmp_path / "runs" / "cpu_ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    exported = model.state_dict()
    assert exported.keys() == {k.removeprefix("model.") for k in final["state_dict"] if k.startswith("model.")}
    assert all(torch.equal(exported[k.removeprefix("model.")], v) for k, v in final["state_dict"].items()
               if k.startswith("model."))


class GradRecorder(pl.Callback):
    """Test-only: each rank saves the gradients the optimizer is about to apply at the first step."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, Path(self.out_dir, f"grads{trainer.global_rank}.pt"))


def test_gradcache_under_two_rank_ddp_applies_the_same_gradients_as_plain_ddp(shards, tmp_path):
    # The module's GradCache path turns DDP's own sync off and all-reduces the gradients itself.
    for name, extra in (("plain", ()), ("gradcache", ("--model.micro_batch_size", "3"))):
        out = tmp_path / name
        out.mkdir()
        result = run_cli(out, "--data.shapes", "null", "--data.train_shards", shards, "--trainer.max_steps", "1",
                         *extra, callback_arg(GradRecorder, out_dir=str(out)))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        plain = torch.load(tmp_path / "plain" / f"grads{rank}.pt", weights_only=True)
        cached = torch.load(tmp_path / "gradcache" / f"grads{rank}.pt", weights_only=True)
        assert plain.keys() == cached.keys() and len(plain) > 100
        for name in plain:
            torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)
    # and the ranks agree: the gradients were averaged over both
    ranks = [torch.load(tmp_path / "gradcache" / f"grads{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])
