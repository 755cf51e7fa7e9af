"""Build an open_clip model, its tokenizer and its preprocessing from an open_clip model config dict.

The config is open_clip's own schema (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...), so what we
train is what ``open_clip.create_model('local-dir:...')`` rebuilds after export. This module only
validates the dict (so a typo fails at start with the valid choices) and mirrors the two lines of
``open_clip.create_model`` that pick the model class, because open_clip builds only from names.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from typing import Any

import open_clip
import timm
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg

import clip_hvt  # noqa: F401  (registers our timm models before any name lookup)

from .config import to_open_clip

_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
             "custom_text", "output_dict", "nonscalar_logit_scale"}
_VISION_KEYS = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
_TEXT_KEYS = {f.name for f in dataclasses.fields(CLIPTextCfg)}


def _check_keys(cfg: dict, valid: set[str], where: str) -> None:
    unknown = sorted(set(cfg) - valid)
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        said = ", ".join(f"'{k}'" + (f" (did you mean '{h[0]}'?)" if h else "") for k, h in hints.items())
        raise ValueError(f"unknown key(s) in {where}: {said}. Valid keys: {', '.join(sorted(valid))}")


def check_timm_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
    families = "pvt_v2_b0..b5, pvt_v2_b2_li, cvt_13, cvt_21, cvt_w24, <trunk>_ms (multiscale), convnext_*, resnet*"
    raise ValueError(
        f"unknown image encoder '{name}' (vision_cfg.timm_model_name). "
        + (f"Close matches: {', '.join(close)}. " if close else "")
        + f"Families: {families}; every name: `python -c \"import clip_hvt, timm; print(timm.list_models())\"`.")


def validate_model_cfg(model_cfg: dict) -> None:
    """Raise ``ValueError`` naming the bad key or name and what is valid."""
    if not isinstance(model_cfg, dict):
        raise ValueError(f"model_cfg must be a mapping (open_clip schema), got {type(model_cfg).__name__}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"model_cfg is missing {missing}; open_clip configs need embed_dim, vision_cfg, text_cfg")
    _check_keys(model_cfg, _TOP_KEYS, "model_cfg")
    _check_keys(model_cfg["vision_cfg"], _VISION_KEYS, "model_cfg.vision_cfg")
    _check_keys(model_cfg["text_cfg"], _TEXT_KEYS, "model_cfg.text_cfg")
    if model_cfg["vision_cfg"].get("timm_model_name"):
        check_timm_name(model_cfg["vision_cfg"]["timm_model_name"])


def create_model(model_cfg: dict, image_weights: str | None = None) -> torch.nn.Module:
    """The open_clip ``CLIP`` (or ``CustomTextCLIP`` for HF text towers) described by ``model_cfg``.

    ``image_weights``: a local timm-layout checkpoint for the image trunk (e.g. PVTv2 ImageNet
    weights, or a CvT converted by ``clip_hvt.convert_cvt``); loaded with ``weights_only``.
    """
    model_cfg = to_open_clip(model_cfg)
    validate_model_cfg(model_cfg)
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg)
    check_image_size(model, model_cfg)
    open_clip.model.set_model_preprocess_cfg(model, preprocess_cfg(model_cfg))
    if image_weights:
        load_image_weights(model, image_weights)
    return model


def check_image_size(model: torch.nn.Module, model_cfg: dict) -> None:
    """Fail before training on an image size the image tower cannot take, or whose border pixels its
    patch embedding would drop (a non-overlapping patch conv that does not divide the size); warn
    where the tower pads instead. Then run the tower once on a blank image of that size."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    name = model_cfg["vision_cfg"].get("timm_model_name") or "the open_clip ViT image tower"
    owner, conv = next(((m, c) for m in model.visual.modules() for c in m.children()
                        if isinstance(c, torch.nn.Conv2d)), (None, None))
    if conv is not None and conv.kernel_size == conv.stride and conv.padding in (0, (0, 0), "valid"):
        patch = conv.stride
        if height % patch[0] or width % patch[1]:
            fit = f"{height - height % patch[0]} or {height - height % patch[0] + patch[0]}"
            if getattr(owner, "dynamic_img_pad", False):
                warnings.warn(f"vision_cfg.image_size {size}: {name} pads it to a multiple of its patch size "
                              f"{patch[0]}; {fit} wastes nothing")
            else:
                raise ValueError(f"vision_cfg.image_size {size} is not a multiple of the patch size {patch[0]} of "
                                 f"{name}: its border pixels would be dropped. Use a multiple, e.g. {fit}")
    was_training = model.visual.training
    try:
        with torch.no_grad():
            try:  # shapes only, on the meta device: no compute (a real forward was ~15% of start-up)
                torch.func.functional_call(model.visual.eval(), meta_state(model.visual),
                                           torch.zeros(1, 3, height, width, device="meta"))
            except Exception:  # a bad size, or an op or tensor the meta device cannot take: the real forward says
                model.visual.eval()(torch.zeros(1, 3, height, width))
    except (RuntimeError, ValueError, AssertionError) as err:  # timm asserts fixed-size inputs
        trunk = getattr(model.visual, "trunk", None)
        default = getattr(trunk, "pretrained_cfg", {}).get("input_size", (None, 224))[-1]
        raise ValueError(f"vision_cfg.image_size {size} does not fit {name} ({err}); "
                         f"use a size it takes, e.g. its default {default}") from None
    finally:
        model.visual.train(was_training)


