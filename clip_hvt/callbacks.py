"""Callbacks: zero-shot classification during validation, and data-skip monitoring."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from .data.decode import PICKLE_KEYS, SKIP_REASONS, SkipCounter, SkipSample, TarSamples, decode_image

log = logging.getLogger(__name__)


def batch_size(batch: dict) -> int:
    """For Lightning's ``ThroughputMonitor(batch_size_fn=...)``: samples in one of our batches."""
    return batch["image"].shape[0]


def _names(value: str | None, root: Path, filename: str, builtin: dict[str, list[str]]) -> list[str]:
    if value in builtin:
        return list(builtin[value])
    path = Path(value) if value else root / filename
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot {filename[:-5]}: '{path}' does not exist; give a JSON list file "
                                f"or one of {sorted(builtin)}")
    return json.loads(path.read_text())


def load_zeroshot_set(root: str | Path, classnames: str | None = None, templates: str | None = None):
    """Class names, prompt templates and the shard paths of a zero-shot directory; no image is read.

    Layout: ``*.tar`` shards of ``jpg``/``png`` + ``cls`` (the label as text), and unless given
    otherwise ``classnames.json`` and ``templates.json`` (``str.format`` templates with one ``{}``).
    ``classnames='imagenet'`` and ``templates='openai'``/``'simple'`` take open_clip's lists.
    The images are streamed at each evaluation by ``zeroshot_samples``.
    """
    root = Path(root)
    shards = sorted(str(p) for p in root.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"zero-shot set '{root}' has no *.tar shards (jpg/png + cls)")
    classnames = _names(classnames, root, "classnames.json", {"imagenet": IMAGENET_CLASSNAMES})
    templates = _names(templates, root, "templates.json",
                       {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES})
    templates = [t("{}") if callable(t) else t for t in templates]
    return classnames, templates, shards


# What a zero-shot sample can be skipped for: the shard and image reasons of ``SKIP_REASONS``, and
# ``no_label`` (no ``cls``, not an integer, or not a class index).
ZEROSHOT_SKIP_REASONS = ("corrupt_shard", "no_image", "undecodable_image", "image_too_large", "pickle_member",
                         "no_label")


class ZeroShotSkipCounter(SkipCounter):
    """``SkipCounter`` over ``ZEROSHOT_SKIP_REASONS``."""

    def __init__(self, log_first: int = 5):
        super().__init__(log_first, reasons=ZEROSHOT_SKIP_REASONS)


def _label(sample: dict, num_classes: int) -> int:
    try:
        label = int(sample["cls"].decode("ascii"))
    except (KeyError, AttributeError, UnicodeDecodeError, ValueError):
        raise SkipSample("no_label") from None
    if not 0 <= label < num_classes:
        raise SkipSample("no_label")
    return label


