"""Fail at start when the SLURM allocation and the trainer disagree, instead of hanging at init.

Lightning's ``SLURMEnvironment.validate_settings`` compares ``--ntasks-per-node`` with ``devices``
and ``--nodes`` with ``num_nodes``. It misses three cases, which this check adds:

- a multi-task job whose Python was started in the batch script, not by ``srun``: Lightning then
  takes ``SLURM_NTASKS`` as the world size and rank 0 waits for peers that never start;
- layouts without ``--ntasks-per-node`` (``--ntasks=8 --nodes=2``, uneven ``2,1``): Lightning
  reads only ``SLURM_NTASKS_PER_NODE``; here the step's real layout (``SLURM_STEP_TASKS_PER_NODE``);
- it stops at the first mismatch, at ``fit()`` after the model is built; this one runs right after
  the trainer is built and names every mismatch at once.

Detection follows Lightning: SLURM is in charge when ``SLURM_NTASKS`` is set and the job is not
an interactive allocation (job name ``bash`` or ``interactive``).

``RequeueOnSignal`` replaces Lightning's handler for the pre-timeout signal (see its docstring).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import Mapping

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_warn

INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # as lightning.fabric.plugins.environments.slurm


def is_slurm_launch(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES


def tasks_per_node(layout: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node layout: ``'2(x3),1'`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in layout.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot read SLURM tasks-per-node layout '{layout}' (expected e.g. '4' or '2(x3),1')")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def launch_problems(num_devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> list[str]:
    """Every way the SLURM step and ``Trainer(devices=num_devices, num_nodes=num_nodes)`` disagree."""
    env = os.environ if env is None else env
    if not is_slurm_launch(env):
        return []
    ntasks = int(env["SLURM_NTASKS"])
    if "SLURM_STEP_ID" not in env:
        if ntasks > 1:
            return [f"the job has {ntasks} tasks but this process was started by the batch script, not by srun, "
                    "so the other ranks never start: launch with `srun python -m clip_hvt.train ...`"]
        return []
    problems = []
    layout = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if layout:
        per_node = tasks_per_node(layout)
        if any(n != num_devices for n in per_node):
            problems.append(f"trainer.devices={num_devices} but SLURM runs {layout} task(s) per node "
                            f"(--ntasks-per-node); set --ntasks-per-node={num_devices} or trainer.devices={per_node[0]}"
                            + ("" if len(set(per_node)) == 1 else "; the layout must be the same on every node"))
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nodes is not None and int(nodes) != num_nodes:
        problems.append(f"trainer.num_nodes={num_nodes} but SLURM allocated {nodes} node(s) (--nodes); "
                        f"set --nodes={num_nodes} or trainer.num_nodes={nodes}")
    if not problems and ntasks != num_devices * num_nodes:
        problems.append(f"SLURM runs {ntasks} tasks but trainer.devices x trainer.num_nodes = "
                        f"{num_devices} x {num_nodes}; use --ntasks-per-node and --nodes, not --ntasks")
    return problems


def check_launch(num_devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` naming each mismatch between the SLURM step and the trainer."""
    problems = launch_problems(num_devices, num_nodes, env)
    if problems:
        raise ValueError("SLURM and trainer settings disagree:\n  - " + "\n  - ".join(problems))


def check_trainer(trainer) -> None:
    """``check_launch`` for a built ``lightning.pytorch.Trainer`` (devices resolved, e.g. from 'auto')."""
    check_launch(trainer.num_devices, trainer.num_nodes)


def requeue_command(env: Mapping[str, str] | None = None) -> list[str]:
    """``scontrol requeue`` for this job (or this task of an array job)."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID"):
        return ["scontrol", "requeue", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"]
    return ["scontrol", "requeue", env["SLURM_JOB_ID"]]


class RequeueOnSignal(pl.Callback):
    """On SLURM's pre-timeout signal (``#SBATCH --signal=SIGUSR1@90``), save ``hpc_ckpt_N.ckpt`` in
    ``default_root_dir`` and requeue the job, at a step boundary that every rank agrees on.

    Why not Lightning's own handler: it saves the checkpoint *inside* the signal handler, and
    ``Trainer.save_checkpoint`` ends with a barrier. Under DDP a rank that takes the signal while its
    peer is in the gradient all-reduce then waits in a barrier the peer never reaches, and the job
    fails at the collective timeout instead of requeueing (seen on the test cluster, gloo, 2 ranks).
    Here the handler only sets a flag; after each training step the ranks all-reduce it (one scalar)
    and, if any rank got the signal, all of them save together and rank 0 runs ``scontrol requeue``.
    Training then continues until SLURM stops the attempt; the next one resumes from the newest
    checkpoint (``slurm/launch.sh``).

    Installed in ``setup``, before Lightning registers its handlers, so Lightning leaves this signal
    alone. Inert unless Lightning runs under SLURM with ``auto_requeue`` (its default); the signal is
    the environment's ``requeue_signal``. ``clip_hvt.train`` adds this callback when a config has none.
    """

    def __init__(self, check_every_n_steps: int = 1):
        self.check_every_n_steps = check_every_n_steps
        self.signalled = False
        self._signum: int | None = None
        self._previous = None

    @staticmethod
    def _environment(trainer: pl.Trainer):
        return getattr(trainer.strategy, "cluster_environment", None) or \
            getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        environment = self._environment(trainer)
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        self._signum = environment.requeue_signal or signal.SIGUSR1
        self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # only a flag: no I/O, no collectives in a handler
        self.signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._signum is None or trainer.global_step % self.check_every_n_steps:
            return
        flag = torch.tensor(float(self.signalled), device=pl_module.device)
        if trainer.strategy.reduce(flag, reduce_op="sum").item() == 0:
            return
        self.signalled = False
        # Lightning's own naming (hpc_ckpt_N.ckpt, N one past the highest), decided by rank 0
        path = trainer.strategy.broadcast(os.path.abspath(_CheckpointConnector.hpc_save_path(trainer.default_root_dir)))
        trainer.save_checkpoint(path)  # on every rank: Lightning's save is collective
        if trainer.is_global_zero:
            command = requeue_command()
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                rank_zero_warn(f"{signal.Signals(self._signum).name}: saved {path} at step {trainer.global_step}, "
                               f"but `{' '.join(command)}` failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}")
            else:
                print(f"{signal.Signals(self._signum).name}: saved {path} at step {trainer.global_step} "
                      f"and requeued SLURM job {command[-1]}", flush=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._signum is not None and stage == "fit":
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._signum = None
