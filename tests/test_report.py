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
from conftest import TINY_MODEL_CFG

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
        "dataset": "shapes", "model": str(pvt / "checkpoints" / "last.ckpt"), "pretrained": "x",
        "task": "zeroshot_classification",
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


# ---- world size, global batch and samples seen from the saved config --------------------------------------------


def _fake_run(path: Path, trainer: dict, rows: list[dict], batch_size: int = 4) -> Path:
    """A run directory as training leaves it, without training: config.yaml and a Lightning metrics.csv."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": {"model_cfg": TINY_MODEL_CFG}, "trainer": trainer,
                                                      "data": {"batch_size": batch_size}}))
    keys = sorted({k for r in rows for k in r})
    (path / "metrics.csv").write_text("\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys)
                                                                   for r in rows]) + "\n")
    return path


# ThroughputMonitor's per-device counts (4 pairs a step, 2 s a step) and a validation at step 20
ROWS = ([{"step": s, "train/samples": 4.0 * s, "train/time": 2.0 * s} for s in (10, 20)]
        + [{"step": 20, "zeroshot/top1": 0.5}])


@pytest.mark.parametrize("trainer, world", [
    ({"devices": "8"}, 8),                      # slurm/launch.sh's --trainer.devices "$SLURM_NTASKS_PER_NODE"
    ({"devices": [0, 1]}, 2),                   # device indices
    ({"devices": "0,1"}, 2),                    # their comma string
    ({"devices": "8", "num_nodes": 2}, 16),
    ({"devices": 4, "num_nodes": 2, "accumulate_grad_batches": 3}, 8),
])
def test_samples_seen_and_throughput_count_every_device_of_every_node(tmp_path, trainer, world):
    row, curve = report.summarize_run(_fake_run(tmp_path / "run", trainer, ROWS))
    accumulate = trainer.get("accumulate_grad_batches", 1)
    assert row["world_size"] == world and row["global_batch"] == 4 * world * accumulate
    assert row["steps"] == 20 and row["samples_seen"] == 20 * 4 * world * accumulate
    assert row["train_samples_per_s"] == pytest.approx(2.0 * world)  # 4 pairs per 2 s on each device
    assert curve == [(20 * 4 * world * accumulate, 0.5, "zeroshot_top1")]  # the learning curve's x: samples seen


def test_devices_left_to_lightning_are_counted_from_the_logged_throughput_else_one_with_a_warning(tmp_path, caplog):
    # Lightning logs the global rate only with several processes: 3 here (6 pairs/s over 2 per device)
    logged = ROWS + [{"step": 20, "train/device/samples_per_sec": 2.0, "train/samples_per_sec": 6.0}]
    for i, devices in enumerate(("auto", -1, "-1")):
        row, _ = report.summarize_run(_fake_run(tmp_path / f"run{i}", {"devices": devices}, logged))
        assert row["world_size"] == 3 and row["samples_seen"] == 20 * 4 * 3
    alone = ROWS + [{"step": 20, "train/device/samples_per_sec": 2.0}]  # no global rate: one process
    assert report.summarize_run(_fake_run(tmp_path / "alone", {"devices": "auto"}, alone))[0]["world_size"] == 1
    assert not caplog.records
    row, _ = report.summarize_run(_fake_run(tmp_path / "unknown", {"devices": "auto"}, ROWS))
    assert row["world_size"] == 1 and row["samples_seen"] == 20 * 4
    assert "trainer.devices 'auto'" in caplog.text


# ---- evaluation results belong to the model they name ----------------------------------------------------------

def _result(model: str, dataset: str, task: str, value: float) -> dict:
    metrics = ({"acc1": value, "acc5": 1.0} if task == "zeroshot_classification" else
               {"image_retrieval_recall@1": value, "text_retrieval_recall@1": value / 2})
    return {"dataset": dataset, "model": model, "pretrained": "", "task": task, "metrics": metrics}


def test_each_run_keeps_its_own_models_results_from_a_shared_eval_folder(tmp_path, monkeypatch):
    runs = {}
    for name in ("a", "b"):
        run = _fake_run(tmp_path / "sweep" / name, {"devices": 1}, ROWS)
        (run / "export").mkdir()
        (run / "export" / "open_clip_config.json").write_text("{}")
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        (run / "checkpoints" / "epoch=0-step=10.ckpt").write_bytes(b"")
        runs[name] = run
    a, b = runs["a"], runs["b"]
    # One `clip_hvt.eval --model a/export --model b/export ... --out` folder, found under both runs: file names as
    # clip_hvt.eval writes them; a's are named relative to where it ran (sweep/), b's absolute.
    results = {
        "zz_export_zeroshot_classification.json": _result("local-dir:a/export", "zz", "zeroshot_classification", 0.1),
        "aa_export_zeroshot_classification.json": _result("local-dir:a/export", "aa", "zeroshot_classification", 0.2),
        "coco_export_zeroshot_retrieval.json": _result(f"local-dir:{a}/export", "coco", "zeroshot_retrieval", 0.3),
        "aa_export_b_zeroshot_classification.json": _result(f"local-dir:{b}/export", "aa", "zeroshot_classification",
                                                            0.6),
        # b's intermediate checkpoint on the same set: its final model's result wins
        "aa_epoch_zeroshot_classification.json": _result(str(b / "checkpoints" / "epoch=0-step=10.ckpt"), "aa",
                                                         "zeroshot_classification", 0.9),
        "coco_last_zeroshot_retrieval.json": _result(str(b / "checkpoints" / "last.ckpt"), "coco",
                                                     "zeroshot_retrieval", 0.7),
        "aa_other_zeroshot_classification.json": _result("ViT-B-32", "aa", "zeroshot_classification", 0.99),
    }
    for run in (a, b):
        (run / "eval").mkdir()
        for name, result in results.items():
            (run / "eval" / name).write_text(json.dumps(result))
    monkeypatch.chdir(tmp_path)  # the report runs elsewhere than the evaluation did
    report_main([str(a), str(b), "--out", str(tmp_path / "r")])
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "r" / "results.csv"))}
    # zero-shot: the first set by name (aa), not the first file; retrieval: mean of both directions
    assert rows["a"]["zeroshot_top1"] == "0.2" and rows["a"]["retrieval_r1"] == f"{(0.3 + 0.15) / 2:.4g}"
    assert rows["a"]["eval/zz/acc1"] == "0.1" and rows["a"]["source"] == "csv+eval"
    assert rows["b"]["zeroshot_top1"] == "0.6" and rows["b"]["retrieval_r1"] == f"{(0.7 + 0.35) / 2:.4g}"
    assert rows["b"]["eval/zz/acc1"] == ""  # zz was evaluated for a only
