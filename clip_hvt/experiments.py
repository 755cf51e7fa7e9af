"""Compute-matched experiment sets: ``python -m clip_hvt.experiments {table,prepare,run} --set FILE``.

A set (``configs/experiments/*.yaml``) lists the arms of one comparison, a hierarchical encoder first
(the reference) and ViT / CNN baselines after it, each within ``tolerance`` of the reference's
image-tower GFLOPs at the set's resolution. Every arm gets the same run config(s), data, step or
wall-time budget and seed, and the set's ``model_cfg`` (text tower, embedding width, resolution) is
merged over the arm's own, so only the image tower differs::

    name: b2
    configs: [configs/gpu.yaml]          # run config(s) shared by every arm
    budget: {max_steps: 20000}           # trainer.* for every arm; {max_time: "00:12:00:00"}: time-matched
    seed: 0
    tolerance: 0.1
    model_cfg: {embed_dim: 512, vision_cfg: {image_size: 224}, text_cfg: {...}}
    arms:
      - configs/models/pvt_v2_b2.yaml    # a model config file, or a mapping that adapts one:
      - {name: vit_s16_d10, config: configs/models/vit_s16.yaml, model_cfg: {vision_cfg: {layers: 10}}}

``table`` prints params and GFLOPs (``clip_hvt.flops``) and fails when an arm is out of tolerance;
``prepare`` writes one arm's resolved config into its run directory and prints its training
arguments (``slurm/sweep.sbatch`` runs them); ``run`` trains every arm one after another here. Both
refuse a set with an arm out of tolerance, as ``table`` does.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import config as model_config, flops
from .cli import UserError, run as run_cli
from .summary import model_cfg_from_configs

_SET_KEYS = {"name", "configs", "budget", "seed", "tolerance", "model_cfg", "arms"}


@dataclass
class Arm:
    name: str
    config: Path  # the arm's model config file (its trainer settings, e.g. sync_batchnorm, apply too)
    model_cfg: dict  # the resolved open_clip model config


@dataclass
class ExperimentSet:
    name: str
    configs: list[Path]
    budget: dict[str, Any]
    seed: int
    tolerance: float
    arms: list[Arm]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _existing(path: str, where: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"{where}: no file '{path}' (paths are relative to the directory you run from, "
                        "normally the clip_hvt checkout)")
    return Path(path).resolve()


def _load_yaml(path: Path, where: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{where}: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {path} must be a YAML mapping")
    return data


def _tower_files(model_cfg: dict, config: Path) -> dict:
    """A tower given as a file (``text_cfg: ../text/w384.yaml``) read, relative to the config naming it,
    as jsonargparse reads it in training."""
    out = dict(model_cfg)
    for tower in ("vision_cfg", "text_cfg"):
        if isinstance(out.get(tower), str):
            tower_file = config.parent / out[tower]
            if not tower_file.is_file():
                raise UserError(f"{config}: model_cfg.{tower}: no file '{tower_file}' (relative to that config)")
            out[tower] = _load_yaml(tower_file, f"{config}: model_cfg.{tower}")
    return out


def load_set(path: str) -> ExperimentSet:
    """Read and check an experiment set; every problem is a ``UserError`` naming the key and the fix."""
    data = _load_yaml(_existing(path, "--set"), "--set")
    unknown = sorted(set(data) - _SET_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; a set has {sorted(_SET_KEYS)}")
    if not data.get("arms"):
        raise UserError(f"{path}: 'arms' must list at least one model config (the first is the reference)")
    budget = data.get("budget") or {}
    if not set(budget) <= {"max_steps", "max_time"}:
        raise UserError(f"{path}: budget takes max_steps and/or max_time (trainer.*), got {sorted(budget)}")
    shared = _tower_files(data.get("model_cfg") or {}, Path(path))
    arms = []
    for i, entry in enumerate(data["arms"]):
        spec = {"config": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or "config" not in spec or not set(spec) <= {"name", "config", "model_cfg"}:
            raise UserError(f"{path}: arms[{i}] must be a config path or {{name, config, model_cfg}}, got {entry!r}")
        config = _existing(spec["config"], f"{path}: arms[{i}]")
        own = model_cfg_from_configs(["--config", str(config)], prog=f"{path}: arms[{i}] {config}")  # as training reads it
        model_cfg = _merge(_merge(own, shared), _tower_files(spec.get("model_cfg") or {}, Path(path)))
        arms.append(Arm(spec.get("name") or config.stem, config, model_cfg))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: arm names must be unique (they name the run directories): {names}; "
                        "give repeated configs a 'name'")
    configs = [_existing(c, f"{path}: configs") for c in data.get("configs") or []]
    return ExperimentSet(data.get("name") or Path(path).stem, configs, budget, int(data.get("seed", 0)),
                         float(data.get("tolerance", 0.1)), arms)


def matching_table(exp: ExperimentSet) -> list[dict[str, Any]]:
    """One row per arm: params and GFLOPs per image and caption, and the image GFLOPs ratio to the reference."""
    rows = []
    for arm in exp.arms:
        costs = flops.model_costs(arm.model_cfg)
        rows.append({"arm": arm.name, "image_params_M": costs["image_params"] / 1e6,
                     "image_gflops": costs["image_flops"] / 1e9, "text_params_M": costs["text_params"] / 1e6,
                     "text_gflops": costs["text_flops"] / 1e9})
    for row in rows:
        row["ratio"] = row["image_gflops"] / rows[0]["image_gflops"]
        row["matched"] = abs(row["ratio"] - 1) <= exp.tolerance
    return rows


def check_matched(set: str, exp: ExperimentSet, rows: list[dict[str, Any]]) -> None:
    """Refuse a set with an arm outside the tolerance of the reference's image-tower GFLOPs (``matching_table``'s
    rows): every command that trains or prepares arms checks it here."""
    out = [r["arm"] for r in rows if not r["matched"]]
    if out:
        raise UserError(f"{set}: {', '.join(out)} outside ±{exp.tolerance:.0%} of {rows[0]['arm']}'s image-tower "
                        "GFLOPs; change the arm (depth, model size) or the tolerance")


def table(set: str) -> list[dict[str, Any]]:
    """Print the matching table of an experiment set; fail when an arm is out of tolerance.

    Args:
        set: experiment set YAML (``configs/experiments/*.yaml``).
    """
    exp = load_set(set)
    rows = matching_table(exp)
    size = exp.arms[0].model_cfg["vision_cfg"].get("image_size")
    print(f"{exp.name}: image-tower GFLOPs at {size} px within ±{exp.tolerance:.0%} of {rows[0]['arm']}")
    print(f"{'arm':<18} {'image M':>8} {'image GFLOPs':>12} {'text M':>7} {'text GFLOPs':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['arm']:<18} {r['image_params_M']:8.2f} {r['image_gflops']:12.3f} {r['text_params_M']:7.2f} "
              f"{r['text_gflops']:11.3f} {r['ratio']:6.3f}{'' if r['matched'] else '  OUT OF TOLERANCE'}")
    check_matched(set, exp, rows)
    return rows


def _arm(exp: ExperimentSet, arm: str | int) -> Arm:
    names = [a.name for a in exp.arms]
    if isinstance(arm, int) or arm.isdigit():
        if not 0 <= int(arm) < len(names):
            raise UserError(f"--arm {arm}: the set has arms 0..{len(names) - 1} ({', '.join(names)})")
        return exp.arms[int(arm)]
    if arm not in names:
        raise UserError(f"--arm {arm}: not in the set; its arms are {', '.join(names)}")
    return exp.arms[names.index(arm)]


def _every_field(model_cfg: dict) -> dict:
    """``model_cfg`` with every optional field of ``clip_hvt.config.ModelCfg`` present, unset ones null.

    The training parser merges ``model.model_cfg`` field by field across ``--config`` files, so a field the
    arm leaves unset would come from the set's run config instead (its ``timm_model_name`` made a ViT arm
    a PVT); an explicit null means open_clip's default, as in the arm's own config.
    """
    def nulls(cls: type) -> dict:
        return {f.name: None for f in dataclasses.fields(cls) if f.default is None}

    return {**nulls(model_config.ModelCfg), **model_cfg,
            "vision_cfg": {**nulls(model_config.VisionCfg), **model_cfg.get("vision_cfg", {})},
            "text_cfg": {**nulls(model_config.TextCfg), **model_cfg.get("text_cfg", {})}}


def prepare_arm(exp: ExperimentSet, arm: Arm, run_dir: Path, budget: dict[str, Any]) -> list[str]:
    """Write ``run_dir/experiment.yaml`` (the arm's model, budget, seed) and return the training arguments.

    The arm's model config is written out whole, every field set (``_every_field``), so it is the model
    trained whatever the set's run configs (given before it) say about the model.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"seed_everything": exp.seed, "trainer": dict(budget),
                "model": {"model_cfg": _every_field(arm.model_cfg)}}
    (run_dir / "experiment.yaml").write_text(
        f"# {exp.name} / {arm.name}, written by clip_hvt.experiments\n" + yaml.safe_dump(resolved, sort_keys=False))
    args = [a for c in exp.configs for a in ("--config", str(c))]
    return args + ["--config", str(arm.config), "--config", str((run_dir / "experiment.yaml").resolve())]


def _budget(exp: ExperimentSet, max_steps: int | None, max_time: str | None) -> dict[str, Any]:
    """The ``trainer.*`` budget of every arm: the command line's when it gives one, else the set's.

    Lightning stops at the first limit it reaches, so a budget with ``max_time`` and no ``max_steps`` is
    time-matched: it sets ``max_steps: -1`` over the run config's steps. One with both keeps both (whichever
    comes first ends every arm).
    """
    given = {k: v for k, v in (("max_steps", max_steps), ("max_time", max_time)) if v is not None}
    budget = given or dict(exp.budget)
    if budget.get("max_time") is not None and budget.get("max_steps") is None:
        budget["max_steps"] = -1
    return budget


def prepare(set: str, arm: str, out: str, max_steps: int | None = None, max_time: str | None = None) -> list[str]:
    """Write one arm's resolved config into ``OUT/<arm>/`` and print its run directory, then its
    ``clip_hvt.train`` arguments, one per line (for ``slurm/sweep.sbatch``).

    Args:
        set: experiment set YAML.
        arm: the arm's index (a SLURM array task id) or name.
        out: the set's output directory; the arm runs in ``OUT/<arm>``.
        max_steps: step budget for every arm (replaces the set's budget).
        max_time: wall-time budget for every arm, ``DD:HH:MM:SS`` (replaces the set's budget): time-matched
            unless max_steps is given too.
    """
    exp = load_set(set)
    chosen = _arm(exp, arm)
    check_matched(set, exp, matching_table(exp))  # as `table` and `run`: a cluster sweep of unmatched arms is refused
    run_dir = Path(out).resolve() / chosen.name
    args = prepare_arm(exp, chosen, run_dir, _budget(exp, max_steps, max_time))
    print(run_dir, *args, sep="\n")
    return args


def run(set: str, out: str, max_steps: int | None = None, max_time: str | None = None,
        arms: list[str] | None = None, overrides: list[str] | None = None) -> list[Path]:
    """Train every arm of a set one after another on this machine (the sweep's local mode).

    Each arm runs in ``OUT/<arm>/`` as its own ``python -m clip_hvt.train`` process, working in that
    directory as a SLURM task does (the config's relative outputs land there), and resumes from its
    ``last.ckpt`` when run again. Stops at the first arm that fails.

    Args:
        set: experiment set YAML.
        out: the set's output directory.
        max_steps: step budget for every arm (replaces the set's budget).
        max_time: wall-time budget for every arm, ``DD:HH:MM:SS`` (replaces the set's budget): time-matched
            unless max_steps is given too.
        arms: only these arms (names or indices); default all.
        overrides: more ``clip_hvt.train`` arguments for every arm, e.g. ``[--data.num_workers, "0"]``.
    """
    exp = load_set(set)
    table(set)
    chosen = [_arm(exp, a) for a in arms] if arms else exp.arms
    run_dirs = []
    for arm in chosen:
        run_dir = Path(out).resolve() / arm.name
        args = prepare_arm(exp, arm, run_dir, _budget(exp, max_steps, max_time))
        cmd = [sys.executable, "-m", "clip_hvt.train", *args, "--ckpt_path", "last", *(overrides or [])]
        print(f"=== {exp.name} / {arm.name} in {run_dir}", flush=True)
        with open(run_dir / "train.log", "a") as log:
            code = subprocess.call(cmd, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        if code:
            raise UserError(f"arm {arm.name} failed (exit {code}); its output is in {run_dir / 'train.log'}")
        run_dirs.append(run_dir)
    print("runs:", *run_dirs)
    return run_dirs


COMMANDS = {"table": table, "prepare": prepare, "run": run}


def main(args: list[str] | None = None) -> Any:
    return run_cli(COMMANDS, args, prog="python -m clip_hvt.experiments")


if __name__ == "__main__":
    main()
