"""PVTv2 with channels-last token maps: timm's ``pvt_v2_*`` with fewer layout copies, same weights, same maths.

timm's PVTv2 keeps tokens as ``(B, N, C)`` and turns them into ``(B, C, H, W)`` maps with
``permute(...).reshape(...)`` before each spatial-reduction conv and ``.contiguous()`` after each stage:
a copy each way in forward and in backward. A ``(B, N, C)`` tensor already *is* a channels-last
``(B, C, H, W)`` map (``transpose(1, 2).view(B, C, H, W)``), which convolutions take as it is (its own
MLP does this for the depthwise conv), and a channels-last conv output flattens back to tokens as a
view. Here the attention's spatial reduction and each stage's output use those views, so no copy is
made; the modules, parameters and state-dict keys are timm's, and timm's weights load unchanged.
``benchmarks/bench_towers.py`` measures the gain; ``tests/models/test_pvt_v2_cl.py`` checks parity.

``pvt_v2_b0_cl`` ... ``pvt_v2_b5_cl``, ``pvt_v2_b2_li_cl`` and their ``_ms`` variants (``pvt_v2_b2_cl_ms``);
an export names the model it equals (``reference_name``), so a plain trunk loads in plain open_clip + timm.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from timm.models import pvt_v2, register_model
from timm.models._manipulate import checkpoint

from .multiscale import register_multiscale

SUFFIX = "_cl"


class Attention(pvt_v2.Attention):
    """timm's spatial-reduction attention; the token map enters and leaves the reduction as views."""

    def forward(self, x, feat_size: List[int]):
        B, N, C = x.shape
        H, W = feat_size
        q = self.q(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        if self.sr is not None:
            x = x.transpose(1, 2).view(B, C, H, W)  # channels-last map of the tokens: no copy
            if self.pool is not None:
                x = self.pool(x)
            x = self.sr(x).flatten(2).transpose(1, 2)  # channels-last conv output: tokens as a view
            x = self.norm(x)
            if self.act is not None:
                x = self.act(x)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class PyramidVisionTransformerStage(pvt_v2.PyramidVisionTransformerStage):
    """timm's stage; its output map stays channels-last (a view of the tokens) instead of a contiguous copy."""

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)  # B, H, W, C
        B, H, W, C = x.shape
        feat_size = (H, W)
        x = x.reshape(B, -1, C)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
        x = self.norm(x)
        return x.reshape(B, H, W, -1).permute(0, 3, 1, 2)


_FASTER = {pvt_v2.Attention: Attention, pvt_v2.PyramidVisionTransformerStage: PyramidVisionTransformerStage}


def channels_last_tokens(model: pvt_v2.PyramidVisionTransformerV2) -> pvt_v2.PyramidVisionTransformerV2:
    """Switch a timm PVTv2 to the copy-free forwards in place.

    The subclasses add no state, only ``forward``, so re-classing each module keeps every parameter,
    buffer and key (timm builds these modules itself, with no hook to pass other classes).
    """
    for module in model.modules():
        faster = _FASTER.get(type(module))
        if faster is not None:
            module.__class__ = faster
    return model


def reference_name(name: str) -> str:
    """The model a ``*_cl`` model equals (weights and outputs): ``pvt_v2_b2_cl`` -> ``pvt_v2_b2``,
    ``pvt_v2_b2_cl_ms`` -> ``pvt_v2_b2_ms``; other names unchanged."""
    base, multiscale = (name[:-3], "_ms") if name.endswith("_ms") else (name, "")
    if base.startswith("pvt_v2_") and base.endswith(SUFFIX):
        return base[: -len(SUFFIX)] + multiscale
    return name


def _create(name: str, pretrained: bool, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return channels_last_tokens(getattr(pvt_v2, name)(pretrained=pretrained, **kwargs))


@register_model
def pvt_v2_b0_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b0', pretrained, **kwargs)


@register_model
def pvt_v2_b1_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b1', pretrained, **kwargs)


@register_model
def pvt_v2_b2_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b2', pretrained, **kwargs)


@register_model
def pvt_v2_b3_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b3', pretrained, **kwargs)


@register_model
def pvt_v2_b4_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b4', pretrained, **kwargs)


@register_model
def pvt_v2_b5_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b5', pretrained, **kwargs)


@register_model
def pvt_v2_b2_li_cl(pretrained=False, **kwargs) -> pvt_v2.PyramidVisionTransformerV2:
    return _create('pvt_v2_b2_li', pretrained, **kwargs)


for _name in ('pvt_v2_b0_cl', 'pvt_v2_b1_cl', 'pvt_v2_b2_cl', 'pvt_v2_b3_cl', 'pvt_v2_b4_cl', 'pvt_v2_b5_cl',
              'pvt_v2_b2_li_cl'):
    register_multiscale(_name)
