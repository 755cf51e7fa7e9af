"""Compute-matched experiment sets: the matching table, tolerance, one arm's prepared run, local mode, sweep.sbatch."""
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clip_hvt import flops
from clip_hvt.experiments import load_set, main, matching_table

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}


def write_set(tmp_path: Path, vit_layers: int, tolerance: float = 0.1, budget: dict | None = None) -> Path:
    """pvt_v2_b0 at 32 px (the reference) vs a ViT whose depth sets its GFLOPs (12 blocks: matched within 10%)."""
    pvt = tmp_path / "pvt.yaml"
    pvt.write_text(yaml.safe_dump({"model": {"model_cfg": {"embed_dim": 64, "vision_cfg": {
        "timm_model_name": "pvt_v2_b0", "image_size": 224}, "text_cfg": {"width": 512, "heads": 8, "layers": 12}}},
        "trainer": {"sync_batchnorm": True}}))
    vit = tmp_path / "vit.yaml"
    vit.write_text(yaml.safe_dump({"model": {"model_cfg": {"embed_dim": 64, "vision_cfg": {
        "image_size": 224, "patch_size": 8, "width": 64, "layers": 12, "head_width": 32},
        "text_cfg": {"width": 512, "heads": 8, "layers": 12}}}}))
    exp = tmp_path / "set.yaml"
    exp.write_text(yaml.safe_dump({
        "name": "tiny", "configs": [str(TINY_CONFIG)], "budget": budget or {"max_steps": 2}, "seed": 3,
        "tolerance": tolerance, "model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32}, "text_cfg": TEXT},
        "arms": [str(pvt), {"name": f"vit_d{vit_layers}", "config": str(vit),
                            "model_cfg": {"vision_cfg": {"layers": vit_layers}}}]}))
    return exp


def test_arms_share_the_sets_text_tower_and_resolution_and_the_table_matches_the_counter(tmp_path, capsys):
    exp = load_set(str(write_set(tmp_path, vit_layers=2)))
    assert [a.name for a in exp.arms] == ["pvt", "vit_d2"]
    for arm in exp.arms:
        assert arm.model_cfg["text_cfg"] == TEXT and arm.model_cfg["vision_cfg"]["image_size"] == 32
    assert exp.arms[1].model_cfg["vision_cfg"]["layers"] == 2 and exp.arms[1].model_cfg["vision_cfg"]["width"] == 64
    rows = matching_table(exp)
    costs = [flops.model_costs(a.model_cfg) for a in exp.arms]
    assert [r["image_gflops"] for r in rows] == pytest.approx([c["image_flops"] / 1e9 for c in costs])
    assert rows[1]["ratio"] == pytest.approx(costs[1]["image_flops"] / costs[0]["image_flops"])
    assert rows[0]["text_gflops"] == rows[1]["text_gflops"]  # one text tower for the whole set


def test_a_tower_given_as_a_file_is_read_relative_to_the_config_naming_it(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "small.yaml").write_text(yaml.safe_dump(TEXT))
    (tmp_path / "models").mkdir()
    arm = tmp_path / "models" / "pvt.yaml"
    arm.write_text(yaml.safe_dump({"model": {"model_cfg": {"embed_dim": 32, "vision_cfg": {
        "timm_model_name": "pvt_v2_b0", "image_size": 32}, "text_cfg": "../text/small.yaml"}}}))
    exp = tmp_path / "set.yaml"
    exp.write_text(yaml.safe_dump({"arms": [str(arm)]}))  # no text tower in the set: the arm's own
    assert load_set(str(exp)).arms[0].model_cfg["text_cfg"] == TEXT
    # the set's own tower file, relative to the set, wins over the arm's
    (tmp_path / "text" / "wide.yaml").write_text(yaml.safe_dump({**TEXT, "width": 64}))
    exp.write_text(yaml.safe_dump({"arms": [str(arm)], "model_cfg": {"text_cfg": "text/wide.yaml"}}))
    assert load_set(str(exp)).arms[0].model_cfg["text_cfg"] == {**TEXT, "width": 64}
    exp.write_text(yaml.safe_dump({"arms": [str(arm)]}))
    arm.write_text(arm.read_text().replace("small.yaml", "big.yaml"))
    with pytest.raises(SystemExit, match="arms\\[0\\] .*pvt.yaml: error: model.model_cfg.text_cfg: could not load '../text/big.yaml' "
                                         "\\(a file named in a config is found relative to that config file"):
        main(["table", "--set", str(exp)])


