"""Export to open_clip's local-dir layout: ``python -m clip_hvt.export --ckpt CKPT --out DIR``.

Writes ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``; ``open_clip.create_model_and_transforms('local-dir:DIR')`` loads it
with strict keys (after ``import clip_hvt`` when the image tower is one of ours). Files are created
with the process umask (a group-readable run directory stays group-readable).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save

from . import cli, factory
from .config import to_open_clip

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def export_state_dict(state: dict[str, torch.Tensor], model_cfg, out_dir: str | Path) -> Path:
    """Write an open_clip model's state dict and config (``ModelCfg`` or open_clip's dict) as a local-dir."""
    model_cfg = to_open_clip(model_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": factory.preprocess_cfg(model_cfg)}
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # safetensors' save_file creates its file mode 0600 whatever the umask; write_bytes honours it.
    (out / WEIGHTS_NAME).write_bytes(save(state, metadata={"format": "pt"}))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tokenizer = factory.create_tokenizer(model_cfg)
    if isinstance(tokenizer, HFTokenizer):  # open_clip's local-dir loads a Hugging Face tokenizer from the dir
        tokenizer.save_pretrained(str(out))
    return out


def export_model(model: torch.nn.Module, model_cfg, out_dir: str | Path) -> Path:
    return export_state_dict(model.state_dict(), model_cfg, out_dir)


def open_clip_state(lightning_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip model's entries of a ``CLIPModule`` state dict (``model.`` prefix removed)."""
    prefix = "model."
    return {k[len(prefix):]: v for k, v in lightning_state.items() if k.startswith(prefix)}


def export_from_trainer(trainer, module, out_dir: str | Path) -> Path | None:
    """Export after ``fit`` from any strategy: the state dict is collected through the strategy on
    every rank (a collective for sharded strategies such as FSDP), and rank 0 writes it."""
    state = trainer.strategy.lightning_module_state_dict()
    out = export_state_dict(open_clip_state(state), module.hparams.model_cfg, out_dir) if trainer.is_global_zero else None
    trainer.strategy.barrier()
    return out


class NotACheckpoint(cli.UserError):
    """A file that is not a ``clip_hvt.train`` checkpoint, or one whose model cannot be built from it; ``reason``
    says why (for callers that word the error their own way, e.g. ``clip_hvt.eval``'s ``--model``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _in_one_line(text: str, lines: int = 1, limit: int = 400) -> str:
    """The first ``lines`` non-blank lines of an error's text, joined, for a one-line message."""
    kept = [line.strip() for line in text.splitlines() if line.strip()][:lines]
    joined = " ".join(kept) or "no detail"
    return joined if len(joined) <= limit else joined[:limit - 3] + "..."


def _refused(err: Exception) -> str:
    """What ``torch.load`` refused: the detail after its advice to load with weights_only=False, which a file of
    unknown origin must not get."""
    _, found, detail = str(err).partition("WeightsUnpickler error:")
    return _in_one_line(detail if found else str(err))


def load_checkpoint(ckpt_path: str | Path) -> dict:
    """A ``clip_hvt.train`` checkpoint, loaded ``weights_only``; anything else is a ``UserError``
    (:class:`NotACheckpoint` for a file that is not one)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise cli.UserError(f"checkpoint '{path}' does not exist; give a .ckpt written by clip_hvt.train "
                            "(e.g. runs/NAME/checkpoints/last.ckpt)")
    not_ours = (f"'{path}' is not a Lightning checkpoint written by clip_hvt.train; give one from the run's "
                "checkpoints directory (e.g. runs/NAME/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:  # not a (safe) torch file
        reason = f"{type(err).__name__} while reading it safely: {_refused(err)}"
        raise NotACheckpoint(f"{not_ours} ({reason})", reason) from err
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("hyper_parameters"), dict)
            and "model_cfg" in ckpt["hyper_parameters"] and isinstance(ckpt.get("state_dict"), dict)):
        reason = "it has no hyper_parameters.model_cfg and state_dict"
        raise NotACheckpoint(f"{not_ours} ({reason})", reason)
    return ckpt


def model_from_checkpoint(ckpt_path: str | Path, ema: bool | None = None) -> tuple[torch.nn.Module, dict]:
    """The open_clip model and its config from a Lightning checkpoint (``weights_only`` load).

    ``ema``: Lightning's ``EMAWeightAveraging`` saves the average as ``state_dict`` and the trained
    weights as ``current_model_state``; True takes the average (an error without one), False the
    trained weights, None ``state_dict`` (the average when there is one).
    """
    return model_from_loaded(load_checkpoint(ckpt_path), ema, ckpt_path)


def model_from_loaded(ckpt: dict, ema: bool | None, ckpt_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """:func:`model_from_checkpoint` of a checkpoint :func:`load_checkpoint` read (``ckpt_path`` names it in errors)."""
    model_cfg = ckpt["hyper_parameters"]["model_cfg"]
    try:
        model = factory.create_model(model_cfg)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # e.g. a trunk name no registry knows
        detail = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"  # KeyError: 'x'
        reason = f"its model_cfg builds no model: {_in_one_line(detail)}"
        raise NotACheckpoint(f"checkpoint '{ckpt_path}' cannot be loaded ({reason})", reason) from err
    averaged = "current_model_state" in ckpt
    if ema and not averaged:
        raise cli.UserError(f"checkpoint '{ckpt_path}' holds no averaged weights: train with the callback "
                         "lightning.pytorch.callbacks.EMAWeightAveraging, or export without --ema")
    state = ckpt["current_model_state"] if averaged and ema is False else ckpt["state_dict"]
    try:
        model.load_state_dict(open_clip_state(state), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped weights
        reason = f"its weights do not fit its model_cfg: {_in_one_line(str(err), lines=2)}"  # the first key
        raise NotACheckpoint(f"checkpoint '{ckpt_path}' cannot be loaded ({reason})", reason) from err
    return model, model_cfg


def export(ckpt: str, out: str, ema: bool | None = None) -> Path:
    """Export a clip_hvt.train checkpoint to an open_clip local-dir.

    Args:
        ckpt: Lightning checkpoint (.ckpt) written by clip_hvt.train.
        out: output directory (open_clip local-dir).
        ema: true: the EMA-averaged weights (EMAWeightAveraging); false: the trained weights;
            default: the averaged ones when the checkpoint has them.
    """
    model, model_cfg = model_from_checkpoint(ckpt, ema=ema)
    path = export_model(model, model_cfg, out)
    print(f"exported to {path}: load with open_clip.create_model_and_transforms('local-dir:{path}')")
    return path


def main(args: list[str] | None = None) -> Path:
    return cli.run(export, args, prog="python -m clip_hvt.export")


if __name__ == "__main__":
    main()
