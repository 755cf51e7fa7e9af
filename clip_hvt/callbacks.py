"""Callbacks: zero-shot classification during validation, and data-skip monitoring."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
import webdataset as wds
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from .data.decode import SKIP_REASONS

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
    """Class names, prompt templates, and (image bytes, label) pairs from a zero-shot directory.

    Layout: ``*.tar`` shards of ``jpg``/``png`` + ``cls`` (the label as text), and unless given
    otherwise ``classnames.json`` and ``templates.json`` (``str.format`` templates with one ``{}``).
    ``classnames='imagenet'`` and ``templates='openai'``/``'simple'`` take open_clip's lists.
    """
    root = Path(root)
    shards = sorted(str(p) for p in root.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"zero-shot set '{root}' has no *.tar shards (jpg/png + cls)")
    classnames = _names(classnames, root, "classnames.json", {"imagenet": IMAGENET_CLASSNAMES})
    templates = _names(templates, root, "templates.json",
                       {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES})
    templates = [t("{}") if callable(t) else t for t in templates]
    samples = []
    for sample in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()):
        image = sample.get("jpg", sample.get("png"))
        samples.append((image, int(sample["cls"].decode())))
    return classnames, templates, samples


class ZeroShotEvaluation(pl.Callback):
    """Zero-shot top-1/top-5 at the end of each validation, from open_clip's template-averaged classifier.

    Every rank scores its share of the images and the hit counts are summed, so all ranks log
    the same numbers. ``root`` defaults to the data module's ``zeroshot_root`` (embedded data);
    ``classnames``/``templates`` are JSON list files or open_clip's built-in lists (see
    ``load_zeroshot_set``), e.g. ImageNet-val shards with ``classnames: imagenet``, ``templates: openai``.
    """

    def __init__(self, root: str | None = None, classnames: str | None = None, templates: str | None = None,
                 batch_size: int = 256):
        self.root = root
        self.classnames, self.templates = classnames, templates
        self.batch_size = batch_size
        self._data = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = self.root or getattr(trainer.datamodule, "zeroshot_root", None)
        if root is None:
            raise ValueError("ZeroShotEvaluation needs root= (a zero-shot set directory) when the data is not `shapes`")
        self._root = Path(root)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._data is None:
            self._data = load_zeroshot_set(self._root, self.classnames, self.templates)
        classnames, templates, samples = self._data
        dm = trainer.datamodule
        model = pl_module.model
        classifier = build_zero_shot_classifier(model, dm.tokenizer, classnames, templates,
                                                num_classes_per_batch=None, device=pl_module.device)
        mine = samples[trainer.global_rank::trainer.world_size]
        hits = torch.zeros(3, device=pl_module.device)  # top1, top5, count
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start:start + self.batch_size]
            images = torch.stack([dm.val_transform(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in chunk])
            labels = torch.tensor([label for _, label in chunk], device=pl_module.device)
            features = model.encode_image(images.to(pl_module.device, pl_module.dtype), normalize=True)
            top5 = (features @ classifier.to(features.dtype)).topk(min(5, len(classnames)), dim=1).indices
            hits[0] += (top5[:, 0] == labels).sum()
            hits[1] += (top5 == labels[:, None]).any(dim=1).sum()
            hits[2] += len(chunk)
        hits = trainer.strategy.reduce(hits, reduce_op="sum")
        return {"zeroshot/top1": (hits[0] / hits[2]).item(), "zeroshot/top5": (hits[1] / hits[2]).item(),
                "zeroshot/chance": 1.0 / len(classnames)}

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
