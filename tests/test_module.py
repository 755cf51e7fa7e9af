"""The LightningModule: schedule, optimizer groups, temperature clamp, GradCache == plain step."""
import math

import lightning.pytorch as pl
import pytest
import torch

from clip_hvt.data.datamodule import Shapes, WebDataModule
from clip_hvt.module import CLIPModule, warmup_cosine

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}


def test_warmup_then_cosine_to_min_ratio():
    f = warmup_cosine(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_gains_and_logit_scale():
    module = CLIPModule(TINY_CFG, weight_decay=0.3)
    module.trainer = type("T", (), {"max_steps": 100})()  # configure_optimizers reads max_steps only
    opt = module.configure_optimizers()["optimizer"]
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.3
    ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in module.model.named_parameters() if id(p) in ids}
    assert "logit_scale" in names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("ln_final.weight") for n in names) and any(n.endswith(".bias") for n in names)
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(module.model.parameters()))


def test_siglip_without_bias_is_a_clear_error():
    with pytest.raises(ValueError, match="init_logit_bias"):
        CLIPModule(TINY_CFG, loss="siglip")


class GradRecorder(pl.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})


def _one_step(shapes_root, micro_batch_size):
    pl.seed_everything(0)
    module = CLIPModule(TINY_CFG, micro_batch_size=micro_batch_size, warmup_steps=1, max_logit_scale=100)
    data = WebDataModule(shapes=Shapes(root=str(shapes_root), image_size=40, train_samples=64, val_samples=16,
                                       zeroshot_per_class=1),
                         batch_size=16, num_workers=0, sample_shuffle=1, model_cfg=TINY_CFG)
    recorder = GradRecorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return recorder.grads, module


def test_gradcache_step_matches_plain_step(tmp_path):
    plain, plain_module = _one_step(tmp_path / "shapes", None)
    cached, cached_module = _one_step(tmp_path / "shapes", 4)
    assert len(plain) == len(cached) == 2
    for step_plain, step_cached in zip(plain, cached):
        for name, grad in step_plain.items():
            assert torch.allclose(step_cached[name], grad, atol=1e-5, rtol=1e-4), name
    assert cached_module.trainer.global_step == plain_module.trainer.global_step == 2


def test_logit_scale_is_clamped_after_each_step(tmp_path):
    _, module = _one_step(tmp_path / "shapes", None)
    module.model.logit_scale.data.fill_(10.0)
    module.on_train_batch_end(None, None, 0)
    assert module.model.logit_scale.item() == pytest.approx(math.log(100))


def test_speed_switches_keep_state_dict_keys_and_outputs():
    torch.manual_seed(0)
    plain = CLIPModule(TINY_CFG).eval()
    fast = CLIPModule(TINY_CFG, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())  # strict: channels-last changes no key
    assert fast.model.visual.trunk.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        for a, b in zip(plain.encode(images, texts), fast.encode(images, texts)):
            assert (a - b).abs().max() < 1e-5
    # Compiling on CPU takes minutes, so only its wiring is checked here: both towers, keys unchanged.
    compiled = CLIPModule(TINY_CFG, compile=True)
    compiled.load_state_dict(plain.state_dict())
    assert compiled.model.visual._compiled_call_impl is not None
    assert compiled.model.transformer._compiled_call_impl is not None


def test_gradcache_refuses_strategies_that_shard_gradients():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    from clip_hvt.module import check_gradcache_strategy

    check_gradcache_strategy(DDPStrategy())
    check_gradcache_strategy(SingleDeviceStrategy(torch.device("cpu")))
    for strategy in (FSDPStrategy, DeepSpeedStrategy):
        with pytest.raises(ValueError, match=f"single device or DDP, not {strategy.__name__}"):
            check_gradcache_strategy(strategy.__new__(strategy))  # the check needs only the type
