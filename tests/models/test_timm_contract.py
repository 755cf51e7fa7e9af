""" timm's model contract for every model `import clip_hvt` registers.

The specification is timm's own `tests/test_models.py` (at the installed timm version): forward (and
unchanged output under gradient checkpointing), backward to every parameter, `default_cfgs` (head sizes,
classifier and first conv names, reset_classifier; creation on a given device and dtype, unknown arguments
refused, frozen weights kept frozen), `forward_intermediates` against `feature_info` and `forward_features`,
`prune_intermediate_layers`, `features_only`, fx tracing forward and backward, and torchscript. Our encoders return a
token sequence from `forward_features` (CvT: class token + last-stage tokens; `_ms`: pooled multiscale tokens),
so the `default_cfgs` checks are those timm applies to its token-sequence models (ViT, PiT, MViTv2).

Each model is built once per name (module-scoped fixture) and copied per test; inputs are 64 px, so the
suite stays small.

timm's own file against our names (`tests/models/timm_suite.py` is the pytest plugin that registers our models,
narrows timm's model lists to them and deselects the tests of timm's own models), from the repository root:

    V=$(python -c 'import timm; print(timm.__version__)')
    mkdir -p /tmp/timm_suite && pip download "timm==$V" --no-deps --no-binary :all: -d /tmp/timm_suite
    tar xzf /tmp/timm_suite/timm-$V.tar.gz -C /tmp/timm_suite --strip-components=2 timm-$V/tests/test_models.py
    export PYTHONPATH=$PWD:$PWD/tests/models HF_HUB_OFFLINE=1
    python -m pytest -p timm_suite --rootdir /tmp/timm_suite -p no:cacheprovider /tmp/timm_suite/test_models.py \
        -k test_model_forward_intermediates   # one test function at a time; -k 'cvt_13 and ...' for one name

`--collect-only -q` lists what runs. timm classes its token-sequence models (ViT, PiT, MViTv2...) by name in the
file's NON_STD_FILTERS; the plugin adds ours there too (`TIMM_SUITE_TOKENS_AS_NON_STD=0` runs them as NCHW
models, where `test_model_default_cfgs` stops at its 2-D spatial output assertion).
"""
import copy
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer

import clip_hvt  # noqa: F401  (registers the models)

NAMES = sorted(timm.list_models(module=['cvt', 'multiscale']))
# one name per family runs by default (cvt_13, cvt_13_ms, pvt_v2_b0_ms, convnext_atto_ms, resnet50_ms, swin_*_ms);
# the other sizes share their code and run with the slow tests (each is tens of seconds per test on 2 cores)
SLOW = {'cvt_21', 'cvt_21_ms', 'cvt_w24', 'cvt_w24_ms', 'convnext_tiny_ms', 'convnext_small_ms', 'pvt_v2_b1_ms',
        'pvt_v2_b2_ms', 'pvt_v2_b2_li_ms', 'pvt_v2_b3_ms', 'pvt_v2_b4_ms', 'pvt_v2_b5_ms'}
SIZE = (64, 64)
BATCH = 2


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _create(name, **kwargs):
    """timm.create_model at our small size: a fixed-size model (swin_*_ms) gets the size at creation, as in timm."""
    if timm.models.get_pretrained_cfg_value(name, 'fixed_input_size'):
        kwargs.setdefault('img_size', SIZE)
    return timm.create_model(name, **kwargs)


@pytest.fixture(scope='module', params=_params(NAMES))
def built(request):
    torch.manual_seed(0)
    return request.param, _create(request.param, pretrained=False).eval()