def test_an_arm_out_of_tolerance_fails_the_table_naming_it(tmp_path, capsys):
    exp = write_set(tmp_path, vit_layers=6)
    ratio = matching_table(load_set(str(exp)))[1]["ratio"]
    assert abs(ratio - 1) > 0.1
    with pytest.raises(SystemExit, match="vit_d6 outside ±10% of pvt's image-tower GFLOPs"):
        main(["table", "--set", str(exp)])
    assert "OUT OF TOLERANCE" in capsys.readouterr().out
    wide = write_set(tmp_path, vit_layers=6, tolerance=abs(ratio - 1) + 0.01)
    assert main(["table", "--set", str(wide)])[1]["matched"]


def test_bad_sets_are_one_line_errors(tmp_path):
    exp = write_set(tmp_path, vit_layers=2)
    data = yaml.safe_load(exp.read_text())
    for change, message in (({"armz": []}, "unknown key"), ({"arms": []}, "at least one model config"),
                            ({"arms": ["nope.yaml"]}, "no file 'nope.yaml'"),
                            ({"arms": [data["arms"][0], data["arms"][0]]}, "names must be unique"),
                            ({"budget": {"steps": 3}}, "budget takes max_steps")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(SystemExit, match=message):
            main(["table", "--set", str(bad)])
    with pytest.raises(SystemExit, match="arms 0..1 \\(pvt, vit_d2\\)"):
        main(["prepare", "--set", str(exp), "--arm", "5", "--out", str(tmp_path / "out")])


def test_prepare_writes_the_arm_config_and_its_training_arguments_compose(tmp_path, capsys):
    exp = write_set(tmp_path, vit_layers=12)
    main(["prepare", "--set", str(exp), "--arm", "1", "--out", str(tmp_path / "out"), "--max_time", "00:00:05:00"])
    lines = capsys.readouterr().out.splitlines()
    run_dir = Path(lines[0])
    assert run_dir == (tmp_path / "out" / "vit_d12").resolve()
    written = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    assert written["seed_everything"] == 3
    # --max_time replaces the set's step budget: time-matched, not capped at the set's (or tiny.yaml's) steps
    assert written["trainer"] == {"max_time": "00:00:05:00", "max_steps": -1}
    assert written["model"]["model_cfg"]["vision_cfg"]["layers"] == 12
    printed = subprocess.run([sys.executable, "-m", "clip_hvt.train", *lines[1:], "--print_config"], cwd=run_dir,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    resolved = yaml.safe_load(printed.stdout)
    # exactly the arm's model: nothing of the run config's (tiny.yaml's timm_model_name: pvt_v2_b0) left in
    got = resolved["model"]["model_cfg"]
    assert {k: v for k, v in got["vision_cfg"].items() if v is not None} == {
        "image_size": 32, "patch_size": 8, "width": 64, "layers": 12, "head_width": 32}
    assert {k: v for k, v in got["text_cfg"].items() if v is not None} == TEXT
    assert got["embed_dim"] == 32
    assert resolved["trainer"]["max_time"] == "00:00:05:00" and resolved["seed_everything"] == 3
    assert resolved["trainer"]["max_steps"] == -1  # over tiny.yaml's max_steps: 4


@pytest.mark.parametrize("budget, args, trainer", [
    ({"max_time": "00:01:00:00"}, [], {"max_time": "00:01:00:00", "max_steps": -1}),  # the set's: time-matched
    ({"max_time": "00:01:00:00", "max_steps": 7}, [], {"max_time": "00:01:00:00", "max_steps": 7}),  # both kept
    ({"max_steps": 2}, ["--max_steps", "9"], {"max_steps": 9}),
    ({"max_steps": 2}, ["--max_steps", "9", "--max_time", "00:00:05:00"], {"max_steps": 9, "max_time": "00:00:05:00"}),
])
def test_a_time_budget_lifts_the_step_limit_unless_it_gives_steps_too(tmp_path, capsys, budget, args, trainer):
    exp = write_set(tmp_path, vit_layers=12, budget=budget)
    main(["prepare", "--set", str(exp), "--arm", "0", "--out", str(tmp_path / "out"), *args])
    written = yaml.safe_load((tmp_path / "out" / "pvt" / "experiment.yaml").read_text())
    assert written["trainer"] == trainer


def test_prepare_refuses_a_set_out_of_tolerance_as_table_does(tmp_path, capsys):
    """slurm/sweep.sbatch prepares each arm: an unmatched set stops there, before any array task trains."""
    exp = write_set(tmp_path, vit_layers=6)
    with pytest.raises(SystemExit, match="vit_d6 outside ±10% of pvt's image-tower GFLOPs") as table:
        main(["table", "--set", str(exp)])
    for arm in ("0", "vit_d6"):  # the reference's task too: the set is the problem, not one arm
        with pytest.raises(SystemExit) as prepared:
            main(["prepare", "--set", str(exp), "--arm", arm, "--out", str(tmp_path / "out")])
        assert str(prepared.value).split("error: ", 1)[1] == str(table.value).split("error: ", 1)[1]
    assert not (tmp_path / "out").exists()


def test_sweep_array_task_prepares_its_arm_and_hands_it_to_launch(tmp_path):
    """sweep.sbatch as SLURM runs it for array task 1, with launch.sh replaced by a stub that records its input."""
    exp = write_set(tmp_path, vit_layers=12)
    home = tmp_path / "home"
    (home / "slurm").mkdir(parents=True)
    stub = home / "slurm" / "launch.sh"
    stub.write_text('#!/bin/bash\necho "RUN_DIR=$RUN_DIR"\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLIP_HVT_HOME": str(home), "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77"}
    done = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sbatch"), str(exp), "--trainer.max_steps", "9"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    run_dir = tmp_path / "runs" / "set-77" / "vit_d12"
    assert out[0] == f"RUN_DIR={run_dir}"
    assert out[1:] == [str(TINY_CONFIG), "--config", str(tmp_path / "vit.yaml"), "--config",
                       str(run_dir / "experiment.yaml")]  # the budget flag became the arm's budget
    assert yaml.safe_load((run_dir / "experiment.yaml").read_text())["trainer"] == {"max_steps": 9}
    timed = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sbatch"), str(exp), "--trainer.max_time=00:00:05:00",
                            "--data.num_workers", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert timed.returncode == 0, timed.stderr[-2000:]
    assert timed.stdout.splitlines()[-2:] == ["--data.num_workers", "0"]  # other overrides pass through
    assert yaml.safe_load((run_dir / "experiment.yaml").read_text())["trainer"] == {  # time-matched: no step cap
        "max_time": "00:00:05:00", "max_steps": -1}
    outside = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sbatch"), str(exp)], cwd=tmp_path,
                             env={k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_ID"},
                             capture_output=True, text=True, timeout=60)
    assert outside.returncode != 0 and "not an array task" in outside.stderr


@pytest.mark.slow
def test_local_mode_trains_every_arm_in_its_own_directory(tmp_path):
    exp = write_set(tmp_path, vit_layers=12)  # matched within 10% (run checks the table first)
    out = tmp_path / "sweep"
    main(["run", "--set", str(exp), "--out", str(out)])
    for arm in ("pvt", "vit_d12"):
        run_dir = out / arm
        assert (run_dir / "experiment.yaml").is_file()
        metrics = glob.glob(str(run_dir / "**" / "metrics.csv"), recursive=True)
        assert metrics, f"{arm}: no metrics in {run_dir}: {(run_dir / 'train.log').read_text()[-2000:]}"
        assert glob.glob(str(run_dir / "runs" / "tiny" / "checkpoints" / "*.ckpt"))


@pytest.mark.slow
def test_every_shipped_set_is_matched_within_its_tolerance():
    for path in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        cwd = os.getcwd()
        os.chdir(REPO)  # set paths are relative to the checkout
        try:
            exp = load_set(str(path))
            rows = main(["table", "--set", str(path)])  # ends with an error when an arm is out of tolerance
        finally:
            os.chdir(cwd)
        assert [r["arm"] for r in rows] == [a.name for a in exp.arms], path.name  # every arm was checked
