"""Every shipped config parses, names a registered encoder, and the run configs compose with model configs."""
import glob
import os

import pytest
import torch
import yaml

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


# ---- composition: a run config names its data section and text tower, each living once in its own file ----

RUN_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def resolved(*args: str) -> dict:
    """The training config as ``python -m clip_hvt.train ARGS --print_config`` resolves it."""
    import contextlib
    import io

    from clip_hvt import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        train.main([*args, "--print_config"])
    assert exc.value.code in (0, None), exc.value.code
    return yaml.safe_load(out.getvalue())


def shared(name: str) -> dict:
    return yaml.safe_load(open(os.path.join(ROOT, "configs", name)))


def test_a_run_config_takes_its_data_section_and_text_tower_from_the_shared_files():
    cfg = resolved("--config", os.path.join(ROOT, "configs", "quickstart.yaml"))
    data, text = shared("data/shapes.yaml"), shared("text/w128.yaml")
    assert {k: cfg["data"][k] for k in ("batch_size", "num_workers", "sample_shuffle")} == \
        {k: data[k] for k in ("batch_size", "num_workers", "sample_shuffle")} == \
        {"batch_size": 64, "num_workers": 1, "sample_shuffle": 1000}
    assert cfg["data"]["shapes"]["seed"] == data["shapes"]["seed"] == 0
    assert {k: cfg["model"]["model_cfg"]["text_cfg"][k] for k in text} == text
    assert cfg["model"]["lr"] == 5e-4 and cfg["trainer"]["max_steps"] == 400  # the run config's own schedule


def test_later_configs_and_dotted_flags_override_a_shared_file_field_by_field(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  batch_size: 7\nmodel:\n  model_cfg:\n    text_cfg:\n      layers: 1\n")
    cfg = resolved("--config", os.path.join(ROOT, "configs", "quickstart.yaml"), "--config", str(override),
                   "--data.num_workers", "0", "--model.model_cfg.text_cfg.width", "64")
    assert cfg["data"]["batch_size"] == 7 and cfg["data"]["num_workers"] == 0
    assert cfg["data"]["sample_shuffle"] == 1000 and cfg["data"]["shapes"]["seed"] == 0  # the rest of data/shapes.yaml
    text = cfg["model"]["model_cfg"]["text_cfg"]
    assert (text["layers"], text["width"], text["context_length"], text["heads"]) == (1, 64, 32, 4)


def test_a_data_file_named_by_a_later_config_or_flag_merges_over_the_earlier_data_section():
    # distill_stored names data/teacher_shards.yaml: its shards replace the shapes data, the quickstart's batch stays
    cfg = resolved("--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                   "--config", os.path.join(ROOT, "configs", "distill_stored.yaml"))
    assert cfg["data"]["shapes"] is None and cfg["data"]["train_shards"] == "runs/teacher_shards/*.tar"
    assert (cfg["data"]["batch_size"], cfg["data"]["sample_shuffle"]) == (64, 1000)
    flag = resolved("--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                    "--data", os.path.join(ROOT, "configs", "data", "shapes_tiny.yaml"), "--data.batch_size", "2")
    assert flag["data"]["shapes"]["train_samples"] == shared("data/shapes_tiny.yaml")["shapes"]["train_samples"] == 256
    assert (flag["data"]["batch_size"], flag["data"]["sample_shuffle"]) == (2, 64)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: os.path.basename(p))
def test_run_configs_name_their_data_section_and_text_tower_instead_of_repeating_them(path):
    cfg = yaml.safe_load(open(path))
    data = cfg.get("data")
    assert data is None or isinstance(data, str), f"{path}: data settings belong in configs/data/"
    text = ((cfg.get("model") or {}).get("model_cfg") or {}).get("text_cfg")
    assert text is None or isinstance(text, str), f"{path}: a text tower belongs in configs/text/"
    for ref in (data, text):
        assert ref is None or os.path.isfile(os.path.join(os.path.dirname(path), ref)), ref
    from clip_hvt.train import TRAINER_DEFAULTS
    assert not set(TRAINER_DEFAULTS) & set(cfg.get("trainer") or {}), f"{path}: set once in clip_hvt.train"


def test_every_run_validates_by_steps_without_a_sanity_pass_and_checkpoints_atomically(tmp_path):
    cfg = resolved("--config", os.path.join(ROOT, "configs", "gpu.yaml"))
    assert cfg["trainer"]["check_val_every_n_epoch"] is None and cfg["trainer"]["num_sanity_val_steps"] == 0
    assert cfg["trainer"]["plugins"] == [{"class_path": "clip_hvt.checkpoint.AtomicCheckpointIO"}]
    assert cfg["seed_everything"] == 0
    from clip_hvt import train
    from clip_hvt.checkpoint import AtomicCheckpointIO
    built = train.build(["--config", os.path.join(ROOT, "configs", "cpu_smoke.yaml"), "--config",
                         os.path.join(ROOT, "configs", "models", "pvt_v2_b0.yaml"),
                         "--data.shapes.root", str(tmp_path / "shapes"), "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(built.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert built.trainer.num_sanity_val_steps == 0 and built.trainer.check_val_every_n_epoch is None
