""" Pooled multiscale tokens for hierarchical timm trunks

Every chosen stage map of a trunk's `forward_intermediates` is pooled to a k x k grid of tokens
(k=1: global average), normalized, projected to a common width, tagged with a learned stage embedding
(and, for k > 1, a grid position embedding shared by the stages), then the token set is reduced to one
image embedding.

The model is registered in timm as `<trunk>_ms` (e.g. `pvt_v2_b2_ms`) and every head option is carried by
the timm `global_pool` string, because that is the only head choice open_clip's TimmModel passes to timm
(vision_cfg `timm_pool`) and saves in an exported config:

    global_pool = REDUCE [":" KEY "=" VALUE]...

    REDUCE  attn    attention pooling with one learned query (timm AttentionPoolLatent), out width = width
            avg     mean of the tokens, out width = width
            concat  concatenated tokens, out width = width * stages * grid**2
            ''      no reduction (timm convention): forward_head returns the (B, N, width) tokens
    KEY     stages  comma separated stage indices into the trunk's feature_info, negative counts from the end
                    (default: all stages)
            grid    k, tokens per stage side (default 1)
            width   common token width (default: channels of the deepest chosen stage)
            heads   attention heads, attn only (default 8, must divide width)

e.g. 'attn', 'attn:grid=2', 'avg:stages=1,2,3:width=256', 'attn:stages=-2,-1:heads=4'.
Plain last-stage average pooling is the trunk itself (`pvt_v2_b2`, global_pool 'avg'), no wrapper.
"""
import re
import sys
from dataclasses import dataclass, replace
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.layers import AttentionPoolLatent, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._builder import pretrained_cfg_for_features

__all__ = ['MultiScale', 'MultiScaleTokens', 'PoolSpec', 'parse_pool', 'create_multiscale', 'register_multiscale',
           'multiscale_trunks']

REDUCTIONS = ('attn', 'avg', 'concat')
OPTION_KEYS = ('grid', 'heads', 'stages', 'width')


@dataclass(frozen=True)
class PoolSpec:
    reduce: str = 'attn'
    stages: Optional[Tuple[int, ...]] = None  # None: all stages of the trunk
    grid: int = 1
    width: Optional[int] = None  # None: channels of the deepest chosen stage
    heads: Optional[int] = None  # None: 8 for attn


def _parse_int(key: str, value: str, spec: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"option '{key}' in global_pool '{spec}' must be an integer, got '{value}'") from None
    if number < 1 and key != 'stages':
        raise ValueError(f"option '{key}' in global_pool '{spec}' must be >= 1, got {number}")
    return number


def parse_pool(spec: str) -> PoolSpec:
    """Parse a global_pool string (grammar in the module docstring) without knowing the trunk."""
    reduce, *options = spec.split(':')
    if reduce not in REDUCTIONS + ('',):
        raise ValueError(
            f"unknown multiscale pooling '{reduce}' in global_pool '{spec}'; valid: {', '.join(REDUCTIONS)} "
            f"(or '' for unreduced tokens), optionally followed by ':key=value' with keys {', '.join(OPTION_KEYS)}")
    fields = {}
    for option in options:
        key, sep, value = option.partition('=')
        if not sep or key not in OPTION_KEYS:
            raise ValueError(
                f"bad option '{option}' in global_pool '{spec}'; expected key=value with key one of "
                f"{', '.join(OPTION_KEYS)}")
        if key in fields:
            raise ValueError(f"option '{key}' given twice in global_pool '{spec}'")
        if key == 'stages':
            fields[key] = tuple(_parse_int(key, v, spec) for v in value.split(','))
        else:
            fields[key] = _parse_int(key, value, spec)
    if 'heads' in fields and reduce != 'attn':
        raise ValueError(f"option 'heads' in global_pool '{spec}' only applies to 'attn' pooling")
    return PoolSpec(reduce=reduce, **fields)


def _resolve(spec: PoolSpec, stage_chs: Sequence[int], pool_str: str) -> PoolSpec:
    """Fill the trunk-dependent defaults and check the options against the trunk's stages."""
    num_stages = len(stage_chs)
    stages = spec.stages if spec.stages is not None else tuple(range(num_stages))
    resolved = []
    for idx in stages:
        if not -num_stages <= idx < num_stages:
            raise ValueError(
                f"stage index {idx} in global_pool '{pool_str}' is out of range for a trunk with {num_stages} "
                f"stages; valid: 0..{num_stages - 1} or -{num_stages}..-1")
        resolved.append(idx % num_stages)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"stage indices in global_pool '{pool_str}' repeat a stage: {stages}")
    stages = tuple(sorted(resolved))
    width = spec.width or stage_chs[stages[-1]]
    heads = spec.heads or 8
    if spec.reduce == 'attn' and width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads} in global_pool '{pool_str}'")
    return replace(spec, stages=stages, width=width, heads=heads if spec.reduce == 'attn' else None)


