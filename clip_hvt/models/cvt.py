""" Convolutional vision Transformer (CvT)

Paper:
* `CvT: Introducing Convolutions to Vision Transformers` - https://arxiv.org/abs/2103.15808

@inproceedings{wu2021cvt,
  title={CvT: Introducing Convolutions to Vision Transformers},
  author={Wu, Haiping and Xiao, Bin and Codella, Noel and Liu, Mengchen and Dai, Xiyang and Yuan, Lu and Zhang, Lei},
  booktitle={ICCV},
  year={2021}
}

Written for clip_hvt in timm's style (timm has no CvT); weights convert from the Hugging Face `CvtModel` /
`CvtForImageClassification` layout (microsoft/cvt-13, cvt-21, cvt-w24 families) via `checkpoint_filter_fn`.

Architecture: three stages, each an overlapping conv token embedding (conv + LayerNorm; kernel/stride/padding
7/4/2, then 3/2/1 twice) followed by pre-norm transformer blocks whose attention projects q/k/v with a depthwise
3x3 conv + BatchNorm (stride 1 for q, stride 2 for k/v) and then a linear layer. The last stage carries a class
token, which takes part in attention but skips the conv projection. Attention scores are scaled by
`dim ** -0.5` (the full embedding width, not the head width) as in the reference code, so pretrained weights
keep their meaning.

Input sizes: any H, W >= 3 (the 7x7/stride 4/padding 2 stem needs 3 pixels; the stride-2 stages then accept
any map). The maps are H1 = (H - 3) // 4 + 1, H2 = ceil(H1 / 2), H3 = ceil(H2 / 2) (same for W); sizes that are a
multiple of 16 give exact reductions 4, 8, 16 (224 -> 56, 28, 14). Smaller inputs raise a ValueError.

BatchNorm in the q/k/v projections and distributed training (`bn_mode`):
* 'batch' (default, as in the paper): plain `nn.BatchNorm2d`. Under DDP each rank normalises with its own batch
  statistics and DDP broadcasts rank 0's running statistics. For global statistics convert the model with
  `torch.nn.SyncBatchNorm.convert_sync_batchnorm` (Lightning: `Trainer(sync_batchnorm=True)`); k and v are
  separate BatchNorms (as in the checkpoints), so that is three all-reduces per block.
* 'frozen': every BatchNorm becomes torchvision's `FrozenBatchNorm2d` (timm's `freeze_batch_norm_2d`): running
  statistics and affine fixed, identical on every rank, no communication. Meant for fine-tuning pretrained
  weights with small per-GPU batches; freezing the affine costs nothing in expressiveness because the linear
  q/k/v layer that follows can absorb any per-channel scale and shift.
Gradient checkpointing recomputes blocks without updating BatchNorm running statistics a second time.

Speed: tokens stay in (B, N, C) order, which viewed as NCHW is channels-last memory, so the convolutions and
BatchNorms run channels-last without copies. Attention goes through `F.scaled_dot_product_attention`, except on
the CPU for small score matrices (stages 2 and 3 at 224 px), where explicit matmuls + softmax are faster. Under
CPU autocast the strided k/v projections (depthwise conv + BatchNorm) stay in fp32: oneDNN's bf16 backward of
strided depthwise convs is ~30x slower there. Training throughput on 2 CPU cores is in benchmarks/README.md.
"""
from contextlib import contextmanager, nullcontext
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, Mlp, calculate_drop_path_rates, freeze_batch_norm_2d, get_device_dtype, to_ntuple, trunc_normal_,
    use_fused_attn)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module

__all__ = ['ConvolutionalVisionTransformer', 'checkpoint_filter_fn']

_BN_MODES = ('batch', 'frozen')
_GLOBAL_POOLS = ('token', 'avg', '')
# below this many scores per head, PyTorch's CPU flash attention is slower than explicit matmuls + softmax
# (measured fwd+bwd, batch 16, bf16: 2-4x slower in stages 2 and 3; fp32: even); stage 1 of CvT-13 at 224 px
# has 3136 x 784 scores, where flash is 1.3-2x faster
_CPU_SDPA_MIN_SCORES = 2 ** 20