def meta_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (meta device) for ``module``'s parameters and buffers, for
    ``torch.func.functional_call``: a shape pass, or a FLOP count, without compute or a second model."""
    return {name: torch.empty_like(t, device="meta") for name, t in
            [*module.named_parameters(), *module.named_buffers()]}


def load_image_weights(model: torch.nn.Module, path: str) -> None:
    """Load a timm-layout trunk checkpoint into a ``TimmModel`` tower; heads of the source are ignored."""
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise ValueError("image_weights needs a timm image tower (vision_cfg.timm_model_name)")
    state = timm.models.load_state_dict(path, weights_only=True)
    trunk_keys = set(trunk.state_dict())
    missing = sorted(trunk_keys - set(state))
    if missing:
        raise ValueError(f"image_weights '{path}' lacks {len(missing)} trunk tensors, e.g. {missing[:5]}; "
                         "is it a checkpoint of the same timm model?")
    trunk.load_state_dict({k: v for k, v in state.items() if k in trunk_keys}, strict=True)


def preprocess_cfg(model_cfg: dict) -> dict[str, Any]:
    """open_clip's preprocess config for this model: its defaults (OpenAI mean/std, bicubic) at our size."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return open_clip.transform.merge_preprocess_dict(PreprocessCfg(), {"size": size})


def image_transforms(model_cfg: dict, aug_cfg: dict | None = None):
    """(train, val) transforms: open_clip's ``image_transform_v2``, as ``create_model_and_transforms``."""
    pp = PreprocessCfg(**preprocess_cfg(model_cfg))
    train = open_clip.transform.image_transform_v2(pp, is_train=True, aug_cfg=aug_cfg)
    return train, open_clip.transform.image_transform_v2(pp, is_train=False)


def context_length(model_cfg: dict) -> int:
    """Tokens per caption: the text tower's ``context_length``, else open_clip's default."""
    return to_open_clip(model_cfg)["text_cfg"].get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)


def create_tokenizer(model_cfg: dict):
    """The tokenizer ``open_clip.get_tokenizer('local-dir:EXPORT')`` returns for this config: the same rules
    (``hf_tokenizer_name`` picks a Hugging Face tokenizer, else CLIP's BPE), from a dict."""
    text = to_open_clip(model_cfg)["text_cfg"]
    length = context_length(model_cfg)
    kwargs = dict(text.get("tokenizer_kwargs") or {})
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=length,
                                               tokenizer_mode=text.get("tokenizer_mode"), **kwargs)
    return open_clip.tokenizer.SimpleTokenizer(context_length=length, **kwargs)
