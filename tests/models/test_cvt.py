"""CvT (clip_hvt.models.cvt): timm interface, shapes, checkpointing, BN modes, input-size errors, CPU speed paths."""
import pytest
import timm
import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d
from timm.models import group_parameters

from clip_hvt.models import cvt
from clip_hvt.models.cvt import ConvolutionalVisionTransformer

TINY = dict(depths=(1, 1, 2), embed_dims=(16, 32, 48), num_heads=(1, 2, 3), num_classes=5)


def tiny(**kwargs):
    torch.manual_seed(0)
    return ConvolutionalVisionTransformer(**{**TINY, **kwargs})


def test_sizes_are_registered_with_the_paper_layouts():
    expected = {
        'cvt_13': ((1, 2, 10), (64, 192, 384), 20.0e6),
        'cvt_21': ((1, 4, 16), (64, 192, 384), 31.6e6),
        'cvt_w24': ((2, 2, 20), (192, 768, 1024), 277.3e6),
    }
    assert set(expected) <= set(timm.list_models('cvt_*'))
    for name, (depths, dims, n_params) in expected.items():
        with torch.device('meta'):
            model = timm.create_model(name)
        assert [len(s.blocks) for s in model.stages] == list(depths)
        assert [f['num_chs'] for f in model.feature_info] == list(dims)
        assert [f['reduction'] for f in model.feature_info] == [4, 8, 16]
        assert model.num_features == dims[-1]
        assert model.pretrained_cfg['architecture'] == name
        # parameter counts of the paper (Table 2): 20M, 32M, 277M
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(n_params, rel=0.02)


@pytest.mark.parametrize('img_size', [(224, 224), (160, 224)])
def test_cvt_13_forward_backward_and_stage_shapes(img_size):
    torch.manual_seed(0)
    model = timm.create_model('cvt_13', num_classes=7).train()
    H, W = img_size
    x = torch.randn(1, 3, H, W)
    final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [
        (1, 64, H // 4, W // 4), (1, 192, H // 8, W // 8), (1, 384, H // 16, W // 16)]
    assert final.shape == (1, 1 + (H // 16) * (W // 16), 384)  # class token first
    # the spatial tokens count too: the last block's q path only reaches them, not the class token
    (model.forward_head(final).sum() + final.mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_stage_sizes_follow_the_documented_formula_for_odd_sizes():
    model = tiny().eval()
    H, W = 61, 37
    H1, W1 = (H - 3) // 4 + 1, (W - 3) // 4 + 1
    expected = [(H1, W1), (-(-H1 // 2), -(-W1 // 2)), (-(-H1 // 4), -(-W1 // 4))]
    assert model.feat_sizes((H, W)) == expected
    maps = model.forward_intermediates(torch.randn(1, 3, H, W), intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == expected


def test_too_small_or_malformed_images_raise_clear_errors():
    model = tiny()
    model.eval()(torch.randn(1, 3, 3, 3))  # the documented minimum works
    with pytest.raises(ValueError, match=r'at least 3 pixels'):
        model(torch.randn(1, 3, 2, 64))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.randn(3, 64, 64))


def test_grad_checkpointing_changes_nothing_but_recomputes_blocks():
    x = torch.randn(2, 3, 48, 40)
    results = []
    for enable in (False, True):
        model = tiny(drop_path_rate=0.2, proj_drop_rate=0.1).train()
        model.set_grad_checkpointing(enable)
        calls = []
        for blk in model.stages[2].blocks:
            blk.register_forward_pre_hook(lambda *a: calls.append(1))
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}, len(calls)))
    (out0, grads0, state0, calls0), (out1, grads1, state1, calls1) = results
    assert (calls0, calls1) == (2, 4)  # checkpointed blocks run again during backward
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    # running statistics get exactly one momentum update, not a second one from the recompute
    for name in state0:
        torch.testing.assert_close(state1[name], state0[name], rtol=0, atol=0, msg=name)


def test_reset_classifier_and_pool_options():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 2 * 2, 48)
    torch.testing.assert_close(model.forward_head(tokens), model.head(tokens[:, 0]))

    model.reset_classifier(3, 'avg')
    assert model.get_classifier().out_features == 3
    torch.testing.assert_close(model(x), model.head(tokens[:, 1:].mean(1)))

    model.reset_classifier(0, '')
    assert isinstance(model.head, nn.Identity)
    torch.testing.assert_close(model(x), tokens)

    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(0, 'max')
    with pytest.raises(ValueError, match='class token'):
        tiny(cls_token=False, global_pool='token')
    no_cls = tiny(cls_token=False, global_pool='avg')
    assert no_cls.forward_features(x).shape == (2, 2 * 2, 48)


def test_forward_intermediates_selection_norm_and_pruning():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 48)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    last, = model.forward_intermediates(x, indices=[2], norm=True, intermediates_only=True)
    normed = model.norm(maps[2].flatten(2).transpose(1, 2))
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), normed)
    first, = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(first, maps[0])

    assert model.prune_intermediate_layers(indices=(0, 1)) == [0, 1]
    assert len(model.stages) == 2 and model.num_features == 32
    pruned = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    for a, b in zip(pruned, maps[:2]):
        torch.testing.assert_close(a, b)


def test_features_only_returns_stage_maps():
    model = timm.create_model('cvt_13', features_only=True, out_indices=(1, 2))
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 8, 8), (1, 384, 4, 4)]
    assert model.feature_info.channels() == [192, 384]


