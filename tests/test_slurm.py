"""SLURM: the settings check (a faked environment), and the project's sbatch script on a real
one-node SLURM started for the test (tests/slurm_cluster.sh): requeued mid-run, it resumes from its
last step checkpoint, finishes, and keeps both attempts' logs."""
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_hvt import slurm
from clip_hvt.data import synthetic
from clip_hvt.data.datamodule import Shapes

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"

SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "clip", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NUM_NODES": "2"}


def test_matching_srun_step_passes():
    assert slurm.launch_problems(4, 2, SRUN_STEP) == []


def test_no_slurm_or_interactive_allocation_is_not_checked():
    assert slurm.launch_problems(1, 1, {}) == []
    assert slurm.launch_problems(1, 1, {**SRUN_STEP, "SLURM_JOB_NAME": "interactive"}) == []


def test_devices_and_nodes_mismatch_names_both():
    with pytest.raises(ValueError) as err:
        slurm.check_launch(8, 1, SRUN_STEP)
    message = str(err.value)
    assert "trainer.devices=8 but SLURM runs 4(x2) task(s) per node" in message
    assert "--ntasks-per-node=8 or trainer.devices=4" in message
    assert "trainer.num_nodes=1 but SLURM allocated 2 node(s)" in message


def test_uneven_task_layout_is_rejected():
    env = {**SRUN_STEP, "SLURM_NTASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
    [problem] = slurm.launch_problems(2, 2, env)
    assert "the layout must be the same on every node" in problem


def test_python_started_by_the_batch_script_instead_of_srun_is_rejected():
    batch_step = {k: v for k, v in SRUN_STEP.items() if not k.startswith("SLURM_STEP")}
    [problem] = slurm.launch_problems(4, 2, batch_step)
    assert "not by srun" in problem and "srun python -m clip_hvt.train" in problem
    assert slurm.launch_problems(1, 1, {**batch_step, "SLURM_NTASKS": "1"}) == []  # one task needs no srun


def test_tasks_per_node_layout_expansion():
    assert slurm.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="cannot read SLURM tasks-per-node layout 'two'"):
        slurm.tasks_per_node("two")


def test_check_trainer_reads_resolved_devices(monkeypatch):
    import lightning.pytorch as pl

    for key, value in {**SRUN_STEP, "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
                       "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
                       "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="trainer.devices=1 but SLURM runs 2 task"):
        slurm.check_trainer(trainer)


# --- a real SLURM --------------------------------------------------------------------------------

def _run(*cmd, env, timeout=60, check=True, cwd=None) -> str:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged for the test needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    try:
        install = subprocess.run(["bash", str(CLUSTER), "install", str(directory)], capture_output=True,
                                 text=True, timeout=300)
        if install.returncode:
            pytest.skip(f"could not install SLURM with apt-get: {install.stderr[-500:]}")
        _run("bash", str(CLUSTER), "start", str(directory), env=env, timeout=120)
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(directory)], env=env, timeout=120)


def _job_field(job_id: str, field: str, env) -> str | None:
    out = _run("scontrol", "show", "job", job_id, env=env, check=False)
    match = re.search(rf"\b{field}=(\S+)", out)
    return match[1] if match else None


def _wait(condition, what: str, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log.exists() else "(no job log)"
    raise AssertionError(f"timed out waiting for {what}; job log tail:\n{tail}")


def _steps(metrics_csv: Path) -> list[int]:
    with open(metrics_csv) as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_sbatch_job_resumes_from_its_last_step_checkpoint(slurm_env, tmp_path):
    shapes = tmp_path / "shapes"
    synthetic.ensure(shapes, Shapes(image_size=40, train_samples=256, val_samples=48, zeroshot_per_class=1).config())
    env = {**slurm_env, "CLIP_HVT_HOME": str(REPO), "PYTHON": sys.executable, "WANDB_MODE": "offline",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    log = tmp_path / "job.out"
    job_id = _run(
        "sbatch", "--parsable", "--job-name=cpuddp", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--gpus-per-node=0", f"--output={log}", str(REPO / "slurm" / "train_single_node.sbatch"),
        str(REPO / "configs" / "cpu_ddp.yaml"), "--data.shapes.root", str(shapes), "--trainer.max_steps", "30",
        "--trainer.limit_val_batches", "0", "--final_validation", "false",
        env=env, cwd=tmp_path).strip()
    run_dir = tmp_path / "runs" / f"cpuddp-{job_id}"
    checkpoints = run_dir / "runs" / "cpu_ddp" / "checkpoints"

    _wait(lambda: (checkpoints / "epoch=0-step=5.ckpt").exists(), "the step-5 checkpoint", 240, log)
    assert _job_field(job_id, "JobState", env) == "RUNNING"
    _run("scontrol", "requeue", job_id, env=env)
    _wait(lambda: _job_field(job_id, "JobState", env) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
          "the requeued job to finish", 300, log)

    out = log.read_text()
    assert _job_field(job_id, "JobState", env) == "COMPLETED", out[-4000:]
    assert _job_field(job_id, "Restarts", env) == "1"
    assert "=== clip_hvt attempt 1 " in out and "resume from scratch" in out  # --open-mode=append kept both
    second = out[out.index("=== clip_hvt attempt 2 "):]
    assert re.search(r"resume from \S+\.ckpt,", second) and "Restored all states from the checkpoint" in second

    first_steps = _steps(run_dir / "runs" / "cpu_ddp" / "lightning_logs" / "version_0" / "metrics.csv")
    second_steps = _steps(run_dir / "runs" / "cpu_ddp" / "lightning_logs" / "version_1" / "metrics.csv")
    start, reached = min(second_steps), max(first_steps)
    # The first attempt wrote the step-5 checkpoint (waited for above). Lightning logs a step's row after
    # the step's checkpoint callback, so a requeue landing in between leaves the row of step s-1 unlogged
    # while checkpoint s exists: the last logged row can be one short of the newest checkpoint.
    assert min(first_steps) == 0 and reached >= 3
    # continued from a step checkpoint (every 5 steps), not from 0, at most 5 steps behind the killed attempt
    assert start >= 5 and start % 5 == 0 and reached - 5 < start <= reached + 2
    assert second_steps == list(range(start, 30))
    final = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == 30
