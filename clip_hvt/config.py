"""The typed model config: open_clip's own config dataclasses, as the command line sees them.

``ModelCfg`` has open_clip's top-level keys; ``vision_cfg`` / ``text_cfg`` have every field of
``open_clip.model.CLIPVisionCfg`` / ``CLIPTextCfg`` (derived from them, so a field open_clip adds appears
here too). jsonargparse derives the CLI from these types: every field is a dotted flag
(``--model.model_cfg.vision_cfg.image_size 96``), validated by type, merged field by field across
repeated ``--config`` files, and printed by ``--print_config``.

Every field defaults to ``None``, meaning "not set: open_clip's default". That is the one thing the
derivation changes, and why it exists: ``to_open_clip`` writes only the fields that were set, so an
export's ``open_clip_config.json`` says what the config file said (as open_clip's own
``model_configs/*.json`` do) instead of freezing every default of today's open_clip.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from open_clip.model import CLIPTextCfg, CLIPVisionCfg


def _all_optional(cls: type, name: str, doc: str) -> type:
    fields = [(f.name, Optional[f.type], dataclasses.field(default=None)) for f in dataclasses.fields(cls)]
    derived = dataclasses.make_dataclass(name, fields)
    derived.__module__, derived.__doc__ = __name__, doc
    return derived


VisionCfg = _all_optional(CLIPVisionCfg, "VisionCfg", "open_clip's CLIPVisionCfg; null fields take open_clip's default.")
TextCfg = _all_optional(CLIPTextCfg, "TextCfg", "open_clip's CLIPTextCfg; null fields take open_clip's default.")


@dataclasses.dataclass
class ModelCfg:
    """An open_clip model config (the schema of open_clip's ``model_configs/*.json``).

    Args:
        embed_dim: width of the joint image-text embedding.
        vision_cfg: the image tower (``timm_model_name`` for a timm trunk, else open_clip's ViT).
        text_cfg: the text tower (open_clip's transformer, or ``hf_model_name`` for a Hugging Face one).
        quick_gelu: OpenAI's QuickGELU activation.
        init_logit_scale: initial log temperature.
        init_logit_bias: initial logit bias (SigLIP); null: no bias.
        nonscalar_logit_scale: a 1-element logit scale instead of a scalar.
        custom_text: build open_clip's ``CustomTextCLIP`` (implied by ``text_cfg.hf_model_name``).
        output_dict: the model returns a dict.
    """

    embed_dim: int
    vision_cfg: VisionCfg = dataclasses.field(default_factory=VisionCfg)
    text_cfg: TextCfg = dataclasses.field(default_factory=TextCfg)
    quick_gelu: Optional[bool] = None
    init_logit_scale: Optional[float] = None
    init_logit_bias: Optional[float] = None
    nonscalar_logit_scale: Optional[bool] = None
    custom_text: Optional[bool] = None
    output_dict: Optional[bool] = None


def to_open_clip(cfg: Any) -> dict:
    """The open_clip JSON dict of a ``ModelCfg`` (or its parsed namespace, or a dict): the fields that are
    set, in open_clip's field order.

    One completion: a Hugging Face text tower (``hf_model_name``) without ``hf_tokenizer_name`` gets its
    model's tokenizer named, because ``open_clip.get_tokenizer`` picks a Hugging Face tokenizer only by
    ``hf_tokenizer_name`` (without it, CLIP's BPE): so training and the export tokenize alike.
    """
    if dataclasses.is_dataclass(cfg) or hasattr(cfg, "as_dict"):
        cfg = cfg.as_dict() if hasattr(cfg, "as_dict") else dataclasses.asdict(cfg)
    elif not isinstance(cfg, dict):
        return cfg  # not a config at all: factory.validate_model_cfg says what is expected
    # a dict too: LightningCLI's saved config.yaml holds every ModelCfg field, the unset ones null
    out = {}
    for key, value in cfg.items():
        if key in ("vision_cfg", "text_cfg") and isinstance(value, dict):
            value = {k: _plain(v) for k, v in value.items() if v is not None and not k.startswith("__")}
        if value is not None:
            out[key] = _plain(value)
    text = out.get("text_cfg")
    if isinstance(text, dict) and text.get("hf_model_name") and not text.get("hf_tokenizer_name"):
        out["text_cfg"] = {**text, "hf_tokenizer_name": text["hf_model_name"]}
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # JSON's (and YAML's) sequences are lists
