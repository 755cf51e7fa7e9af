"""The LightningModule: an open_clip model, the contrastive loss, optimizer groups and schedule.

Cross-cutting concerns live in callbacks (``clip_hvt.callbacks``): zero-shot evaluation, skip
monitoring, throughput. Retrieval on the validation shards is computed here because it needs the
features of the whole validation set, gathered from every rank.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from open_clip_train.train import get_clip_metrics
from torch.optim.optimizer import _default_to_fused_or_foreach

from . import factory, flops, lock
from .cli import UserError
from .config import ModelCfg, to_open_clip
from .distill import Distill, Teacher, copy_text_tower, embedding_loss, teacher_tokenizer
from .gradcache import gradcache_backward
from .loss import build_loss


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # open_clip's rule: biases, norms, gains (1-d tensors) and the temperature are not decayed.
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear warmup from ~0 to 1, then cosine to ``min_lr_ratio`` at ``max_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class CLIPModule(pl.LightningModule):
    """Contrastive image-text training of an open_clip model.

    Args:
        model_cfg: open_clip model config (``clip_hvt.config.ModelCfg``, or open_clip's JSON as a dict).
        loss: ``clip`` (InfoNCE, global negatives) or ``siglip``.
        lr, weight_decay, betas, eps: AdamW; no decay on biases, norms, gains, ``logit_scale``.
        warmup_steps: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``.
        max_logit_scale: the temperature is clamped to ``[0, ln(max_logit_scale)]`` after each step.
        grad_checkpointing: recompute activations in backward (both towers).
        image_weights: local timm-layout checkpoint for the image trunk.
        micro_batch_size: GradCache: encode the batch this many samples at a time, the loss still over
            the whole (global) batch; exact gradients at the activation memory of one micro-batch.
        compile: ``torch.compile`` both towers in place (state-dict keys unchanged).
        channels_last: keep the image tower and images in channels-last memory format (faster convs on GPUs).
        fused_optimizer: torch's fused AdamW (one kernel over all parameters) wherever torch supports the
            parameters' device, dtype and tensor type, else torch's default (for-each) AdamW; False: always
            the default. Same update up to float rounding.
        lock_image, lock_image_unlocked_groups, lock_image_freeze_bn_stats: LiT locking of the image tower
            but its last groups (timm's ``group_matcher``), BatchNorm statistics of locked groups frozen;
            open_clip_train's ``--lock-image*`` flags.
        lock_text, lock_text_unlocked_layers, lock_text_freeze_layer_norm: the same for the text tower
            (``--lock-text*``); ``lock_text_freeze_layer_norm=False`` keeps locked layers' LayerNorms trainable.
        distill: distillation from a frozen open_clip teacher (``clip_hvt.distill.Distill``).
    """

    def __init__(
        self,
        model_cfg: ModelCfg,
        loss: str = "clip",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        max_logit_scale: float = 100.0,
        grad_checkpointing: bool = False,
        image_weights: str | None = None,
        micro_batch_size: int | None = None,
        compile: bool = False,
        channels_last: bool = False,
        fused_optimizer: bool = True,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_freeze_bn_stats: bool = False,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        lock_text_freeze_layer_norm: bool = True,
        distill: Distill | None = None,
    ):
        super().__init__()
        model_cfg = to_open_clip(model_cfg)  # hparams hold open_clip's JSON dict (a plain dict also works)
        self.save_hyperparameters()
        if isinstance(distill, dict):  # from a checkpoint's hyperparameters
            distill = Distill(**distill)
        if distill is not None:  # a plain dict in checkpoints, which load with weights_only
            self.hparams.distill = asdict(distill)
        if loss == "siglip" and "init_logit_bias" not in model_cfg:
            raise ValueError("loss 'siglip' needs a learnable bias: set model_cfg.init_logit_bias (e.g. -10) "
                             "and model_cfg.init_logit_scale (e.g. 2.3026 = ln 10), as open_clip's SigLIP configs do")
        # GradCache runs several backward passes per step: Lightning's manual optimization.
        self.automatic_optimization = micro_batch_size is None
        self.model = factory.create_model(model_cfg, image_weights=image_weights)
        self.distill, self.teacher, self.distill_proj = distill, None, None
        if distill is not None:
            self._setup_distill(distill, model_cfg, micro_batch_size)
        self._frozen_norms: list[torch.nn.Module] = []  # BatchNorms whose statistics the lock froze
        if lock_image:
            self._frozen_norms = lock.lock_image(self.model, lock_image_unlocked_groups, lock_image_freeze_bn_stats)
            self.train(self.training)
        if lock_text:
            lock.lock_text(self.model, lock_text_unlocked_layers, lock_text_freeze_layer_norm)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        if compile:
            # nn.Module.compile compiles in place: no `_orig_mod.` prefix in checkpoints or exports.
            self.model.visual.compile()
            text_tower = self.model.text if hasattr(self.model, "text") else self.model.transformer
            text_tower.compile()
        self._val_features: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._paused_broadcast = False  # DDP's buffer broadcast, off during validation

    def _setup_distill(self, distill: Distill, model_cfg: dict, micro_batch_size: int | None) -> None:
        if distill.clip_weight > 0 and self.hparams.loss != "clip":
            raise UserError(f"model.distill.clip_weight (open_clip's DistillClipLoss) needs model.loss clip, not "
                            f"{self.hparams.loss!r}: set model.distill.clip_weight 0 to distil embeddings only")
        self.teacher = Teacher.load(distill)
        self._teacher_tokenizes = teacher_tokenizer(distill, model_cfg) is not None
        mean, std = (factory.preprocess_cfg(model_cfg)[k] for k in ("mean", "std"))
        self._student_norm = (mean, std)
        if distill.text_tower:
            copy_text_tower(self.model, self.teacher)
            lock.lock_text(self.model)
        widths = (model_cfg["embed_dim"], self.teacher.embed_dim)
        if distill.embed_weight and widths[0] != widths[1]:
            if not distill.project:
                raise UserError(f"the teacher's embedding width {widths[1]} differs from the student's {widths[0]}: "
                                "set model.distill.project true (a learned projection) or model.model_cfg.embed_dim "
                                f"{widths[1]}")
            if micro_batch_size is not None:
                raise UserError("model.distill.project learns inside the loss, which GradCache (model.micro_batch_size) "
                                f"does not back-propagate: drop micro_batch_size or set model_cfg.embed_dim {widths[1]}")
            # after the towers: a projection inside the loss, not part of the exported open_clip model
            self.distill_proj = torch.nn.Linear(*widths, bias=False)

    def train(self, mode: bool = True):
        super().train(mode)
        # Eval mode keeps running statistics as loaded. Lightning keeps each submodule's mode across
        # validation, and calls no train() at fit start: hence also at construction.
        for norm in self._frozen_norms:
            norm.eval()
        return self

    def setup(self, stage: str) -> None:
        if not self.automatic_optimization:
            check_gradcache_strategy(self.trainer.strategy)
        self.loss_fn = build_loss(self.hparams.loss, rank=self.global_rank, world_size=self.trainer.world_size,
                                  distill=self.distill is not None and self.distill.clip_weight > 0)
        # Forward FLOPs per image and caption, counted once (meta device): ThroughputMonitor's TFLOP/s and MFU.
        self.tower_costs = flops.tower_costs(self.model, self.hparams.model_cfg)

    def encode(self, images: torch.Tensor, texts: torch.Tensor):
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        image_features = self.model.encode_image(images, normalize=True)
        text_features = self.model.encode_text(texts, normalize=True)
        return image_features, text_features

    def _logit_bias(self):
        return getattr(self.model, "logit_bias", None)

    def teacher_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The teacher's unit image and text embeddings for ``batch``: read from it (stored targets) or
        computed by the live teacher on the same images and the captions tokenized its way."""
        if self.teacher is None or not (self.distill.clip_weight or self.distill.embed_weight):
            return None  # no teacher, or LiT from its text tower only: nothing to run it for
        if self.distill.stored_targets:
            return batch["teacher_image_emb"].float(), batch["teacher_text_emb"].float()
        if self._teacher_tokenizes and "teacher_text" not in batch:
            raise ValueError("the teacher tokenizes captions differently from the student, and the batch has no "
                             "'teacher_text': give the data module the same distill settings (data.distill)")
        return self.teacher.encode(batch["image"], batch.get("teacher_text", batch["text"]), *self._student_norm)

    def distill_loss(self, image_features, text_features, logit_scale, logit_bias, targets):
        """Total loss and its named parts: contrastive (+ DistillClipLoss term) (+ embedding term)."""
        if targets is None:
            return self.loss_fn(image_features, text_features, logit_scale, logit_bias), {}
        teacher_image, teacher_text = targets
        parts = {}
        if self.distill.clip_weight > 0:
            contrastive, parts["distill_loss"] = self.loss_fn(
                image_features, text_features, logit_scale, teacher_image, teacher_text,
                self.teacher.logit_scale.to(image_features.device))
            total = contrastive + self.distill.clip_weight * parts["distill_loss"]
        else:
            contrastive = total = self.loss_fn(image_features, text_features, logit_scale, logit_bias)
        parts["contrastive_loss"] = contrastive
        if self.distill.embed_weight:
            student = image_features if self.distill_proj is None else self.distill_proj(image_features)
            parts["embed_loss"] = embedding_loss(student, teacher_image, self.distill.embed_loss)
            total = total + self.distill.embed_weight * parts["embed_loss"]
        return total, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logit_scale = self.model.logit_scale.exp()
        targets, parts = self.teacher_targets(batch), {}

        def loss_fn(image_features, text_features, scale, bias):
            total, named = self.distill_loss(image_features, text_features, scale, bias, targets)
            parts.update(named)
            return total

        if self.automatic_optimization:
            image_features, text_features = self.encode(batch["image"], batch["text"])
            loss = loss_fn(image_features, text_features, logit_scale, self._logit_bias())
        else:
            loss = self._gradcache_step(batch, logit_scale, loss_fn)
        # Mean over ranks of the local-loss rows = the loss of the global batch.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), sync_dist=True)
        self.log("train/logit_scale", logit_scale)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.flops_per_batch = flops.flops_per_batch(self.tower_costs, batch["image"].shape[0], training=True)
        ddp = self.trainer.strategy.model if not self.automatic_optimization else None
        if ddp is not None and hasattr(ddp, "require_backward_grad_sync"):
            # DDP's reducer expects one backward per forward; GradCache runs several, so the
            # gradients are averaged once by _all_reduce_gradients instead.
            ddp.require_backward_grad_sync = False

    def _gradcache_step(self, batch: dict, logit_scale: torch.Tensor, loss_fn) -> torch.Tensor:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        loss = gradcache_backward(self.encode, batch["image"], batch["text"], loss_fn, logit_scale,
                                  self._logit_bias(), micro_batch_size=self.hparams.micro_batch_size,
                                  backward=self.manual_backward)
        self._all_reduce_gradients()
        optimizer.step()
        schedule.step()
        return loss

    def _all_reduce_gradients(self) -> None:
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]).div_(self.trainer.world_size)
        dist.all_reduce(flat)
        for grad, synced in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(synced.view_as(grad))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.hparams.max_logit_scale))

    def on_validation_start(self) -> None:
        # Validation inside fit runs through the DDP wrapper, whose forward broadcasts buffers: a
        # collective per batch, which hangs when ranks hold different numbers of validation batches
        # (shards split by rank). Eval mode changes no buffer, and the next training forward
        # broadcasts again. The epoch-end gathers below take uneven row counts.
        ddp = self.trainer.strategy.model
        self._paused_broadcast = getattr(ddp, "broadcast_buffers", False) is True
        if self._paused_broadcast:
            ddp.broadcast_buffers = False

    def on_validation_end(self) -> None:
        if self._paused_broadcast:
            self.trainer.strategy.model.broadcast_buffers = True
            self._paused_broadcast = False

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.flops_per_batch = flops.flops_per_batch(self.tower_costs, batch["image"].shape[0], training=False)
        if len(batch["image"]):  # a batch without images only brings the loader's last skip counts
            self._val_features.append(self.encode(batch["image"], batch["text"]))

    def on_validation_epoch_end(self) -> None:
        # Every rank gathers, also one whose share of the validation shards was empty (float32 on all
        # ranks: the gather needs one dtype).
        if self._val_features:
            image, text = (torch.cat(f).float() for f in zip(*self._val_features))
        else:
            image = text = torch.zeros(0, self.hparams.model_cfg["embed_dim"], device=self.device)
        self._val_features.clear()
        image, text = gather_uneven(self, image), gather_uneven(self, text)
        if image.shape[0] == 0:  # no validation samples on any rank
            return
        metrics = get_clip_metrics(image, text, self.model.logit_scale.exp().float())
        for name, value in metrics.items():
            self.log(f"val/{name}", float(value), rank_zero_only=True, sync_dist=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():  # the model and, when distilling, the projection
            if param.requires_grad:
                (no_decay if _no_weight_decay(name, param) else decay).append(param)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": hp.weight_decay}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
            # None, not False: an explicit False would also turn off the for-each default
            fused=(hp.fused_optimizer and fused_supported(decay + no_decay)) or None)
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(hp.warmup_steps, max_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (device, floating dtype, plain tensors).

    torch's own rule (private in torch): AdamW's default is the for-each loop, ~10 kernels per tensor,
    which on CPU was 14% of a quickstart step; the fused kernel is one pass over each tensor.
    """
    return bool(params) and _default_to_fused_or_foreach(params, differentiable=False, use_fused=True)[0]


def check_gradcache_strategy(strategy) -> None:
    """GradCache (``micro_batch_size``) averages gradients itself with one all-reduce: that is right
    for DDP (whose own sync is turned off) and one device, wrong for strategies that shard gradients."""
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(f"model.micro_batch_size (GradCache) works with a single device or DDP, not "
                         f"{type(strategy).__name__}: it all-reduces full gradients itself. Use DDP, or drop "
                         "micro_batch_size and lower data.batch_size")


def gather_uneven(module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
    """All-gather rows from every rank when ranks hold different row counts (pad, gather, trim)."""
    if module.trainer.world_size == 1:
        return x
    sizes = module.all_gather(torch.tensor(x.shape[0], device=x.device)).flatten().tolist()
    if max(sizes) == 0:
        return x
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = module.all_gather(padded)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
