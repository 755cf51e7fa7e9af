"""The commands as a user drives them: the typed model config, one run directory, and every input a user
can get wrong ending in one line that names the problem and the fix."""
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from clip_hvt import cli, export, summary, train
from clip_hvt.convert_cvt import main as convert_main
from clip_hvt.factory import create_model

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
REFERENCES = sorted((ROOT / "tests" / "data" / "open_clip_configs").glob("*.json"))
CONFIG_FILES = {"quickstart": ["configs/quickstart.yaml"], "cpu_ddp": ["configs/cpu_ddp.yaml"], "tiny": [TINY]}
TINY_TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}


def model_cfg(*args: str) -> dict:
    """open_clip's dict for a training command line, parsed as every command parses it."""
    return summary.model_cfg_from_configs(list(args))


def one_line_error(fn, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    message = str(exc.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("reference", REFERENCES, ids=lambda p: p.stem)
def test_export_of_the_typed_config_equals_the_untyped_export_byte_for_byte(reference, tmp_path):
    # The references were written by main's (untyped, dict) export code before the typed config.
    files = CONFIG_FILES.get(reference.stem, [f"configs/models/{reference.stem}.yaml"])
    args = [a for f in files for a in ("--config", str(ROOT / f))]
    export.export_state_dict({}, model_cfg(*args), tmp_path)
    assert (tmp_path / export.CONFIG_NAME).read_bytes() == reference.read_bytes()


def test_dotted_overrides_change_one_field_each():
    base = model_cfg("--config", TINY)
    assert base == {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "pvt_v2_b0"},
                    "text_cfg": TINY_TEXT}
    changed = model_cfg("--config", TINY, "--model.model_cfg.vision_cfg.image_size", "96",
                        "--model.model_cfg.embed_dim", "256", "--model.model_cfg.text_cfg.layers", "2")
    assert changed == {"embed_dim": 256, "vision_cfg": {"image_size": 96, "timm_model_name": "pvt_v2_b0"},
                       "text_cfg": {**TINY_TEXT, "layers": 2}}
    assert model_cfg("--config", TINY, "--model.model_cfg.vision_cfg.image_size", "[64, 96]")["vision_cfg"][
        "image_size"] == [64, 96]


def test_repeated_config_files_merge_field_by_field_and_model_files_share_the_text_tower(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  model_cfg:\n    vision_cfg:\n      image_size: 64\n    text_cfg:\n      layers: 6\n")
    cfg = model_cfg("--config", str(ROOT / "configs/models/cvt_13_ms.yaml"), "--config", str(override))
    assert cfg["vision_cfg"] == {"image_size": 64, "timm_model_name": "cvt_13_ms", "timm_pool": "attn",
                                 "timm_proj": "linear", "timm_drop_path": 0.1}
    assert cfg["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 6}
    for path in (ROOT / "configs" / "models").glob("*.yaml"):
        assert "text_cfg: ../text/" in path.read_text(), path  # the text tower lives once, in configs/text


def test_print_config_shows_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        summary.main(["--config", TINY, "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "timm_model_name: pvt_v2_b0" in out and "patch_dropout: null" in out and "hf_model_name: null" in out


@pytest.mark.parametrize("args, expected", [
    (["--model.model_cfg.vision_cfg.image_sise", "96"],
     "unknown key 'model.model_cfg.vision_cfg.image_sise' (did you mean 'image_size'?)"),
    (["--model.model_cfg.vision_cfg.image_size", "big"], 'Parser key "model.model_cfg.vision_cfg.image_size"'),
    (["--model.model_cfg.embed_dim", "wide"], 'Parser key "model.model_cfg.embed_dim"'),
    (["--model.model_cfg.vision_cfg.timm_model_name", "pvt_v2_b9"], "unknown image encoder 'pvt_v2_b9'"),
], ids=["unknown-key", "image-size-type", "embed-dim-type", "unknown-encoder"])
def test_a_wrong_model_flag_ends_in_one_line(args, expected):
    message = one_line_error(summary.main, ["--config", TINY, "--steps", "0", *args])
    assert message.startswith("python -m clip_hvt.summary: error: ") and expected in message


def test_an_unknown_key_in_a_config_file_gets_did_you_mean(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  model_cfg:\n    text_cfg:\n      widht: 64\n")
    message = one_line_error(summary.main, ["--config", TINY, "--config", str(typo)])
    assert "unknown key 'model.model_cfg.text_cfg.widht' (did you mean 'width'?)" in message


@pytest.mark.parametrize("pool", ["attn", "avg", "concat:grid=2"])
def test_summary_works_for_multiscale_models_with_every_pooling(pool, capsys):
    summary.main(["--config", str(ROOT / "configs/models/pvt_v2_b0_ms.yaml"), "--steps", "0",
                  "--model.model_cfg.vision_cfg.image_size", "64", "--model.model_cfg.vision_cfg.timm_pool", pool])
    out = capsys.readouterr().out
    assert "pvt_v2_b0_ms @ 64x64" in out and "stage 3: [1, 256, 2, 2]" in out


def test_summary_reads_the_readme_example_config(capsys):
    summary.main(["--config", str(ROOT / "configs/gpu.yaml"), "--config", str(ROOT / "configs/models/cvt_13_ms.yaml"),
                  "--model.model_cfg.vision_cfg.image_size", "64", "--steps", "0"])
    assert "cvt_13_ms @ 64x64" in capsys.readouterr().out


@pytest.mark.parametrize("vision, expected", [
    ({"timm_model_name": "swin_tiny_patch4_window7_224_ms", "timm_pool": "attn", "image_size": 64},
     "vision_cfg.image_size 64 does not fit swin_tiny_patch4_window7_224_ms"),
    ({"layers": 1, "width": 64, "head_width": 32, "patch_size": 16, "image_size": 72},
     "vision_cfg.image_size 72 is not a multiple of the patch size 16 of the open_clip ViT image tower: its "
     "border pixels would be dropped. Use a multiple, e.g. 64 or 80"),
    ({"timm_model_name": "convnext_atto", "image_size": 70}, "not a multiple of the patch size 4 of convnext_atto"),
], ids=["swin-64", "vit16-72", "convnext-70"])
def test_an_image_size_the_tower_cannot_take_is_an_error_before_training(vision, expected):
    with pytest.raises(ValueError, match="image_size") as exc:
        create_model({"embed_dim": 32, "vision_cfg": vision, "text_cfg": TINY_TEXT})
    assert expected in str(exc.value)


def test_an_image_size_the_tower_pads_is_a_warning():
    import timm
    from types import SimpleNamespace

    from clip_hvt.factory import check_image_size
    padding_vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=72, dynamic_img_size=True,
                                    dynamic_img_pad=True, depth=1)
    with pytest.warns(UserWarning, match="pads it to a multiple of its patch size 16; 64 or 80 wastes nothing"):
        check_image_size(SimpleNamespace(visual=padding_vit), {"vision_cfg": {"image_size": 72, "timm_model_name": "vit"}})


def _tiny_checkpoint(path: Path) -> Path:
    from clip_hvt.module import CLIPModule
    module = CLIPModule({"embed_dim": 32, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32},
                         "text_cfg": TINY_TEXT})  # a plain dict still works from Python
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


class NotATensor:
    pass


@pytest.mark.parametrize("content, expected", [
    (None, "checkpoint '{path}' does not exist; give a .ckpt written by clip_hvt.train"),
    (b"not a checkpoint at all", "is not a Lightning checkpoint written by clip_hvt.train; give one from the run's "
                                 "checkpoints directory (e.g. runs/NAME/checkpoints/last.ckpt) (UnpicklingError while "
                                 "reading it safely: Unsupported operand "),
    ("pickle", "(UnpicklingError while reading it safely: Unsupported global: GLOBAL "),  # names the class it refused
    ("weights", "(e.g. runs/NAME/checkpoints/last.ckpt) (it has no hyper_parameters.model_cfg and state_dict)"),
    ("unknown-trunk", "checkpoint '{path}' cannot be loaded (its model_cfg builds no model: unknown image encoder "
                      "'pvt_v2_b99' (vision_cfg.timm_model_name). Close matches: pvt_v2_b5"),
    ("weights-mismatch", "checkpoint '{path}' cannot be loaded (its weights do not fit its model_cfg: Error(s) in "
                         "loading state_dict for CLIP: size mismatch for "),
], ids=["missing", "garbage", "unsafe-pickle", "plain-weights", "unknown-trunk", "weights-mismatch"])
def test_export_of_a_file_that_is_not_a_checkpoint_ends_in_one_line(content, expected, tmp_path):
    path = tmp_path / "model.ckpt"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": NotATensor()}, protocol=2))  # torch.save's protocol
    elif content == "weights":
        torch.save({"weight": torch.zeros(2)}, path)
    elif content in ("unknown-trunk", "weights-mismatch"):
        ckpt = torch.load(_tiny_checkpoint(tmp_path / "tiny.ckpt"), weights_only=True)
        if content == "unknown-trunk":
            ckpt["hyper_parameters"]["model_cfg"]["vision_cfg"]["timm_model_name"] = "pvt_v2_b99"
        else:
            ckpt["hyper_parameters"]["model_cfg"]["embed_dim"] = 48  # the projections' shapes change
        torch.save(ckpt, path)
    elif content is not None:
        path.write_bytes(content)
    message = one_line_error(export.main, ["--ckpt", str(path), "--out", str(tmp_path / "out")])
    assert message.startswith("python -m clip_hvt.export: error: ")
    assert expected.format(path=path) in message and "weights_only=False" not in message


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_export_honours_the_umask(umask, mode, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny.ckpt")
    old = os.umask(umask)
    try:
        out = export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    finally:
        os.umask(old)
    for name in (export.CONFIG_NAME, export.WEIGHTS_NAME):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name


def test_convert_cvt_errors_end_in_one_line(tmp_path):
    prog = "python -m clip_hvt.convert_cvt: error: "
    assert one_line_error(convert_main, ["--src", str(tmp_path / "nope.bin"), "--out", str(tmp_path / "x.safetensors"),
                                         "--model", "cvt_13"]) == f"{prog}No checkpoint at {tmp_path / 'nope.bin'}; " \
        "give a .safetensors/.bin/.pth file or a local HF model directory."
    assert one_line_error(convert_main, ["--src", str(tmp_path), "--out", str(tmp_path / "x.pt"), "--model", "cvt_13"]) \
        == f"{prog}--out must end in .safetensors, got {tmp_path / 'x.pt'}"
    assert "Expected a typing.Literal['cvt_13', 'cvt_21', 'cvt_w24']. Got value: cvt_99" in one_line_error(convert_main, ["--src", str(tmp_path), "--out", "x.safetensors",
                                                              "--model", "cvt_99"])


def test_one_run_directory_places_checkpoints_logs_and_export(tmp_path):
    root = tmp_path / "runs" / "mine"
    built = train.build(["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                         "--trainer.default_root_dir", str(root), "--checkpoint.every_n_train_steps", "7",
                         "--export_dir", "true"])
    checkpoint = built.trainer.checkpoint_callback
    assert checkpoint.dirpath == str(root / "checkpoints")
    assert built.config.checkpoint.every_n_train_steps == 7
    assert built.trainer.logger.save_dir == str(root)
    assert built.config.export_dir == str(root / "export")


@pytest.mark.parametrize("given", ["yaml", "flag"])
def test_a_logger_save_dir_the_config_sets_is_honoured(given, tmp_path):
    logs = tmp_path / "logs"
    args = ["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"), "--trainer.default_root_dir",
            str(tmp_path / "run")]
    if given == "yaml":
        (tmp_path / "logger.yaml").write_text(
            f"trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
            f"    init_args: {{save_dir: {logs}, name: mine}}\n")
        args += ["--config", str(tmp_path / "logger.yaml")]
    else:
        args += ["--trainer.logger.init_args.save_dir", str(logs)]
    built = train.build(args)
    assert built.trainer.logger.save_dir == str(logs)
    assert built.trainer.checkpoint_callback.dirpath == str(tmp_path / "run" / "checkpoints")  # the rest stays


@pytest.mark.parametrize("logger", ["lightning.pytorch.loggers.CSVLogger", "clip_hvt.loggers.WandbLogger"])
def test_a_logger_save_dir_left_unset_is_the_run_directory(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    built = train.build(["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", logger])
    assert built.trainer.logger.save_dir == str(tmp_path / "run")  # wandb's own default, ".", counts as unset


def test_a_checkpoint_dirpath_the_config_sets_is_honoured(tmp_path):
    (tmp_path / "ckpt.yaml").write_text(f"checkpoint:\n  dirpath: {tmp_path / 'elsewhere'}\n")
    built = train.build(["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                         "--trainer.default_root_dir", str(tmp_path / "run"), "--config", str(tmp_path / "ckpt.yaml")])
    assert built.trainer.checkpoint_callback.dirpath == str(tmp_path / "elsewhere")
    assert built.trainer.logger.save_dir == str(tmp_path / "run")


def test_resume_from_last_without_a_checkpoint_says_it_starts_from_step_0(tmp_path):
    built = train.build(["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                         "--trainer.default_root_dir", str(tmp_path / "run")])
    assert train.resume_notice(built.trainer, "last") == \
        f"python -m clip_hvt.train: no checkpoint in {tmp_path / 'run' / 'checkpoints'}, starting from step 0"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert train.resume_notice(built.trainer, "last") is None
    for other in ("hpc", "best", "registry", "registry:mine:latest", "memory://bucket/last.ckpt"):
        assert train.resume_notice(built.trainer, other) is None  # Lightning's names and URLs: Lightning checks
    with pytest.raises(cli.UserError, match="--ckpt_path 'nope/registry:x' is not a file"):
        train.resume_notice(built.trainer, "nope/registry:x")


def test_resume_from_a_path_that_does_not_exist_ends_in_one_line(tmp_path):
    message = one_line_error(train.main, ["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                                          "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert f"--ckpt_path '{tmp_path / 'nope.ckpt'}' is not a file" in message


def test_trainer_settings_lightning_rejects_at_build_end_in_one_line(tmp_path):
    # Lightning raises MisconfigurationException when the Trainer is made (an accelerator the machine lacks alike)
    message = one_line_error(train.main, ["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                                          "--trainer.default_root_dir", str(tmp_path / "run"),
                                          "--trainer.devices", "0"])
    assert message.startswith("python -m clip_hvt.train: error: ") and "devices='0'" in message


def test_too_few_samples_for_one_batch_end_in_one_line(tmp_path):
    # raised when fit asks for the training loader: the data module's own check, not a traceback
    message = one_line_error(train.main, ["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                                          "--trainer.default_root_dir", str(tmp_path / "run"),
                                          "--data.batch_size", "512"])
    assert message == ("python -m clip_hvt.train: error: 256 training samples make no full batch of 512 on 1 rank(s); "
                       "lower data.batch_size or add data")


def test_trainer_settings_lightning_rejects_at_fit_end_in_one_line(tmp_path):
    # LearningRateMonitor checks for a logger only when fit starts
    message = one_line_error(train.main, ["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                                          "--trainer.default_root_dir", str(tmp_path / "run"),
                                          "--trainer.logger", "false",
                                          "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"])
    assert message.startswith("python -m clip_hvt.train: error: ") and "LearningRateMonitor" in message
    assert "logger" in message


def test_a_step_bounded_run_shows_no_negative_epoch_count(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar
    built = train.build(["--config", TINY, "--data.shapes.root", str(tmp_path / "shapes"),
                         "--trainer.enable_progress_bar", "true"])
    # bounded by max_steps (max_epochs -1 in fit): Rich's bar, Lightning's pick, would say "Epoch 0/-2"
    assert isinstance(built.trainer.progress_bar_callback, TQDMProgressBar)


def test_a_dict_of_subcommands_runs_the_named_one_and_names_the_choices_otherwise():
    from clip_hvt.cli import run

    def add(a: int, b: int = 1) -> int:
        """Add."""
        return a + b

    def neg(a: int) -> int:
        """Negate."""
        return -a

    def fail(a: int) -> int:
        """Refuse."""
        raise cli.UserError(f"no {a}")

    commands = {"add": add, "neg": neg, "fail": fail}
    assert run(commands, ["add", "--a", "2", "--b", "3"], prog="calc") == 5
    assert run(commands, ["neg", "--a", "2"], prog="calc") == -2
    assert run(commands, ["--debug", "neg", "--a", "2"], prog="calc") == -2  # --debug may come first
    with pytest.raises(SystemExit, match="^calc fail: error: no 3$"):
        run(commands, ["fail", "--a", "3"], prog="calc")
    for args in (["--debug", "fail", "--a", "3"], ["fail", "--a", "3", "--debug"]):
        with pytest.raises(cli.UserError, match="no 3"):  # the traceback, wherever --debug stands
            run(commands, args, prog="calc")
    for args, said in (([], "no command given"), (["mul"], "unknown command 'mul'")):
        with pytest.raises(SystemExit) as exc:
            run(commands, args, prog="calc")
        assert str(exc.value.code) == f"calc: error: {said}; give one of add, neg, fail first (then --help for its options)"


@pytest.mark.parametrize("command", ["train", "summary"])
def test_a_config_file_naming_other_config_files_ends_in_one_line(command, tmp_path):
    # jsonargparse would ignore the list, and for one path drop the named file's model section behind this one's
    (tmp_path / "schedule.yaml").write_text("model:\n  lr: 0.123\n")
    run = tmp_path / "run.yaml"
    run.write_text("config: schedule.yaml\nmodel:\n  warmup_steps: 9\n")
    fn = train.main if command == "train" else summary.main
    message = one_line_error(fn, ["--config", TINY, "--config", str(run)])
    assert message.endswith(f"error: {run}: a config file cannot name other config files ('config:'); give them as "
                            "repeated --config before it, or name a section's file (e.g. data: data/shapes.yaml)")


@pytest.mark.parametrize("command", ["train", "summary"])
def test_a_tower_file_that_is_not_there_ends_in_one_line_naming_key_and_path(command, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text("model:\n  model_cfg:\n    text_cfg: ../text/w999.yaml\n")
    fn = train.main if command == "train" else summary.main
    message = one_line_error(fn, ["--config", TINY, "--config", str(model)])
    assert message.endswith("error: model.model_cfg.text_cfg: could not load '../text/w999.yaml' (a file named in a "
                            "config is found relative to that config file; check the path and that it is a YAML mapping)")