@register_notrace_module  # its device/autocast branch is Python control flow: an fx leaf
class ConvProjection(nn.Module):
    """ Depthwise conv + BatchNorm that turns a feature map into q, k or v tokens. """

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(
            dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False, **dd)
        self.bn = nn.BatchNorm2d(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # torchscript has no autocast state to ask
            if self.conv.stride[0] > 1 and x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
                # oneDNN's bf16 backward of strided depthwise convs is ~30x slower than fp32 on CPU
                with torch.autocast('cpu', enabled=False):
                    x = self.bn(self.conv(x.to(self.conv.weight.dtype)))
                return x.permute(0, 2, 3, 1).flatten(1, 2)
        x = self.bn(self.conv(x))
        return x.permute(0, 2, 3, 1).flatten(1, 2)  # a view: the map is channels-last


@register_notrace_function  # chooses the kernel from the device and sizes: opaque to fx
def conv_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float, fused: bool,
        cpu_sdpa_min_scores: int,
) -> torch.Tensor:
    if fused and (q.device.type != 'cpu' or q.shape[-2] * k.shape[-2] >= cpu_sdpa_min_scores):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = F.dropout(attn.softmax(dim=-1), dropout_p, dropout_p > 0.)
    return attn @ v


# also wrapped for traces rooted elsewhere (a `<trunk>_ms` model calls forward_intermediates, not a module call)
torch.fx.wrap('conv_attention')


