"""Training wall clock: ``python -m clip_hvt.train`` against ``python -m open_clip_train.main``.

Both train the same open_clip model config on the same shards with the same batch size, data workers,
precision (fp32), optimizer (AdamW, same lr / weight decay / betas / eps, open_clip's no-decay rule) and
schedule (linear warmup, cosine to 0 at the last step), no evaluation, one checkpoint at the end, a log
line every ``--log-every`` steps. Each run is a whole process, timed from outside (start-up included).
Every round runs a short and a long run of each side, alternating sides (and which goes first); the
steady-state step time is (long - short) / (long steps - short steps), start-up is the short run minus
its steps. Medians over rounds are compared, then means (the steady step pooled over rounds: one slow
short run moves it less than it moves its own round's figure), and every round's ratios are printed, with
the 2048² fp32 matmul rate measured in each round for scale (the machine may be shared: compare ratios,
not times).
The same figures are printed from CPU time (user + system of the process and its data workers), which
load from other processes disturbs less than wall clock.

open_clip_train runs in its own interpreter (``--open-clip-python``; see ``benchmarks/common.py``).

    PYTHONPATH=. python benchmarks/bench_train.py --model quickstart [--short 20 --long 60 --rounds 3]
    PYTHONPATH=. python benchmarks/bench_train.py --model pvt_v2_b2 --batch-size 8 --short 3 --long 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OPEN_CLIP_PYTHON, check_open_clip_python, checkout_env, matmul_gflops

ROOT = Path(__file__).resolve().parent.parent
TEXT_12 = {"context_length": 77, "width": 512, "heads": 8, "layers": 12}
MODELS = {
    # configs/quickstart.yaml's model (read from it below) at its batch size
    "quickstart": None,
    "pvt_v2_b2": {"embed_dim": 512, "vision_cfg": {"timm_model_name": "pvt_v2_b2", "timm_pool": "avg",
                                                   "timm_proj": "linear", "image_size": 224}, "text_cfg": TEXT_12},
}


def _quickstart() -> tuple[dict, dict]:
    import yaml  # only in the parent process
    from clip_hvt.summary import model_cfg_from_configs  # the config parser of every command (file references)
    path = ROOT / "configs" / "quickstart.yaml"
    return model_cfg_from_configs(["--config", str(path)]), yaml.safe_load(path.read_text())["model"]


def _shapes_spec() -> str:
    """The embedded shapes training shards (generated once by the quickstart / tests), as one brace
    pattern: both sides read it as one source."""
    sys.path.insert(0, str(ROOT))
    from clip_hvt.data.datamodule import Shapes, WebDataModule
    shapes = Shapes(seed=0)
    WebDataModule(shapes=shapes).prepare_data()
    tars = sorted((shapes.resolve_root() / "train").glob("shapes-train-*.tar"))
    return f"{tars[0].parent}/shapes-train-{{{tars[0].stem[-6:]}..{tars[-1].stem[-6:]}}}.tar"


def ours_command(work: Path, tag: str, model_cfg: dict, hp: dict, args, steps: int) -> list[str]:
    run_dir = work / f"ours-{tag}"
    config = {
        "seed_everything": 0,
        "final_validation": False,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps,
                    "log_every_n_steps": args.log_every, "num_sanity_val_steps": 0,
                    "default_root_dir": str(run_dir),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir)}}},
        "model": {"model_cfg": model_cfg, **hp},
        "data": {"train_shards": args.spec, "batch_size": args.batch_size, "num_workers": args.workers,
                 "train_num_samples": steps * args.batch_size},
    }
    path = work / f"ours-{tag}.json"  # JSON is YAML: LightningCLI reads it with --config
    path.write_text(json.dumps(config))
    return [sys.executable, "-m", "clip_hvt.train", "--config", str(path), *args.ours_args]


def open_clip_command(work: Path, tag: str, model_cfg: dict, hp: dict, args, steps: int) -> list[str]:
    cfg_dir = work / "open_clip_cfg"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "bench_model.json").write_text(json.dumps(model_cfg))
    beta1, beta2 = hp.get("betas", (0.9, 0.98))
    return [args.open_clip_python, __file__, "--open-clip-main", str(cfg_dir), "--",
            "--model", "bench_model", "--train-data", args.spec, "--dataset-type", "webdataset",
            "--dataset-resampled", "--train-num-samples", str(steps * args.batch_size),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1",
            "--lr", str(hp["lr"]), "--wd", str(hp["weight_decay"]), "--warmup", str(hp["warmup_steps"]),
            "--beta1", str(beta1), "--beta2", str(beta2), "--eps", str(hp.get("eps", 1e-6)),
            "--precision", "fp32", "--seed", "0", "--log-every-n-steps", str(args.log_every),
            "--logs", str(work), "--name", f"open_clip-{tag}", "--save-frequency", "1"]


def _open_clip_main(cfg_dir: str, argv: list[str]) -> None:
    """The open_clip side, in its interpreter: register the model config, run open_clip_train's main."""
    import open_clip
    open_clip.add_model_config(cfg_dir)
    from open_clip_train.main import main
    main(argv)


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall s, CPU s of the process and the children it waited for: its data workers)."""
    env = checkout_env(WANDB_MODE="offline")
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({os.waitstatus_to_exitcode(status)}); its output: {log}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="quickstart")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the quickstart's 64, 8 otherwise")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--short", type=int, default=20, help="steps of the short run")
    parser.add_argument("--long", type=int, default=60, help="steps of the long run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=20, help="a log line every N steps, both sides")
    parser.add_argument("--spec", default=None, help="training shards (default: the embedded shapes data)")
    parser.add_argument("--work", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--open-clip-python", default=OPEN_CLIP_PYTHON)
    parser.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[],
                        help="extra flags for clip_hvt.train (last on the command line)")
    if len(sys.argv) > 2 and sys.argv[1] == "--open-clip-main":
        return _open_clip_main(sys.argv[2], sys.argv[4:])
    args = parser.parse_args()
    check_open_clip_python(args.open_clip_python)
    if args.model == "quickstart":
        model_cfg, module_cfg = _quickstart()
        hp = {k: module_cfg[k] for k in ("lr", "weight_decay", "warmup_steps")}
        args.batch_size = args.batch_size or 64
    else:
        model_cfg, hp = MODELS[args.model], {"lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 2}
        args.batch_size = args.batch_size or 8
    args.spec = args.spec or _shapes_spec()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model}: {json.dumps(model_cfg)}")
    print(f"batch {args.batch_size}, {args.workers} worker(s), fp32, AdamW lr {hp['lr']} wd {hp['weight_decay']} "
          f"warmup {hp['warmup_steps']}, cosine; runs of {args.short} and {args.long} steps, {args.rounds} rounds; "
          f"shards {args.spec}; logs in {work}", flush=True)
    sides = {"ours": ours_command, "open_clip": open_clip_command}
    times = {(side, n): [] for side in sides for n in (args.short, args.long)}
    cpu = {key: [] for key in times}
    gflops = []
    for r in range(args.rounds):
        gflops.append(matmul_gflops())
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for steps in (args.short, args.long):
            for side in order:
                tag = f"r{r}-{steps}"
                cmd = sides[side](work, tag, model_cfg, hp, args, steps)
                wall, cpu_s = timed(cmd, work / f"{side}-{tag}.log")
                for checkpoints in (work / f"{side}-{tag}").rglob("checkpoints"):  # 1 GB each for PVTv2-B2
                    shutil.rmtree(checkpoints)
                times[side, steps].append(wall)
                cpu[side, steps].append(cpu_s)
                print(f"  {side} {steps} steps: {wall:.1f} s wall, {cpu_s:.1f} s CPU", flush=True)
        print(f"round {r} (matmul {gflops[-1]:.0f} GFLOP/s)\n  wall: " + _ratios(
            {k: v[-1] for k, v in times.items()}, args) + "\n  CPU:  " + _ratios(
            {k: v[-1] for k, v in cpu.items()}, args), flush=True)
    print(f"median over {args.rounds} rounds (matmul 2048² fp32 {statistics.median(gflops):.0f} GFLOP/s, "
          f"range {min(gflops):.0f}-{max(gflops):.0f})")
    print("  wall: " + _ratios({k: statistics.median(v) for k, v in times.items()}, args))
    print("  CPU:  " + _ratios({k: statistics.median(v) for k, v in cpu.items()}, args))
    print(f"mean over {args.rounds} rounds (steady step pooled: all long runs minus all short runs)")
    print("  wall: " + _ratios({k: statistics.fmean(v) for k, v in times.items()}, args))


def _ratios(t: dict, args) -> str:
    span = args.long - args.short
    step = {side: (t[side, args.long] - t[side, args.short]) / span for side in ("ours", "open_clip")}
    start = {side: t[side, args.short] - args.short * step[side] for side in step}
    return (f"whole process {args.long} steps ours {t['ours', args.long]:.1f} s, open_clip "
            f"{t['open_clip', args.long]:.1f} s ({t['open_clip', args.long] / t['ours', args.long]:.2f}x); "
            f"{args.short} steps {t['ours', args.short]:.1f} s vs {t['open_clip', args.short]:.1f} s "
            f"({t['open_clip', args.short] / t['ours', args.short]:.2f}x); steady step ours "
            f"{1000 * step['ours']:.0f} ms, open_clip {1000 * step['open_clip']:.0f} ms, samples/s "
            f"{args.batch_size / step['ours']:.1f} vs {args.batch_size / step['open_clip']:.1f} "
            f"({step['open_clip'] / step['ours']:.2f}x); start-up ours {start['ours']:.1f} s, "
            f"open_clip {start['open_clip']:.1f} s")


if __name__ == "__main__":
    main()
