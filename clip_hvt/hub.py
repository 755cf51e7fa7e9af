"""Encoders that leave the project: the image trunk alone as a timm checkpoint; CLIP_benchmark with our encoders.

``python -m clip_hvt.hub --src SRC --out DIR`` (SRC: an open_clip export dir written by
``clip_hvt.export``, or a ``.ckpt`` written by ``clip_hvt.train``) writes timm's own export layout through
``timm.models.save_for_hf``: ``model.safetensors`` and ``config.json`` (``architecture``, ``model_args``,
``pretrained_cfg``). After ``import clip_hvt`` (our encoders are registered by it), either of

    timm.create_model('local-dir:DIR', pretrained=True)
    timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file='DIR/model.safetensors'), **MODEL_ARGS)

rebuilds the trunk with identical features, also with ``features_only=True`` for detection/segmentation heads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import timm
import torch

from . import export
from .cli import UserError, run


def load_open_clip(src: str | Path) -> torch.nn.Module:
    """The open_clip model of an export dir (``open_clip_config.json``) or a clip_hvt ``.ckpt``."""
    src = Path(src)
    if src.is_dir():
        if not (src / export.CONFIG_NAME).is_file():
            raise UserError(f"'{src}' has no {export.CONFIG_NAME}; give an export dir written by clip_hvt.export")
        name = json.loads((src / export.CONFIG_NAME).read_text())["model_cfg"]["vision_cfg"].get("timm_model_name")
        if name and not timm.is_model(name):
            raise UserError(f"image encoder '{name}' of '{src}' is not registered in timm: `import clip_hvt` first")
        return open_clip.create_model(f"local-dir:{src}")
    if src.is_file():
        return export.model_from_checkpoint(src)[0]
    raise UserError(f"'{src}' does not exist; give an open_clip export dir or a .ckpt")


def save_trunk(model: torch.nn.Module, out: str | Path) -> Path:
    """Write the timm trunk of an open_clip model (``model.visual.trunk``) in timm's export layout."""
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise UserError("the image tower is open_clip's own ViT, not a timm trunk; nothing to export for timm")
    out = Path(out)
    timm.models.save_for_hf(trunk, str(out), safe_serialization=True)
    return out


def export_timm(src: str, out: str) -> Path:
    """Export the image trunk of a clip_hvt model as a timm checkpoint.

    Args:
        src: open_clip export dir (clip_hvt.export) or Lightning checkpoint (.ckpt).
        out: output directory: model.safetensors + config.json (timm's layout).
    """
    path = save_trunk(load_open_clip(src), out)
    config = json.loads((path / "config.json").read_text())
    print(f"timm checkpoint in {path}: timm.create_model('local-dir:{path}', pretrained=True) "
          f"(architecture {config['architecture']}, after `import clip_hvt`)")
    return path


def clip_benchmark_main() -> None:
    """``clip-hvt-benchmark``: CLIP_benchmark's own CLI, unchanged, with clip_hvt's encoders registered in timm.

    CLIP_benchmark builds models by name through open_clip and timm and never imports clip_hvt, so an export whose
    image trunk is ours (``cvt_*``, ``*_ms``) fails there with ``Unknown model``; importing this module registers
    them first (``import clip_hvt`` does), then the arguments go to ``clip_benchmark.cli.main`` as they are.
    """
    try:
        from clip_benchmark.cli import main
    except ImportError:
        sys.exit("clip-hvt-benchmark needs CLIP_benchmark: pip install 'clip_hvt[benchmark]'")
    main()


def main(args: list[str] | None = None) -> Path:
    return run(export_timm, args, prog="clip-hvt-export-timm")


if __name__ == "__main__":
    main()
