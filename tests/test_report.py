"""The report: two real tiny runs (CSV and wandb-offline logs) -> results.csv, report.md, PNGs that are not blank."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clip_hvt import flops, report, train
from clip_hvt.report import main as report_main, pareto_front

MONITOR = {"class_path": "clip_hvt.flops.ThroughputMonitor",
           "init_args": {"batch_size_fn": "clip_hvt.callbacks.batch_size", "window_size": 2}}
TINY_CONFIG = str(Path(__file__).parent / "configs" / "tiny.yaml")
VIT = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}


def _tiny_run(root: Path, tiny_config: str, name: str, vision_cfg: dict | None, wandb: bool) -> Path:
    cfg = yaml.safe_load(Path(tiny_config).read_text())
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg["trainer"]["callbacks"].append(MONITOR)
    # One run directory: checkpoints and the logger's save_dir derive from default_root_dir.
    cfg["trainer"].update(max_steps=6, val_check_interval=3, default_root_dir=str(run_dir))
    if wandb:
        cfg["trainer"]["logger"] = {"class_path": "clip_hvt.loggers.WandbLogger",
                                    "init_args": {"project": "clip_hvt", "name": name}}
    if vision_cfg:
        cfg["model"]["model_cfg"]["vision_cfg"] = vision_cfg
    cfg["data"]["shapes"]["root"] = str(root / "shapes")
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(config)])
    if wandb:
        # As the end of a training process would: wandb's core writes the run file asynchronously and
        # flushes it only when the run finishes (Lightning's WandbLogger leaves the run open).
        import wandb as wandb_sdk
        wandb_sdk.finish()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    pvt = _tiny_run(root, TINY_CONFIG, "pvt", None, wandb=False)
    vit = _tiny_run(root, TINY_CONFIG, "vit", VIT, wandb=True)
    return pvt, vit


def _not_blank(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005, f"{path.name} looks blank"


@pytest.mark.slow
def test_report_over_two_real_runs_writes_one_row_per_run_and_plots(runs, tmp_path, capsys):
    pvt, vit = runs
    broken = tmp_path / "broken"
    broken.mkdir()
    out = tmp_path / "report"
    report_main([str(pvt), str(vit), str(broken), "--out", str(out)])
    assert "skipped" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["run"] for r in rows] == ["pvt", "vit"]
    by_run = {r["run"]: r for r in rows}
    assert by_run["pvt"]["family"] == "hierarchical" and by_run["vit"]["family"] == "ViT"
    assert by_run["pvt"]["source"] == "csv" and by_run["vit"]["source"] == "wandb"
    tiny = yaml.safe_load(open(Path(__file__).parent / "configs" / "tiny.yaml"))["model"]["model_cfg"]
    assert float(by_run["pvt"]["image_gflops"]) == pytest.approx(flops.model_costs(tiny)["image_flops"] / 1e9, rel=1e-3)
    for r in rows:
        assert r["steps"] == "6" and r["samples_seen"] == str(6 * 16)
        assert float(r["train_samples_per_s"]) > 0
        assert 0 <= float(r["zeroshot_top1"]) <= 1 and 0 <= float(r["retrieval_r1"]) <= 1
    md = (out / "report.md").read_text()
    assert "| pvt | hierarchical |" in md and "`" + str(broken) + "`" in md
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["learning_curves.png", "retrieval_r1_vs_cost.png", "zeroshot_top1_vs_cost.png"]
    for png in pngs:
        _not_blank(png)


@pytest.mark.slow
def test_evaluation_json_wins_and_a_missing_metric_is_a_blank_cell(runs, tmp_path):
    pvt = tmp_path / "pvt"
    shutil.copytree(runs[0], pvt)
    eval_dir = pvt / "eval"
    eval_dir.mkdir()
    (eval_dir / "shapes_zeroshot.json").write_text(json.dumps({
        "dataset": "shapes", "model": "pvt", "pretrained": "x", "task": "zeroshot_classification",
        "metrics": {"acc1": 0.625, "acc5": 0.875, "mean_per_class_recall": 0.5}}))
    for path in pvt.rglob("metrics.csv"):  # drop the retrieval columns: R@1 becomes a blank cell
        rows = list(csv.DictReader(open(path)))
        keep = [k for k in rows[0] if not k.startswith("val/")]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, keep, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    report_main([str(pvt), "--out", str(tmp_path / "r")])
    row = next(csv.DictReader(open(tmp_path / "r" / "results.csv")))
    assert row["zeroshot_top1"] == "0.625" and row["eval/shapes/mean_per_class_recall"] == "0.5"
    assert row["retrieval_r1"] == "" and row["image_to_text_R@1"] == ""
    assert row["source"] == "csv+eval"


def test_no_readable_run_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no readable run.*empty: no saved training config"):
        report_main([str(tmp_path / "empty"), str(tmp_path / "missing"), "--out", str(tmp_path / "r")])


def test_pareto_front_keeps_the_runs_no_cheaper_run_beats():
    points = [(1.0, 0.2), (2.0, 0.5), (2.5, 0.4), (3.0, 0.6), (3.0, 0.1), (4.0, 0.55)]
    assert pareto_front(points) == [(1.0, 0.2), (2.0, 0.5), (3.0, 0.6)]


def test_a_requeued_runs_attempts_merge_into_one_history_and_their_throughput_adds_up(tmp_path):
    # Attempt 1 logged steps 10-40 but its last checkpoint was at step 20; attempt 2 resumed there.
    # Each process's ThroughputMonitor counts samples and seconds from zero.
    def write(version: int, rows: list[dict]) -> None:
        path = tmp_path / "lightning_logs" / f"version_{version}" / "metrics.csv"
        path.parent.mkdir(parents=True)
        keys = ["step", "zeroshot/top1", "train/samples", "train/time"]
        path.write_text("\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]))
    write(0, [{"step": s, "train/samples": 8 * s, "train/time": 2.0 * s} for s in (10, 20, 30, 40)]
          + [{"step": 30, "zeroshot/top1": 0.5}])
    write(1, [{"step": s, "train/samples": 8 * (s - 20), "train/time": 1.0 * (s - 20)} for s in (30, 40, 50)]
          + [{"step": 50, "zeroshot/top1": 0.75}])
    attempts, source = report.read_metrics(tmp_path)
    assert source == "csv" and [len(a) for a in attempts] == [5, 4]
    merged = report.merge_attempts(attempts)
    assert [r["step"] for r in merged] == [10, 20, 30, 40, 50, 50]  # attempt 1's steps 30, 40 replaced
    assert [r["zeroshot/top1"] for r in merged if "zeroshot/top1" in r] == [0.75]
    # (8*30 samples in 60 s) + (8*20 samples in 20 s)
    assert report.throughput(attempts) == pytest.approx((240 + 160) / (60 + 20))
