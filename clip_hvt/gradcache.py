""" GradCache: a contrastive loss over a large batch with the activation memory of a micro-batch.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021
(https://arxiv.org/abs/2101.06983). The loss couples every sample of the batch, so plain gradient
accumulation changes the loss; GradCache keeps the loss exact:

1. encode every micro-batch without grad (activations freed at once), remembering its RNG state;
2. take the loss over the whole batch on the detached features (including the cross-rank gather
   of a distributed loss) and cache its gradient w.r.t. the features;
3. re-encode each micro-batch with grad, replaying its RNG state, and back-propagate the cached
   gradient through the towers.

Written here because neither open_clip nor Lightning ships it, and the authors' luyug/GradCache
is installed from git only (PyPI has stale third-party copies, e.g. gradcache 0.0.1 of 2022).
"""
import contextlib
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = ['gradcache_backward']

Encode = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class _RngState:
    """ CPU and accelerator RNG state at one point, as torch.utils.checkpoint saves it for its recompute. """

    def __init__(self, *tensors: torch.Tensor):
        self.device_type = next((t.device.type for t in tensors if t.device.type != 'cpu'), 'cpu')
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    @contextlib.contextmanager
    def replay(self):
        # fork_rng restores the surrounding state afterwards, so the step's later draws are unchanged.
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu_state)
            if self.devices:
                set_device_states(self.devices, self.device_states, device_type=self.device_type)
            yield


def _split(images: torch.Tensor, texts: torch.Tensor, micro_batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    if len(images) != len(texts):
        raise ValueError(f"images and texts must have the same batch size, got {len(images)} and {len(texts)}.")
    return list(zip(images.split(micro_batch_size), texts.split(micro_batch_size)))


def _encode_without_grad(encode: Encode, chunks) -> Tuple[List[_RngState], torch.Tensor, torch.Tensor]:
    rng_states, image_features, text_features = [], [], []
    for images, texts in chunks:
        rng_states.append(_RngState(images, texts))
        with torch.no_grad():
            image_f, text_f = encode(images, texts)
        image_features.append(image_f)
        text_features.append(text_f)
    return rng_states, torch.cat(image_features), torch.cat(text_features)


def _loss_and_gradients(loss_fn, image_features, text_features, logit_scale, logit_bias):
    """ Loss over the whole batch and its gradients w.r.t. features, logit_scale and logit_bias. """
    image_features = image_features.detach().requires_grad_()
    text_features = text_features.detach().requires_grad_()
    scalars = [t for t in (logit_scale, logit_bias) if isinstance(t, torch.Tensor) and t.requires_grad]
    loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
    # autograd.grad leaves parameters' .grad alone, so the scalars' gradient reaches them only
    # inside the final backward below, the one DDP synchronises.
    grads = torch.autograd.grad(loss, [image_features, text_features, *scalars])
    return loss.detach(), grads[0], grads[1], list(zip(scalars, grads[2:]))


def _surrogate(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    # d/dθ sum(y * g) with g constant is g^T dy/dθ: the cached gradient pushed through the graph of y.
    return sum((y * g).sum() for y, g in zip(outputs, grads))


def gradcache_backward(
        encode: Encode,
        images: torch.Tensor,
        texts: torch.Tensor,
        loss_fn: Callable[..., torch.Tensor],
        logit_scale: torch.Tensor,
        logit_bias: Optional[torch.Tensor] = None,
        *,
        micro_batch_size: int,
        backward: Callable[[torch.Tensor], None] = torch.autograd.backward,
        no_sync: Optional[Callable[[], ContextManager]] = None,
) -> torch.Tensor:
    """ Accumulate into ``.grad`` the gradient of ``loss_fn`` over the whole batch, encoding
    ``micro_batch_size`` samples at a time, and return the loss (detached).

    Args:
        encode: ``encode(images, texts) -> (image_features, text_features)`` for one micro-batch,
            e.g. ``lambda i, t: model(i, t)[:2]`` for an open_clip CLIP. One call for both towers,
            so that under plain torch DDP each re-forward is one DDP forward paired with one backward.
        images, texts: the local batch (the first dimension is split).
        loss_fn: ``loss_fn(image_features, text_features, logit_scale, logit_bias) -> scalar``,
            e.g. from ``clip_hvt.loss.build_loss``; a distributed loss gathers across ranks here.
        logit_scale, logit_bias: as the model outputs them (``logit_scale`` already exp()'d),
            with their graph to the parameters.
        micro_batch_size: samples per encode call; peak activation memory is that of one call.
        backward: called once per micro-batch with a scalar; ``LightningModule.manual_backward``
            in a Lightning module (it applies precision scaling and prepares DDP).
        no_sync: context-manager factory under which all but the last micro-batch's re-encode and
            backward run, so DDP all-reduces the accumulated gradient once: ``ddp_model.no_sync`` for torch DDP,
            ``functools.partial(optimizer.toggle_model, sync_grad=False)`` in Lightning manual
            optimization. The last backward also carries logit_scale/logit_bias, so it reaches
            every parameter (DDP with ``find_unused_parameters=False`` needs that).

    Each micro-batch is re-encoded under the RNG state of its first encode: dropout and drop_path
    then draw the same masks, and the re-forward's graph is the graph of the features the loss saw.
    Train-mode BatchNorm sees micro-batch statistics and updates its running stats on both passes.
    """
    chunks = _split(images, texts, micro_batch_size)
    rng_states, image_features, text_features = _encode_without_grad(encode, chunks)
    loss, image_grad, text_grad, scalar_grads = _loss_and_gradients(
        loss_fn, image_features, text_features, logit_scale, logit_bias)

    no_sync = no_sync or contextlib.nullcontext
    image_grads, text_grads = image_grad.split(micro_batch_size), text_grad.split(micro_batch_size)
    last = len(chunks) - 1
    for i, ((chunk_images, chunk_texts), rng_state) in enumerate(zip(chunks, rng_states)):
        # torch DDP decides at forward time whether the backward syncs, so no_sync spans both.
        with no_sync() if i < last else contextlib.nullcontext():
            with rng_state.replay():
                image_f, text_f = encode(chunk_images, chunk_texts)
            outputs, grads = [image_f, text_f], [image_grads[i], text_grads[i]]
            if i == last:
                outputs += [scalar for scalar, _ in scalar_grads]
                grads += [grad for _, grad in scalar_grads]
            backward(_surrogate(outputs, grads))
    return loss
