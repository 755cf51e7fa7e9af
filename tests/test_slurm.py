"""SLURM: the settings check (a faked environment), and the project's sbatch scripts on a real
one-node SLURM started for the test (tests/slurm_cluster.sh): requeued mid-run, a training job resumes
from its last step checkpoint, finishes, and keeps both attempts' logs; the sweep's job array trains
one arm per task (one of them requeued) where the report reads them."""
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
import yaml
from safetensors.torch import load_file

from clip_hvt import flops, slurm
from clip_hvt.data import synthetic
from clip_hvt.data.datamodule import Shapes
from clip_hvt.experiments import load_set
from test_experiments import write_set  # the tiny two-arm set (tests/ is on sys.path under pytest)

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


def _launch(tmp_path, *args) -> list[str]:
    """``slurm/launch.sh CONFIG ARGS`` in a faked job step: the arguments it hands srun."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, body in (("srun", 'printf "%s\\n" "$@" > "$ARGS_OUT"'), ("scontrol", "echo node1")):
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    config = tmp_path / "run.yaml"
    config.write_text("trainer: {}\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args"),
           "RUN_DIR": str(tmp_path / "run"), "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "clip",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), str(config), *args], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    return (tmp_path / "args").read_text().splitlines()


def test_a_ckpt_path_given_to_the_job_starts_its_first_attempt_only(tmp_path):
    def ckpt_paths(args):
        return [args[i + 1] for i, a in enumerate(args) if a == "--ckpt_path"]

    assert ckpt_paths(_launch(tmp_path, "--trainer.max_steps", "9")) == ["last"]
    (tmp_path / "init.ckpt").write_bytes(b"")
    for given in (["--ckpt_path", "init.ckpt"], ["--ckpt_path=init.ckpt"]):  # relative to where sbatch ran
        args = _launch(tmp_path, *given, "--trainer.max_steps", "9")
        assert ckpt_paths(args) == [str(tmp_path / "init.ckpt")] and args[-2:] == ["--trainer.max_steps", "9"]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")  # a requeued attempt finds its own
    assert ckpt_paths(_launch(tmp_path, "--ckpt_path", "init.ckpt")) == [str(tmp_path / "run" / "checkpoints" /
                                                                          "last.ckpt")]


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


def _wait(condition, what: str, timeout: float, *logs: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {log}:\n" + (log.read_text()[-4000:] if log.exists() else "(no job log)")
                      for log in logs)
    raise AssertionError(f"timed out waiting for {what}; job log tail:\n{tails}")


def _steps(metrics_csv: Path) -> list[int]:
    with open(metrics_csv) as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _assert_resumed_after_signal(second: str, hpc: Path, saved: int, every: int, metrics_csv: Path, steps: int):
    """The attempt after a pre-timeout save resumes from the newest checkpoint (slurm/launch.sh): the save,
    hpc_ckpt_1.ckpt at step ``saved``, or a step checkpoint (every ``every`` steps) that the attempt wrote after
    it while SLURM was stopping it. Either way it trains on from that step to the end."""
    resumed = Path(re.search(r"resume from (\S+\.ckpt),", second)[1])
    assert f"Restored all states from the checkpoint at {resumed}" in second
    trained = _steps(metrics_csv)
    if resumed == hpc:
        assert trained[0] == saved
    else:
        assert resumed.parent == hpc.parent / "checkpoints" and saved < trained[0] <= saved + every
        assert trained[0] % every == 0
    assert trained == list(range(trained[0], steps))


def _shapes(tmp_path: Path) -> Path:
    """The generated shapes data of the tiny configs (tests/configs/tiny.yaml, configs/cpu_ddp.yaml) in the test dir."""
    shapes = tmp_path / "shapes"
    synthetic.ensure(shapes, Shapes(image_size=40, train_samples=256, val_samples=48, zeroshot_per_class=1).config())
    return shapes


def _job_env(env) -> dict:
    """What a job submitted by the test inherits (sbatch exports the submitting environment): this checkout."""
    # The test cluster binds no task to its CPUs (TaskPlugin=task/none): one thread each, as --cpus-per-task=1 asks
    return {**env, "CLIP_HVT_HOME": str(REPO), "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
            "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore::FutureWarning", "OMP_NUM_THREADS": "1"}


def _submit_cpu_ddp(env, tmp_path: Path) -> tuple[str, Path, Path]:
    """Submit the project's single-node sbatch script with configs/cpu_ddp.yaml (2 tasks, 30 steps,
    step checkpoints every 5); return the job id, its run directory and its output file."""
    shapes = _shapes(tmp_path)
    env = _job_env(env)
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
    _assert_resumed_after_signal(second, hpc, saved, 5, out_dir / "lightning_logs" / "version_1" / "metrics.csv", 30)
    assert torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30


SWEEP_STEPS = 60
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_array_trains_each_arm_resumes_a_requeued_task_and_feeds_the_report(slurm_env, tmp_path):
    """slurm/sweep.sbatch submitted as the README says (a 2-arm set of tiny models, one array task per arm,
    CPU resources): each task trains its own arm in runs/<set>-<array job id>/<arm>/; task 0, requeued
    mid-run, resumes from its step checkpoint; task 1, signalled as before its time limit, saves, requeues
    itself and resumes; the report over the arms has one row per arm."""
    # arms: pvt (pvt_v2_b0) and vit_d12 (a 12-block ViT of matched GFLOPs, so both train at about one pace), 32 px
    exp = write_set(tmp_path, vit_layers=12)
    shapes = _shapes(tmp_path)
    array_id = _run(
        "sbatch", "--parsable", "--array=0-1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
        str(REPO / "slurm" / "sweep.sbatch"), str(exp), "--data.shapes.root", str(shapes),
        "--trainer.max_steps", str(SWEEP_STEPS), "--trainer.val_check_interval", str(SWEEP_STEPS),
        "--checkpoint.every_n_train_steps", "10", "--export_dir", "true",
        env=_job_env(slurm_env), cwd=tmp_path).strip().split(";")[0]
    tasks = [f"{array_id}_{i}" for i in (0, 1)]
    logs = [tmp_path / f"clip_hvt_sweep-{task}.out" for task in tasks]  # --output=%x-%A_%a.out in the submit dir
    sweep = tmp_path / "runs" / f"set-{array_id}"
    arms = {"pvt": sweep / "pvt" / "runs" / "tiny", "vit_d12": sweep / "vit_d12" / "runs" / "tiny"}

    # Once each arm has saved its first step checkpoint (step 10): requeue task 0 (arm pvt) with scontrol, and
    # send task 1 (arm vit_d12) the time-limit signal, on which it saves and requeues its own array task.
    actions = (["scontrol", "requeue", tasks[0]], ["scancel", "--signal=USR1", tasks[1]])
    for (arm, root), task, action in zip(arms.items(), tasks, actions):
        _wait(lambda: list((root / "checkpoints").glob("*.ckpt")), f"arm {arm}'s first checkpoint", 240, *logs)
        assert _job_field(task, "JobState", slurm_env) == "RUNNING"
        _run(*action, env=slurm_env)
    _wait(lambda: all(_job_field(t, "JobState", slurm_env) in TERMINAL for t in tasks), "both array tasks", 300,
          *logs)
    for task, log in zip(tasks, logs):
        assert _job_field(task, "JobState", slurm_env) == "COMPLETED", log.read_text()[-4000:]
    assert [_job_field(t, "Restarts", slurm_env) for t in tasks] == ["1", "1"]

    # Array index -> arm: each run trained its own image tower (nothing of the run config's model left in),
    # with the set's text tower, budget and seed.
    towers = {"pvt": ("pvt_v2_b0", None), "vit_d12": (None, 12)}  # (timm_model_name, ViT layers)
    for arm, root in arms.items():
        prepared = yaml.safe_load((sweep / arm / "experiment.yaml").read_text())["model"]["model_cfg"]
        # LightningCLI's saved config, what the report reads
        saved = yaml.safe_load((root / "lightning_logs" / "version_0" / "config.yaml").read_text())
        assert saved["model"]["model_cfg"]["vision_cfg"] == prepared["vision_cfg"]
        vision = prepared["vision_cfg"]
        assert (vision["timm_model_name"], vision["layers"]) == towers[arm]
        assert saved["model"]["model_cfg"]["text_cfg"]["width"] == 32 and vision["image_size"] == 32
        assert saved["seed_everything"] == 3 and saved["trainer"]["max_steps"] == SWEEP_STEPS
        final = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert final["global_step"] == SWEEP_STEPS
        assert (root / "export" / "open_clip_config.json").is_file()

    # Task 0: two attempts in one output file; the second resumed from a step checkpoint, not from 0.
    out = logs[0].read_text()
    first, second = out.split("=== clip_hvt attempt 2 ")
    assert "=== clip_hvt attempt 1 " in first and "resume from scratch" in first
    resumed = re.search(r"resume from (\S+\.ckpt),", second)
    assert resumed and f"Restored all states from the checkpoint at {resumed[1]}" in second
    assert Path(resumed[1]).parent == arms["pvt"] / "checkpoints"
    first_steps = _steps(arms["pvt"] / "lightning_logs" / "version_0" / "metrics.csv")
    second_steps = _steps(arms["pvt"] / "lightning_logs" / "version_1" / "metrics.csv")
    start, reached = min(second_steps), max(first_steps)
    assert min(first_steps) == 0 and reached < SWEEP_STEPS - 1  # the requeue stopped the first attempt mid-run
    # from a step checkpoint (every 10 steps), at most 10 steps behind the killed attempt (see the test above)
    assert start >= 10 and start % 10 == 0 and reached - 10 < start <= reached + 2
    assert second_steps == list(range(start, SWEEP_STEPS))
    # Task 1 saved hpc_ckpt_1.ckpt at a step boundary and requeued itself (its array task, not the array).
    first, second = logs[1].read_text().split("=== clip_hvt attempt 2 ")
    hpc = arms["vit_d12"] / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, weights_only=True, map_location="cpu")["global_step"]
    assert 10 <= saved < SWEEP_STEPS
    assert f"SIGUSR1: saved {hpc} at step {saved} and requeued SLURM job {tasks[1]}" in first
    _assert_resumed_after_signal(second, hpc, saved, 10, arms["vit_d12"] / "lightning_logs" / "version_1" / "metrics.csv",
                                 SWEEP_STEPS)
    # The final validation and the export are of the trained state, not of the stale hpc_ckpt_1.ckpt in the run
    # directory (which Lightning's validate loads on SLURM when given no checkpoint).
    loaded = re.findall(r"Loaded model weights from the checkpoint at (\S+)", second)
    assert len(loaded) == 1 and loaded[0].endswith("/checkpoints/last.ckpt"), loaded
    final = torch.load(arms["vit_d12"] / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    exported = load_file(arms["vit_d12"] / "export" / "open_clip_model.safetensors")
    assert all(torch.equal(exported[k[len("model."):]], v) for k, v in final["state_dict"].items() if k.startswith("model."))

    # The report over the arms, as the README runs it: one row per arm with its cost and final metrics.
    report = _run(sys.executable, "-m", "clip_hvt.report", *sorted(map(str, sweep.iterdir())), "--out",
                  str(tmp_path / "report"), env=_job_env(slurm_env), timeout=300)
    with open(tmp_path / "report" / "results.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["pvt", "vit_d12"], report
    assert [rows[a]["family"] for a in ("pvt", "vit_d12")] == ["hierarchical", "ViT"]
    for arm in load_set(str(exp)).arms:  # each row costs its own arm's image tower
        row = rows[arm.name]
        gflops = flops.model_costs(arm.model_cfg)["image_flops"] / 1e9
        assert float(row["image_gflops"]) == pytest.approx(gflops, rel=1e-3), rows
        assert int(row["steps"]) == SWEEP_STEPS and row["source"] == "csv", rows  # the final validation row
        assert 0 <= float(row["zeroshot_top1"]) <= 1