def zeroshot_samples(shards: list[str], counter: SkipCounter, num_classes: int, rank: int = 0,
                     world_size: int = 1, max_image_pixels: int = 64_000_000) -> Iterator[tuple[Image.Image, int]]:
    """This rank's share of a zero-shot set: (RGB image, label) pairs, read and decoded one at a time.

    With at least as many shards as ranks, a rank reads shards ``rank::world_size``; with fewer, every
    rank reads every shard and decodes samples ``rank::world_size`` of the whole set (a broken shard
    is then counted by rank 0 only). Either way the shares are disjoint and cover the set. Shards
    are read with ``TarSamples`` and images decoded with the pixel limit of the training data;
    broken samples are skipped and counted in ``counter`` (reasons: ``ZEROSHOT_SKIP_REASONS``),
    nothing is unpickled.
    """
    if len(shards) >= world_size:
        mine, every, shard_counter = shards[rank::world_size], 1, counter
    else:  # counts of shard errors that every rank meets go to a throw-away counter except on rank 0
        mine, every = shards, world_size
        shard_counter = counter if rank == 0 else ZeroShotSkipCounter(log_first=0)
    for index, sample in enumerate(TarSamples(shard_counter)({"url": url} for url in mine)):
        if index % every != rank % every:
            continue
        try:
            if any(k.rsplit(".", 1)[-1] in PICKLE_KEYS for k in sample):
                raise SkipSample("pickle_member")
            label = _label(sample, num_classes)
            image = decode_image(sample, max_image_pixels, draft_size=None)  # full decode: same pixels as PIL's
        except SkipSample as skip:
            counter.add(skip.reason, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")
            continue
        yield image, label


class ZeroShotEvaluation(pl.Callback):
    """Zero-shot top-1/top-5 at the end of each validation, from open_clip's template-averaged classifier.

    Every rank streams its share of the images (see ``zeroshot_samples``), scores them
    ``batch_size`` at a time and the hit and skip counts are summed over ranks, so all ranks log
    the same numbers; no image is kept between evaluations. Broken samples (truncated or
    non-image files, images over ``max_image_pixels``, missing or out-of-range labels, truncated
    shards) are skipped and counted: ``zeroshot/skipped`` and ``zeroshot/skipped_<reason>``,
    with ``zeroshot/samples`` the images scored.

    ``root`` defaults to the data module's ``zeroshot_root`` (embedded data);
    ``classnames``/``templates`` are JSON list files or open_clip's built-in lists (see
    ``load_zeroshot_set``), e.g. ImageNet-val shards with ``classnames: imagenet``, ``templates: openai``.
    ``max_image_pixels`` defaults to the data module's.
    """

    def __init__(self, root: str | None = None, classnames: str | None = None, templates: str | None = None,
                 batch_size: int = 256, max_image_pixels: int | None = None):
        self.root = root
        self.classnames, self.templates = classnames, templates
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels
        self._set = None  # (classnames, templates, shard paths): small, read once

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = self.root or getattr(trainer.datamodule, "zeroshot_root", None)
        if root is None:
            raise ValueError("ZeroShotEvaluation needs root= (a zero-shot set directory) when the data is not `shapes`")
        self._root = Path(root)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._set is None:
            self._set = load_zeroshot_set(self._root, self.classnames, self.templates)
        classnames, templates, shards = self._set
        dm = trainer.datamodule
        model, device = pl_module.model, pl_module.device
        classifier = build_zero_shot_classifier(model, dm.tokenizer, classnames, templates,
                                                num_classes_per_batch=None, device=device)
        max_pixels = self.max_image_pixels or getattr(dm, "max_image_pixels", None) or 64_000_000
        counter = ZeroShotSkipCounter()
        hits = torch.zeros(3 + len(ZEROSHOT_SKIP_REASONS), device=device)  # top1, top5, count, skips

        def score(batch: list[tuple[torch.Tensor, int]]) -> None:
            images = torch.stack([image for image, _ in batch])
            labels = torch.tensor([label for _, label in batch], device=device)
            features = model.encode_image(images.to(device, pl_module.dtype), normalize=True)
            top5 = (features @ classifier.to(features.dtype)).topk(min(5, len(classnames)), dim=1).indices
            hits[0] += (top5[:, 0] == labels).sum()
            hits[1] += (top5 == labels[:, None]).any(dim=1).sum()
            hits[2] += len(batch)

        batch = []
        for image, label in zeroshot_samples(shards, counter, len(classnames), trainer.global_rank,
                                             trainer.world_size, max_pixels):
            batch.append((dm.val_transform(image), label))
            if len(batch) == self.batch_size:
                score(batch)
                batch = []
        if batch:
            score(batch)
        hits[3:] = torch.tensor([counter.total[r] for r in ZEROSHOT_SKIP_REASONS], dtype=hits.dtype,
                                device=device)
        # one collective per rank and evaluation, also on a rank whose share was empty
        hits = trainer.strategy.reduce(hits, reduce_op="sum").cpu()
        count, skips = int(hits[2]), [int(n) for n in hits[3:]]
        if trainer.is_global_zero and sum(skips):
            log.warning("zero-shot evaluation skipped %d sample(s) and scored %d: %s", sum(skips), count,
                        ", ".join(f"{r}={n}" for r, n in zip(ZEROSHOT_SKIP_REASONS, skips) if n))
        if trainer.is_global_zero and not count:
            log.warning("zero-shot evaluation scored no image from '%s': top-1/top-5 are NaN", self._root)
        metrics = {"zeroshot/top1": (hits[0] / hits[2]).item(), "zeroshot/top5": (hits[1] / hits[2]).item(),
                   "zeroshot/chance": 1.0 / len(classnames), "zeroshot/samples": float(count),
                   "zeroshot/skipped": float(sum(skips))}
        metrics.update({f"zeroshot/skipped_{r}": float(n) for r, n in zip(ZEROSHOT_SKIP_REASONS, skips)})
        return metrics

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(name, value, sync_dist=False)


class SkipMonitor(pl.Callback):
    """Log skipped-sample counts by reason (summed over ranks) and stop a run whose data is broken.

    Counts arrive with each batch (``batch["skipped"]``). Training counts accumulate over the run
    (``data/skipped_<reason>``); validation counts are per validation pass
    (``val_data/skipped_<reason>`` and ``val_data/samples``, the samples the metrics were computed
    on). A run stops with an error once more than ``min_samples`` training samples were read and the
    skipped fraction exceeds ``max_skip_rate``: a broken data set must not train silently.
    """

    def __init__(self, max_skip_rate: float = 0.1, min_samples: int = 1000, log_every_n_steps: int = 50):
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.log_every_n_steps = log_every_n_steps
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.used = 0
        self.val_skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.val_used = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.skipped += batch["skipped"].cpu()
        self.used += batch["image"].shape[0]
        if (trainer.global_step + 1) % self.log_every_n_steps and not trainer.is_last_batch:
            return
        counts = torch.cat([self.skipped, torch.tensor([self.used])]).to(pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum").long().cpu()
        skipped, used = counts[:-1], int(counts[-1])
        for reason, n in zip(SKIP_REASONS, skipped.tolist()):
            pl_module.log(f"data/skipped_{reason}", float(n), rank_zero_only=True)
        total_skipped = int(skipped.sum())
        seen = total_skipped + used
        if seen >= self.min_samples and total_skipped / seen > self.max_skip_rate:
            detail = ", ".join(f"{r}={n}" for r, n in zip(SKIP_REASONS, skipped.tolist()) if n)
            raise RuntimeError(f"{total_skipped} of {seen} samples skipped ({total_skipped / seen:.1%} > "
                               f"max_skip_rate {self.max_skip_rate:.1%}): {detail}. Check the shards with "
                               "`python data_scripts/check_shards.py`.")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_skipped.zero_()
        self.val_used = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "skipped" in batch:
            self.val_skipped += batch["skipped"].cpu()
        self.val_used += batch["image"].shape[0]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        counts = torch.cat([self.val_skipped, torch.tensor([self.val_used])]).to(pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum").long().cpu()
        for reason, n in zip(SKIP_REASONS, counts[:-1].tolist()):
            pl_module.log(f"val_data/skipped_{reason}", float(n), rank_zero_only=True)
        pl_module.log("val_data/samples", float(counts[-1]), rank_zero_only=True)
        if counts[:-1].sum():
            detail = ", ".join(f"{r}={n}" for r, n in zip(SKIP_REASONS, counts[:-1].tolist()) if n)
            log.warning("validation skipped %d sample(s) and used %d: %s", int(counts[:-1].sum()),
                        int(counts[-1]), detail)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.tolist(), "used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = torch.tensor(state["skipped"], dtype=torch.long)
        self.used = state["used"]
