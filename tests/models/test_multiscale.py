""" Pooled multiscale tokens: shapes, gradients, stage/grid sensitivity, option errors, and building/exporting
through open_clip (constructor and local-dir) by the timm names `<trunk>_ms` whose options live in timm_pool.
"""
import json
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import group_parameters

from clip_hvt.models.multiscale import MultiScale, PoolSpec, create_multiscale, parse_pool, register_multiscale

B0_CHS = (32, 64, 160, 256)  # pvt_v2_b0 stage widths
SMALL_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
EMBED_DIM = 32
PREPROCESS = dict(size=64, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation='bicubic', resize_mode='shortest')


def _images(batch=2, size=(64, 64), seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _backward(out):
    # random weights: a plain sum would give LayerNorm inputs exactly zero gradient
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()


def _params_without_grad(model):
    return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def _clip(vision_cfg):
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=dict(image_size=64, **vision_cfg), text_cfg=SMALL_TEXT)


def test_parse_pool_reads_every_option():
    assert parse_pool('attn') == PoolSpec()
    assert parse_pool('concat:grid=2:stages=1,-1:width=64') == PoolSpec('concat', (1, -1), 2, 64, None)
    assert parse_pool('attn:heads=4:width=48') == PoolSpec('attn', None, 1, 48, 4)
    assert parse_pool('') == PoolSpec(reduce='')


