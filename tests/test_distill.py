"""Distillation from a frozen open_clip teacher: it moves the student toward the teacher, the teacher
stays frozen and out of the student's state, LiT from the teacher's text tower, and bad input fails
with one clear line."""
import lightning.pytorch as pl
import pytest
import torch
from open_clip.loss import DistillClipLoss

from clip_hvt.cli import UserError
from clip_hvt.data.datamodule import Shapes, WebDataModule
from clip_hvt.distill import Distill
from clip_hvt.export import export_from_trainer, export_model
from clip_hvt.factory import create_model
from clip_hvt.module import CLIPModule

TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
TEACHER_CFG = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32}, "text_cfg": TEXT}
STUDENT_CFG = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32,
                                                "timm_pool": "avg", "timm_proj": "linear"}, "text_cfg": TEXT}
NARROW_CFG = {**STUDENT_CFG, "embed_dim": 16}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    torch.manual_seed(1)
    return export_model(create_model(TEACHER_CFG), TEACHER_CFG, tmp_path_factory.mktemp("teacher"))


def data_module(shapes_root, model_cfg, batch_size=16, samples=256):
    return WebDataModule(shapes=Shapes(root=str(shapes_root), image_size=40, train_samples=samples, val_samples=64,
                                       zeroshot_per_class=1),
                         batch_size=batch_size, num_workers=0, sample_shuffle=64, model_cfg=model_cfg)


def fit(module, data, steps):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return trainer


def one_batch(shapes_root, model_cfg):
    data = data_module(shapes_root, model_cfg, batch_size=8)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    return data.on_after_batch_transfer(batch, 0)


def test_live_teacher_is_frozen_outside_the_student_and_its_loss_is_open_clips(random_teacher, shapes_root):
    pl.seed_everything(0)
    module = CLIPModule(STUDENT_CFG, distill=Distill(teacher=str(random_teacher), embed_weight=0.5))
    assert not any(k.startswith("teacher") for k in module.state_dict())
    assert all(not p.requires_grad for p in module.teacher.model.parameters()) and not module.teacher.model.training
    module.loss_fn = DistillClipLoss(local_loss=True, gather_with_grad=True)
    batch = one_batch(shapes_root, STUDENT_CFG)
    image_f, text_f = module.encode(batch["image"], batch["text"])
    scale = module.model.logit_scale.exp()
    total, parts = module.distill_loss(image_f, text_f, scale, None, module.teacher_targets(batch))

    teacher = module.teacher.model
    with torch.no_grad():  # the teacher at its own (equal) size and normalization: the student's batch as is
        t_image = teacher.encode_image(batch["image"], normalize=True)
        t_text = teacher.encode_text(batch["text"], normalize=True)
    contrastive, kd = DistillClipLoss()(image_f, text_f, scale, t_image, t_text, teacher.logit_scale.exp())
    cosine = 1 - (image_f * t_image).sum(-1).mean()
    torch.testing.assert_close(parts["distill_loss"], kd)
    torch.testing.assert_close(total, contrastive + kd + 0.5 * cosine)


# open_clip ViTs of 16 tokens: a few hundred steps in seconds
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                            "head_width": 32}, "text_cfg": TEXT}


@pytest.mark.slow
def test_distilled_student_moves_toward_the_teacher(shapes_root, tmp_path):
    """A small teacher trained on the shapes; students of the same steps with and without distillation."""
    pl.seed_everything(0)
    teacher = CLIPModule(TINY_VIT, lr=2e-3, warmup_steps=10)
    trainer = fit(teacher, data_module(shapes_root, TINY_VIT, batch_size=16), 100)
    teacher_dir = export_from_trainer(trainer, teacher, tmp_path / "teacher")

    batch = one_batch(shapes_root, TINY_VIT)
    with torch.no_grad():
        target = teacher.eval().model.encode_image(batch["image"], normalize=True)

    cosines = {}
    for name, distill in (("plain", None), ("distilled", Distill(teacher=str(teacher_dir), embed_weight=1.0))):
        pl.seed_everything(1)
        student = CLIPModule(TINY_VIT, lr=2e-3, warmup_steps=10, distill=distill)
        fit(student, data_module(shapes_root, TINY_VIT, batch_size=16), 200)
        with torch.no_grad():
            image_f = student.eval().model.encode_image(batch["image"], normalize=True)
        cosines[name] = (image_f * target).sum(-1).mean().item()
    print(f"cosine to the teacher's image embeddings after 200 steps: {cosines}")
    assert cosines["distilled"] > 0.8 and cosines["distilled"] > cosines["plain"] + 0.5, cosines


def test_teacher_text_tower_becomes_the_students_frozen(random_teacher, shapes_root):
    module = CLIPModule(STUDENT_CFG, distill=Distill(teacher=str(random_teacher), text_tower=True, clip_weight=0.0))
    teacher, params = module.teacher.model.state_dict(), dict(module.model.named_parameters())
    text_keys = [k for k in module.model.state_dict()
                 if k.startswith(("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection"))]
    assert len(text_keys) > 10
    for key in text_keys:
        assert torch.equal(module.model.state_dict()[key], teacher[key]), key
        assert key not in params or not params[key].requires_grad, key
    assert any(p.requires_grad for p in module.model.visual.parameters())
    assert module.teacher_targets({}) is None  # LiT alone never runs the teacher