def _images(size=SIZE, batch=BATCH, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _num_tokens(model, size):
    """Length of forward_features' token sequence: CvT's class token + last-stage map, or stages * grid**2."""
    if hasattr(model, 'spec'):
        return len(model.spec.stages) * model.spec.grid ** 2
    h, w = model.feat_sizes(size)[-1]
    return model.num_prefix_tokens + h * w


def _trace(model):
    """A GraphModule of model.forward traced with timm's non-traceable leaves and functions, as timm traces."""
    tracer = NodePathTracer(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def test_every_registered_name_is_covered():
    expected = {'cvt_13', 'cvt_21', 'cvt_w24'} | {f'{t}_ms' for t in clip_hvt.models.multiscale.multiscale_trunks()}
    assert set(NAMES) == expected


@pytest.mark.parametrize('name', NAMES)
def test_factory_places_every_tensor_on_the_requested_device_and_dtype(name):
    # the meta device allocates nothing, so every size runs here
    model = _create(name, device='meta', dtype=torch.float64)
    assert model.in_chans == model.pretrained_cfg['input_size'][0] == 3
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert not [n for n, t in tensors if t.device.type != 'meta']
    assert not [n for n, t in tensors if t.is_floating_point() and t.dtype != torch.float64]
    model.reset_classifier(0)
    model.reset_classifier(7)
    assert model.get_classifier().weight.device.type == 'meta'
    assert model.get_classifier().weight.dtype == torch.float64
    with pytest.raises(TypeError, match='not_a_model_arg'):
        _create(name, device='meta', not_a_model_arg=1)


@pytest.mark.parametrize('name', NAMES)
def test_frozen_parameters_stay_frozen_through_head_reset_and_resize(name):
    model = _create(name, device='meta')
    model.requires_grad_(False)
    model.reset_classifier(0, '')
    if hasattr(model, 'set_input_size'):
        model.set_input_size(img_size=tuple(2 * s for s in SIZE))
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.num_classes == 0


def test_forward_is_finite_and_unchanged_by_grad_checkpointing(built):
    _, model = built
    model = copy.deepcopy(model)
    x = _images()
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing()
        out_ckpt = model(x)
    assert out.shape == (BATCH, model.num_classes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_ckpt, out, rtol=1e-4, atol=1e-5)


def test_backward_reaches_every_parameter(built):
    _, model = built
    model = copy.deepcopy(model).train()
    model.reset_classifier(42)
    out = model(_images())
    assert out.shape == (BATCH, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert torch.isfinite(out).all()


def test_default_cfg_matches_features_heads_and_state_dict(built):
    name, model = built
    model = copy.deepcopy(model)
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name
    assert model.num_classes == cfg['num_classes'] == 1000
    assert model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state
    assert f"{cfg['first_conv']}.weight" in state
    x = _images()
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape == (BATCH, _num_tokens(model, SIZE), model.num_features)
        assert pre_logits.shape == (BATCH, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre_logits)
        model.reset_classifier(0, '')  # no pooling: the token sequence itself
        torch.testing.assert_close(model(x), features)


@pytest.mark.parametrize('size', [SIZE, (64, 96)])
def test_forward_intermediates_follow_feature_info(built, size):
    name, model = built
    if size != SIZE and timm.models.get_pretrained_cfg_value(name, 'fixed_input_size'):
        pytest.skip('a fixed-size model takes the one size it was built for')
    model = copy.deepcopy(model)
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    assert len(info.channels()) >= 3
    x = _images(size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == len(info.channels())
        for chs, red, m in zip(info.channels(), info.reduction(), maps):
            assert m.shape[:2] == (BATCH, chs)
            assert m.shape[2] <= math.ceil(size[0] / red) + 1 and m.shape[3] <= math.ceil(size[1] / red) + 1
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(only, [maps[0], maps[-1]])
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


def test_pruned_model_ends_at_its_tap_and_trains_every_kept_parameter(built):
    name, model = built
    x = _images()
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    for i in range(len(taps)):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([i], prune_norm=True)
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[i])
            if name.endswith('_ms'):  # the token head is gone: the features are the deepest kept stage map
                torch.testing.assert_close(pruned.forward_features(x), taps[i])
        pruned.train()
        pruned.forward_features(x).sum().backward()
        unused = [n for n, p in pruned.named_parameters() if p.grad is None]
        assert not unused, f'pruned to stage {i}, no gradient for {unused[:5]}'


def test_features_only_returns_the_stage_maps(built, tmp_path):
    name, model = built
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    features = _create(
        name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    features.eval()
    assert features.feature_info.channels() == [i['num_chs'] for i in model.feature_info]
    assert features.feature_info.reduction() == [i['reduction'] for i in model.feature_info]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(features(x), model.forward_intermediates(x, intermediates_only=True))
    last_two = _create(name, features_only=True, out_indices=(-2, -1))
    assert last_two.feature_info.channels() == [i['num_chs'] for i in model.feature_info[-2:]]


def test_fx_trace_gives_the_eager_output(built):
    _, model = built
    x = _images()
    with torch.no_grad():
        expected = model(x)
        traced = _trace(copy.deepcopy(model))
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)


def test_fx_traced_backward_reaches_every_parameter(built):
    _, model = built
    model = copy.deepcopy(model).train()
    model.reset_classifier(42)
    traced = _trace(model)
    out = traced(_images())
    out.mean().backward()
    assert out.shape == (BATCH, 42)
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'


# timm's ResNet.forward_intermediates slices a tuple by a variable index, which torchscript cannot compile
NOT_SCRIPTABLE = {'resnet50_ms': "timm's ResNet.forward_intermediates is not scriptable"}


def test_torchscript_gives_the_eager_output(built):
    name, model = built
    if name in NOT_SCRIPTABLE:
        pytest.skip(NOT_SCRIPTABLE[name])
    with timm.layers.set_scriptable(True):
        scriptable = _create(name, pretrained=False).eval()
    scriptable.load_state_dict(model.state_dict())
    scripted = torch.jit.script(scriptable)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)
