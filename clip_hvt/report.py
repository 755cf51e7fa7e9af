"""Compare trained encoders: ``python -m clip_hvt.report RUN_DIR... --out DIR``.

Reads each run directory (a training run's working directory, e.g. an arm of
``clip_hvt.experiments`` or ``slurm/sweep.sbatch``): its saved config (``config.yaml``, LightningCLI's),
its logged metrics (Lightning CSV ``metrics.csv`` and wandb offline ``*.wandb`` files) and the
evaluation JSONs (CLIP_benchmark's keys, as ``clip_hvt.eval`` writes them) anywhere under it whose ``model`` is
one the run wrote (its export or a checkpoint; ``run_models``).
It computes params and GFLOPs per image and caption (``clip_hvt.flops``) and the measured training
throughput (``ThroughputMonitor``'s ``train/samples`` over ``train/time``), and writes
``results.csv``, ``report.md`` and PNG plots: zero-shot top-1 and retrieval R@1 against image-tower
GFLOPs, params and training samples/s (families told apart, Pareto frontier drawn), and learning
curves against samples seen. A missing metric is a blank cell; an unreadable run is skipped and named.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import struct
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import flops
from .cli import UserError, run as run_cli
from .export import CONFIG_NAME

log = logging.getLogger(__name__)

FAMILIES = ("hierarchical", "hierarchical+multiscale", "ViT", "CNN")
_HIERARCHICAL = ("pvt_v2", "cvt_", "swin", "twins", "pvt")
_MARKERS = {"hierarchical": ("o", "tab:blue"), "hierarchical+multiscale": ("*", "tab:purple"),
            "ViT": ("s", "tab:orange"), "CNN": ("^", "tab:green")}
# (column, axis label) of the two headline metrics and the three cost axes
METRICS = (("zeroshot_top1", "zero-shot top-1"), ("retrieval_r1", "retrieval R@1 (mean of both directions)"))
COSTS = (("image_gflops", "image-tower GFLOPs per image"), ("image_params_M", "image-tower params (M)"),
         ("train_samples_per_s", "measured training samples/s"))
COLUMNS = ["run", "family", "image_tower", "image_size", "image_params_M", "image_gflops", "text_params_M",
           "text_gflops", "world_size", "global_batch", "steps", "samples_seen", "train_samples_per_s",
           "zeroshot_top1", "zeroshot_top5", "retrieval_r1", "image_to_text_R@1", "text_to_image_R@1", "source"]


def family(vision_cfg: dict) -> str:
    name = vision_cfg.get("timm_model_name")
    if not name or name.startswith(("vit_", "deit", "eva")):
        return "ViT"
    if name.endswith("_ms"):
        return "hierarchical+multiscale"
    return "hierarchical" if name.startswith(_HIERARCHICAL) else "CNN"


# ---- reading a run -----------------------------------------------------------------------------

def _files(run_dir: Path, pattern: str) -> list[Path]:
    """Files under a run, each once (wandb's ``latest-run`` is a link to a run directory)."""
    return sorted({p.resolve() for p in run_dir.rglob(pattern) if p.is_file()})


def find_config(run_dir: Path) -> dict:
    """LightningCLI's saved ``config.yaml`` (the one with ``model.model_cfg``; wandb keeps its own)."""
    for path in sorted(_files(run_dir, "config.yaml"), key=lambda p: len(p.parts)):
        try:
            cfg = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(cfg, dict) and isinstance((cfg.get("model") or {}).get("model_cfg"), dict):
            return cfg
    raise ValueError("no saved training config (config.yaml with model.model_cfg)")


def read_csv_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a Lightning CSV ``metrics.csv``, blank cells dropped."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if k and v not in ("", None)})
    return rows


def _wandb_records(path: Path) -> Iterator[bytes]:
    # wandb's transaction log (LevelDB log format: 32 KiB blocks of checksummed, possibly split
    # records after a 7-byte ":W&B" header). wandb >= 0.19 reads it in its Go core only, so no Python
    # reader is importable; this is that format's reader, without checksum verification.
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    offset, pending = 7, b""
    while offset + 7 <= len(data):
        space = 32768 - offset % 32768
        if space < 7:  # block trailer padding
            offset += space
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:  # zero padding up to the next block
            offset += space
            continue
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 1:  # full record
            yield chunk
        elif kind == 2:  # first fragment
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def read_wandb_metrics(path: Path) -> list[dict[str, float]]:
    """History rows (numeric values only) of a wandb offline run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            value = json.loads(item.value_json)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = float(value)
        if "trainer/global_step" in row:
            row["step"] = row["trainer/global_step"]
        rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> tuple[list[list[dict[str, float]]], str]:
    """Logged metric rows per attempt, oldest first (a requeued or resumed run logs each attempt to its
    own file), from the CSV logger, else from wandb offline files; and where they came from."""
    for pattern, reader, source in (("metrics.csv", read_csv_metrics, "csv"), ("*.wandb", read_wandb_metrics, "wandb")):
        files = sorted(_files(run_dir, pattern), key=lambda p: p.stat().st_mtime)
        if files:
            return [reader(p) for p in files], source
    return [], "none"


def merge_attempts(attempts: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """One history from a run's attempts: an attempt resumes at its checkpoint's step, so its rows replace
    the earlier attempts' from that step on (steps logged after that checkpoint were lost with the job)."""
    merged: list[dict[str, float]] = []
    for rows in attempts:
        steps = [r["step"] for r in rows if "step" in r]
        if steps:
            merged = [r for r in merged if r.get("step", -1.0) < min(steps)]
        merged += rows
    return merged


def read_eval_jsons(run_dir: Path) -> list[dict]:
    """CLIP_benchmark-style result files (``dataset``, ``task``, ``metrics``) anywhere under the run."""
    results = []
    for path in _files(run_dir, "*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"dataset", "task", "metrics"} <= set(data):
            results.append(data)
    return results


def run_models(run_dir: Path, cfg: dict) -> list[Path]:
    """The models a run wrote, final first: its exports (``--export_dir``: directories with ``open_clip_config.json``
    under the run, or the saved config's absolute ``export_dir``), its ``last.ckpt`` files, then its other
    checkpoints, newest first."""
    exports = [p.parent for p in _files(run_dir, CONFIG_NAME)]
    if isinstance(cfg.get("export_dir"), str) and Path(cfg["export_dir"]).is_absolute():
        exports.append(Path(cfg["export_dir"]).resolve())
    ckpts = sorted(_files(run_dir, "*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    return list(dict.fromkeys(exports + ckpts))


def _evaluated_path(result: dict) -> Path | None:
    # clip_hvt.eval's "model": "local-dir:DIR" for an export, the path for a .ckpt, else an open_clip name
    name = result.get("model")
    return Path(name.removeprefix("local-dir:")) if isinstance(name, str) and name else None


def _is_model(path: Path, model: Path) -> bool:
    """``path`` (as ``clip_hvt.eval`` was given it) names ``model`` (resolved): an absolute path the same file, a
    relative one (relative to wherever the evaluation ran) the same file from here or the last parts of its path."""
    if path.resolve() == model:
        return True
    return not path.is_absolute() and ".." not in path.parts and model.parts[-len(path.parts):] == path.parts


def evals_of(results: list[dict], models: list[Path]) -> list[dict]:
    """The results of one of ``models`` (resolved, preferred first; ``run_models``): for each (dataset, task) the
    result of the first model evaluated on it, sorted by dataset and task. Results of other models are left out:
    a folder of ``clip_hvt.eval --out`` holds one JSON per (model, set)."""
    best: dict[tuple[str, str], tuple[int, dict]] = {}
    for result in results:
        path = _evaluated_path(result)
        rank = next((i for i, m in enumerate(models) if path is not None and _is_model(path, m)), None)
        key = (str(result["dataset"]), str(result["task"]))
        if rank is not None and (key not in best or rank < best[key][0]):
            best[key] = (rank, result)
    return [best[key][1] for key in sorted(best)]


def _last(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return values[-1] if values else None


def devices_per_node(devices: Any) -> int | None:
    """Devices per node of a saved ``trainer.devices``, in the forms Lightning accepts: an int > 0, its digit
    string ('8': jsonargparse keeps a command-line value of that Union as given, as slurm/launch.sh passes it),
    a list of device indices or their comma-separated string ('0,1'). None: Lightning picks at run time
    ('auto', -1, '-1')."""
    if isinstance(devices, str):
        text = devices.strip()
        devices = [d for d in text.split(",") if d.strip()] if "," in text else int(text) if text.isdigit() else None
    if isinstance(devices, (list, tuple)):
        return len(devices) or None
    return devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 else None


def world_size(trainer: dict, rows: list[dict[str, float]] | None = None) -> int:
    """Processes of a run: ``devices_per_node`` x ``num_nodes`` of its saved config. Where the config leaves the
    devices to Lightning, the ratio of ThroughputMonitor's global to per-device ``train/samples_per_sec`` in its
    logged ``rows`` (Lightning logs the global rate only with several processes: a per-device rate alone is 1);
    with neither, 1 and a warning naming the value."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    per_node = devices_per_node(devices)
    if per_node is not None:
        nodes = int(nodes) if isinstance(nodes, int) or (isinstance(nodes, str) and nodes.isdigit()) else 1
        return per_node * max(nodes, 1)
    device_rate = _last(rows or [], "train/device/samples_per_sec")
    if device_rate:
        total = _last(rows or [], "train/samples_per_sec")
        return round(total / device_rate) if total else 1
    log.warning("trainer.devices %r: the device count was left to Lightning and no throughput was logged; "
                "counting one process (samples seen and samples/s may be too low)", devices)
    return 1


def samples_seen(steps: int | None, global_batch: int) -> int | None:
    """Training samples seen after ``steps`` optimizer steps of ``global_batch`` (``summarize_run``'s)."""
    return int(steps) * global_batch if steps is not None and global_batch else None


def throughput(attempts: list[list[dict[str, float]]]) -> float | None:
    """Training samples/s per device from ThroughputMonitor's cumulative ``train/samples`` and ``train/time``
    (validation time excluded by the monitor), between the first and the last logged step of each attempt
    (each process counts from zero), summed over the attempts."""
    samples = seconds = 0.0
    for rows in attempts:
        points = [(r["train/time"], r["train/samples"]) for r in rows if "train/time" in r and "train/samples" in r]
        if len(points) >= 2 and points[-1][0] > points[0][0]:
            samples += points[-1][1] - points[0][1]
            seconds += points[-1][0] - points[0][0]
    return samples / seconds if seconds else None


def summarize_run(run_dir: Path) -> tuple[dict[str, Any], list[tuple[float, float, str]]]:
    """One results row and the learning-curve points (samples seen, value, metric) of a run."""
    cfg = find_config(run_dir)
    model_cfg = cfg["model"]["model_cfg"]
    vision = model_cfg.get("vision_cfg") or {}
    costs = flops.model_costs(model_cfg)
    attempts, source = read_metrics(run_dir)
    rows = merge_attempts(attempts)
    trainer = cfg.get("trainer") or {}
    world = world_size(trainer, rows)
    # pairs per optimizer step (the logged steps): per-device batch x processes x Lightning's gradient accumulation
    accumulate = trainer.get("accumulate_grad_batches")
    global_batch = (int((cfg.get("data") or {}).get("batch_size") or 0) * world
                    * (accumulate if isinstance(accumulate, int) and accumulate > 0 else 1))
    steps = max((r["step"] for r in rows if "step" in r), default=None)
    device_rate = throughput(attempts)
    row: dict[str, Any] = {
        "run": run_dir.name, "family": family(vision),
        "image_tower": vision.get("timm_model_name") or f"ViT w{vision.get('width')} d{vision.get('layers')} "
                                                        f"p{vision.get('patch_size')}",
        "image_size": vision.get("image_size"),
        "image_params_M": costs["image_params"] / 1e6, "image_gflops": costs["image_flops"] / 1e9,
        "text_params_M": costs["text_params"] / 1e6, "text_gflops": costs["text_flops"] / 1e9,
        "world_size": world, "global_batch": global_batch,
        "steps": int(steps) if steps is not None else None,
        "samples_seen": samples_seen(steps, global_batch),
        "train_samples_per_s": device_rate * world if device_rate else None,
        "zeroshot_top1": _last(rows, "zeroshot/top1"), "zeroshot_top5": _last(rows, "zeroshot/top5"),
        "image_to_text_R@1": _last(rows, "val/image_to_text_R@1"),
        "text_to_image_R@1": _last(rows, "val/text_to_image_R@1"),
        "source": source,
    }
    # Standalone evaluation of this run's model wins over training-time numbers: the first zero-shot and the first
    # retrieval set by name. Results of other models (an eval folder shared by several) are not this run's.
    evals = evals_of(read_eval_jsons(run_dir), run_models(run_dir, cfg))
    zeroshot = [e for e in evals if "acc1" in e["metrics"]]
    retrieval = [e for e in evals if "image_retrieval_recall@1" in e["metrics"]]
    if zeroshot:
        row.update(zeroshot_top1=zeroshot[0]["metrics"]["acc1"], zeroshot_top5=zeroshot[0]["metrics"].get("acc5"),
                   source=f"{source}+eval")
    if retrieval:
        m = retrieval[0]["metrics"]
        # CLIP_benchmark's names: image_retrieval = text->image, text_retrieval = image->text
        row.update({"text_to_image_R@1": m.get("image_retrieval_recall@1"),
                    "image_to_text_R@1": m.get("text_retrieval_recall@1")}, source=f"{source}+eval")
    for e in evals:
        for key, value in e["metrics"].items():
            if isinstance(value, (int, float)):
                row[f"eval/{e['dataset']}/{key}"] = value
    directions = [row[k] for k in ("image_to_text_R@1", "text_to_image_R@1") if row.get(k) is not None]
    row["retrieval_r1"] = sum(directions) / len(directions) if directions else None
    curve = []
    for r in rows:
        seen = samples_seen(r.get("step"), global_batch)
        if seen is None:
            continue
        for key, name in (("zeroshot/top1", "zeroshot_top1"), ("val/image_to_text_R@1", "image_to_text_R@1"),
                          ("val/text_to_image_R@1", "text_to_image_R@1")):
            if key in r:
                curve.append((seen, r[key], name))
    return row, curve


# ---- plots -------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal cost and higher-or-equal metric, by cost."""
    front, best = [], -math.inf
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if value > best:
            front.append((cost, value))
            best = value
    return front


def _scatter(ax, results: list[dict], cost: str, metric: str, higher_cost_is_better: bool) -> None:
    points = [(r[cost], r[metric], r) for r in results if r.get(cost) is not None and r.get(metric) is not None]
    for fam in FAMILIES:
        mine = [(x, y, r) for x, y, r in points if r["family"] == fam]
        if mine:
            marker, color = _MARKERS[fam]
            ax.scatter([x for x, _, _ in mine], [y for _, y, _ in mine], marker=marker, color=color, s=70, label=fam)
    for x, y, r in points:
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if len(points) > 1:
        # throughput is a benefit (more samples/s is cheaper); GFLOPs and params are costs
        sign = -1 if higher_cost_is_better else 1
        front = pareto_front([(sign * x, y) for x, y, _ in points])
        ax.step([sign * x for x, _ in front], [y for _, y in front], where="post", color="grey",
                linestyle="--", linewidth=1, label="Pareto frontier")
    if not points:
        ax.text(0.5, 0.5, "no run has both numbers", ha="center", va="center", transform=ax.transAxes)


def plot_tradeoffs(results: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, metric_label in METRICS:
        fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4.2), squeeze=False)
        for ax, (cost, cost_label) in zip(axes[0], COSTS):
            _scatter(ax, results, cost, metric, higher_cost_is_better=cost == "train_samples_per_s")
            ax.set_xlabel(cost_label)
            ax.set_ylabel(metric_label)
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
        fig.suptitle(f"{metric_label} vs cost")
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
        path = out / f"{metric}_vs_cost.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_curves(curves: dict[str, list[tuple[float, float, str]]], results: list[dict], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("zeroshot_top1", "image_to_text_R@1", "text_to_image_R@1")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2), squeeze=False)
    fam = {r["run"]: r["family"] for r in results}
    for ax, name in zip(axes[0], names):
        for run, points in curves.items():
            xs = [x for x, _, n in points if n == name]
            ys = [y for _, y, n in points if n == name]
            if xs:
                marker = _MARKERS[fam[run]][0]
                ax.plot(xs, ys, marker=marker, label=run)  # marker: family; colour: run
        ax.set_xlabel("samples seen")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("learning curves")
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- writing -----------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(results: list[dict], path: Path) -> None:
    extra = sorted({k for r in results for k in r} - set(COLUMNS))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + extra)
        for r in results:
            writer.writerow([_cell(r.get(k)) for k in COLUMNS + extra])


def write_markdown(results: list[dict], skipped: dict[str, str], plots: list[Path], path: Path) -> None:
    shown = ["run", "family", "image_params_M", "image_gflops", "text_gflops", "steps", "train_samples_per_s",
             "zeroshot_top1", "retrieval_r1"]
    lines = ["# Encoder comparison", "",
             "GFLOPs: forward FLOPs per image at the run's resolution and per caption (`clip_hvt.flops`, "
             "attention included). Throughput: measured training samples/s (all devices). Zero-shot top-1 and retrieval R@1 "
             "(mean of image→text and text→image): standalone evaluation where present, else the last "
             "training-time validation. A blank cell: not logged.", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in shown) + " |" for r in results]
    if skipped:
        lines += ["", "Skipped (unreadable):", ""] + [f"- `{run}`: {why}" for run, why in skipped.items()]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


def report(run_dirs: list[str], out: str) -> list[dict[str, Any]]:
    """Compare runs: results.csv, report.md and PNG plots in OUT.

    Args:
        run_dirs: run directories (each a training run's working directory), given first or as a list.
        out: output directory.
    """
    if not run_dirs:
        raise UserError("no run directory given: python -m clip_hvt.report RUN_DIR... --out DIR")
    results, curves, skipped = [], {}, {}
    for name in run_dirs:
        run_dir = Path(name)
        try:
            if not run_dir.is_dir():
                raise ValueError("not a directory")
            row, curve = summarize_run(run_dir)
        except (ValueError, OSError, KeyError, TypeError) as err:
            skipped[name] = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"skipped {name}: {skipped[name]}")
            continue
        if row["run"] in curves:  # two arms of different sets with one name: keep both apart
            row["run"] = f"{run_dir.parent.name}/{row['run']}"
        results.append(row)
        curves[row["run"]] = curve
    if not results:
        raise UserError(f"no readable run among {run_dirs}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results, out_dir / "results.csv")
    plots = plot_tradeoffs(results, out_dir) + [plot_curves(curves, results, out_dir)]
    write_markdown(results, skipped, plots, out_dir / "report.md")
    for r in results:
        print(f"{r['run']:<24} {r['family']:<24} {_cell(r['image_gflops']):>8} GFLOPs  "
              f"{_cell(r['train_samples_per_s']):>8} samples/s  top-1 {_cell(r['zeroshot_top1']):>6}  "
              f"R@1 {_cell(r['retrieval_r1']):>6}")
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'results.csv'} and {len(plots)} plots")
    return results


def main(args: list[str] | None = None) -> Any:
    args = list(sys.argv[1:] if args is None else args)
    # `report RUN_DIR... --out DIR` (a shell glob): jsonargparse takes a list option as one JSON list
    dirs = []
    while args and not args[0].startswith("-"):
        dirs.append(args.pop(0))
    return run_cli(report, (["--run_dirs", json.dumps(dirs)] if dirs else []) + args, prog="python -m clip_hvt.report")


if __name__ == "__main__":
    main()
