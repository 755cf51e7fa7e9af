"""The one FLOP counter: parameters and forward FLOPs per image and per caption, and MFU.

Every count in clip_hvt (``clip_hvt.summary``, ``clip_hvt.experiments``, ``clip_hvt.report`` and the
``flops_per_batch`` that Lightning's ``ThroughputMonitor`` turns into TFLOP/s and MFU) comes from
:func:`count_flops`: torch's ``FlopCounterMode`` plus the formulas it lacks. torch counts attention
only for the CUDA kernels (flash, efficient, cudnn) and the math path (bmm); on the CPU
``scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``, which it does
not know, so without the formula here ViT-S/16 counts 8.48 GFLOPs instead of 9.20. FLOPs are 2 per
multiply-add, torch's convention.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import ThroughputMonitor as _LightningThroughputMonitor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from . import factory

aten = torch.ops.aten


def _attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# Kernels torch's registry has no formula for (counted as 0 otherwise); same formulas as its CUDA ones.
MISSING_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (forward, plus backward if ``fn`` runs one), attention included."""
    counter = FlopCounterMode(display=False, custom_mapping=MISSING_FORMULAS)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class NeedsValues(RuntimeError):
    """A forward that cannot run on shape-only (meta) weights and inputs, e.g. one that reads values."""


def _count_forward(model: torch.nn.Module, weights: dict, inputs: tuple) -> int:
    """FLOPs of ``model(*inputs)`` on meta stand-ins; a forward the meta device cannot run (one that reads
    values, as a Hugging Face text tower's attention-mask check does) is counted on zeros with the model's own
    weights instead, where a real error also shows."""
    try:
        return count_flops(torch.func.functional_call, model, weights, inputs)
    except Exception:
        pass
    param = next(model.parameters())
    if param.device.type == "meta":
        raise NeedsValues("the forward cannot run on the meta device: count on a model with real weights")
    real = tuple(None if t is None else torch.zeros(t.shape, device=param.device,
                                                   dtype=param.dtype if t.is_floating_point() else t.dtype)
                 for t in inputs)
    return count_flops(model, *real)


def tower_costs(model: torch.nn.Module, model_cfg: dict) -> dict[str, int]:
    """Parameters and forward FLOPs of one image and one caption through an open_clip model.

    Counted on shape-only stand-ins of the weights (meta device): nothing is computed, whatever device
    ``model`` lives on, and no second model is built. A tower the meta device cannot run (a Hugging Face text
    tower) is counted on zeros through the real weights. A caption is always padded to the context length, so
    its FLOPs do not depend on its words.
    """
    size = factory.preprocess_cfg(model_cfg)["size"]
    height, width = (size, size) if isinstance(size, int) else size
    image = torch.zeros(1, 3, height, width, device="meta")
    caption = torch.zeros(1, factory.context_length(model_cfg), dtype=torch.long, device="meta")  # no tokenizer
    weights = factory.meta_state(model)
    modes = {module: module.training for module in model.modules()}  # restored one by one: frozen norms stay in eval
    model.eval()
    # With autograd on: under no_grad, nn.MultiheadAttention takes its fused fast path, which torch's
    # counter sees as one op without a formula (open_clip's ViT would lose its attention blocks).
    # open_clip's forward(image, text) encodes only what it is given.
    try:
        with torch.enable_grad():
            image_flops = _count_forward(model, weights, (image, None))
            text_flops = _count_forward(model, weights, (None, caption))
    finally:
        for module, training in modes.items():
            module.training = training
    image_params = _params(model.visual)
    return {"image_params": image_params, "text_params": _params(model) - image_params,
            "image_flops": image_flops, "text_flops": text_flops}


def model_costs(model_cfg: dict) -> dict[str, int]:
    """:func:`tower_costs` of a model config, built on the meta device (no memory, no weights); a model whose
    forward the meta device cannot run (a Hugging Face text tower) is built for real on the CPU instead."""
    with torch.device("meta"):
        model = factory.create_model(model_cfg)
    try:
        return tower_costs(model, model_cfg)
    except NeedsValues:
        return tower_costs(factory.create_model(model_cfg), model_cfg)


def flops_per_batch(costs: dict[str, int], batch_size: int, training: bool) -> int:
    """Model FLOPs of one batch of image-text pairs on one device: forward, and 2x forward for the
    backward in training (the usual 3x convention of MFU; the loss's logits are not counted)."""
    return (3 if training else 1) * batch_size * (costs["image_flops"] + costs["text_flops"])


class ThroughputMonitor(_LightningThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` with a configurable peak, for MFU where Lightning knows none.

    Lightning looks the peak up for known GPUs and returns none on CPUs, so no MFU is logged there;
    ``peak_flops`` (FLOP/s of one device at the run's precision, e.g. a measured matmul rate) sets it.
    The module's ``flops_per_batch`` gives the FLOPs (:func:`flops_per_batch`).

    Args:
        batch_size_fn: samples in a batch, e.g. ``clip_hvt.callbacks.batch_size``.
        peak_flops: FLOP/s of one device; ``None`` keeps Lightning's lookup.
        kwargs: Lightning's (``length_fn``, ``window_size``, ``separator``).
    """

    def __init__(self, batch_size_fn: Callable[[Any], int], peak_flops: float | None = None, **kwargs: Any):
        super().__init__(batch_size_fn, **kwargs)
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops
