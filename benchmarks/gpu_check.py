"""The GPU check's Python part (run it through ``benchmarks/gpu_check.sh``): one table, within a time budget.

Sections, in order of priority (a section that would overrun ``--budget`` is listed as skipped; one that
fails is listed with its error, and the rest still run):

1. bf16-mixed CLIP training, 224 px, batch 256, through ``CLIPModule`` and Lightning's ``Trainer`` (fused
   AdamW, the contrastive loss, the real step), on a fixed synthetic batch already on the GPU (the data
   path is measured by ``bench_loader.py``): ViT-B/16, PVTv2-B2, PVTv2-B2-ms, CvT-13, eager and
   ``model.compile``. Samples/s after warm-up, MFU (3 x forward FLOPs of both towers from
   ``clip_hvt.flops`` over the GPU's bf16 peak as Lightning knows it), peak memory.
2. CvT-13 against transformers' ``CvtModel`` in bf16 (``bench_cvt.compare``).
3. FSDP on one GPU through ``python -m clip_hvt.train``: 10 steps with a checkpoint, resume to 20, export;
   the export must equal ``last.ckpt``'s weights and load in plain open_clip with the same outputs.
4. DDP on one GPU through ``python -m clip_hvt.train``: a few steps.

``--dry-run`` runs every section on the CPU with tiny sizes (FSDP replaced by DDP: Lightning runs FSDP on
GPUs only), to check that the script itself works where no GPU is at hand.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# A hang before main() (an import, a driver call) that gpu_check.sh's hard stop ends still says where it was:
# every thread's stack on SIGTERM. main() then replaces this with the handler that prints the table.
faulthandler.register(signal.SIGTERM, chain=True)
print("gpu_check: importing torch, Lightning, clip_hvt", flush=True)

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and bench_cvt.py, also when imported by a test
from common import checkout_env  # noqa: E402

from clip_hvt.flops import model_costs
from clip_hvt.module import CLIPModule
from clip_hvt.summary import model_cfg_from_configs

ROOT = Path(__file__).resolve().parent.parent
TRAIN_MODELS = ["vit_b16", "pvt_v2_b2", "pvt_v2_b2_ms", "cvt_13"]


def model_cfg(name: str, tiny: bool) -> dict:
    # read by the config parser of every command: the text tower is a file reference (configs/text/*.yaml)
    cfg = model_cfg_from_configs(["--config", str(ROOT / "configs" / "models" / f"{name}.yaml")])
    if tiny:  # same towers, small inputs
        cfg["vision_cfg"]["image_size"] = 64
        cfg["text_cfg"].update(context_length=16, layers=2)
        if "timm_model_name" not in cfg["vision_cfg"]:
            cfg["vision_cfg"].update(layers=2, width=64, patch_size=16)
    return cfg


class _Repeat(torch.utils.data.Dataset):
    """The same batch ``n`` times (a DataLoader over it with ``batch_size=None`` yields it as is)."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def _now(self, device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = self._now(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = self._now(module.device)


def train_throughput(name: str, compile: bool, args) -> dict:
    cfg = model_cfg(name, args.dry_run)
    device = torch.device(args.accelerator if args.accelerator == "cpu" else "cuda")
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    batch = {"image": torch.randn(args.batch_size, 3, size, size, device=device),
             "text": torch.randint(0, 49408, (args.batch_size, ctx), device=device)}
    steps = args.warmup + args.steps
    module = CLIPModule(cfg, warmup_steps=10, compile=compile)
    timer = _StepTimer(args.warmup)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, precision="bf16-mixed", max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=None))
    rate = args.batch_size * args.steps / (timer.end - timer.start)
    costs = model_costs(cfg)
    achieved = 3 * (costs["image_flops"] + costs["text_flops"]) * rate
    peak = bf16_peak(device, args.peak_tflops)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del trainer, module, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"samples/s": f"{rate:.1f}", "TFLOP/s": f"{achieved / 1e12:.1f}",
            "MFU": f"{achieved / peak:.1%}" if peak else "n/a (no peak known)", "peak GiB": f"{memory:.1f}"}


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 FLOP/s of the GPU: ``--peak-tflops``, else Lightning's table, else H100/H200 SXM's 989 TFLOP/s
    for names Lightning's table misses (it knows "H200" only with an SXM1/NVL1 suffix)."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops
    peak = get_available_flops(device, "bf16-mixed")
    if peak is None and any(chip in torch.cuda.get_device_name(device).lower() for chip in ("h100", "h200")):
        peak = 989.4e12
    return peak


def cvt_vs_transformers(args) -> dict:
    from bench_cvt import compare
    device = "cpu" if args.dry_run else "cuda"
    rates = compare("bf16", batch_size=args.batch_size, img_size=64 if args.dry_run else 224,
                    iters=2 if args.dry_run else 10, rounds=3, warmup=1 if args.dry_run else 3, device=device)
    hf, ours = (sorted(rates[k])[len(rates[k]) // 2] for k in ("transformers", "ours"))
    return {"samples/s": f"{ours:.1f} vs {hf:.1f}", "note": f"ours / CvtModel {ours / hf:.2f}x (goal >= 2x)"}


def _train_cli(config: dict, work: Path, *extra: str) -> None:
    path = work / "config.json"
    path.write_text(json.dumps(config))
    env = checkout_env(WANDB_MODE="offline")
    log = work / "train.log"
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "clip_hvt.train", "--config", str(path), *extra],
                              cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"clip_hvt.train exited {proc.returncode}: {' | '.join(tail)}")


