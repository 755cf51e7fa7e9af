"""Callbacks: zero-shot classification during validation, and data-skip monitoring."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch

from . import factory
from .cli import UserError
from .data.sample import MAX_IMAGE_PIXELS, SKIP_REASONS
from .eval import CLASSIFICATION, evaluate_set, load_set

log = logging.getLogger(__name__)


def batch_size(batch: dict) -> int:
    """For Lightning's ``ThroughputMonitor(batch_size_fn=...)``: samples in one of our batches."""
    return batch["image"].shape[0]


class ZeroShotEvaluation(pl.Callback):
    """Zero-shot classification and retrieval on each of ``sets`` at the end of each validation, with
    ``clip_hvt.eval``'s code (open_clip's template-averaged classifier, CLIP_benchmark's metrics).

    ``sets``: evaluation set directories in any layout ``clip_hvt.eval`` recognises (zero-shot
    classification, or caption shards for retrieval); none given, none evaluated (a one-line notice). The training CLI passes the embedded shapes set when the data
    is ``shapes`` and no set is given. ``classnames``/``templates``: JSON list files or open_clip's
    built-in lists for every set (default: each set's own files), e.g. ImageNet-val shards with
    ``classnames: imagenet``, ``templates: openai``.

    Each rank streams its share of each set (``clip_hvt.eval.evaluate_set``), through the evaluated model's
    own preprocessing and tokenizer; hit and skip counts are summed over ranks, so all ranks log the
    same numbers, and no image is kept between batches. Metrics: ``zeroshot/top1``, ``top5``,
    ``chance`` (classification; also CLIP_benchmark's ``acc1``, ``acc5``, ``mean_per_class_recall``),
    ``image_retrieval_recall@K``/``text_retrieval_recall@K`` (retrieval), ``samples`` (images
    scored), ``skipped`` and ``skipped_<reason>``; with several sets, ``zeroshot/<set directory name>/...``.
    """

    def __init__(self, sets: list[str] | None = None, classnames: str | None = None, templates: str | None = None,
                 batch_size: int = 256, max_image_pixels: int = MAX_IMAGE_PIXELS, num_workers: int = 0):
        self.sets = sets
        self.classnames, self.templates = classnames, templates
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels
        self.num_workers = num_workers

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.sets and trainer.is_global_zero:
            log.warning("zero-shot evaluation: no sets given (ZeroShotEvaluation sets=[DIR, ...]), none evaluated")

    @torch.no_grad()
    def evaluate_set(self, root: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """This set's metrics, equal on every rank: ``clip_hvt.eval.evaluate_set``, the standalone
        evaluation's code, so a number logged here is the one ``python -m clip_hvt.eval`` gives."""
        evalset = load_set(root, self.classnames, self.templates)
        model = pl_module.model
        tokenizer = factory.create_tokenizer(pl_module.hparams.model_cfg)
        transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        result = evaluate_set(model, tokenizer, transform, evalset, batch_size=self.batch_size,
                              num_workers=self.num_workers, rank=trainer.global_rank, world_size=trainer.world_size,
                              max_image_pixels=self.max_image_pixels,
                              reduce=lambda counts: trainer.strategy.reduce(counts, reduce_op="sum"))
        metrics = dict(result["metrics"])
        if evalset.task == CLASSIFICATION:  # the names logged since the first release, beside CLIP_benchmark's
            metrics.update(top1=metrics["acc1"], top5=metrics["acc5"], chance=1.0 / len(evalset.classnames))
        metrics.update(samples=float(result["samples"]), skipped=float(sum(result["skipped"].values())))
        metrics.update({f"skipped_{r}": float(n) for r, n in result["skipped"].items()})
        return metrics

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        sets = self.sets or []
        prefix = {root: "zeroshot/" if len(sets) == 1 else f"zeroshot/{Path(root).name}/" for root in sets}
        return {prefix[root] + name: value for root in sets
                for name, value in self.evaluate_set(root, trainer, pl_module).items()}

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
            raise UserError(f"{total_skipped} of {seen} samples skipped ({total_skipped / seen:.1%} > "
                            f"max_skip_rate {self.max_skip_rate:.1%}): {detail}. Check the shards with "
                            "`python -m clip_hvt.data.check --paths DIR`.")

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
        counts = state["skipped"] + [0] * (len(SKIP_REASONS) - len(state["skipped"]))  # older runs: fewer reasons
        self.skipped = torch.tensor(counts, dtype=torch.long)
        self.used = state["used"]



class _PairFlops:
    """Lightning's layer summary with the forward FLOPs of one image-text pair where Lightning prints 0.

    Lightning counts FLOPs only by running an ``example_input_array``, which a two-tower module has not, so
    its FLOPs column and total are zeros; the module counts them once with ``clip_hvt.flops``
    (``tower_costs``, attention included), and the summary prints that count and drops the zero column.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        costs = getattr(pl_module, "tower_costs", None)
        self._pair_flops = costs["image_flops"] + costs["text_flops"] if costs else 0
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, *totals, total_flops=0, **summarize_kwargs) -> None:
        summary_data = [(name, column) for name, column in summary_data if name != "FLOPs"]
        super().summarize(summary_data, *totals, total_flops=self._pair_flops, **summarize_kwargs)


class ModelSummary(_PairFlops, pl.callbacks.ModelSummary):
    __doc__ = _PairFlops.__doc__


class RichModelSummary(_PairFlops, pl.callbacks.RichModelSummary):
    __doc__ = _PairFlops.__doc__
