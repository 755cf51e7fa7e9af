"""The one FLOP counter: attention counted on every backend, meta-device counts, MFU logged in training."""
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clip_hvt import factory, flops, train
from conftest import hf_text_cfg

TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
TINY = {
    "vit": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                            "head_width": 32}, "text_cfg": TEXT},
    # 224 px: below ~1M attention scores our CvT computes attention explicitly on the CPU, not with the fused kernel
    "cvt": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "cvt_13", "image_size": 224}, "text_cfg": TEXT},
    "pvt_v2": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32}, "text_cfg": TEXT},
    "pvt_v2_ms": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "pvt_v2_b0_ms", "timm_pool": "attn",
                                                  "timm_proj": "linear", "image_size": 32}, "text_cfg": TEXT},
}


def test_attention_is_counted_on_the_cpu_flash_kernel_as_on_the_math_path():
    b, h, L, S, d = 2, 3, 10, 7, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (L, S, S))
    reference = 2 * 2 * b * h * L * S * d  # q @ k^T and attn @ v, 2 FLOPs per multiply-add
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            assert flops.count_flops(F.scaled_dot_product_attention, q, k, v) == reference
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        # flash backward, as torch counts its CUDA kernel: 5 matmuls (scores recomputed, dV, dP, dQ, dK)
        assert flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) \
            == reference + 5 * reference // 2
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # what this fixes: torch alone counts 0 here
        counter = FlopCounterMode(display=False)
        with counter:
            F.scaled_dot_product_attention(q, k, v)
        assert counter.get_total_flops() == 0


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "cvt" else f for f in sorted(TINY)])
def test_tower_flops_are_the_same_with_fused_attention_on_and_off_and_on_the_meta_device(family):
    cfg = TINY[family]
    torch.manual_seed(0)
    model = factory.create_model(cfg).eval()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = flops.tower_costs(model, cfg)
    with sdpa_kernel(SDPBackend.MATH):
        math = flops.tower_costs(model, cfg)
    assert fused == math
    assert flops.model_costs(cfg) == fused
    assert fused["image_params"] == sum(p.numel() for p in model.visual.parameters())
    assert fused["image_params"] + fused["text_params"] == sum(p.numel() for p in model.parameters())
    # more than torch's own count on the fused kernel: the attention it misses is in
    counter = FlopCounterMode(display=False)
    size = cfg["vision_cfg"]["image_size"]
    with counter, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model.encode_image(torch.zeros(1, 3, size, size))
    assert fused["image_flops"] > counter.get_total_flops()


def test_vit_image_flops_equal_the_hand_count():
    cfg = TINY["vit"]
    w, n, layers, mlp = 64, 1 + (32 // 8) ** 2, 2, 4 * 64
    per_layer = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * mlp
    patch_embed = 2 * (32 // 8) ** 2 * (3 * 8 * 8) * w
    projection = 2 * w * 32  # pooled token to embed_dim
    assert flops.model_costs(cfg)["image_flops"] == patch_embed + layers * per_layer + projection


def test_flops_per_batch_is_three_forwards_in_training_one_in_evaluation():
    costs = {"image_flops": 10, "text_flops": 5, "image_params": 1, "text_params": 1}
    assert flops.flops_per_batch(costs, 4, training=True) == 3 * 4 * 15
    assert flops.flops_per_batch(costs, 4, training=False) == 4 * 15


@pytest.mark.slow
def test_training_logs_flops_per_second_and_mfu_against_a_configured_peak(tmp_path, tiny_config):
    cfg = yaml.safe_load(Path(tiny_config).read_text())
    cfg["trainer"]["callbacks"] = [{"class_path": "clip_hvt.flops.ThroughputMonitor", "init_args": {
        "batch_size_fn": "clip_hvt.callbacks.batch_size", "peak_flops": 1.0e12, "window_size": 2}}]
    cfg["trainer"]["default_root_dir"] = str(tmp_path)  # the run directory: the logger writes under it
    cfg["data"]["shapes"]["root"] = str(tmp_path / "shapes")
    config = tmp_path / "mfu.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(config), "--final_validation", "false"])
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("train/device/mfu")]
    assert logged, f"no MFU logged; columns: {sorted(rows[0])}"
    costs = flops.model_costs(cfg["model"]["model_cfg"])
    per_sample = 3 * (costs["image_flops"] + costs["text_flops"])
    for row in logged:
        flops_per_s, samples_per_s = float(row["train/device/flops_per_sec"]), float(row["train/device/samples_per_sec"])
        assert flops_per_s == pytest.approx(per_sample * samples_per_s, rel=1e-6)
        assert float(row["train/device/mfu"]) == pytest.approx(flops_per_s / 1e12, rel=1e-6)


def test_tower_costs_leave_every_submodule_in_its_mode():
    # A locked tower keeps its norms in eval mode inside a model in training mode; counting must not undo that.
    model = factory.create_model(TINY["pvt_v2"]).train()
    norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.LayerNorm)][:2]
    for norm in norms:
        norm.eval()
    before = {name: m.training for name, m in model.named_modules()}
    flops.tower_costs(model, TINY["pvt_v2"])
    assert {name: m.training for name, m in model.named_modules()} == before
    assert norms and not any(norm.training for norm in norms)


def test_a_hugging_face_text_tower_is_counted_on_real_weights(local_hf_text_tower):
    # its attention-mask check reads values, which the meta device has not: counted on zeros instead
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": hf_text_cfg(local_hf_text_tower)}
    torch.manual_seed(0)
    model = factory.create_model(cfg)
    expected = flops.count_flops(model.encode_text, torch.zeros(1, 16, dtype=torch.long))
    w, n, mlp = 32, 16, 64  # the tiny BERT: one layer, 16 tokens; then BERT's pooler on [CLS] and the projection
    layer = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * mlp
    assert expected == layer + 2 * w * w + 2 * w * cfg["embed_dim"]
    assert flops.tower_costs(model, cfg)["text_flops"] == expected  # what CLIPModule.setup counts
    assert flops.model_costs(cfg)["text_flops"] == expected  # what the summary and experiment tables count
    assert flops.model_costs(cfg)["image_flops"] == flops.count_flops(model.encode_image, torch.zeros(1, 3, 32, 32))
