"""Every shipped config parses, names a registered encoder, and the run configs compose with model configs."""
import glob
import os

import pytest
import torch

from clip_hvt.factory import create_model, validate_model_cfg
from clip_hvt.summary import model_cfg_from_configs

ROOT = os.path.dirname(os.path.dirname(__file__))
MODEL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "models", "*.yaml")))


def test_a_config_exists_for_every_family_and_size():
    names = {os.path.basename(p)[:-5] for p in MODEL_CONFIGS}
    expected = {f"pvt_v2_{b}" for b in ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")}
    expected |= {"cvt_13", "cvt_21", "cvt_w24", "vit_ti16", "vit_s16", "vit_b16", "resnet50", "convnext_tiny"}
    expected |= {f"{n}_ms" for n in expected if n.startswith(("pvt", "cvt"))}
    assert expected <= names


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: os.path.basename(p))
def test_model_config_is_valid_open_clip_schema(path):
    cfg = model_cfg_from_configs(["--config", path])
    validate_model_cfg(cfg)  # raises on unknown keys or unregistered timm names
    assert cfg["vision_cfg"]["image_size"] == 224


@pytest.mark.parametrize("name", ["pvt_v2_b0_ms", "cvt_13", "vit_ti16"])
def test_small_model_configs_build_and_run_at_a_smaller_size(name):
    cfg = model_cfg_from_configs(["--config", os.path.join(ROOT, "configs", "gpu.yaml"),
                                  "--config", os.path.join(ROOT, "configs", "models", f"{name}.yaml")])
    size = 224 if name.startswith("vit") else 64  # open_clip's ViT has a fixed position-embedding grid
    cfg["vision_cfg"]["image_size"] = size
    model = create_model(cfg)
    assert model.encode_image(torch.zeros(1, 3, size, size)).shape == (1, cfg["embed_dim"])
