"""The train CLI end to end on tiny generated data: fit, resume, export, and bad input."""
import csv
import gc
import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clip_hvt import train
from clip_hvt.export import main as export_main
from conftest import hf_text_cfg


def _logged_steps(metrics_csv):
    with open(metrics_csv) as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _run(tiny_config, shapes_root, *extra):
    return train.main(["--config", tiny_config, "--data.shapes.root", str(shapes_root), *extra])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fit_validates_exports_and_resume_continues_global_step(tiny_config, in_tmp, capsys):
    shapes = in_tmp / "shapes"
    metrics = _run(tiny_config, shapes, "--export_dir", "export")
    out = capsys.readouterr().out
    assert "zero-shot top-1" in out and "exported to export" in out
    assert set(metrics) >= {"zeroshot/top1", "zeroshot/top5", "val/image_to_text_R@1", "val/text_to_image_R@10"}
    assert metrics["zeroshot/chance"] == pytest.approx(1 / 30)
    assert (shapes / "manifest.json").is_file()  # generated on first use

    ckpt_dir = in_tmp / "runs" / "tiny" / "checkpoints"
    first = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    assert first["global_step"] == 4

    _run(tiny_config, shapes, "--ckpt_path", "last", "--trainer.max_steps", "6", "--final_validation", "false")
    resumed = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    assert resumed["global_step"] == 6
    steps = _logged_steps(in_tmp / "runs" / "tiny" / "lightning_logs" / "version_1" / "metrics.csv")
    assert min(steps) >= 4 and max(steps) == 5  # the second run trained steps 4 and 5 only: resumed, not restarted

    config = json.loads((in_tmp / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "pvt_v2_b0"
    assert config["preprocess_cfg"]["size"] == 32


def _model_weights(path):
    state = torch.load(path, weights_only=True, map_location="cpu")
    return state["global_step"], {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}


def _assert_export_holds(export_dir, weights):
    exported = load_file(export_dir / "open_clip_model.safetensors")
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


def test_the_command_freezes_what_its_imports_built_before_training(monkeypatch):
    """`run` (python -m clip_hvt.train) freezes what is alive before it calls `main`."""
    frozen_in_main = []
    monkeypatch.setattr(train, "main", lambda: frozen_in_main.append(gc.get_freeze_count()))
    gc.unfreeze()
    try:
        train.run()
    finally:
        gc.unfreeze()
    assert frozen_in_main and frozen_in_main[0] > 100_000  # torch, Lightning, open_clip, timm: ~600k objects


def test_last_checkpoint_holds_the_final_step_between_step_saves(tiny_config, in_tmp):
    """5 steps, a step checkpoint every 2: last.ckpt is step 5 (Lightning's own stopped at step 4), and the
    export and the final validation are of that state."""
    metrics = _run(tiny_config, in_tmp / "shapes", "--trainer.max_steps", "5", "--trainer.val_check_interval", "5",
                   "--export_dir", "export")
    ckpt_dir = in_tmp / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    step, weights = _model_weights(ckpt_dir / "last.ckpt")
    assert step == 5
    _assert_export_holds(in_tmp / "export", weights)
    assert {"zeroshot/top1", "val/image_to_text_R@1"} <= set(metrics)  # the final validation ran


def test_final_validation_and_export_on_slurm_ignore_a_stale_hpc_checkpoint(tiny_config, in_tmp, monkeypatch):
    """A requeued SLURM attempt trains on from the pre-timeout save (hpc_ckpt_1.ckpt) to the end. With
    ckpt_path None, Lightning's validate loads the newest hpc checkpoint on SLURM: the final validation
    measured, and the export wrote, the stale state of that save instead of the trained one."""
    shapes = in_tmp / "shapes"
    _run(tiny_config, shapes, "--trainer.max_steps", "2", "--final_validation", "false")  # the first attempt
    root = in_tmp / "runs" / "tiny"
    (root / "hpc_ckpt_1.ckpt").write_bytes((root / "checkpoints" / "last.ckpt").read_bytes())
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "clip", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    _run(tiny_config, shapes, "--ckpt_path", str(root / "hpc_ckpt_1.ckpt"), "--export_dir", "export")

    step, weights = _model_weights(root / "checkpoints" / "last.ckpt")
    hpc_step, hpc_weights = _model_weights(root / "hpc_ckpt_1.ckpt")
    assert (hpc_step, step) == (2, 4)
    _assert_export_holds(in_tmp / "export", weights)
    assert not all(torch.equal(weights[k], hpc_weights[k]) for k in weights)


def test_export_cli_matches_checkpoint_through_open_clip(tiny_config, in_tmp):
    _run(tiny_config, in_tmp / "shapes", "--final_validation", "false")
    ckpt = in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    export_main(["--ckpt", str(ckpt), "--out", str(in_tmp / "oc")])

    from clip_hvt.module import CLIPModule
    module = CLIPModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{in_tmp / 'oc'}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{in_tmp / 'oc'}")
    captions = ["a small red circle on the left", "the star is blue"]
    from clip_hvt.factory import create_tokenizer
    assert torch.equal(tokenizer(captions), create_tokenizer(module.hparams.model_cfg)(captions))

    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = module.encode(images, tokenizer(captions + ["x"]))
        theirs = (model.encode_image(images, normalize=True), model.encode_text(tokenizer(captions + ["x"]), normalize=True))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-5
    assert torch.equal(model.logit_scale, module.model.logit_scale)


def test_shard_pattern_matching_nothing_stops_with_listing(tiny_config, in_tmp, capsys):
    (in_tmp / "shards").mkdir()
    (in_tmp / "shards" / "real-000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", tiny_config, "--data.shapes", "null",
                    "--data.train_shards", str(in_tmp / "shards" / "typo-{000000..000003}.tar")])
    message = str(exc.value.code)
    assert "matched no files" in message and "real-000000.tar" in message


def test_unknown_model_name_lists_close_matches(tiny_config, in_tmp):
    with pytest.raises(SystemExit) as exc:
        _run(tiny_config, in_tmp / "shapes", "--model.model_cfg.vision_cfg.timm_model_name", "pvt_v2_b9")
    message = str(exc.value.code)
    assert "unknown image encoder 'pvt_v2_b9'" in message and "pvt_v2_b0" in message


def test_unknown_config_key_is_rejected_with_valid_keys(tiny_config, in_tmp):
    with pytest.raises(SystemExit) as exc:
        _run(tiny_config, in_tmp / "shapes", "--model.lrate", "0.1")
    message = str(exc.value.code)
    assert "unknown key 'model.lrate' (did you mean 'lr'?)" in message and "\n" not in message


def test_unknown_model_cfg_key_suggests_the_right_one(tiny_config, in_tmp):
    with pytest.raises(SystemExit) as exc:
        _run(tiny_config, in_tmp / "shapes", "--model.model_cfg.text_cfg.widht", "32")
    message = str(exc.value.code)
    assert "text_cfg.widht' (did you mean 'width'?)" in message and "Valid keys under 'model.model_cfg.text_cfg'" in message


def test_print_config_shows_linked_model_cfg(tiny_config, in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(tiny_config, in_tmp / "shapes", "--print_config")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "timm_model_name: pvt_v2_b0" in out and "class_path: clip_hvt.callbacks.ZeroShotEvaluation" in out


def test_skip_monitor_and_requeue_handler_are_added_when_the_config_lists_no_callbacks(tiny_config, tmp_path):
    from clip_hvt.callbacks import SkipMonitor
    from clip_hvt.slurm import RequeueOnSignal

    cli = train.build(["--config", tiny_config, "--data.shapes.root", str(tmp_path / "shapes"),
                       "--trainer.callbacks", "[]"])
    assert sum(isinstance(c, SkipMonitor) for c in cli.trainer.callbacks) == 1
    assert sum(isinstance(c, RequeueOnSignal) for c in cli.trainer.callbacks) == 1
    listed = train.build(["--config", tiny_config, "--data.shapes.root", str(tmp_path / "shapes")])
    monitors = [c for c in listed.trainer.callbacks if isinstance(c, SkipMonitor)]
    assert len(monitors) == 1 and monitors[0].log_every_n_steps == 1  # the config's own, not a second one


def test_a_hugging_face_text_tower_trains(tiny_config, in_tmp, local_hf_text_tower):
    # its FLOPs cannot be counted on the meta device (the attention-mask check reads values): setup must not fail
    text = json.dumps(hf_text_cfg(local_hf_text_tower))
    _run(tiny_config, in_tmp / "shapes", "--model.model_cfg.text_cfg", text, "--trainer.max_steps", "2",
         "--final_validation", "false")
    assert _logged_steps(in_tmp / "runs" / "tiny" / "lightning_logs" / "version_0" / "metrics.csv") == [0, 1]
    ckpt = torch.load(in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2