def _cli_config(strategy: str, work: Path, args, steps: int) -> dict:
    cfg = model_cfg("pvt_v2_b0" if args.dry_run else "pvt_v2_b2_ms", args.dry_run)
    cfg["vision_cfg"]["image_size"] = 64 if args.dry_run else 224
    return {
        "seed_everything": 0, "final_validation": False,
        "trainer": {"accelerator": args.accelerator, "devices": 1, "strategy": strategy,
                    "precision": "bf16-mixed", "max_steps": steps, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                    "log_every_n_steps": 5, "default_root_dir": str(work), "logger": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(work / "checkpoints"), "save_last": True,
                                                 "every_n_train_steps": 10}}]},
        "model": {"model_cfg": cfg, "warmup_steps": 5},
        "data": {"shapes": {"seed": 0, "train_samples": 2000, "val_samples": 100, "zeroshot_per_class": 2},
                 "batch_size": 4 if args.dry_run else 64, "num_workers": 2},
    }


def fsdp_resume_export(args) -> dict:
    import open_clip
    from clip_hvt.export import model_from_checkpoint
    strategy = "ddp" if args.dry_run else "fsdp"
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{strategy}-") as tmp:  # checkpoints: gone afterwards
        work = Path(tmp)
        _train_cli(_cli_config(strategy, work, args, 10), work)
        _train_cli(_cli_config(strategy, work, args, 20), work, "--ckpt_path", "last",
                   "--export_dir", str(work / "export"))
        ckpt = torch.load(work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        if ckpt["global_step"] != 20:
            raise RuntimeError(f"resumed run ended at step {ckpt['global_step']}, not 20")
        trained, cfg = model_from_checkpoint(work / "checkpoints" / "last.ckpt")
        exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{work / 'export'}")
        theirs, ours = exported.state_dict(), trained.state_dict()
        if theirs.keys() != ours.keys():
            raise RuntimeError(f"export keys differ from the checkpoint's: {sorted(theirs.keys() ^ ours.keys())[:3]}")
        weights = max((theirs[k].float() - ours[k].float()).abs().max().item() for k in ours)
        size = cfg["vision_cfg"]["image_size"]
        images, texts = torch.randn(2, 3, size, size), torch.randint(0, 49408, (2, cfg["text_cfg"]["context_length"]))
        trained.eval(), exported.eval()
        with torch.no_grad():
            outputs = max((a - b).abs().max().item() for a, b in zip(
                (trained.encode_image(images), trained.encode_text(texts)),
                (exported.encode_image(images), exported.encode_text(texts))))
        if weights or outputs > 1e-5:
            raise RuntimeError(f"export differs from last.ckpt: weights {weights:.2e}, outputs {outputs:.2e}")
        return {"note": f"{strategy}: 10 steps, checkpoint, resume to step 20, export == last.ckpt "
                        f"(weights max diff {weights:.0e}, outputs {outputs:.1e}), loads in open_clip"}


def ddp_steps(args) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp-") as tmp:
        _train_cli(_cli_config("ddp", Path(tmp), args, 5), Path(tmp))
    return {"note": f"ddp, 1 device: 5 steps in {time.perf_counter() - start:.0f} s (whole process)"}


class _TimeLimit(BaseException):
    """SIGTERM from gpu_check.sh's hard stop: not caught by a section, so the table still prints."""


def _stop(signum, frame):
    raise _TimeLimit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script, not the GPU")
    parser.add_argument("--budget", type=float, default=450, help="seconds; sections that would overrun are skipped")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (4 with --dry-run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per training row (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: Lightning's table)")
    args = parser.parse_args()
    args.accelerator = "cpu" if args.dry_run else "gpu"
    args.batch_size = args.batch_size or (4 if args.dry_run else 256)
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.warmup = args.warmup or (1 if args.dry_run else 5)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --dry-run to check the script on the CPU")
    torch.set_float32_matmul_precision("high")
    deadline = time.perf_counter() + args.budget
    # (name, setting, function, seconds it is expected to need at most on an H100-class GPU)
    sections = [(f"train {m}", "bf16 eager", lambda m=m: train_throughput(m, False, args), 30) for m in TRAIN_MODELS]
    sections += [("cvt_13 vs CvtModel", "bf16 fwd+bwd", lambda: cvt_vs_transformers(args), 30),
                 ("fsdp 1 GPU", "resume + export", lambda: fsdp_resume_export(args), 90),
                 ("ddp 1 GPU", "5 steps", lambda: ddp_steps(args), 40)]
    sections += [(f"train {m}", "bf16 compile", lambda m=m: train_throughput(m, True, args), 75) for m in TRAIN_MODELS]
    rows = []
    signal.signal(signal.SIGTERM, _stop)
    try:
        for name, setting, run, needs in sections:
            left = deadline - time.perf_counter()
            if left < needs and not args.dry_run:
                rows.append((name, setting, {"note": f"skipped: {left:.0f} s of the budget left, needs ~{needs} s"}))
                continue
            start = time.perf_counter()
            try:
                result = run()
            except _TimeLimit:
                rows.append((name, setting, {"note": "stopped by the time limit"}))
                raise
            except Exception as err:  # one failing section must not hide the others' figures
                traceback.print_exc()
                result = {"note": f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
            result["s"] = f"{time.perf_counter() - start:.0f}"
            rows.append((name, setting, result))
            print(f"gpu_check: {name} [{setting}] {result}", flush=True)
    except _TimeLimit:
        pass
    finally:
        print_table(rows, args)


def print_table(rows: list, args) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    print(f"\n{device}; torch {torch.__version__}; batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    columns = ["samples/s", "TFLOP/s", "MFU", "peak GiB", "s", "note"]
    print("| check | setting | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, setting, result in rows:
        print(f"| {name} | {setting} | " + " | ".join(result.get(c, "") for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
