"""pytest plugin: run timm's own `tests/test_models.py` against the models `import clip_hvt` registers.

timm's file parametrizes each test over `timm.list_models(...)` at import time; this plugin (loaded with `-p`
before that import) registers our models and narrows every such list to our names, so nothing of timm's own
zoo runs. Our modules are added wherever the file filters by module (its list of families with
`forward_intermediates` and the `features_only` getter wrapper), since ours have both. Recipe: the docstring
of tests/models/test_timm_contract.py.
"""
import os

import timm

import clip_hvt  # noqa: F401  (registers the models)

OUR_MODULES = ['cvt', 'multiscale']
_list_models = timm.list_models
OURS = set(_list_models(module=OUR_MODULES))
# Our forward_features return token sequences (B, N, C) as timm's ViTs do. timm's file routes its token models
# by name through NON_STD_FILTERS (its default_cfgs test asserts a 2-D spatial map: "TODO add 1D sequence
# support"), so ours join that list; TIMM_SUITE_TOKENS_AS_NON_STD=0 runs them as NCHW models instead.
TOKENS_AS_NON_STD = os.environ.get('TIMM_SUITE_TOKENS_AS_NON_STD', '1') != '0'


def _with_ours(patterns):
    """Our names added to the file's NON_STD_FILTERS (recognised by its first pattern, 'vit_*')."""
    if TOKENS_AS_NON_STD and isinstance(patterns, (list, tuple)) and 'vit_*' in patterns:
        return list(patterns) + sorted(OURS) + sorted(f'{n}.*' for n in OURS)  # with and without tags
    return patterns


def list_models(filter='', module='', pretrained=False, exclude_filters='', **kwargs):
    """timm.list_models limited to our names; a module filter also admits our modules."""
    if module:
        module = ([module] if isinstance(module, str) else list(module)) + OUR_MODULES
    names = _list_models(
        _with_ours(filter), module, pretrained=pretrained, exclude_filters=_with_ours(exclude_filters), **kwargs)
    return [n for n in names if n.split('.')[0] in OURS]


def list_pretrained(filter='', exclude_filters=''):
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters)


timm.list_models = list_models
timm.list_pretrained = list_pretrained


def pytest_configure(config):
    for marker in ('base', 'forward', 'backward', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward',
                   'fxbackward', 'timeout'):  # timm's markers (its pyproject.toml); timeout is pytest-timeout's
        config.addinivalue_line('markers', marker)


def pytest_collection_modifyitems(config, items):
    """Deselect the tests of timm's own models (those with fixed model names): only our names run."""
    keep = [i for i in items if str(getattr(i, 'callspec', None) and i.callspec.params.get('model_name')).split('.')[0]
            in OURS]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