class MultiScaleTokens(nn.Module):
    """ Stage maps (NCHW) -> (B, stages * grid**2, width) tokens with stage and grid position embeddings."""

    def __init__(
            self,
            stage_chs: Sequence[int],
            grid: int = 1,
            width: int = 256,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grid = grid
        # stage outputs of most trunks are unnormalized and differ in scale, so each gets its own norm
        self.norms = nn.ModuleList([nn.LayerNorm(c, **dd) for c in stage_chs])
        self.projs = nn.ModuleList([nn.Linear(c, width, **dd) for c in stage_chs])
        self.stage_embed = nn.Parameter(torch.zeros(len(stage_chs), width, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, width, **dd)) if grid > 1 else None
        self.init_weights()

    def init_weights(self):
        for proj in self.projs:
            trunc_normal_(proj.weight, std=.02)
            nn.init.zeros_(proj.bias)
        trunc_normal_(self.stage_embed, std=.02)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)

    def project(self, maps: List[torch.Tensor], grid: Optional[int] = None) -> List[torch.Tensor]:
        """Pool and project each stage map to (B, grid**2, width) (default: the trained grid), before any embedding."""
        grid = self.grid if grid is None else grid
        tokens = []
        for i, (norm, proj) in enumerate(zip(self.norms, self.projs)):  # torchscript zips no tensor list
            x = F.adaptive_avg_pool2d(maps[i], grid).flatten(2).transpose(1, 2)
            tokens.append(proj(norm(x)))
        return tokens

    def embed(self, tokens: List[torch.Tensor], pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the stage and (grid > 1) position embeddings (pos_embed: one resampled for another grid),
        concatenate stage by stage."""
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        out = []
        for i, t in enumerate(tokens):
            t = t + self.stage_embed[i]  # indexed, not iterated: a traced parameter cannot be iterated (fx)
            if pos_embed is not None:
                t = t + pos_embed
            out.append(t)
        return torch.cat(out, dim=1)

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        return self.embed(self.project(maps))


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def _create_reducer(spec: PoolSpec, dd) -> Tuple[nn.Module, int]:
    """The token reduction for a resolved spec and the width it outputs."""
    if spec.reduce == 'attn':
        # timm's SigLIP-style latent-query pool (multi-head, F.scaled_dot_product_attention, residual MLP)
        return AttentionPoolLatent(spec.width, num_heads=spec.heads, norm_layer=nn.LayerNorm, **dd), spec.width
    if spec.reduce == 'avg':
        return TokenMean(), spec.width
    if spec.reduce == 'concat':
        return nn.Flatten(1), spec.width * len(spec.stages) * spec.grid ** 2
    return nn.Identity(), spec.width


def _prefix_matcher(matcher: Dict, prefix: str) -> Dict:
    """Re-anchor a trunk's group_matcher regexes under the attribute the trunk lives in."""
    def anchor(pattern):
        # group the alternatives (resnet: '^conv1|bn1|maxpool') so the prefix applies to each of them
        return '^' + prefix + '(?:' + re.sub(r'(^|\|)\^', r'\1', pattern) + ')'
    out = {}
    for group, rule in matcher.items():
        if isinstance(rule, str):
            out[group] = anchor(rule)
        else:
            out[group] = [(anchor(pattern), order) for pattern, order in rule]
    return out


_PREPROCESS_CFG_KEYS = ('input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


class MultiScale(nn.Module):
    """ A timm trunk with the pooled multiscale token head, behind the timm model interface.

    forward_features returns the (B, N, width) multiscale tokens, forward_head reduces them.
    """

    def __init__(
            self,
            trunk: nn.Module,
            num_classes: int = 1000,
            global_pool: str = 'attn',
            drop_rate: float = 0.,
            in_chans: int = 3,
    ):
        super().__init__()
        if not hasattr(trunk, 'forward_intermediates') or not hasattr(trunk, 'feature_info'):
            raise ValueError(
                f'{type(trunk).__name__} has no forward_intermediates/feature_info, multiscale pooling needs both')
        self.trunk = trunk
        self.in_chans = in_chans
        self.num_stages = len(trunk.feature_info)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self._build_head(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        dd = get_device_dtype(trunk)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        # the trunk's stages are this model's features (features_only, forward_intermediates)
        self.feature_info = [
            dict(info, module=f"trunk.{info['module']}") for info in self.trunk.feature_info[:self.num_stages]]

    def _build_head(self, global_pool: str):
        dd = get_device_dtype(self.trunk)
        stage_chs = [info['num_chs'] for info in self.trunk.feature_info[:self.num_stages]]
        spec = _resolve(parse_pool(global_pool), stage_chs, global_pool)
        old = getattr(self, 'spec', None)
        if old is None or (old.stages, old.grid, old.width) != (spec.stages, spec.grid, spec.width):
            tokens = MultiScaleTokens([stage_chs[i] for i in spec.stages], spec.grid, spec.width, **dd)
            self.tokens = tokens.train(self.training)
            self._prune_trunk(spec.stages)
        if old != spec:
            pool, self.num_features = _create_reducer(spec, dd)
            self.pool = pool.train(self.training)
        self.spec = spec
        self.token_head = True  # spec for torchscript, which cannot read a dataclass
        self.stage_indices: List[int] = list(spec.stages)  # the spec's stages, typed for torchscript
        self.global_pool = global_pool
        self.head_hidden_size = self.num_features

    def _prune_trunk(self, stages: Tuple[int, ...]):
        # dropping unused stages, the trunk's final norm and classifier leaves no unused parameters (DDP)
        if hasattr(self.trunk, 'prune_intermediate_layers'):
            self.trunk.prune_intermediate_layers(list(stages), prune_norm=True, prune_head=True)
            self.num_stages = max(stages) + 1
        else:
            self.trunk.reset_classifier(0, '')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return _prefix_matcher(self.trunk.group_matcher(coarse=coarse), r'trunk\.')

    @torch.jit.ignore
    def no_weight_decay(self):
        trunk_nwd = self.trunk.no_weight_decay() if hasattr(self.trunk, 'no_weight_decay') else set()
        head_nwd = {'tokens.stage_embed', 'tokens.pos_embed', 'pool.latent'}
        return {'trunk.' + n for n in trunk_nwd} | head_nwd

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.trunk.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def set_input_size(self, img_size=None, **kwargs):
        """Resize a fixed-size trunk (swin); open_clip's TimmModel.set_input_size calls this. A trunk without
        set_input_size takes any size, so there is nothing to resize (the head is size-independent)."""
        if hasattr(self.trunk, 'set_input_size'):
            self.trunk.set_input_size(img_size=img_size, **kwargs)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New classifier; a new global_pool rebuilds only the head parts whose options changed."""
        if global_pool is not None:
            if global_pool == '':
                # timm convention: '' removes the reduction, the token options stay as they are
                options = [o for o in self.global_pool.split(':')[1:] if not o.startswith('heads=')]
                global_pool = ':'.join([''] + options)
            self._build_head(global_pool)
        self.num_classes = num_classes
        dd = get_device_dtype(self.trunk)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Keep the trunk stages the indices need (timm's features_only); the token head goes with the head."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        if prune_head or max_index < max(self.spec.stages):
            self.tokens, self.pool, self.head = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_classes = 0
            self.spec = None  # no token head: forward_intermediates returns stage maps only
            self.token_head = False
            # as in a pruned timm trunk, the features end at the deepest kept stage
            self.stage_indices = [max_index]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if hasattr(self.trunk, 'prune_intermediate_layers'):
            self.trunk.prune_intermediate_layers(take_indices, prune_norm=prune_norm, prune_head=True)
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:self.num_stages]
        return take_indices

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Trunk stage outputs (NCHW or NHWC) and, unless intermediates_only, the multiscale tokens."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'")
        take_indices, _ = feature_take_indices(self.num_stages, indices)
        if not intermediates_only and self.spec is None:
            raise ValueError('the token head was pruned (features_only); use intermediates_only=True')
        needed = set(take_indices) if intermediates_only else set(take_indices) | set(self.spec.stages)
        needed = sorted(needed)
        maps = self.trunk.forward_intermediates(
            x, indices=needed, norm=norm, stop_early=stop_early or intermediates_only, intermediates_only=True)
        by_index = dict(zip(needed, maps))
        intermediates = [by_index[i] for i in take_indices]
        if output_fmt == 'NHWC':
            intermediates = [t.permute(0, 2, 3, 1) for t in intermediates]
        if intermediates_only:
            return intermediates
        return self.tokens([by_index[i] for i in self.spec.stages]), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.trunk.forward_intermediates(
            x, indices=self.stage_indices, stop_early=True, intermediates_only=True)
        assert isinstance(maps, list)  # narrows the trunk's declared return type for torchscript
        if not self.token_head:  # pruned (features_only): the deepest kept stage map
            return maps[-1]
        return self.tokens(maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _build(
        trunk_name: str,
        num_classes: int = 1000,
        global_pool: str = 'attn',
        drop_rate: float = 0.,
        in_chans: int = 3,
        **trunk_kwargs,
) -> MultiScale:
    """The trunk (random init; weights come through timm's pretrained loading of the whole model) + the head.

    trunk_kwargs reach the trunk, img_size included: timm passes it from the cfg to fixed-size trunks (swin)."""
    trunk = timm.create_model(trunk_name, pretrained=False, num_classes=0, in_chans=in_chans, **trunk_kwargs)
    return MultiScale(trunk, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate, in_chans=in_chans)


def _create_multiscale(variant: str, trunk_name: str, pretrained: bool = False, **kwargs) -> MultiScale:
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    feature_cls = kwargs.pop('feature_cls', 'getter')
    feature_cfg = kwargs.pop('feature_cfg', None) or {}
    feature_cls = feature_cfg.pop('feature_cls', feature_cls)
    if features_only and feature_cls != 'getter':
        raise ValueError(f"{variant}: features_only supports feature_cls='getter' only, got {feature_cls!r}")
    model = build_model_with_cfg(partial(_build, trunk_name), variant, pretrained, **kwargs)
    if not features_only:
        return model
    # wrapped here rather than by build_model_with_cfg: the default out_indices (every stage) depend on the
    # trunk, which is only known once it is built
    if out_indices is None:
        out_indices = feature_cfg.pop('out_indices', tuple(range(len(model.feature_info))))
    features = FeatureGetterNet(model, out_indices=out_indices, **feature_cfg)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return features


def _ms_cfg(trunk_name: str) -> dict:
    """The `<trunk>_ms` default cfg: the trunk's preprocessing, no weights of its own (pool_size None:
    forward_features returns a token sequence, as timm's ViTs do)."""
    trunk_cfg = get_pretrained_cfg(trunk_name)
    trunk_cfg = trunk_cfg.to_dict() if trunk_cfg is not None else {}
    cfg = {k: trunk_cfg[k] for k in _PREPROCESS_CFG_KEYS if trunk_cfg.get(k) is not None}
    first_conv = trunk_cfg.get('first_conv')
    if isinstance(first_conv, str):
        first_conv = 'trunk.' + first_conv
    elif first_conv:
        first_conv = tuple('trunk.' + c for c in first_conv)
    cfg.update(num_classes=1000, classifier='head', pool_size=None, first_conv=first_conv)
    return cfg


default_cfgs: Dict = {}
_REGISTERED: Dict[str, str] = {}  # trunk name -> registered multiscale model name


def register_multiscale(trunk_name: str) -> str:
    """Register `<trunk_name>_ms` and its default cfg in timm's registry (idempotent) and return that name."""
    if trunk_name in _REGISTERED:
        return _REGISTERED[trunk_name]
    if not timm.is_model(trunk_name):
        raise ValueError(f"'{trunk_name}' is not a timm model; register its module before clip_hvt.models.multiscale")
    name = f'{trunk_name}_ms'

    def entrypoint(pretrained: bool = False, **kwargs) -> MultiScale:
        return _create_multiscale(name, trunk_name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'{trunk_name} with pooled multiscale tokens; global_pool grammar in {__name__}.'
    default_cfgs.update(generate_default_cfgs({name: _ms_cfg(trunk_name)}))
    register_model(entrypoint)
    setattr(sys.modules[__name__], name, entrypoint)
    _REGISTERED[trunk_name] = name
    return name


def multiscale_trunks() -> List[str]:
    """Trunks with a registered `<trunk>_ms` model."""
    return sorted(_REGISTERED)


def create_multiscale(trunk_name: str, pretrained: bool = False, **kwargs) -> MultiScale:
    """Build `<trunk_name>_ms` through timm, e.g. create_multiscale('pvt_v2_b2', global_pool='attn:grid=2')."""
    if trunk_name not in _REGISTERED:
        raise ValueError(
            f"no multiscale model for trunk '{trunk_name}'; supported trunks: {', '.join(multiscale_trunks())} "
            f"(register_multiscale adds another timm trunk that has forward_intermediates)")
    return timm.create_model(_REGISTERED[trunk_name], pretrained=pretrained, **kwargs)


_TRUNKS = (
    'pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'pvt_v2_b2_li', 'pvt_v2_b3', 'pvt_v2_b4', 'pvt_v2_b5',
    'convnext_atto', 'convnext_tiny', 'convnext_small', 'swin_tiny_patch4_window7_224', 'resnet50',
)
# clip_hvt.models.cvt registers these when it is imported first (clip_hvt.models does so)
_OPTIONAL_TRUNKS = ('cvt_13', 'cvt_21', 'cvt_w24')

for _trunk in _TRUNKS + tuple(t for t in _OPTIONAL_TRUNKS if timm.is_model(t)):
    register_multiscale(_trunk)
