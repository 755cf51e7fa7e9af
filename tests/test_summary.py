"""The model summary: parameter counts, FLOPs, stage shapes and throughput for a config."""
import os

import pytest

from clip_hvt.summary import main, model_cfg_from_configs, summarize

TINY = os.path.join(os.path.dirname(__file__), "configs", "tiny.yaml")


def test_summary_counts_match_the_model_and_stage_shapes_follow_the_strides():
    cfg = model_cfg_from_configs(["--config", TINY])
    info = summarize(cfg, batch_size=2, steps=1)
    # pvt_v2_b0 at 32 px: strides 4, 8, 16, 32 and widths 32, 64, 160, 256
    assert info["stage_shapes"] == [(1, 32, 8, 8), (1, 64, 4, 4), (1, 160, 2, 2), (1, 256, 1, 1)]
    assert 3.0 < info["image_params_M"] < 4.0  # PVTv2-B0 trunk is 3.4 M without its head
    text_expected = (49408 * 32 + 16 * 32) / 1e6  # token + position embeddings dominate this tiny text tower
    assert info["text_params_M"] > text_expected
    assert info["image_gflops"] > 0 and info["text_gflops"] > 0 and info["pairs_per_s"] > 0


def test_later_configs_override_earlier_ones_and_missing_model_is_an_error(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  model_cfg:\n    vision_cfg:\n      image_size: 64\n")
    assert model_cfg_from_configs(["--config", TINY, "--config", str(override)])["vision_cfg"] == \
        {"image_size": 64, "timm_model_name": "pvt_v2_b0"}
    main(["--config", TINY, "--steps", "0"])
    out = capsys.readouterr().out
    assert "pvt_v2_b0 @ 32x32" in out and "stage 3: [1, 256, 1, 1]" in out and "pairs/s" not in out
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer: {}\n")
    with pytest.raises(SystemExit, match="required: model.model_cfg.embed_dim; give a model config, e.g. --config configs/models/"):
        model_cfg_from_configs(["--config", str(empty)])
