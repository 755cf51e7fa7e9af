"""Token sequences for large multimodal models (LLaVA-style) from a trained image trunk.

An LMM reads a sequence of image tokens, not one pooled vector. From any of our image towers (an open_clip
model, e.g. ``hub.load_open_clip(EXPORT_DIR)``, or its timm trunk) this gives, for images (B, 3, H, W):

- ``stage_maps(model, images)``: every stage's map, a list of (B, C_i, H_i, W_i) (PVTv2: C = 32/64/160/256
  for B0, H_i = H/4, H/8, H/16, H/32; CvT: H/4, H/8, H/16; the trunk's ``feature_info`` gives C_i and the
  reduction). ``as_tokens(maps)`` flattens each to (B, H_i * W_i, C_i).
- ``multiscale_tokens(model, images, grid=k)``: every chosen stage pooled to a k x k grid.
  With ``project=True`` (``_ms`` models only): their trained per-stage norm + projection to the common width,
  plus the stage (and grid position) embeddings, concatenated: (B, stages * k * k, width), stage by stage,
  row-major within a stage. That is ``forward_features`` at the trained grid; another k resamples the position
  embedding (a model trained with grid 1 has none). With ``project=False`` (any trunk): the raw pooled maps,
  a list of (B, k * k, C_i), one per stage (widths differ, so they are not concatenated).

A k larger than a stage's map is refused: pooling would repeat pixels, not add detail.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .models.multiscale import MultiScale


def trunk_of(model: torch.nn.Module) -> torch.nn.Module:
    """The timm trunk of an open_clip model (``model.visual.trunk``), or the timm model itself."""
    visual = getattr(model, "visual", None)
    if visual is not None and not hasattr(visual, "trunk"):  # its forward_intermediates returns a dict, no maps
        raise ValueError(f"the image tower is open_clip's own {type(visual).__name__}, not a timm trunk: stage maps "
                         "come from a tower built by timm name (vision_cfg.timm_model_name)")
    trunk = visual.trunk if visual is not None else model
    if not hasattr(trunk, "forward_intermediates"):
        raise ValueError(f"{type(trunk).__name__} has no forward_intermediates: not a hierarchical timm trunk")
    return trunk


def _maps(trunk, images: torch.Tensor, indices: Optional[Sequence[int]]) -> list[torch.Tensor]:
    """The maps of stages ``indices`` in the order asked (timm's ``forward_intermediates`` gives them in stage
    order), all stages for None."""
    if indices is None:
        return trunk.forward_intermediates(images, indices=None, intermediates_only=True)
    wanted = [i % len(trunk.feature_info) for i in indices]
    taken = sorted(set(wanted))
    maps = dict(zip(taken, trunk.forward_intermediates(images, indices=taken, intermediates_only=True)))
    return [maps[i] for i in wanted]


def stage_maps(model: torch.nn.Module, images: torch.Tensor,
               stages: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Each stage's map (B, C_i, H_i, W_i); ``stages`` picks some (negative from the end), default all."""
    return _maps(trunk_of(model), images, stages)


def as_tokens(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """NCHW maps -> (B, H * W, C) token sequences, row-major."""
    return [m.flatten(2).transpose(1, 2) for m in maps]


def _check_grid(grid: int, maps: Sequence[torch.Tensor], stages: Sequence[int]) -> None:
    for stage, m in zip(stages, maps):
        h, w = m.shape[-2:]
        if grid > min(h, w):
            raise ValueError(
                f"grid {grid} is larger than stage {stage}'s map ({h}x{w}); use grid <= {min(h, w)} or larger images")


def multiscale_tokens(model: torch.nn.Module, images: torch.Tensor, grid: Optional[int] = None,
                      project: bool = True, stages: Optional[Sequence[int]] = None):
    """Pooled multiscale tokens at a ``grid`` x ``grid`` per stage (shapes in the module docstring).

    ``grid`` defaults to a ``_ms`` model's trained grid (1 for other trunks); ``stages`` defaults to a ``_ms``
    model's chosen stages (all stages for other trunks).
    """
    trunk = trunk_of(model)
    is_ms = isinstance(trunk, MultiScale) and trunk.spec is not None
    if project and not is_ms:
        raise ValueError(
            f"project=True needs a multiscale (`<trunk>_ms`) model, whose trained projection it applies; "
            f"{type(trunk).__name__} has none: use project=False")
    if is_ms:
        grid = grid or trunk.spec.grid
        if stages is None:
            stages = trunk.spec.stages
        elif project and sorted(s % trunk.num_stages for s in stages) != list(trunk.spec.stages):
            raise ValueError(f"project=True uses the model's trained stages {trunk.spec.stages}, got {stages}")
    grid = grid or 1
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    num_stages = len(trunk.feature_info)
    stages = [s % num_stages for s in (stages if stages is not None else range(num_stages))]
    maps = _maps(trunk, images, stages)
    _check_grid(grid, maps, stages)
    if not project:
        return [F.adaptive_avg_pool2d(m, grid).flatten(2).transpose(1, 2) for m in maps]
    head = trunk.tokens
    pos = head.pos_embed
    if pos is not None and grid != head.grid:
        pos = resample_abs_pos_embed(pos[None], (grid, grid), (head.grid, head.grid), num_prefix_tokens=0)[0]
    return head.embed(head.project(maps, grid), pos)
