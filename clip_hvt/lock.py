"""LiT-style locking (Zhai et al., 2022, https://arxiv.org/abs/2111.07991) with open_clip_train's meaning.

``lock_image`` / ``lock_image_unlocked_groups`` / ``lock_image_freeze_bn_stats`` and ``lock_text`` /
``lock_text_unlocked_layers`` / ``lock_text_freeze_layer_norm`` do what ``--lock-image...`` and
``--lock-text...`` do in open_clip_train, through open_clip's own ``lock_image_tower`` (timm towers:
``TimmModel.lock``, groups from timm's ``group_matcher``) and ``lock_text_tower``. Written here: the
range check open_clip lacks (a group count past the end silently locks nothing), BatchNorm statistics
frozen by eval mode instead of open_clip's ``FrozenBatchNorm2d`` swap (that swap drops
``num_batches_tracked``, so the export would no longer load into open_clip's model with strict keys),
and unfrozen LayerNorms for open_clip's own text tower (open_clip implements that only for Hugging Face
towers). Locked parameters keep ``requires_grad=False``: out of the optimizer, still in the state dict.
"""
from __future__ import annotations

from timm.models import group_parameters
from torch import nn

__all__ = ["lock_image", "lock_text", "image_groups", "text_groups", "frozen_batch_norms"]


def image_groups(visual: nn.Module) -> int:
    """How many layer groups open_clip's ``lock`` splits the image tower into."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # open_clip TimmModel: timm's grouping of the trunk
        return len(group_parameters(trunk, trunk.group_matcher()))
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):  # open_clip VisionTransformer
        return len(visual.transformer.resblocks) + 2  # stem, blocks..., last block + ln_post, proj
    return 1  # ModifiedResNet and others: whole-tower locking only


def text_groups(model: nn.Module) -> int:
    """How many layer groups ``lock_text_tower`` splits the text tower into."""
    text = getattr(model, "text", model)
    if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):  # open_clip's TextTransformer
        has_proj = getattr(text, "text_projection", None) is not None
        return len(text.transformer.resblocks) + 1 + has_proj  # embeddings, blocks..., (last + ln_final), proj
    if hasattr(text, "config"):  # HFTextEncoder: embeddings, layers...
        return text.config.num_hidden_layers + 1
    return 1


def _check_range(value: int, groups: int, flag: str, tower: str) -> None:
    if not 0 <= value < groups:
        raise ValueError(f"model.{flag}={value} is out of range: the {tower} tower has {groups} layer group(s), "
                         f"so use 0..{groups - 1} (0 locks it whole; drop the lock to train all of it)")


def lock_image(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> list[nn.Module]:
    """Lock the image tower but its last ``unlocked_groups`` groups; return the BatchNorms whose
    statistics must stay frozen (those of locked groups when ``freeze_bn_stats``); the caller keeps
    them in eval mode."""
    _check_range(unlocked_groups, image_groups(model.visual), "lock_image_unlocked_groups", "image")
    model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=False)
    return frozen_batch_norms(model.visual) if freeze_bn_stats else []


def frozen_batch_norms(module: nn.Module) -> list[nn.Module]:
    """BatchNorms all of whose parameters are locked: their running statistics freeze with them."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and all(not p.requires_grad for p in m.parameters())]


def lock_text(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Lock the text tower but its last ``unlocked_layers`` groups. ``freeze_layer_norm=False`` leaves
    the LayerNorms of locked layers trainable, as open_clip's Hugging Face towers do."""
    _check_range(unlocked_layers, text_groups(model), "lock_text_unlocked_layers", "text")
    if hasattr(model, "text") and hasattr(model.text, "config"):  # HF tower implements freeze_layer_norm
        model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)
        return
    model.lock_text_tower(unlocked_layers=unlocked_layers)  # open_clip locks LayerNorms with their layers
    if not freeze_layer_norm:
        text = getattr(model, "text", model)
        for part in (text.transformer, text.ln_final):
            for norm in part.modules():
                if isinstance(norm, nn.LayerNorm):
                    norm.requires_grad_(True)