def test_group_matcher_covers_every_parameter_in_depth_order():
    model = tiny()
    groups = group_parameters(model, model.group_matcher())
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert groups[0][0].startswith('stages.0.patch_embed')
    assert all(n.startswith('norm') or n.startswith('head') for n in groups[max(groups)])
    assert model.no_weight_decay() == {'stages.2.cls_token'}


def _qkv_bns(model):
    return [m for n, m in model.named_modules() if '.attn.conv_proj_' in n and n.endswith('.bn')]


def test_batchnorm_converts_to_syncbatchnorm():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny())
    sync = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync) == 3 * sum(TINY['depths']) and len(_qkv_bns(model)) == len(sync)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_frozen_bn_mode_keeps_statistics_in_train_mode():
    x = torch.randn(2, 3, 32, 32)
    batch = tiny().train()
    before = {k: v.clone() for k, v in batch.state_dict().items() if 'running' in k}
    batch(x)
    assert any(not torch.equal(batch.state_dict()[k], v) for k, v in before.items())  # 'batch' does update

    frozen = tiny(bn_mode='frozen').train()
    assert all(isinstance(m, FrozenBatchNorm2d) for m in _qkv_bns(frozen))
    frozen.load_state_dict(tiny().state_dict())  # same keys as 'batch' checkpoints
    before = {k: v.clone() for k, v in frozen.state_dict().items() if 'running' in k}
    out_train = frozen(x)
    after = frozen.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(out_train, frozen.eval()(x))  # no dropout: train == eval once BN is frozen

    with pytest.raises(ValueError, match='bn_mode'):
        tiny(bn_mode='sync')


def test_cpu_attention_paths_agree(monkeypatch):
    """ Small maps take explicit matmuls + softmax on the CPU, large ones SDPA; both compute the same. """
    x = torch.randn(2, 3, 48, 40)
    results = []
    for min_scores in (0, float('inf')):  # SDPA everywhere, then nowhere
        monkeypatch.setattr(cvt, '_CPU_SDPA_MIN_SCORES', min_scores)
        model = tiny().train()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_sdpa, grads_sdpa), (out_explicit, grads_explicit) = results
    torch.testing.assert_close(out_explicit, out_sdpa, rtol=0, atol=1e-5)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_explicit[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_strided_qkv_projections_run_in_fp32_under_cpu_autocast():
    """ oneDNN's bf16 backward of strided depthwise convs is slow on CPU, so k/v projections leave autocast. """
    model = tiny().train()
    dtypes = {}
    for name, m in model.named_modules():
        if isinstance(m, cvt.ConvProjection):
            m.register_forward_hook(lambda mod, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    x = torch.randn(4, 3, 48, 40)
    ref = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert {(n.rsplit('.', 1)[-1], d) for n, d in dtypes.items()} == {
        ('conv_proj_q', torch.bfloat16), ('conv_proj_k', torch.float32), ('conv_proj_v', torch.float32)}
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.1)  # bf16 rounding, not a different function


def test_prefix_tokens_are_projected_as_if_joined_first():
    """ q/k/v linears run on the class token and the map tokens apart (a speed path); the result, and every
    gradient, is that of joining the tokens first and projecting them together, as the reference CvT does. """
    torch.manual_seed(0)
    attn = cvt.ConvAttention(32, num_heads=2, num_prefix_tokens=1).train()
    H, W = 6, 5
    x = torch.randn(3, 1 + H * W, 32, requires_grad=True)

    def joined_first(x):
        B, N, C = x.shape
        prefix, x_map = x[:, :1], x[:, 1:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        qkv = [attn._heads(linear(torch.cat([prefix, proj(x_map)], dim=1))) for proj, linear in
               ((attn.conv_proj_q, attn.q), (attn.conv_proj_k, attn.k), (attn.conv_proj_v, attn.v))]
        out = torch.softmax(qkv[0] * attn.scale @ qkv[1].transpose(-2, -1), dim=-1) @ qkv[2]
        return attn.proj(out.transpose(1, 2).reshape(B, N, C))

    weights = torch.randn(3, 1 + H * W, 32)
    results = []
    for forward in (joined_first, lambda x: attn(x, (H, W))):
        attn.zero_grad()
        x.grad = None
        out = forward(x)
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (ref, ref_dx, ref_grads), (out, dx, grads) = results
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=1e-5)
    for name, grad in ref_grads.items():
        # k's bias shifts every key alike, which softmax ignores: its gradient is rounding noise around 0
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert ref_grads['k.bias'].abs().max() < 1e-5