def test_projection_bridges_a_narrower_student_and_is_trained(random_teacher, shapes_root):
    pl.seed_everything(0)
    module = CLIPModule(NARROW_CFG, warmup_steps=1, lr=1e-2,
                        distill=Distill(teacher=str(random_teacher), embed_weight=1.0, project=True))
    before = module.distill_proj.weight.detach().clone()
    trainer = fit(module, data_module(shapes_root, NARROW_CFG, samples=64), 2)
    assert module.distill_proj.weight.shape == (32, 16)
    assert not torch.equal(before, module.distill_proj.weight)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(module.distill_proj.weight) in optimized


def test_bad_teacher_input_is_one_clear_line(random_teacher, tmp_path, monkeypatch):
    cases = [
        (Distill(teacher=str(tmp_path / "nowhere")), "teacher '.*nowhere' not found: no .*open_clip_config.json"),
        (Distill(teacher="ViT-B-33"), "teacher 'ViT-B-33' not found: neither a directory nor an open_clip model name"),
        (Distill(teacher="ViT-B-32"), "teacher 'ViT-B-32' needs its weights as a local file"),
    ]
    for distill, message in cases:
        with pytest.raises(UserError, match=message):
            CLIPModule(STUDENT_CFG, distill=distill)
    weights = tmp_path / "siglip.bin"
    weights.write_bytes(b"")
    with monkeypatch.context() as offline:  # a Hugging Face tokenizer in no cache, and no network (read at import)
        offline.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        offline.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
        with pytest.raises(UserError, match="teacher 'ViT-B-16-SigLIP' uses a Hugging Face tokenizer that is not in "
                                            "the local Hugging Face cache and could not be fetched"):
            CLIPModule(STUDENT_CFG, distill=Distill(teacher="ViT-B-16-SigLIP", weights=str(weights)))
    with pytest.raises(UserError, match="the teacher's embedding width 32 differs from the student's 16: set "
                                        "model.distill.project true"):
        CLIPModule(NARROW_CFG, distill=Distill(teacher=str(random_teacher), embed_weight=1.0))
    with pytest.raises(UserError, match="distill.text_tower: the student's text tower differs from the teacher's"):
        CLIPModule({**STUDENT_CFG, "text_cfg": {**TEXT, "width": 64}},
                   distill=Distill(teacher=str(random_teacher), text_tower=True))
    with pytest.raises(UserError, match="model.distill.clip_weight \\(open_clip's DistillClipLoss\\) needs model.loss clip"):
        CLIPModule({**STUDENT_CFG, "init_logit_bias": -10.0}, loss="siglip", distill=Distill(teacher=str(random_teacher)))
    with pytest.raises(ValueError, match="DistillClipLoss is InfoNCE's: it needs loss 'clip', not 'siglip'"):
        from clip_hvt.loss import build_loss
        build_loss("siglip", distill=True)


QUICKSTART_CFG = {"embed_dim": 128, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "timm_pool": "avg",
                                                   "timm_proj": "linear", "image_size": 64},
                  "text_cfg": {"context_length": 32, "width": 128, "heads": 4, "layers": 3}}
CONFIGS = "configs"


SMALL_SHAPES = ["--data.shapes.root", "shapes", "--data.shapes.train_samples", "64", "--data.shapes.val_samples",
                "16", "--data.shapes.zeroshot_per_class", "1"]


def _train_with(config, tmp_path, monkeypatch, *extra):
    import os

    from clip_hvt import train
    root = os.getcwd()
    monkeypatch.chdir(tmp_path)
    return train.main([
        "--config", f"{root}/{CONFIGS}/quickstart.yaml", "--config", f"{root}/{CONFIGS}/{config}",
        *(SMALL_SHAPES if config != "distill_stored.yaml" else []), "--data.batch_size", "8",
        "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false", "--final_validation", "false", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["distill_live.yaml", "lit.yaml", "distill_stored.yaml"])
def test_distill_configs_run_on_the_cpu_with_the_quickstart_export_as_teacher(config, tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = tmp_path / "runs" / "quickstart" / "export"
    export_model(create_model(QUICKSTART_CFG), QUICKSTART_CFG, teacher)
    if config == "distill_stored.yaml":  # the config's first step, on a small shapes set
        from clip_hvt.data.synthetic import ShapesConfig, ensure
        from clip_hvt.data.teacher_features import main as teacher_features
        ensure(tmp_path / "shapes", ShapesConfig(train_samples=64, val_samples=16, zeroshot_per_class=1))
        teacher_features(["--shards", str(tmp_path / "shapes" / "train" / "*.tar"),
                          "--out", str(tmp_path / "runs" / "teacher_shards"), "--teacher", str(teacher)])
    _train_with(config, tmp_path, monkeypatch)
    name = config.removesuffix(".yaml")
    assert (tmp_path / "runs" / name / "export" / "open_clip_model.safetensors").is_file()
    assert (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").is_file()


def test_missing_teacher_stops_training_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        _train_with("distill_live.yaml", tmp_path, monkeypatch)
    assert str(exc.value.code).startswith("python -m clip_hvt.train: error: teacher 'runs/quickstart/export' not found: no ")
    assert "the quickstart writes runs/quickstart/export" in str(exc.value.code)


def test_teacher_in_bf16_gives_float32_embeddings_close_to_fp32(random_teacher):
    from clip_hvt.distill import Teacher
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(0, 49408, (4, 16))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    full = Teacher.load(Distill(teacher=str(random_teacher), precision="32")).encode(images, texts, mean, std)
    half = Teacher.load(Distill(teacher=str(random_teacher), precision="bf16")).encode(images, texts, mean, std)
    for a, b in zip(full, half):
        assert b.dtype == torch.float32 and (a * b).sum(-1).min() > 0.99
