"""WebDataset DataModule: shards -> robust decode -> open_clip transforms and tokenizer -> batches.

Training reads resampled shards (endless, weighted per source) and every rank yields exactly
``train_num_samples // (batch_size * world_size)`` batches per epoch, so DDP never waits on a rank
that ran out. Validation reads each shard once, split explicitly by rank and worker.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
import webdataset as wds

from .. import factory
from . import synthetic
from .decode import RobustDecoder, SkipCounter, TarSamples, collate
from .shards import ShardSplit, WeightedResampledShards, count_samples, expand_sources

log = logging.getLogger(__name__)


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
        fields = asdict(self)
        fields.pop("root")
        return synthetic.ShapesConfig(**fields)

    def resolve_root(self) -> Path:
        return Path(self.root).expanduser() if self.root else synthetic.default_root(self.config())


class WebDataModule(pl.LightningDataModule):
    """Image-text pairs from WebDataset shards.

    Args:
        train_shards: webdataset spec, brace expansion and ``::`` between sources.
        val_shards: spec of the retrieval validation shards (read once, in order).
        shapes: use the embedded shapes data instead of ``train_shards``/``val_shards``.
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
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        shapes: Shapes | None = None,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        train_num_samples: int | None = None,
        source_weights: Sequence[float] | None = None,
        caption_key: str | list[str] = "txt",
        val_caption_key: str | None = None,
        sample_shuffle: int = 2000,
        max_image_pixels: int = 64_000_000,
        seed: int = 0,
        aug_cfg: dict | None = None,
        model_cfg: dict | None = None,
    ):
        super().__init__()
        if shapes is None and train_shards is None:
            raise ValueError("WebDataModule needs train_shards (a webdataset spec) or shapes (the embedded data)")
        self.train_shards, self.val_shards, self.shapes = train_shards, val_shards, shapes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.train_num_samples = train_num_samples
        self.source_weights = source_weights
        self.caption_key = caption_key
        self.val_caption_key = val_caption_key
        self.sample_shuffle = sample_shuffle
        self.max_image_pixels = max_image_pixels
        self.seed = seed
        self.aug_cfg = aug_cfg
        self.model_cfg = model_cfg
        self.zeroshot_root: Path | None = None
        for spec in (train_shards, val_shards):  # fail at start on a typo, not at the first batch
            if spec is not None:
                expand_sources(spec)
        if shapes is not None:
            root = shapes.resolve_root()
            self.train_shards = self.train_shards or str(root / "train" / _brace(shapes.train_samples, "train"))
            self.val_shards = self.val_shards or str(root / "val" / _brace(shapes.val_samples, "val"))
            self.zeroshot_root = root / "zeroshot"

    def prepare_data(self) -> None:
        if self.shapes is not None:
            synthetic.ensure(self.shapes.resolve_root(), self.shapes.config())

    def setup(self, stage: str) -> None:
        if self.model_cfg is None:
            raise ValueError("WebDataModule needs model_cfg (the CLI links it from model.model_cfg)")
        self.train_transform, self.val_transform = factory.image_transforms(self.model_cfg, self.aug_cfg)
        # Workers run the PIL part and ship uint8; on_after_batch_transfer normalizes on the device.
        train_split, val_split = (factory.split_normalize(t) for t in (self.train_transform, self.val_transform))
        self._normalize = train_split[1:] if train_split and val_split else None
        self._train_pil = train_split[0] if self._normalize else self.train_transform
        self._val_pil = val_split[0] if self._normalize else self.val_transform
        self.tokenizer = factory.create_tokenizer(self.model_cfg)
        self.image_size = factory.preprocess_cfg(self.model_cfg)["size"]
        self.train_sources = expand_sources(self.train_shards)
        self.val_sources = expand_sources(self.val_shards) if self.val_shards else None
        keys = [self.caption_key] if isinstance(self.caption_key, str) else list(self.caption_key)
        if len(keys) not in (1, len(self.train_sources)):
            raise ValueError(f"caption_key has {len(keys)} entries for {len(self.train_sources)} sources")
        self._train_keys, self._val_key = keys, self.val_caption_key or keys[0]

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
            raise ValueError(f"{total} training samples make no full batch of {self.batch_size} on "
                             f"{self.world_size} rank(s); lower data.batch_size or add data")
        return per_rank

    def _decoder(self, transform, counter: SkipCounter, seed: int, caption_keys: str | list[str],
                 source_of: dict[str, int] | None = None) -> RobustDecoder:
        size = max(self.image_size) if isinstance(self.image_size, (tuple, list)) else self.image_size
        return RobustDecoder(transform, counter, caption_keys, self.max_image_pixels, draft_size=size,
                             seed=seed, source_of=source_of)

    def train_dataloader(self):
        counter = SkipCounter()
        step = self.trainer.global_step if self.trainer else 0
        workers = max(1, self.num_workers)
        num_batches = self.batches_per_epoch()
        shards = WeightedResampledShards(self.train_sources, self.source_weights, seed=self.seed,
                                         rank=self.rank, stream_offset=step)
        pipeline = wds.DataPipeline(
            shards,
            TarSamples(counter),
            wds.shuffle(self.sample_shuffle, initial=min(self.sample_shuffle, 500),
                        seed=hash((self.seed, self.rank, step))),  # else webdataset seeds from pid and time
            self._decoder(self._train_pil, counter, seed=hash((self.seed, self.rank, step)),
                          caption_keys=self._train_keys,
                          source_of={url: i for i, urls in enumerate(self.train_sources) for url in urls}),
            wds.batched(self.batch_size, partial=False,
                        collation_fn=partial(collate, tokenizer=self.tokenizer, counter=counter)),
        ).with_epoch(math.ceil(num_batches / workers))
        # with_epoch counts per worker, so every rank yields the same ceil(n/workers)*workers batches.
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)
        return loader.with_length(math.ceil(num_batches / workers) * workers)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._normalize is not None and batch["image"].dtype == torch.uint8:
            batch["image"] = factory.normalize_uint8(batch["image"], *self._normalize)
        return batch

    def val_dataloader(self):
        if not self.val_sources:
            return []
        counter = SkipCounter()
        urls = [u for source in self.val_sources for u in source]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            ShardSplit(rank=self.rank, world_size=self.world_size),
            TarSamples(counter),
            # one key for all val shards: never looked up by URL in the train sources
            self._decoder(self._val_pil, counter, seed=self.seed, caption_keys=self._val_key),
            wds.batched(self.val_batch_size, partial=True,
                        collation_fn=partial(collate, tokenizer=self.tokenizer, counter=counter)),
        )
        return wds.WebLoader(pipeline, batch_size=None, num_workers=min(self.num_workers, 1))


def _brace(n: int, split: str) -> str:
    shards = max(1, math.ceil(n / synthetic.ShapesConfig.samples_per_shard))
    return f"shapes-{split}-{{000000..{shards - 1:06d}}}.tar"
