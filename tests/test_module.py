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


class StepRecorder(pl.Callback):
    """Each step's gradients and parameters just before the optimizer step. Given ``feed`` (another
    run's recorded gradients), it then puts those in their place, so both runs take the same update."""

    def __init__(self, feed=None):
        self.grads, self.params, self.feed = [], [], feed

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = dict(pl_module.model.named_parameters())
        self.grads.append({n: p.grad.detach().clone() for n, p in named.items()})
        self.params.append({n: p.detach().clone() for n, p in named.items()})
        if self.feed is not None:
            for n, p in named.items():
                p.grad.copy_(self.feed[len(self.grads) - 1][n])


def _one_step(shapes_root, micro_batch_size, feed=None):
    pl.seed_everything(0)
    module = CLIPModule(TINY_CFG, micro_batch_size=micro_batch_size, warmup_steps=1, max_logit_scale=100)
    data = WebDataModule(shapes=Shapes(root=str(shapes_root), image_size=40, train_samples=64, val_samples=16,
                                       zeroshot_per_class=1),
                         batch_size=16, num_workers=0, sample_shuffle=1, model_cfg=TINY_CFG)
    recorder = StepRecorder(feed)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return recorder, module


def test_gradcache_step_matches_plain_step(tmp_path):
    """GradCache's manual step (gradients, optimizer, schedule, clamp) equals Lightning's automatic one.

    The GradCache run takes the plain run's gradients for its update: AdamW turns last-bit gradient
    differences into lr-sized parameter differences where a gradient is ~0 next to eps. The text
    attention's key bias has a gradient that is exactly 0 in exact arithmetic (softmax ignores a shift
    shared by all keys) and rounding noise in practice (~1e-8, summed in another order over micro-batches);
    AdamW's first step moves it by lr * g / (|g| + eps), up to lr * 0.06 = 3e-5 here, so the two runs'
    parameters would be ~1e-5 apart and the step-2 gradients taken at different points.
    Fed the same gradients, both runs must hold the same parameters before each step (the default, fused
    AdamW; the optimizer itself is checked against torch's reference below).
    """
    plain, plain_module = _one_step(tmp_path / "shapes", None)
    cached, cached_module = _one_step(tmp_path / "shapes", 4, feed=plain.grads)
    assert len(plain.grads) == len(cached.grads) == 2
    for step in range(2):
        for name, param in plain.params[step].items():
            assert torch.equal(cached.params[step][name], param), (step, name)  # same updates, same kernel
            assert torch.allclose(cached.grads[step][name], plain.grads[step][name], atol=1e-5, rtol=1e-4), name
    for (name, param), cached_param in zip(plain_module.model.named_parameters(), cached_module.model.parameters()):
        assert torch.equal(cached_param, param), name
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


@pytest.mark.parametrize("fused_optimizer", [True, False])
def test_optimizer_steps_like_torchs_reference_adamw(fused_optimizer):
    """Fused by default where torch supports the parameters (here fp32 on CPU); the switch gives
    torch's default. Either way the update is torch's AdamW with our groups, up to float rounding."""
    module = CLIPModule(TINY_CFG, weight_decay=0.3, fused_optimizer=fused_optimizer)
    module.trainer = type("T", (), {"max_steps": 100})()
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is (True if fused_optimizer else None)
    params = list(module.model.parameters())
    initial = [p.detach().clone() for p in params]
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    reference = torch.optim.AdamW([{**g, "params": [reference_params[index[id(p)]] for p in g["params"]],
                                    "fused": False, "foreach": False} for g in opt.param_groups])
    torch.manual_seed(0)
    for _ in range(3):
        for p, r in zip(params, reference_params):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        reference.step()
    for p, r, p0 in zip(params, reference_params, initial):
        assert not torch.equal(p.detach(), p0)  # every parameter was updated
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
