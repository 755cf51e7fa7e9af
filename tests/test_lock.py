"""LiT locking: locked weights do not move, unlocked groups do, locked BatchNorm statistics hold, bad
group counts fail with the valid range, and locked weights stay in checkpoints and exports."""
import lightning.pytorch as pl
import pytest
import torch

from clip_hvt.data.datamodule import Shapes, WebDataModule
from clip_hvt.export import export_from_trainer
from clip_hvt.module import CLIPModule

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2},
}
BN_CFG = {**TINY_CFG, "vision_cfg": {"timm_model_name": "resnet10t", "image_size": 32}}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def fit(module, shapes_root, model_cfg, steps=3, callbacks=()):
    data = WebDataModule(shapes=Shapes(root=str(shapes_root), image_size=40, train_samples=64, val_samples=16,
                                       zeroshot_per_class=1),
                         batch_size=16, num_workers=0, sample_shuffle=1, model_cfg=model_cfg)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_locked_image_tower_is_bit_identical_and_out_of_the_optimizer(tmp_path, shapes_root):
    pl.seed_everything(0)
    module = CLIPModule(TINY_CFG, lock_image=True, warmup_steps=1, lr=1e-2)
    before = snapshot(module)
    trainer = fit(module, shapes_root, TINY_CFG)
    moved = changed(before, snapshot(module))
    assert not any(k.startswith("visual.trunk.") for k in moved)
    # open_clip's TimmModel.lock locks the trunk; the projection head and the text tower train
    assert any(k.startswith("visual.head.") for k in moved) and any(k.startswith("transformer.") for k in moved)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in module.model.visual.trunk.parameters())
    # locked weights are still saved: the export holds every key of the model
    out = export_from_trainer(trainer, module, tmp_path / "export")
    from safetensors.torch import load_file
    exported = load_file(out / "open_clip_model.safetensors")
    assert set(exported) == set(before)
    assert torch.equal(exported["visual.trunk.patch_embed.proj.weight"], before["visual.trunk.patch_embed.proj.weight"])


def test_unlocked_last_group_moves_the_rest_stays(shapes_root):
    pl.seed_everything(0)
    module = CLIPModule(TINY_CFG, lock_image=True, lock_image_unlocked_groups=1, warmup_steps=1, lr=1e-2)
    before = snapshot(module)
    fit(module, shapes_root, TINY_CFG)
    moved = {k for k in changed(before, snapshot(module)) if k.startswith("visual.trunk.")}
    # pvt_v2's group_matcher: the stem, then one group per stage; the last group is stage 3
    assert moved and all(k.startswith("visual.trunk.stages.3.") for k in moved), sorted(moved)
    assert any(".blocks." in k for k in moved) and any(".downsample." in k for k in moved)


def test_locked_text_tower_but_last_layers(shapes_root):
    pl.seed_everything(0)
    module = CLIPModule(TINY_CFG, lock_text=True, lock_text_unlocked_layers=2, warmup_steps=1, lr=1e-2)
    before = snapshot(module)
    fit(module, shapes_root, TINY_CFG)
    moved = changed(before, snapshot(module))
    text_moved = {k for k in moved if k.startswith(("token_embedding", "positional_embedding", "transformer.",
                                                      "ln_final", "text_projection"))}
    # groups: embeddings, block 0, (block 1 + ln_final), projection: the last two are unlocked
    assert "text_projection" in text_moved and "ln_final.weight" in text_moved
    assert any(k.startswith("transformer.resblocks.1.") for k in text_moved)
    assert not any(k.startswith(("transformer.resblocks.0.", "token_embedding", "positional_embedding"))
                   for k in text_moved)
    assert any(k.startswith("visual.") for k in moved)


def test_unfrozen_layer_norm_of_locked_text_layers_trains():
    module = CLIPModule(TINY_CFG, lock_text=True, lock_text_freeze_layer_norm=False)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert "transformer.resblocks.0.ln_1.weight" in trainable and "ln_final.bias" in trainable
    assert "transformer.resblocks.0.attn.in_proj_weight" not in trainable and "text_projection" not in trainable


@pytest.mark.slow
def test_locked_batch_norm_statistics_hold_only_with_freeze_bn_stats(shapes_root):
    def running_means(module):
        return [m.running_mean.clone() for m in module.model.visual.modules()
                if isinstance(m, torch.nn.BatchNorm2d)]

    stats = {}
    for freeze in (False, True):
        pl.seed_everything(0)
        module = CLIPModule(BN_CFG, lock_image=True, lock_image_freeze_bn_stats=freeze, warmup_steps=1)
        before = running_means(module)
        fit(module, shapes_root, BN_CFG, steps=1)
        stats[freeze] = [torch.equal(a, b) for a, b in zip(before, running_means(module))]
    assert len(stats[True]) == len(stats[False]) > 0  # the trunk has BatchNorms to check
    assert all(stats[True]) and not any(stats[False])


@pytest.mark.parametrize("kwargs, message", [
    ({"lock_image": True, "lock_image_unlocked_groups": 99},
     r"model.lock_image_unlocked_groups=99 is out of range: the image tower has 5 layer group\(s\), so use 0..4"),
    ({"lock_text": True, "lock_text_unlocked_layers": 4},
     r"model.lock_text_unlocked_layers=4 is out of range: the text tower has 4 layer group\(s\), so use 0..3"),
])
def test_lock_group_out_of_range_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPModule(TINY_CFG, **kwargs)
