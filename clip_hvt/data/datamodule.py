"""WebDataset DataModule: shards -> open_clip transforms and tokenizer -> batches, built by
``clip_hvt.data.pipeline``. Every rank yields ``train_num_samples // (batch_size * world_size)``
training batches per epoch, so DDP never waits on a rank that ran out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch

from .. import factory
from ..cli import UserError
from ..distill import Distill, teacher_tokenizer
from . import synthetic
from .pipeline import eval_loader, normalize_uint8, split_normalize, train_loader
from .sample import MAX_IMAGE_PIXELS
from .shards import count_samples, expand_sources


@dataclass
class Shapes:
    """Use the embedded procedural data set (generated into ``root`` or the cache on first use)."""
    root: str | None = None
    seed: int = 0
    image_size: int = 72
    train_samples: int = 20000
    val_samples: int = 1000
    zeroshot_per_class: int = 20

    def config(self) -> synthetic.ShapesConfig:
        return synthetic.ShapesConfig(**{k: v for k, v in asdict(self).items() if k != "root"})

    def resolve_root(self) -> Path:
        return Path(self.root).expanduser() if self.root else synthetic.default_root(self.config())


class WebDataModule(pl.LightningDataModule):
    """Image-text pairs from WebDataset shards.

    Args:
        train_shards: webdataset spec, brace expansion and ``::`` between sources.
        val_shards: spec of the retrieval validation shards (read once, in order).
        shapes: use the embedded shapes data instead of ``train_shards`` (its validation shards
            unless ``val_shards`` is given; its zero-shot set is ``zeroshot_sets``).
        batch_size: per-rank batch size.
        train_num_samples: samples per epoch; default from ``sizes.json`` / img2dataset stats.
        source_weights: sampling weight per ``::`` source (default: proportional to shard count).
        caption_key: ``txt`` or ``json.<field>``; one per source or one for all.
        val_caption_key: caption key of the validation shards, same syntax as one ``caption_key``
            entry; default: the first train source's.
        sample_shuffle: in-worker sample shuffle buffer.
        max_image_pixels: larger images are skipped (decompression-bomb guard).
        aug_cfg: open_clip ``AugmentationCfg`` fields for the train transform.
        model_cfg: linked from ``model.model_cfg`` by the CLI (transforms and tokenizer).
        distill: linked from ``model.distill`` by the CLI: stored teacher targets, or the captions also
            tokenized the live teacher's way when its tokenizer differs.
        worker_nice: the training data workers' CPU priority below training's (an ``os.nice`` increment; 0:
            the same). Where every core is busy, training's multi-threaded ops wait less for the cores the
            workers hold; set 0 if the workers cannot keep up and other processes compete for the cores.
    """

    def __init__(self, train_shards: str | None = None, val_shards: str | None = None, shapes: Shapes | None = None,
                 batch_size: int = 256, val_batch_size: int | None = None, num_workers: int = 4,
                 train_num_samples: int | None = None, source_weights: Sequence[float] | None = None,
                 caption_key: str | list[str] = "txt", val_caption_key: str | None = None, sample_shuffle: int = 2000,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, seed: int = 0, aug_cfg: dict | None = None,
                 model_cfg: dict | None = None, distill: Distill | None = None, worker_nice: int = 10):
        super().__init__()
        if shapes is not None and train_shards is not None:
            raise ValueError("data.shapes and data.train_shards are both set: give one (--data.shapes null to "
                             "train on your shards, or drop --data.train_shards to use the embedded shapes data)")
        if shapes is None and train_shards is None:
            raise ValueError("WebDataModule needs train_shards (a webdataset spec) or shapes (the embedded data)")
        self.shapes = shapes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.worker_nice = worker_nice
        self.train_num_samples = train_num_samples
        self.source_weights = source_weights
        self.sample_shuffle = sample_shuffle
        self.max_image_pixels = max_image_pixels
        self.seed = seed
        self.aug_cfg = aug_cfg
        self.model_cfg = model_cfg
        self.distill = distill
        self.zeroshot_sets: list[str] = []  # the default sets of ZeroShotEvaluation (the CLI passes them)
        # expanded once, here: a typo fails at start, not at the first batch
        self.train_sources = expand_sources(train_shards) if train_shards is not None else None
        self.val_urls = _urls(val_shards)
        if shapes is not None:  # its shards are written by prepare_data, expanded in setup
            root = shapes.resolve_root()
            self._shapes_specs = (str(root / "train" / "*.tar"), None if val_shards else str(root / "val" / "*.tar"))
            self.zeroshot_sets = [str(root / "zeroshot")]
        self.val_shards = val_shards or (self._shapes_specs[1] if shapes is not None else None)
        keys = [caption_key] if isinstance(caption_key, str) else list(caption_key)
        sources = len(self.train_sources) if self.train_sources else 1
        if len(keys) not in (1, sources):
            raise ValueError(f"caption_key has {len(keys)} entries for {sources} sources")
        self.caption_keys = keys * sources if len(keys) == 1 else keys
        self.val_caption_key = val_caption_key or keys[0]

    def prepare_data(self) -> None:
        if self.shapes is not None:
            synthetic.ensure(self.shapes.resolve_root(), self.shapes.config())

    def setup(self, stage: str) -> None:
        if self.model_cfg is None:
            raise ValueError("WebDataModule needs model_cfg (the CLI links it from model.model_cfg)")
        self.train_transform, self.val_transform = factory.image_transforms(self.model_cfg, self.aug_cfg)
        # Workers run the PIL part and ship uint8; on_after_batch_transfer normalizes on the device.
        train_split, val_split = (split_normalize(t) for t in (self.train_transform, self.val_transform))
        self._normalize = train_split[1:] if train_split and val_split else None
        self._train_pil = train_split[0] if self._normalize else self.train_transform
        self._val_pil = val_split[0] if self._normalize else self.val_transform
        self.tokenizer = factory.create_tokenizer(self.model_cfg)
        self.teacher_tokenizer = teacher_tokenizer(self.distill, self.model_cfg)
        if self.train_sources is None:  # the shapes data, written by prepare_data
            self.train_sources = expand_sources(self._shapes_specs[0])
            self.val_urls = self.val_urls or _urls(self._shapes_specs[1])
        size = factory.preprocess_cfg(self.model_cfg)["size"]
        self.min_side = max(size) if isinstance(size, (tuple, list)) else size  # JPEG DCT-scaled decode

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer else 0

    def batches_per_epoch(self) -> int:
        total = self.train_num_samples or count_samples(self.train_sources)
        per_rank = total // (self.batch_size * self.world_size)
        if per_rank < 1:
            raise UserError(f"{total} training samples make no full batch of {self.batch_size} on "
                            f"{self.world_size} rank(s); lower data.batch_size or add data")
        return per_rank

    def train_dataloader(self):
        return train_loader(
            self.train_sources, self._train_pil, self.tokenizer, self.batch_size, self.batches_per_epoch(),
            num_workers=self.num_workers, weights=self.source_weights, caption_keys=self.caption_keys,
            shuffle=self.sample_shuffle, seed=self.seed, rank=self.rank,
            step=self.trainer.global_step if self.trainer else 0, max_pixels=self.max_image_pixels,
            min_side=self.min_side, teacher_targets=bool(self.distill and self.distill.stored_targets),
            teacher_tokenizer=self.teacher_tokenizer, worker_nice=self.worker_nice)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._normalize is not None and batch["image"].dtype == torch.uint8:
            batch["image"] = normalize_uint8(batch["image"], *self._normalize)
        return batch

    def val_dataloader(self):
        if not self.val_urls:
            return []
        return eval_loader(self.val_urls, self._val_pil, self.val_batch_size, "retrieval", rank=self.rank,
                             world_size=self.world_size, num_workers=min(self.num_workers, 1),
                             caption_key=self.val_caption_key, tokenizer=self.tokenizer,
                             max_pixels=self.max_image_pixels, min_side=self.min_side)


def _urls(spec: str | None) -> list[str] | None:
    return None if spec is None else [url for source in expand_sources(spec) for url in source]
