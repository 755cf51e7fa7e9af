""" Token sequences for LMMs: shapes for PVTv2, CvT and `_ms` models at 224 and a non-square size,
equality with forward_features at the trained grid, and a grid larger than a stage map refused. """
import open_clip
import pytest
import timm
import torch

from clip_hvt import features

SIZES = [(224, 224), (96, 160)]


def _images(size):
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    return {
        'pvt_v2_b0': timm.create_model('pvt_v2_b0', num_classes=0).eval(),
        'cvt_13': timm.create_model('cvt_13', num_classes=0).eval(),
        'pvt_v2_b0_ms': timm.create_model('pvt_v2_b0_ms', global_pool='attn:grid=2', num_classes=0).eval(),
    }


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name, chs, reductions', [
    ('pvt_v2_b0', [32, 64, 160, 256], [4, 8, 16, 32]),
    ('cvt_13', [64, 192, 384], [4, 8, 16]),
    ('pvt_v2_b0_ms', [32, 64, 160, 256], [4, 8, 16, 32]),
])
def test_stage_maps_and_raw_pooled_tokens(models, name, chs, reductions, size):
    with torch.no_grad():
        maps = features.stage_maps(models[name], _images(size))
        assert [tuple(m.shape) for m in maps] == [(1, c, size[0] // r, size[1] // r) for c, r in zip(chs, reductions)]
        assert [tuple(t.shape) for t in features.as_tokens(maps)] == [
            (1, (size[0] // r) * (size[1] // r), c) for c, r in zip(chs, reductions)]
        pooled = features.multiscale_tokens(models[name], _images(size), grid=2, project=False)
        assert [tuple(t.shape) for t in pooled] == [(1, 4, c) for c in chs]
        # row-major 2x2 average of the map
        torch.testing.assert_close(pooled[0][0, 1], maps[0][0, :, :size[0] // 8, size[1] // 8:].mean(dim=(1, 2)))


@pytest.mark.parametrize('size', SIZES)
def test_projected_tokens_of_a_multiscale_model(models, size):
    model = models['pvt_v2_b0_ms']
    x = _images(size)
    with torch.no_grad():
        tokens = features.multiscale_tokens(model, x)
        assert tokens.shape == (1, 4 * 2 * 2, 256)
        torch.testing.assert_close(tokens, model.forward_features(x))
        finer = features.multiscale_tokens(model, x, grid=3)
        assert finer.shape == (1, 4 * 3 * 3, 256)


def test_projected_tokens_from_an_open_clip_model():
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(
        image_size=64, timm_model_name='cvt_13_ms', timm_pool='avg:grid=2', timm_proj='linear'),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)).eval()
    with torch.no_grad():
        tokens = features.multiscale_tokens(clip, _images((64, 96)))
    assert tokens.shape == (1, 3 * 2 * 2, 384)


def test_grid_larger_than_a_stage_map_is_refused_with_its_size(models):
    with pytest.raises(ValueError, match=r"grid 8 is larger than stage 3's map \(7x7\); use grid <= 7"):
        features.multiscale_tokens(models['pvt_v2_b0'], _images((224, 224)), grid=8, project=False)


def test_projection_needs_a_multiscale_model(models):
    with pytest.raises(ValueError, match="project=True needs a multiscale"):
        features.multiscale_tokens(models['cvt_13'], _images((224, 224)))


def test_open_clips_own_vit_tower_is_refused_by_name():
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8, head_width=32),
                          text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)).eval()
    with pytest.raises(ValueError, match="the image tower is open_clip's own VisionTransformer, not a timm trunk"):
        features.stage_maps(clip, _images((32, 32)))


def test_stage_maps_come_in_the_order_asked(models):
    images = _images((64, 64))
    with torch.no_grad():
        every = features.stage_maps(models['pvt_v2_b0'], images)
        asked = features.stage_maps(models['pvt_v2_b0'], images, stages=[-1, 0, 2])
        tokens = features.multiscale_tokens(models['pvt_v2_b0'], images, grid=1, project=False, stages=[3, 1])
    assert [m.shape[1] for m in asked] == [256, 32, 160]
    for got, stage in zip(asked, (3, 0, 2)):
        torch.testing.assert_close(got, every[stage])
    for got, stage in zip(tokens, (3, 1)):
        torch.testing.assert_close(got, every[stage].mean((2, 3))[:, None])
