"""Distillation from a frozen open_clip teacher, its weights loaded from local files only.

Three signals, each weighted against the contrastive loss:

* ``clip_weight``: open_clip's ``DistillClipLoss``, as ``open_clip_train --distill-model`` uses it
  (cross-entropy of the student's image-text logits to the teacher's softmax, both directions);
* ``embed_weight``: the student's image embedding pulled to the teacher's (``cosine`` or ``mse`` of the
  unit vectors), through a learned linear projection when the widths differ and ``project`` allows it;
* ``text_tower``: the teacher's text tower, frozen, becomes the student's (LiT / Dill-CLIP): the
  student's ``text_cfg`` and ``embed_dim`` must be the teacher's so its weights load as they are.

The teacher's targets come from the live teacher (frozen, eval mode, no gradients, bf16 on devices that
support it) or, with ``stored_targets``, from the shards (``python -m clip_hvt.data.teacher_features``),
so a step costs what a plain step costs (1.005x measured, ``benchmarks/bench_distill.py``).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import factory
from .cli import UserError

__all__ = ["Distill", "Teacher", "embedding_loss", "same_tokenizer", "copy_text_tower"]

_PROBE = ["a photo of a red circle", "Zwei kleine Sterne, 42 mal! \u00e9t\u00e9"]


@dataclass
class Distill:
    """Distillation settings (``model.distill``).

    Args:
        teacher: an open_clip export directory (``local-dir:DIR`` or ``DIR``, e.g. the quickstart's
            ``runs/quickstart/export``) or an open_clip model name (``ViT-L-14``) with ``weights``.
        weights: local weights file of a teacher given by model name (never downloaded).
        clip_weight: weight of ``DistillClipLoss``'s distillation term (open_clip_train: 1).
        embed_weight: weight of the image-embedding distillation.
        embed_loss: ``cosine`` (1 - cos) or ``mse`` of the unit embeddings.
        project: learn a linear map from the student's embedding width to the teacher's when they differ.
        text_tower: use the teacher's text tower, frozen, as the student's.
        stored_targets: read the teacher's embeddings from the shards instead of running the teacher.
        precision: ``auto`` (bf16 on a CUDA device that supports it, else fp32), ``bf16`` or ``32``.
    """
    teacher: str
    weights: str | None = None
    clip_weight: float = 1.0
    embed_weight: float = 0.0
    embed_loss: Literal["cosine", "mse"] = "cosine"
    project: bool = False
    text_tower: bool = False
    stored_targets: bool = False
    precision: Literal["auto", "bf16", "32"] = "auto"


def _teacher_dir(spec: str) -> Path | None:
    path = Path(spec.removeprefix("local-dir:")).expanduser()
    return path if spec.startswith("local-dir:") or path.is_dir() or "/" in spec else None


def _tokenizer(teacher: str):
    """The teacher's tokenizer. A Hugging Face one (SigLIP, ...: ``text_cfg.hf_tokenizer_name``) comes from the
    Hugging Face cache, fetched once when there is network: a ``UserError`` when it is in neither."""
    path = _teacher_dir(teacher)
    try:
        return open_clip.get_tokenizer(f"local-dir:{path}" if path is not None else teacher)
    except OSError as err:  # transformers: not cached and no connection (or HF_HUB_OFFLINE)
        first = (str(err).splitlines() or [""])[0]
        raise UserError(f"teacher '{teacher}' uses a Hugging Face tokenizer that is not in the local Hugging Face "
                        f"cache and could not be fetched ({first}); fetch it once with network: python -c \"import "
                        f"open_clip; open_clip.get_tokenizer('{teacher}')\"") from None


class Teacher:
    """A frozen open_clip model kept outside the student's module tree, so it is in no state dict,
    optimizer, EMA copy or DDP bucket; moved to the student's device (and dtype) on first use."""

    def __init__(self, model: nn.Module, tokenizer, model_cfg: dict, precision: str = "auto"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.precision = precision
        self.embed_dim = model_cfg["embed_dim"]
        pp = model.visual.preprocess_cfg
        self.image_size, self.mean, self.std = pp["size"], pp["mean"], pp["std"]

    def __deepcopy__(self, memo):  # EMA's AveragedModel deep-copies the module: share the frozen teacher
        return self

    @classmethod
    def load(cls, cfg: Distill) -> "Teacher":
        """Load ``cfg.teacher``'s weights from local files (a Hugging Face tokenizer: from its cache, see
        ``_tokenizer``); a clear ``UserError`` when they are not there."""
        path = _teacher_dir(cfg.teacher)
        if path is not None:
            config = path / "open_clip_config.json"
            if not config.is_file():
                raise UserError(f"teacher '{cfg.teacher}' not found: no {config}. Give an open_clip export directory "
                                "(the quickstart writes runs/quickstart/export: python -m clip_hvt.train "
                                "--config configs/quickstart.yaml) or an open_clip model name with distill.weights")
            model_cfg = json.loads(config.read_text())["model_cfg"]
            tokenizer = _tokenizer(cfg.teacher)
            model = open_clip.create_model(f"local-dir:{path}")
        else:
            if cfg.teacher not in open_clip.list_models():
                close = difflib.get_close_matches(cfg.teacher, open_clip.list_models(), n=3)
                raise UserError(f"teacher '{cfg.teacher}' not found: neither a directory nor an open_clip model name"
                                + (f" (close: {', '.join(close)})" if close else "")
                                + "; give an export directory or a model name with distill.weights")
            if not cfg.weights or not Path(cfg.weights).is_file():
                raise UserError(f"teacher '{cfg.teacher}' needs its weights as a local file: distill.weights "
                                f"{cfg.weights!r} does not exist (weights are never downloaded)")
            model_cfg = open_clip.get_model_config(cfg.teacher)
            tokenizer = _tokenizer(cfg.teacher)  # before the model: the one part that may need the network
            model = open_clip.create_model(cfg.teacher, pretrained=cfg.weights)
        return cls(model, tokenizer, model_cfg, cfg.precision)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()

    def _place(self, device: torch.device) -> None:
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())
        dtype = torch.bfloat16 if bf16 else torch.float32
        if self.model.logit_scale.device != device or self.model.logit_scale.dtype != dtype:
            self.model.to(device=device, dtype=dtype)

    def pixels(self, images: torch.Tensor, mean, std) -> torch.Tensor:
        """The student's normalized batch as the teacher's preprocessing would give it: same crop, the
        teacher's size (bicubic, antialiased) and normalization."""
        size = self.image_size if isinstance(self.image_size, (tuple, list)) else (self.image_size,) * 2
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
        if tuple(mean) != tuple(self.mean) or tuple(std) != tuple(self.std):
            shape = (1, -1, 1, 1)
            as_t = lambda v: torch.as_tensor(v, dtype=images.dtype, device=images.device).view(shape)  # noqa: E731
            images = (images * as_t(std) + as_t(mean) - as_t(self.mean)) / as_t(self.std)
        return images

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text embeddings (float32) of a student batch."""
        self._place(images.device)
        dtype = self.model.logit_scale.dtype
        image = self.model.encode_image(self.pixels(images, mean, std).to(dtype), normalize=True)
        text = self.model.encode_text(texts.to(images.device), normalize=True)
        return image.float(), text.float()


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids (vocabulary and context length) on a probe."""
    x, y = a(_PROBE), b(_PROBE)
    return x.shape == y.shape and torch.equal(x, y)


