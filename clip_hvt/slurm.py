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
"""
from __future__ import annotations

import os
import re
from typing import Mapping

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
