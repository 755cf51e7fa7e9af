""" Contrastive losses for clip_hvt: a name -> open_clip loss adapter.

Both losses are open_clip's own; this module only fixes the distributed settings
that make a rank's loss a share of the loss on the global batch:

* ``clip``: InfoNCE in the *local-loss* form. Each rank scores its own rows against the
  columns gathered from every rank (logits are local x global, not global x global), and
  the gather keeps its gradient, so every rank's features receive the gradient of every
  rank's loss.
* ``siglip``: sigmoid loss. Text features travel around the ring of ranks by neighbour
  exchange with gradient, so each rank sums over all global negatives while holding only
  local x local logits at a time.

Both are called as ``loss_fn(image_features, text_features, logit_scale, logit_bias=None)``
with ``logit_scale`` already exponentiated, as open_clip's ``CLIP.forward`` returns it.
Local batches must be the same size on every rank (the gather and the rank-offset labels
assume it).
"""
from typing import Optional

import torch
from torch import nn
from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

__all__ = ['build_loss', 'LOSS_NAMES']


class _SigLipLoss(SigLipLoss):
    """ open_clip's SigLipLoss with ``logit_bias`` optional, to share ClipLoss's call signature. """

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            logit_bias: Optional[torch.Tensor] = None,
            output_dict: bool = False,
    ):
        return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict=output_dict)


def _clip_loss(rank: int, world_size: int, cls: type = ClipLoss) -> nn.Module:
    # gather's backward sums all ranks' loss grads into each rank's features; DDP averages: d mean(loss_r)=d loss(all)
    return cls(
        local_loss=True,
        gather_with_grad=True,
        cache_labels=True,
        rank=rank,
        world_size=world_size,
    )


def _siglip_loss(rank: int, world_size: int) -> nn.Module:
    # loss_r sums rank r's rows x all columns over the local batch, so DDP's mean_r(loss_r) is the global-batch loss.
    return _SigLipLoss(rank=rank, world_size=world_size)


_LOSSES = {
    'clip': _clip_loss,
    'siglip': _siglip_loss,
}
LOSS_NAMES = tuple(_LOSSES)


def build_loss(name: str, rank: int = 0, world_size: int = 1, distill: bool = False) -> nn.Module:
    """ Build the contrastive loss ``name`` for the process ``rank`` of ``world_size``.

    Args:
        name: one of ``LOSS_NAMES`` ('clip', 'siglip').
        rank: global rank of this process (``trainer.global_rank``).
        world_size: number of processes (``trainer.world_size``).
        distill: open_clip's ``DistillClipLoss`` with the same settings (``clip`` only), called as
            ``loss_fn(image_f, text_f, logit_scale, teacher_image_f, teacher_text_f, teacher_logit_scale)``
            and returning ``(contrastive_loss, distill_loss)``.
    """
    if name not in _LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid losses are: {', '.join(LOSS_NAMES)}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size and world_size >= 1, got rank={rank}, world_size={world_size}.")
    if distill:
        if name != 'clip':
            raise ValueError(f"DistillClipLoss is InfoNCE's: it needs loss 'clip', not {name!r} "
                             "(or set model.distill.clip_weight 0 and distil embeddings only)")
        return _clip_loss(rank, world_size, DistillClipLoss)
    return _LOSSES[name](rank, world_size)
