"""SLURM: the settings check (a faked environment), and the project's sbatch script on a real
one-node SLURM started for the test (tests/slurm_cluster.sh): requeued mid-run, it resumes from its
last step checkpoint, finishes, and keeps both attempts' logs."""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
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
    for key, value in {**SRUN_STEP, "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
                       "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
                       "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="trainer.devices=1 but SLURM runs 2 task"):
        slurm.check_trainer(trainer)


def test_requeue_command_names_the_job_or_the_array_task():
    assert slurm.requeue_command({"SLURM_JOB_ID": "7"}) == ["scontrol", "requeue", "7"]
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}
    assert slurm.requeue_command(array) == ["scontrol", "requeue", "5_2"]


class SignalAt(pl.Callback):
    """Sends this process SIGUSR1 after the training step that ends at ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_requeue_on_signal_saves_at_the_step_boundary_and_requeues(monkeypatch, tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "clip", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    before = signal.getsignal(signal.SIGUSR1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[SignalAt(3), slurm.RequeueOnSignal()])
    trainer.fit(BoringModel())

    assert calls == [["scontrol", "requeue", "7"]]
    assert [p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]  # Lightning's handler stayed out
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and "optimizer_states" in saved
    assert trainer.global_step == 6  # training went on until SLURM stops the attempt
    assert signal.getsignal(signal.SIGUSR1) == before


def test_requeue_on_signal_is_inert_without_slurm(monkeypatch, tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    callback = slurm.RequeueOnSignal()
    before = signal.getsignal(signal.SIGUSR1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback])
    trainer.fit(BoringModel())
    assert callback._signum is None and signal.getsignal(signal.SIGUSR1) == before
    assert not list(tmp_path.glob("hpc_ckpt_*"))


# --- a real SLURM --------------------------------------------------------------------------------

def _run(*cmd, env, timeout=60, check=True, cwd=None) -> str:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


def _unavailable(reason: str):
    """Skip, or fail where CI demands the real-SLURM tests (CLIP_HVT_REQUIRE_SLURM=1, set by .ci/run)."""
    if os.environ.get("CLIP_HVT_REQUIRE_SLURM") == "1":
        pytest.fail(f"CLIP_HVT_REQUIRE_SLURM=1 but the SLURM tests cannot run: {reason}")
    pytest.skip(reason)


def test_ci_turns_an_unavailable_slurm_into_a_failure(monkeypatch):
    monkeypatch.setenv("CLIP_HVT_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception, match="cannot run: no root"):
        _unavailable("no root")
    monkeypatch.delenv("CLIP_HVT_REQUIRE_SLURM")
    with pytest.raises(pytest.skip.Exception, match="no root"):
        _unavailable("no root")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable("starting slurmctld/slurmd/munged for the test needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _unavailable("SLURM is not installed and apt-get is not available to install it")
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    try:
        install = subprocess.run(["bash", str(CLUSTER), "install", str(directory)], capture_output=True,
                                 text=True, timeout=300)
        if install.returncode:
            _unavailable(f"could not install SLURM with apt-get: {install.stderr[-500:]}")
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


def _submit_cpu_ddp(env, tmp_path: Path) -> tuple[str, Path, Path]:
    """Submit the project's single-node sbatch script with configs/cpu_ddp.yaml (2 tasks, 30 steps,
    step checkpoints every 5); return the job id, its run directory and its output file."""
    shapes = tmp_path / "shapes"
    synthetic.ensure(shapes, Shapes(image_size=40, train_samples=256, val_samples=48, zeroshot_per_class=1).config())
    env = {**env, "CLIP_HVT_HOME": str(REPO), "PYTHON": sys.executable, "WANDB_MODE": "offline",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    log = tmp_path / "job.out"
    job_id = _run(
        "sbatch", "--parsable", "--job-name=cpuddp", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--gpus-per-node=0", f"--output={log}", str(REPO / "slurm" / "train_single_node.sbatch"),
        str(REPO / "configs" / "cpu_ddp.yaml"), "--data.shapes.root", str(shapes), "--trainer.max_steps", "30",
        "--trainer.limit_val_batches", "0", "--final_validation", "false",
        env=env, cwd=tmp_path).strip()
    return job_id, tmp_path / "runs" / f"cpuddp-{job_id}" / "runs" / "cpu_ddp", log


def _wait_until_done(job_id: str, env, log: Path) -> str:
    _wait(lambda: _job_field(job_id, "JobState", env) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
          "the requeued job to finish", 300, log)
    out = log.read_text()
    assert _job_field(job_id, "JobState", env) == "COMPLETED", out[-4000:]
    assert _job_field(job_id, "Restarts", env) == "1"
    assert "=== clip_hvt attempt 1 " in out and "resume from scratch" in out  # --open-mode=append kept both
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_sbatch_job_resumes_from_its_last_step_checkpoint(slurm_env, tmp_path):
    job_id, out_dir, log = _submit_cpu_ddp(slurm_env, tmp_path)
    checkpoints = out_dir / "checkpoints"

    _wait(lambda: (checkpoints / "epoch=0-step=5.ckpt").exists(), "the step-5 checkpoint", 240, log)
    assert _job_field(job_id, "JobState", slurm_env) == "RUNNING"
    _run("scontrol", "requeue", job_id, env=slurm_env)
    out = _wait_until_done(job_id, slurm_env, log)
    second = out[out.index("=== clip_hvt attempt 2 "):]
    assert re.search(r"resume from \S+\.ckpt,", second) and "Restored all states from the checkpoint" in second

    first_steps = _steps(out_dir / "lightning_logs" / "version_0" / "metrics.csv")
    second_steps = _steps(out_dir / "lightning_logs" / "version_1" / "metrics.csv")
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


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_signal_reaches_the_tasks_which_save_and_requeue_the_job(slurm_env, tmp_path):
    """SIGUSR1 to the job's tasks, as ``#SBATCH --signal=SIGUSR1@90`` sends it before the time limit:
    the training processes save hpc_ckpt_1.ckpt and run ``scontrol requeue``; the next attempt
    resumes from that checkpoint. (With Lightning's own handler this job failed: its save inside the
    signal handler waits in a barrier while the other rank is in the gradient all-reduce.)"""
    job_id, out_dir, log = _submit_cpu_ddp(slurm_env, tmp_path)
    _wait(lambda: (out_dir / "checkpoints" / "epoch=0-step=5.ckpt").exists(), "the step-5 checkpoint", 240, log)
    _run("scancel", "--signal=USR1", job_id, env=slurm_env)  # every task of the job's steps, not the batch shell
    out = _wait_until_done(job_id, slurm_env, log)

    first, second = out.split("=== clip_hvt attempt 2 ")
    hpc = out_dir / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, weights_only=True, map_location="cpu")["global_step"]
    assert saved >= 5
    # clip_hvt.slurm.RequeueOnSignal did it at a step boundary, not Lightning's in-handler save
    assert f"SIGUSR1: saved {hpc} at step {saved} and requeued SLURM job {job_id}" in first
    assert "Handling auto-requeue signal" not in first
    assert f"resume from {hpc}," in second and f"Restored all states from the checkpoint at {hpc}" in second
    assert _steps(out_dir / "lightning_logs" / "version_1" / "metrics.csv") == list(range(saved, 30))
    assert torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