def teacher_tokenizer(cfg: Distill | None, student_model_cfg: dict):
    """The teacher's tokenizer when captions must also be tokenized its way (live teacher whose
    tokenizer differs from the student's), else None."""
    if cfg is None or cfg.stored_targets:
        return None
    tokenizer = _tokenizer(cfg.teacher)
    return None if same_tokenizer(tokenizer, factory.create_tokenizer(student_model_cfg)) else tokenizer


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance of unit embeddings: ``cosine`` = mean(1 - cos), ``mse`` = mean squared difference."""
    student = F.normalize(student, dim=-1)
    if kind == "cosine":
        return (1 - (student * teacher).sum(-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"distill.embed_loss must be 'cosine' or 'mse', got {kind!r}")


def _text_keys(state: dict) -> list[str]:
    prefixes = ("text.", "token_embedding", "positional_embedding", "transformer.", "ln_final.",
                "text_projection", "attn_mask")
    return [k for k in state if k.startswith(prefixes)]


def copy_text_tower(student: nn.Module, teacher: Teacher) -> None:
    """Load the teacher's text tower into the student's; its text_cfg and embed_dim must match."""
    ours, theirs = student.state_dict(), teacher.model.state_dict()
    keys = _text_keys(ours)
    bad = [k for k in keys if k not in theirs or theirs[k].shape != ours[k].shape] + \
          [k for k in _text_keys(theirs) if k not in ours]
    if bad:
        raise UserError(f"distill.text_tower: the student's text tower differs from the teacher's (e.g. {bad[0]}); "
                        "set model.model_cfg.text_cfg and embed_dim to the teacher's (its open_clip_config.json)")
    student.load_state_dict({k: theirs[k] for k in keys}, strict=False)
