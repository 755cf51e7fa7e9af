"""Export to open_clip's local-dir layout: ``python -m clip_hvt.export --ckpt CKPT --out DIR``.

Writes ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``; ``open_clip.create_model_and_transforms('local-dir:DIR')`` loads it
with strict keys (after ``import clip_hvt`` when the image tower is one of ours).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import factory

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def export_state_dict(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path) -> Path:
    """Write an open_clip model's state dict and config as an open_clip local-dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": factory.preprocess_cfg(model_cfg)}
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def export_model(model: torch.nn.Module, model_cfg: dict, out_dir: str | Path) -> Path:
    return export_state_dict(model.state_dict(), model_cfg, out_dir)


def open_clip_state(lightning_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip model's entries of a ``CLIPModule`` state dict (``model.`` prefix removed)."""
    prefix = "model."
    return {k[len(prefix):]: v for k, v in lightning_state.items() if k.startswith(prefix)}


def export_module(module, out_dir: str | Path) -> Path:
    """Export a ``CLIPModule`` in memory."""
    return export_model(module.model, module.hparams.model_cfg, out_dir)


def export_from_trainer(trainer, module, out_dir: str | Path) -> Path | None:
    """Export after ``fit`` from any strategy: the state dict is collected through the strategy on
    every rank (a collective for sharded strategies such as FSDP), and rank 0 writes it."""
    state = trainer.strategy.lightning_module_state_dict()
    out = export_state_dict(open_clip_state(state), module.hparams.model_cfg, out_dir) if trainer.is_global_zero else None
    trainer.strategy.barrier()
    return out


def model_from_checkpoint(ckpt_path: str | Path, ema: bool | None = None) -> tuple[torch.nn.Module, dict]:
    """The open_clip model and its config from a Lightning checkpoint (``weights_only`` load).

    ``ema``: Lightning's ``EMAWeightAveraging`` saves the average as ``state_dict`` and the trained
    weights as ``current_model_state``; True takes the average (an error without one), False the
    trained weights, None ``state_dict`` (the average when there is one).
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model_cfg = ckpt["hyper_parameters"]["model_cfg"]
    model = factory.create_model(model_cfg)
    averaged = "current_model_state" in ckpt
    if ema and not averaged:
        raise ValueError(f"checkpoint '{ckpt_path}' holds no averaged weights: train with the callback "
                         "lightning.pytorch.callbacks.EMAWeightAveraging, or export without --ema")
    state = ckpt["current_model_state"] if averaged and ema is False else ckpt["state_dict"]
    model.load_state_dict(open_clip_state(state), strict=True)
    return model, model_cfg


def main(args: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by clip_hvt.train")
    parser.add_argument("--out", required=True, help="output directory (open_clip local-dir)")
    parser.add_argument("--ema", type=lambda v: {"true": True, "false": False}[v.lower()], default=None,
                        help="true: the EMA-averaged weights (EMAWeightAveraging); false: the trained weights; "
                             "default: the averaged ones when the checkpoint has them")
    opts = parser.parse_args(args)
    if not Path(opts.ckpt).is_file():
        parser.error(f"checkpoint '{opts.ckpt}' does not exist")
    try:
        model, model_cfg = model_from_checkpoint(opts.ckpt, ema=opts.ema)
    except ValueError as err:
        parser.error(str(err))
    out = export_model(model, model_cfg, opts.out)
    print(f"exported to {out}: load with open_clip.create_model_and_transforms('local-dir:{out}')")
    return out


if __name__ == "__main__":
    main()
