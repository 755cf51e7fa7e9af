"""Model summary for choosing compute-matched pairs: ``python -m clip_hvt.summary --config FILE``.

Prints image/text parameter counts, GFLOPs per image and per caption (``clip_hvt.flops``),
the output shape of every stage of the image trunk, and forward+backward throughput measured on
this machine. Reads the training config files as they are (repeatable ``--config``, dotted
overrides such as ``--model.model_cfg.vision_cfg.image_size 96``); only ``model`` is used.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from . import cli, factory, flops
from .cli import UserError


def model_cfg_from_configs(args: list[str], prog: str = "clip_hvt.summary.model_cfg_from_configs") -> dict:
    """open_clip's model config dict from training config files and flags (``["--config", FILE, ...]``),
    parsed as every command parses them; an error exits with ``prog: error: ...``."""
    def model_cfg(model_cfg: dict) -> dict:
        """The model config of a training config."""
        return model_cfg
    return cli.run(model_cfg, args, prog=prog, train_config=True)


def stage_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[int, ...]]:
    """Per-stage output shapes of a timm trunk (``forward_intermediates``); [] for other towers."""
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "forward_intermediates"):
        return []
    with torch.no_grad():
        feats = trunk.forward_intermediates(images, intermediates_only=True)
    return [tuple(f.shape) for f in feats]


def throughput(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, steps: int = 3) -> float:
    """Image-text pairs per second for forward+backward of both towers (after one warmup step)."""
    model.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(texts, normalize=True)
        (image @ text.T).sum().backward()
    return steps * images.shape[0] / (time.perf_counter() - start)


def summarize(model_cfg: dict, batch_size: int = 8, steps: int = 3) -> dict[str, Any]:
    model = factory.create_model(model_cfg).eval()
    size = factory.preprocess_cfg(model_cfg)["size"]
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(1, 3, height, width)
    texts = factory.create_tokenizer(model_cfg)(["a photo of a small red circle on a striped background"])
    costs = flops.tower_costs(model, model_cfg)  # attention counted on every backend
    return {
        "image_params_M": costs["image_params"] / 1e6,
        "text_params_M": costs["text_params"] / 1e6,
        "image_gflops": costs["image_flops"] / 1e9,
        "text_gflops": costs["text_flops"] / 1e9,
        "stage_shapes": stage_shapes(model, images),
        "pairs_per_s": throughput(model, images.expand(batch_size, -1, -1, -1).contiguous(),
                                  texts.expand(batch_size, -1).contiguous(), steps) if steps else None,
        "image_size": (height, width),
        "threads": torch.get_num_threads(),
    }


def summary(model_cfg: dict, batch_size: int = 8, steps: int = 3) -> dict[str, Any]:
    """Parameters, GFLOPs per image and caption, stage shapes and throughput of a training config's model.

    Args:
        batch_size: batch for the throughput measurement.
        steps: timed forward+backward steps (0: skip).
    """
    try:
        info = summarize(model_cfg, batch_size, steps)
    except ValueError as err:  # an unknown encoder or key, an image size the trunk cannot take
        raise UserError(str(err)) from err
    vision = model_cfg["vision_cfg"]
    name = vision.get("timm_model_name") or f"open_clip ViT width {vision.get('width', 768)}"
    print(f"image tower  {name} @ {info['image_size'][0]}x{info['image_size'][1]}: "
          f"{info['image_params_M']:.2f} M params, {info['image_gflops']:.3f} GFLOPs/image")
    print(f"text tower   {info['text_params_M']:.2f} M params, {info['text_gflops']:.3f} GFLOPs/caption")
    for i, shape in enumerate(info["stage_shapes"]):
        print(f"  stage {i}: {list(shape)}")
    if info["pairs_per_s"] is not None:
        print(f"forward+backward: {info['pairs_per_s']:.1f} pairs/s (batch {batch_size}, "
              f"{info['threads']} threads, this machine)")
    return info


def main(args: list[str] | None = None) -> dict[str, Any]:
    return cli.run(summary, args, prog="python -m clip_hvt.summary", train_config=True)


if __name__ == "__main__":
    main()