@pytest.mark.parametrize('spec, message', [
    ('max', "unknown multiscale pooling 'max'.*valid: attn, avg, concat"),
    ('attn:size=2', "bad option 'size=2'.*grid, heads, stages, width"),
    ('attn:grid', "bad option 'grid'"),
    ('attn:grid=two', "'grid'.*must be an integer"),
    ('attn:grid=0', "'grid'.*must be >= 1"),
    ('avg:heads=4', "'heads'.*only applies to 'attn'"),
    ('attn:grid=1:grid=2', "'grid' given twice"),
])
def test_bad_pool_string_raises(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_pool(spec)


@pytest.mark.parametrize('spec, message', [
    ('attn:stages=4', r'stage index 4 .* 4 stages; valid: 0..3 or -4..-1'),
    ('attn:stages=-5', r'stage index -5'),
    ('attn:stages=1,-3', 'repeat a stage'),
    ('attn:width=30', 'width 30 is not divisible by heads 8'),
])
def test_bad_stage_or_width_raises_at_build(spec, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('pvt_v2_b0_ms', global_pool=spec)


def test_unknown_trunk_lists_supported_trunks():
    with pytest.raises(ValueError, match=r"no multiscale model for trunk 'vit_tiny_patch16_224'.*pvt_v2_b0.*"):
        create_multiscale('vit_tiny_patch16_224')
    with pytest.raises(ValueError, match="'not_a_model' is not a timm model"):
        register_multiscale('not_a_model')


@pytest.mark.parametrize('spec, num_tokens, num_features', [
    ('attn', 4, 256),
    ('avg', 4, 256),
    ('concat', 4, 4 * 256),
    ('attn:grid=2', 16, 256),
    ('concat:grid=2:stages=1,3', 8, 8 * 256),
    ('avg:stages=-1', 1, 256),
    ('attn:stages=0,2:width=48:heads=3', 2, 48),
])
def test_pvt_shapes_and_gradients_reach_every_parameter(spec, num_tokens, num_features):
    model = create_multiscale('pvt_v2_b0', global_pool=spec, num_classes=0)
    x = _images()
    tokens = model.forward_features(x)
    assert tokens.shape == (2, num_tokens, model.spec.width)
    out = model.forward_head(tokens)
    assert model.num_features == num_features and out.shape == (2, num_features)
    _backward(out)
    # unused trunk stages are pruned, so every remaining parameter (all stages up to the deepest chosen) trains
    assert len(model.trunk.stages) == max(model.spec.stages) + 1
    assert _params_without_grad(model) == []


def test_convnext_shapes_and_gradients():
    model = create_multiscale('convnext_atto', global_pool='attn:grid=2:stages=1,2,3:width=64:heads=4', num_classes=7)
    out = model(_images())
    assert out.shape == (2, 7) and model.num_features == 64
    _backward(out)
    assert _params_without_grad(model) == []


@pytest.mark.skipif(not timm.is_model('cvt_13_ms'), reason='cvt_13 is not in the timm registry (clip_hvt.models.cvt '
                                                            'must be imported before multiscale)')
def test_cvt_shapes_and_gradients():
    model = create_multiscale('cvt_13', global_pool='attn:grid=2', num_classes=0)
    out = model(_images())
    assert out.shape == (2, model.num_features)
    _backward(out)
    assert _params_without_grad(model) == []


def test_attention_head_depends_on_stage_and_grid_embeddings():
    torch.manual_seed(0)
    model = create_multiscale('pvt_v2_b0', global_pool='attn:grid=2:width=64', num_classes=0).eval()
    with torch.no_grad():
        # at their .02 init scale the embeddings' effect is small; the mechanism is what is under test
        model.tokens.stage_embed.normal_()
        model.tokens.pos_embed.normal_()
        maps = model.trunk.forward_intermediates(_images(), intermediates_only=True)
        projected = model.tokens.project(maps)
        out = model.forward_head(model.tokens.embed(projected))
        swapped_stages = model.forward_head(model.tokens.embed([projected[1], projected[0]] + projected[2:]))
        flipped_cells = model.forward_head(model.tokens.embed([projected[0].flip(1)] + projected[1:]))
        # the attention itself is a set function: reordering the embedded tokens changes nothing
        embedded = model.tokens.embed(projected)
        reordered = model.forward_head(embedded[:, torch.randperm(embedded.shape[1])])
        assert torch.allclose(out, reordered, atol=1e-5)
        assert (out - swapped_stages).abs().max() > 1e-3
        assert (out - flipped_cells).abs().max() > 1e-3
        # so the order information comes from the stage embedding
        model.tokens.stage_embed.zero_()
        out = model.forward_head(model.tokens.embed(projected))
        swapped_stages = model.forward_head(model.tokens.embed([projected[1], projected[0]] + projected[2:]))
        assert torch.allclose(out, swapped_stages, atol=1e-5)


def test_reset_classifier_rebuilds_only_changed_parts():
    model = create_multiscale('pvt_v2_b0', num_classes=10)
    tokens, pool = model.tokens, model.pool
    model.reset_classifier(0, 'attn')
    assert model.tokens is tokens and model.pool is pool and isinstance(model.head, torch.nn.Identity)
    model.reset_classifier(5, 'avg')
    assert model.tokens is tokens and model.pool is not pool and model.head.out_features == 5
    model.reset_classifier(0, 'attn:grid=2:width=64:heads=4')
    assert model.tokens is not tokens and model(_images()).shape == (2, 64)
    model.reset_classifier(0, '')  # timm convention: no reduction, the token options stay
    assert model(_images()).shape == (2, 16, 64)


def test_grad_checkpointing_gives_same_output_and_gradients():
    model = create_multiscale('pvt_v2_b0', global_pool='attn:grid=2', num_classes=0).train()
    x = _images()
    ref = model(x)
    _backward(ref)
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.trunk.stages)
    out = model(x)
    _backward(out)
    assert torch.allclose(ref, out, atol=1e-6)
    assert all(torch.allclose(ref_grads[n], p.grad, atol=1e-6) for n, p in model.named_parameters())


@pytest.mark.parametrize('size', [(224, 224), (160, 224)])
def test_b0_forward_backward_at_full_and_non_square_size(size):
    model = create_multiscale('pvt_v2_b0', global_pool='attn:grid=2', num_classes=0)
    out = model(_images(batch=1, size=size))
    assert out.shape == (1, 256)
    _backward(out)
    assert _params_without_grad(model) == []


def test_forward_intermediates_matches_forward():
    model = create_multiscale('pvt_v2_b0', global_pool='avg:stages=1,2,3', num_classes=0).eval()
    x = _images()
    with torch.no_grad():
        tokens, inter = model.forward_intermediates(x, indices=[0, 2])
        assert [t.shape for t in inter] == [(2, 32, 16, 16), (2, 160, 4, 4)]
        assert torch.allclose(model.forward_head(tokens), model(x), atol=1e-6)
        only = model.forward_intermediates(x, indices=1, output_fmt='NHWC', intermediates_only=True)
        assert [t.shape for t in only] == [(2, 2, 2, 256)]


@pytest.mark.parametrize('proj, pool, visual_width', [
    ('linear', 'attn:grid=2', 256),  # open_clip's Linear sized by num_features
    ('linear', 'concat:stages=2,3:width=64', 128),
    ('', 'attn', None),  # trunk classifier is the projection (num_classes=embed_dim)
    ('none', f'avg:width={EMBED_DIM}', None),  # pass-through: the head width is the embedding
])
def test_open_clip_builds_by_name(proj, pool, visual_width):
    model = _clip(dict(timm_model_name='pvt_v2_b0_ms', timm_pool=pool, timm_proj=proj))
    trunk = model.visual.trunk
    assert isinstance(trunk, MultiScale) and trunk.global_pool == pool
    if visual_width:
        assert model.visual.head.proj.in_features == visual_width
    features = model.encode_image(_images())
    assert features.shape == (2, EMBED_DIM)
    _backward(features)
    assert _params_without_grad(model.visual) == []


def test_open_clip_lock_freezes_trunk_groups_but_not_head():
    model = _clip(dict(timm_model_name='pvt_v2_b0_ms', timm_pool='attn'))
    trunk = model.visual.trunk
    groups = group_parameters(trunk, trunk.group_matcher())
    assert all(n.startswith('trunk.patch_embed') for n in groups[0])
    assert any(n.startswith('pool.') for n in groups[max(groups)])
    model.visual.lock(unlocked_groups=1)
    assert not trunk.trunk.patch_embed.proj.weight.requires_grad
    assert all(p.requires_grad for p in trunk.pool.parameters()) and trunk.tokens.stage_embed.requires_grad


def test_group_matcher_anchors_every_alternative_under_trunk():
    model = create_multiscale('resnet50', num_classes=0)  # resnet's stem pattern is '^conv1|bn1|maxpool'
    groups = group_parameters(model, model.group_matcher())
    assert groups[0] == ['trunk.conv1.weight', 'trunk.bn1.weight', 'trunk.bn1.bias']


def _export(model, model_cfg, out_dir):
    out_dir.mkdir()
    (out_dir / 'open_clip_config.json').write_text(json.dumps({'model_cfg': model_cfg, 'preprocess_cfg': PREPROCESS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / 'open_clip_model.safetensors')


def test_local_dir_export_reloads_identical_image_embeddings(tmp_path):
    pool = 'attn:grid=2:stages=1,2,3:width=64:heads=4'
    vision_cfg = dict(timm_model_name='pvt_v2_b0_ms', timm_pool=pool, timm_proj='linear', image_size=64)
    model_cfg = dict(embed_dim=EMBED_DIM, vision_cfg=vision_cfg, text_cfg=SMALL_TEXT)
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg).eval()
    _export(model, model_cfg, tmp_path / 'export')

    torch.manual_seed(1)  # a different init, so equality proves the weights were loaded
    loaded, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + str(tmp_path / 'export'))
    loaded.eval()
    assert loaded.visual.trunk.spec == model.visual.trunk.spec
    x = _images()
    with torch.no_grad():
        assert (model.encode_image(x) - loaded.encode_image(x)).abs().max() <= 1e-5
    assert preprocess(Image.new('RGB', (80, 64))).shape == (3, 64, 64)


def test_plain_trunk_export_loads_without_clip_hvt(tmp_path):
    vision_cfg = dict(timm_model_name='pvt_v2_b0', timm_pool='avg', timm_proj='linear', image_size=64)
    model_cfg = dict(embed_dim=EMBED_DIM, vision_cfg=vision_cfg, text_cfg=SMALL_TEXT)
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg).eval()
    _export(model, model_cfg, tmp_path / 'export')
    x = _images()
    with torch.no_grad():
        save_file({'images': x, 'features': model.encode_image(x)}, tmp_path / 'reference.safetensors')

    script = textwrap.dedent(f"""
        import sys, torch, open_clip
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / 'reference.safetensors')!r})
        model, _, _ = open_clip.create_model_and_transforms('local-dir:' + {str(tmp_path / 'export')!r})
        with torch.no_grad():
            diff = (model.eval().encode_image(ref['images']) - ref['features']).abs().max().item()
        assert not any(m.split('.')[0] == 'clip_hvt' for m in sys.modules), 'clip_hvt was imported'
        print(diff)
    """)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5
