"""Cost of a distillation training step against a plain one, measured in the same run.

Three steps of the same student (the quickstart's model: PVTv2-B0 at 64 px, 3-layer text tower) on
the same batch, each forward + backward + AdamW step through ``CLIPModule``'s own loss code
(``teacher_targets`` + ``distill_loss``):

* ``plain``: the contrastive loss only;
* ``stored``: + DistillClipLoss + image-embedding distillation, teacher targets read from the batch
  (float16, as ``clip_hvt.data.teacher_features`` stores them);
* ``live``: the same losses with the teacher (the student's architecture) running in the step.

Rounds interleave the three so that a shared machine's load hits each alike; medians are printed, with
a 2048x2048 fp32 matmul's GFLOP/s for scale. Target: stored <= 1.05x plain.

Run: python benchmarks/bench_distill.py [--batch-size 64] [--rounds 15]
"""
import argparse
import statistics
import tempfile
import time

import torch

from clip_hvt.distill import Distill
from common import matmul_gflops
from clip_hvt.export import export_model
from clip_hvt.factory import create_model
from clip_hvt.loss import build_loss
from clip_hvt.module import CLIPModule

MODEL_CFG = {"embed_dim": 128, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "timm_pool": "avg",
                                              "timm_proj": "linear", "image_size": 64},
             "text_cfg": {"context_length": 32, "width": 128, "heads": 4, "layers": 3}}



def stepper(module: CLIPModule, batch: dict):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        targets = module.teacher_targets(batch)
        image_f, text_f = module.encode(batch["image"], batch["text"])
        loss, _ = module.distill_loss(image_f, text_f, module.model.logit_scale.exp(), None, targets)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    gflops = matmul_gflops()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as teacher_dir:
        export_model(create_model(MODEL_CFG), MODEL_CFG, teacher_dir)
        distill = dict(teacher=teacher_dir, clip_weight=1.0, embed_weight=1.0, precision="32")
        modules = {
            "plain": CLIPModule(MODEL_CFG),
            "stored": CLIPModule(MODEL_CFG, distill=Distill(**distill, stored_targets=True)),
            "live": CLIPModule(MODEL_CFG, distill=Distill(**distill)),
        }
    n = args.batch_size
    batch = {"image": torch.randn(n, 3, 64, 64), "text": torch.randint(0, 49408, (n, 32))}
    with torch.no_grad():
        targets = modules["live"].teacher_targets(batch)
    batch["teacher_image_emb"], batch["teacher_text_emb"] = (t.half() for t in targets)
    for name, module in modules.items():
        module.loss_fn = build_loss("clip", distill=name != "plain")
    steps = {name: stepper(module, batch) for name, module in modules.items()}
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step())
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 2048^2 fp32 matmul: "
          f"{gflops:.1f} GFLOP/s (for scale; a shared machine varies)")
    print(f"batch {n}, quickstart model, {args.rounds} interleaved rounds, median step time:")
    for name in steps:
        print(f"  {name:<7} {median[name] * 1e3:8.1f} ms   {median[name] / median['plain']:.3f}x plain")
    print(f"stored targets: {median['stored'] / median['plain']:.3f}x a plain step (target <= 1.05x)")


if __name__ == "__main__":
    main()
