"""benchmarks/gpu_check.py reads the shipped model configs as training does (a text tower given as a file
included), so the GPU check, which only runs where a GPU is lent, does not fail on its first line there."""
import importlib.util
from pathlib import Path

import pytest

from clip_hvt.flops import model_costs

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.parametrize("tiny", [False, True], ids=["gpu", "dry-run"])
@pytest.mark.parametrize("name", gpu_check.TRAIN_MODELS)
def test_train_model_configs_resolve_and_build(name, tiny):
    cfg = gpu_check.model_cfg(name, tiny)
    assert isinstance(cfg["text_cfg"], dict) and cfg["text_cfg"]["width"] > 0
    assert (cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]) == ((64, 16) if tiny else (224, 77))
    costs = model_costs(cfg)  # the model built on the meta device
    assert costs["image_flops"] > 0 and costs["text_flops"] > 0