class ConvAttention(nn.Module):
    """ Multi-head attention over conv-projected q/k/v; prefix (class) tokens bypass the conv projection. """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 3,
            stride_q: int = 1,
            stride_kv: int = 2,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            num_prefix_tokens: int = 0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert dim % num_heads == 0, f'dim {dim} should be divided by num_heads {num_heads}.'
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        # the reference CvT scales by the full width; kept so that converted weights behave identically
        self.scale = dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.cpu_sdpa_min_scores = _CPU_SDPA_MIN_SCORES  # an attribute: torchscript reads no int globals

        self.conv_proj_q = ConvProjection(dim, kernel_size, stride_q, **dd)
        self.conv_proj_k = ConvProjection(dim, kernel_size, stride_kv, **dd)
        self.conv_proj_v = ConvProjection(dim, kernel_size, stride_kv, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        prefix: Optional[torch.Tensor] = None
        x_map = x[:, self.num_prefix_tokens:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        if self.num_prefix_tokens:
            prefix = x[:, :self.num_prefix_tokens]
            # one copy here instead of one inside each of the three convs
            x_map = x_map.contiguous(memory_format=torch.channels_last)

        q = self.q(self.conv_proj_q(x_map))
        k = self.k(self.conv_proj_k(x_map))
        v = self.v(self.conv_proj_v(x_map))
        if prefix is not None:
            # The prefix gets its own linear, joined after: joined before, the cat's backward would hand the
            # BatchNorm a strided slice of the gradient, and its CPU backward is ~7x slower on one (8.4 vs
            # 1.2 ms a call in stage 3 of CvT-13 at batch 16, fp32).
            q = torch.cat([self.q(prefix), q], dim=1)
            k = torch.cat([self.k(prefix), k], dim=1)
            v = torch.cat([self.v(prefix), v], dim=1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        x = conv_attention(
            q, k, v, self.scale, self.attn_drop if self.training else 0., self.fused_attn, self.cpu_sdpa_min_scores)

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            kernel_size: int = 3,
            stride_q: int = 1,
            stride_kv: int = 2,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            num_prefix_tokens: int = 0,
            act_layer: type = nn.GELU,
            norm_layer: type = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ConvAttention(
            dim,
            num_heads=num_heads,
            kernel_size=kernel_size,
            stride_q=stride_q,
            stride_kv=stride_kv,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            num_prefix_tokens=num_prefix_tokens,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class ConvEmbed(nn.Module):
    """ Overlapping conv token embedding: NCHW map in, normalised NHWC tokens out. """

    def __init__(
            self,
            in_chans: int,
            embed_dim: int,
            patch_size: int,
            stride: int,
            padding: int,
            norm_layer: type = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=padding, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@contextmanager
def _frozen_bn_stats(module: nn.Module):
    """ Batch statistics without a running-stat update, for the recompute pass of gradient checkpointing.

    Momentum 0 instead of track_running_stats=False: the recompute must save the same tensors as the forward.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.
    try:
        yield
    finally:
        for m, (momentum, num_batches_tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(num_batches_tracked)


def _checkpoint_block(blk: nn.Module, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    # direct call instead of timm's wrapper: context_fn needs the non-reentrant variant; a function of its own
    # because torchscript cannot parse the lambda (it never compiles this branch)
    return torch.utils.checkpoint.checkpoint(
        blk, x, feat_size,
        use_reentrant=False,
        context_fn=lambda blk=blk: (nullcontext(), _frozen_bn_stats(blk)),
    )


class CvtStage(nn.Module):

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            patch_size: int = 3,
            patch_stride: int = 2,
            patch_padding: int = 1,
            num_heads: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            cls_token: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            norm_layer: type = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.num_prefix_tokens = 1 if cls_token else 0
        self.patch_embed = ConvEmbed(
            dim, dim_out, patch_size, patch_stride, patch_padding, norm_layer=norm_layer, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim_out, **dd)) if cls_token else None
        self.blocks = nn.ModuleList([Block(
            dim=dim_out,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
            num_prefix_tokens=self.num_prefix_tokens,
            norm_layer=norm_layer,
            **dd,
        ) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """ NCHW map in; (B, prefix + H * W, C) tokens and their (H, W) out. """
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        feat_size = (H, W)
        x = x.reshape(B, H * W, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = _checkpoint_block(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
        return x, feat_size


def _tokens_to_map(x: torch.Tensor, feat_size: Tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """ Spatial tokens as an NCHW view with channels-last memory (no copy). """
    B, _, C = x.shape
    return x[:, num_prefix_tokens:].reshape(B, feat_size[0], feat_size[1], C).permute(0, 3, 1, 2)


Geometry = Tuple[Tuple[Tuple[int, int, int], Tuple[int, int, int]], ...]  # per stage, per side: kernel, stride, pad


def _stage_sizes(img_size: Tuple[int, int], geometry: Geometry) -> List[Tuple[int, int]]:
    sizes = []
    h, w = img_size
    for (kh, sh, ph), (kw, sw, pw) in geometry:
        h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        sizes.append((h, w))
    return sizes


@register_notrace_function  # checks concrete sizes: opaque to fx (a public name: fx autowraps no _private one)
def check_input(x: torch.Tensor, in_chans: int, geometry: Geometry) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f'CvT expects images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}.')
    sizes = _stage_sizes(tuple(x.shape[-2:]), geometry)
    if min(min(s) for s in sizes) < 1:
        min_size = next(n for n in range(1, 1 << 16) if min(_stage_sizes((n, n), geometry)[-1]) >= 1)
        raise ValueError(
            f'Image size {tuple(x.shape[-2:])} is too small for this CvT: every side needs at least '
            f'{min_size} pixels (stage maps for this size would be {sizes}).')


torch.fx.wrap('check_input')


class ConvolutionalVisionTransformer(nn.Module):

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            depths: Tuple[int, ...] = (1, 2, 10),
            embed_dims: Tuple[int, ...] = (64, 192, 384),
            num_heads: Tuple[int, ...] = (1, 3, 6),
            patch_sizes: Tuple[int, ...] = (7, 3, 3),
            patch_strides: Tuple[int, ...] = (4, 2, 2),
            patch_paddings: Tuple[int, ...] = (2, 1, 1),
            mlp_ratios: Union[float, Tuple[float, ...]] = 4.,
            qkv_bias: bool = True,
            cls_token: bool = True,
            bn_mode: str = 'batch',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: type = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cls_token: Add a class token to the last stage (as in the paper).
            global_pool: 'token' (class token, needs cls_token), 'avg' (mean of the spatial tokens) or '' (none).
            bn_mode: 'batch' (nn.BatchNorm2d, SyncBatchNorm-convertible) or 'frozen' (FrozenBatchNorm2d).
            drop_path_rate: Stochastic depth rate of the last block; it grows linearly from 0 over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if bn_mode not in _BN_MODES:
            raise ValueError(f'bn_mode must be one of {_BN_MODES}, got {bn_mode!r}.')
        self._check_pool(global_pool, cls_token)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if cls_token else 0
        self.depths = depths
        mlp_ratios = to_ntuple(num_stages)(mlp_ratios)
        self.feature_info = []

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        dpr = [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        prev_dim = in_chans
        reduction = 1
        for i in range(num_stages):
            stages.append(CvtStage(
                dim=prev_dim,
                dim_out=embed_dims[i],
                depth=depths[i],
                patch_size=patch_sizes[i],
                patch_stride=patch_strides[i],
                patch_padding=patch_paddings[i],
                num_heads=num_heads[i],
                mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias,
                cls_token=cls_token and i == num_stages - 1,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                **dd,
            ))
            prev_dim = embed_dims[i]
            reduction *= patch_strides[i]
            self.feature_info += [dict(num_chs=prev_dim, reduction=reduction, module=f'stages.{i}')]
        self.stages = nn.ModuleList(stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = norm_layer(embed_dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=.02)
        if bn_mode == 'frozen':
            freeze_batch_norm_2d(self)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check_pool(self, global_pool: str, cls_token: bool):
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}.')
        if global_pool == 'token' and not cls_token:
            raise ValueError("global_pool='token' needs the class token (cls_token=True); use 'avg' or ''.")

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'stages.{i}.cls_token' for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(
            stem=r'^stages\.0\.patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:patch_embed|cls_token)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool, self.num_prefix_tokens > 0 and len(self.stages) == len(self.depths))
            self.global_pool = global_pool
        dd = get_device_dtype(self.stages)  # the final norm may have been pruned
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def _geometry(self) -> Geometry:
        convs = [stage.patch_embed.proj for stage in self.stages]
        return tuple(tuple((c.kernel_size[d], c.stride[d], c.padding[d]) for d in (0, 1)) for c in convs)

    @torch.jit.ignore
    def feat_sizes(self, img_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """ (H, W) of every stage's map for an image size; ValueError if the strides cannot take it. """
        check_input(torch.empty(0, self.in_chans, *img_size, device='meta'), self.in_chans, self._geometry())
        return _stage_sizes(tuple(img_size), self._geometry())

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last stage's map (the only one of matching width).
            stop_early: Stop after the last requested stage (the final features need all stages, so the
                returned final tokens are only normalised when every stage ran).
            output_fmt: Shape of intermediate feature outputs, 'NCHW' only. The maps are channels-last in
                memory (views of the token tensors).
            intermediates_only: Only return intermediate features.
        Returns:
            Per-stage maps, or (final tokens (B, prefix + H * W, C), per-stage maps).
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        if not torch.jit.is_scripting():
            check_input(x, self.in_chans, self._geometry())
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1

        x = x.contiguous(memory_format=torch.channels_last)
        feat_size = (x.shape[-2], x.shape[-1])  # defined before the loop for torchscript
        for feat_idx, stage in enumerate(self.stages):
            if stop_early and feat_idx > max_index:  # (no break: torchscript unrolls ModuleList loops)
                pass
            else:
                if feat_idx > 0:
                    x = _tokens_to_map(x, feat_size, 0)
                x, feat_size = stage(x)
                if feat_idx in take_indices:
                    x_inter = self.norm(x) if norm and feat_idx == last_idx else x
                    intermediates.append(_tokens_to_map(x_inter, feat_size, stage.num_prefix_tokens))

        if intermediates_only:
            return intermediates
        if not stop_early or max_index == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """ Prune layers not required for specified intermediates. """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            # the final norm and head are sized for the last stage, which is gone
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.num_prefix_tokens = self.stages[-1].num_prefix_tokens
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ Image (B, C, H, W) -> normalised final tokens (B, prefix + H3 * W3, C), class token first. """
        if not torch.jit.is_scripting():
            check_input(x, self.in_chans, self._geometry())
        x = x.contiguous(memory_format=torch.channels_last)
        feat_size = (x.shape[-2], x.shape[-1])  # defined before the loop for torchscript
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = _tokens_to_map(x, feat_size, 0)
            x, feat_size = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


_HF_RENAMES = (
    ('embedding.convolution_embeddings.projection', 'patch_embed.proj'),
    ('embedding.convolution_embeddings.normalization', 'patch_embed.norm'),
    ('.layers.', '.blocks.'),
    ('attention.attention.convolution_projection_query.convolution_projection.convolution', 'attn.conv_proj_q.conv'),
    ('attention.attention.convolution_projection_query.convolution_projection.normalization', 'attn.conv_proj_q.bn'),
    ('attention.attention.convolution_projection_key.convolution_projection.convolution', 'attn.conv_proj_k.conv'),
    ('attention.attention.convolution_projection_key.convolution_projection.normalization', 'attn.conv_proj_k.bn'),
    ('attention.attention.convolution_projection_value.convolution_projection.convolution', 'attn.conv_proj_v.conv'),
    ('attention.attention.convolution_projection_value.convolution_projection.normalization', 'attn.conv_proj_v.bn'),
    ('attention.attention.projection_query', 'attn.q'),
    ('attention.attention.projection_key', 'attn.k'),
    ('attention.attention.projection_value', 'attn.v'),
    ('attention.output.dense', 'attn.proj'),
    ('intermediate.dense', 'mlp.fc1'),
    ('output.dense', 'mlp.fc2'),
    ('layernorm_before', 'norm1'),
    ('layernorm_after', 'norm2'),
)


def checkpoint_filter_fn(state_dict, model):
    """ Remap Hugging Face `CvtModel` / `CvtForImageClassification` checkpoints -> this layout.

    A `CvtModel` checkpoint has no final norm; it then keeps its identity initialisation.
    """
    if 'stages.0.patch_embed.proj.weight' in state_dict:
        return state_dict  # already in this layout

    out_dict = {}
    for k, v in state_dict.items():
        k = k.removeprefix('cvt.').removeprefix('encoder.')
        if k.startswith('layernorm.'):
            k = 'norm.' + k[len('layernorm.'):]
        elif k.startswith('classifier.'):
            k = 'head.' + k[len('classifier.'):]
        else:
            for old, new in _HF_RENAMES:
                k = k.replace(old, new)
        out_dict[k] = v

    if 'norm.weight' not in out_dict and isinstance(model.norm, nn.LayerNorm):
        out_dict['norm.weight'] = torch.ones_like(model.norm.weight, device='cpu')
        out_dict['norm.bias'] = torch.zeros_like(model.norm.bias, device='cpu')
    return out_dict


def _create_cvt(variant, pretrained=False, **kwargs):
    out_indices = kwargs.pop('out_indices', (0, 1, 2))
    model = build_model_with_cfg(
        ConvolutionalVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )
    return model


def _cfg(hf_hub_id='', **kwargs):
    # hf_hub_id names the Hugging Face (transformers-layout) source as metadata; checkpoint_filter_fn converts it
    return {
        'hf_hub_id': hf_hub_id, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stages.0.patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs
    }


_CFG_384 = dict(input_size=(3, 384, 384), pool_size=(24, 24), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    'cvt_13.ms_in1k': _cfg(hf_hub_id='microsoft/cvt-13'),
    'cvt_13.ms_in1k_384': _cfg(hf_hub_id='microsoft/cvt-13-384', **_CFG_384),
    'cvt_13.ms_in22k_ft_in1k_384': _cfg(hf_hub_id='microsoft/cvt-13-384-22k', **_CFG_384),
    'cvt_21.ms_in1k': _cfg(hf_hub_id='microsoft/cvt-21'),
    'cvt_21.ms_in1k_384': _cfg(hf_hub_id='microsoft/cvt-21-384', **_CFG_384),
    'cvt_21.ms_in22k_ft_in1k_384': _cfg(hf_hub_id='microsoft/cvt-21-384-22k', **_CFG_384),
    'cvt_w24.ms_in22k_ft_in1k_384': _cfg(hf_hub_id='microsoft/cvt-w24-384-22k', **_CFG_384),
})


@register_model
def cvt_13(pretrained=False, **kwargs) -> ConvolutionalVisionTransformer:
    model_args = dict(depths=(1, 2, 10), embed_dims=(64, 192, 384), num_heads=(1, 3, 6))
    return _create_cvt('cvt_13', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cvt_21(pretrained=False, **kwargs) -> ConvolutionalVisionTransformer:
    model_args = dict(depths=(1, 4, 16), embed_dims=(64, 192, 384), num_heads=(1, 3, 6))
    return _create_cvt('cvt_21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cvt_w24(pretrained=False, **kwargs) -> ConvolutionalVisionTransformer:
    model_args = dict(depths=(2, 2, 20), embed_dims=(192, 768, 1024), num_heads=(3, 12, 16))
    return _create_cvt('cvt_w24', pretrained=pretrained, **dict(model_args, **kwargs))
