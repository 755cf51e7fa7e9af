"""EMA through Lightning's EMAWeightAveraging: the export writes the average (plain and GradCache
steps), a resumed run continues the saved average, and ``--ema`` picks averaged or trained weights."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from safetensors.torch import load_file

from clip_hvt.data.datamodule import Shapes, WebDataModule
from clip_hvt.export import export_from_trainer, main as export_main
from clip_hvt.module import CLIPModule

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}
DECAY = 0.5  # large steps of the average, so every update shows


class WeightRecorder(pl.Callback):
    """The trained weights after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def fit(shapes_root, steps, callbacks, micro_batch_size=None, ckpt_path=None, root=None):
    pl.seed_everything(0)
    module = CLIPModule(TINY_CFG, warmup_steps=1, lr=1e-2, micro_batch_size=micro_batch_size)
    data = WebDataModule(shapes=Shapes(root=str(shapes_root), image_size=40, train_samples=64, val_samples=16,
                                       zeroshot_per_class=1),
                         batch_size=16, num_workers=0, sample_shuffle=1, model_cfg=TINY_CFG)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                         enable_checkpointing=root is not None, default_root_dir=root)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


def ema(steps, decay=DECAY):
    """torch's AveragedModel EMA: the first update copies, then avg = decay * avg + (1 - decay) * w."""
    average = {k: v.clone() for k, v in steps[0].items()}
    for weights in steps[1:]:
        for k, v in weights.items():
            if v.is_floating_point():
                average[k] = decay * average[k] + (1 - decay) * v
            else:
                average[k] = v.clone()
    return average


@pytest.mark.parametrize("micro_batch_size", [None, 8], ids=["plain", "gradcache"])
def test_export_after_fit_writes_the_averaged_weights(shapes_root, tmp_path, micro_batch_size):
    recorder = WeightRecorder()
    trainer, module = fit(shapes_root, 3, [recorder, EMAWeightAveraging(decay=DECAY)], micro_batch_size)
    out = export_from_trainer(trainer, module, tmp_path / "export")
    exported = load_file(out / "open_clip_model.safetensors")
    expected = ema(recorder.steps)
    trained = recorder.steps[-1]
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(exported["visual.trunk.patch_embed.proj.weight"], trained["visual.trunk.patch_embed.proj.weight"])


def test_resume_continues_the_saved_average_and_export_picks_average_or_trained(shapes_root, tmp_path):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1,
                            filename="{step}")
    fit(shapes_root, 2, [every, EMAWeightAveraging(decay=DECAY)], root=tmp_path)
    saved = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=True, map_location="cpu")

    recorder = WeightRecorder()
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1,
                            filename="{step}")
    fit(shapes_root, 3, [every, recorder, EMAWeightAveraging(decay=DECAY)], root=tmp_path,
        ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert len(recorder.steps) == 1  # resumed at step 2: one more step
    final = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True, map_location="cpu")
    trained = recorder.steps[0]
    for name, value in trained.items():
        if value.is_floating_point():
            expected = DECAY * saved["state_dict"]["model." + name] + (1 - DECAY) * value
            torch.testing.assert_close(final["state_dict"]["model." + name], expected, rtol=1e-5, atol=1e-6,
                                       msg=name)
            torch.testing.assert_close(final["current_model_state"]["model." + name], value, msg=name)

    export_main(["--ckpt", str(tmp_path / "ckpt" / "step=3.ckpt"), "--out", str(tmp_path / "avg"), "--ema", "true"])
    export_main(["--ckpt", str(tmp_path / "ckpt" / "step=3.ckpt"), "--out", str(tmp_path / "raw"), "--ema", "false"])
    avg, raw = (load_file(tmp_path / d / "open_clip_model.safetensors") for d in ("avg", "raw"))
    key = "visual.trunk.patch_embed.proj.weight"
    assert torch.equal(avg[key], final["state_dict"]["model." + key])
    assert torch.equal(raw[key], trained[key]) and not torch.equal(avg[key], raw[key])


def test_export_ema_of_a_checkpoint_without_average_is_a_clear_error(shapes_root, tmp_path):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(shapes_root, 1, [every], root=tmp_path)
    with pytest.raises(SystemExit) as exc:
        export_main(["--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "x"), "--ema", "true"])
    assert "holds no averaged weights: train with the callback lightning.pytorch.callbacks.EMAWeightAveraging" \
        in str(exc.value.code)
