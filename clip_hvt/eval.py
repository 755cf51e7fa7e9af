"""Standalone evaluation: ``python -m clip_hvt.eval --model M [--model M2] --data DIR [--data DIR2] [--out DIR]``.

Zero-shot classification and image-text retrieval with CLIP_benchmark's metrics and result files,
on sets recognised from their layout (``SUPPORTED_LAYOUTS``), for models given as a clip_hvt export
directory, a clip_hvt ``.ckpt`` or ``OPEN_CLIP_NAME,WEIGHTS_FILE``. The training-time evaluation
(``clip_hvt.callbacks.ZeroShotEvaluation``) calls ``evaluate_set`` too, so the numbers agree.

Launched by ``torchrun`` or ``srun`` with several processes, each rank scores its share of every set
and the counts (classification) or features (retrieval) are combined over ranks: the numbers are
those of one rank. Images are streamed: a classification keeps only counts, a retrieval only the
embeddings. Broken samples are skipped and counted, as in training.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import open_clip
import torch
import torch.distributed as dist
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from . import factory
from .atomic import atomic_write
from .cli import UserError, run
from .data.pipeline import eval_loader, normalize_uint8, split_normalize
from .data.sample import IMAGE_KEYS, MAX_IMAGE_PIXELS, SKIP_REASONS, SkipSample, read_tar
from .malloc import keep_freed_memory

log = logging.getLogger(__name__)

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"  # CLIP_benchmark's task names
SUPPORTED_LAYOUTS = (
    "clip_hvt zero-shot (*.tar shards with jpg/png + cls, classnames.json, templates.json); "
    "CLIP_benchmark webdataset (test/*.tar with webp/jpg/png + cls, classnames.txt, "
    "zeroshot_classification_templates.txt; or dataset_type.txt 'retrieval' with txt captions, one per line); "
    "an image folder (one sub-folder of images per class; optional classnames.json, templates.json); "
    "caption shards for retrieval (*.tar with an image and txt or json 'captions')")
TEXT_BATCH = 1024  # prompts per text-tower forward pass when building a zero-shot classifier
BUILTIN_CLASSNAMES = {"imagenet": IMAGENET_CLASSNAMES}
BUILTIN_TEMPLATES = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


# ----------------------------------------------------------------------------------------- sets
@dataclass
class EvalSet:
    """An evaluation set as recognised from its directory; no image is read until it is evaluated."""
    root: Path
    layout: str                      # clip_hvt | clip_benchmark | folder | captions
    task: str                        # CLASSIFICATION or RETRIEVAL
    shards: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)  # folder layout: (image path, label)
    classnames: list[str] | None = None
    templates: list[str] | None = None  # str.format templates with one ``{}``
    caption_key: str = "txt"            # retrieval: ``txt`` or ``json.captions`` (all of COCO's captions)

    @property
    def name(self) -> str:
        return self.root.name


def _read_names(path: Path) -> list[str]:
    """A JSON list, or one entry per line (CLIP_benchmark's ``.txt``)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"'{path}' must hold a JSON list of strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def _names(value: str | None, found: Path | None, builtin: dict[str, list], what: str, where: Path) -> list:
    """``value`` (a built-in list's name or a file) wins over the set's own file ``found``."""
    if value in builtin:
        return list(builtin[value])
    path = Path(value) if value else found
    if path is None or not path.is_file():
        raise UserError(f"{what} for '{where}': '{path}' is not a file; give a JSON list or a .txt file "
                        f"(one per line), or one of {sorted(builtin)}")
    return _read_names(path)


def check_templates(templates: Sequence, where: str) -> list[str]:
    """Templates as ``str.format`` strings with one ``{}``: CLIP_benchmark's ``{c}`` becomes ``{}``,
    open_clip's callables are applied to ``{}``; a template without a slot for the class name is an error."""
    checked = []
    for template in templates:
        text = template("{}") if callable(template) else template.replace("{c}", "{}")
        if "{}" not in text:
            raise UserError(f"template {template!r} of {where} has no '{{}}' (or CLIP_benchmark's '{{c}}') for the "
                            "class name; every template needs one, e.g. 'a photo of a {}.'")
        checked.append(text)
    if not checked:
        raise UserError(f"{where} has no templates; give at least one, e.g. 'a photo of a {{}}.'")
    return checked


def _tars(directory: Path) -> list[str]:
    # numeric order for CLIP_benchmark's 0.tar, 1.tar, ... 10.tar; any order gives the same metrics
    return [str(p) for p in sorted(directory.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))]


def _caption_key(shard: str) -> str:
    """``json.captions`` when the first sample carries a list of captions there (clip_hvt's COCO and
    Flickr shards: all five), else ``txt``."""
    try:
        with contextlib.closing(read_tar(shard)) as samples:
            first = next(samples, {})
        return "json.captions" if isinstance(json.loads(first.get("json", b"{}")).get("captions"), list) else "txt"
    except (SkipSample, ValueError, AttributeError):
        return "txt"  # an unreadable first sample is counted when the set is read


def load_set(root: str | Path, classnames: str | None = None, templates: str | None = None) -> EvalSet:
    """Recognise the set in ``root`` from its layout (``SUPPORTED_LAYOUTS``).

    ``classnames`` / ``templates`` (a file, or ``imagenet`` / ``openai``, ``simple`` for open_clip's
    lists) replace a classification set's own files.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"evaluation set '{root}' is not a directory; supported layouts: {SUPPORTED_LAYOUTS}")
    if (root / "test").is_dir() and any((root / f).is_file() for f in
                                        ("classnames.txt", "dataset_type.txt", "zeroshot_classification_templates.txt")):
        layout, shards = "clip_benchmark", _tars(root / "test")
        kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() else ""
        if kind not in ("", "classification", "retrieval"):
            raise UserError(f"'{root}': CLIP_benchmark dataset_type '{kind}' is not supported; "
                            "supported: classification, retrieval")
        task = RETRIEVAL if kind == "retrieval" else CLASSIFICATION
        if not shards:
            raise UserError(f"'{root}' is in CLIP_benchmark's layout but test/ has no *.tar shards")
        found_names, found_templates = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    elif _tars(root):
        shards = _tars(root)
        layout, task = ("clip_hvt", CLASSIFICATION) if (root / "classnames.json").is_file() or classnames \
            else ("captions", RETRIEVAL)
        found_names, found_templates = root / "classnames.json", root / "templates.json"
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        files = [(str(f), label) for label, d in enumerate(folders) for f in sorted(d.iterdir()) if f.is_file()]
        if not files and ((root / "classnames.json").is_file() or (root / "classnames.txt").is_file()):
            raise UserError(f"'{root}' has class names but no *.tar shards (nor test/*.tar) and no class "
                            f"sub-folders of images; supported layouts: {SUPPORTED_LAYOUTS}")
        if not files:
            raise UserError(f"'{root}' is no evaluation set: no *.tar shards and no class sub-folders with images; "
                            f"supported layouts: {SUPPORTED_LAYOUTS}")
        evalset = EvalSet(root, "folder", CLASSIFICATION, files=files)
        evalset.classnames = (_names(classnames, root / "classnames.json", BUILTIN_CLASSNAMES, "class names", root)
                              if classnames or (root / "classnames.json").is_file() else [d.name for d in folders])
        if len(evalset.classnames) != len(folders):
            raise UserError(f"'{root}' has {len(folders)} class folders but {len(evalset.classnames)} class names; "
                            "classnames.json must list one name per sub-folder, in sorted folder order")
        own = next((root / f for f in ("templates.json", "zeroshot_classification_templates.txt")
                    if (root / f).is_file()), None)
        evalset.templates = check_templates(
            _names(templates or (None if own else "openai"), own, BUILTIN_TEMPLATES, "templates", root), str(root))
        return evalset
    evalset = EvalSet(root, layout, task, shards=shards)
    if layout == "captions":
        evalset.caption_key = _caption_key(shards[0])
    if task == CLASSIFICATION:
        evalset.classnames = _names(classnames, found_names, BUILTIN_CLASSNAMES, "class names", root)
        evalset.templates = check_templates(_names(templates, found_templates, BUILTIN_TEMPLATES, "templates", root),
                                            str(found_templates if not templates else templates))
    return evalset


# --------------------------------------------------------------------------------------- models
@dataclass
class EvalModel:
    """An open_clip model with its tokenizer and evaluation transform; ``name``/``pretrained`` are
    what CLIP_benchmark writes into its result files."""
    model: torch.nn.Module
    tokenizer: Callable
    transform: Callable
    name: str
    pretrained: str


def load_model(spec: str) -> EvalModel:
    """``spec``: an export directory (``open_clip_config.json``), a clip_hvt ``.ckpt`` or
    ``OPEN_CLIP_NAME,WEIGHTS_FILE`` (CLIP_benchmark's ``model,pretrained`` form, a local file)."""
    from .export import CONFIG_NAME, NotACheckpoint, model_from_checkpoint

    path = Path(spec)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{path}")
        return EvalModel(model, open_clip.get_tokenizer(f"local-dir:{path}"), transform, f"local-dir:{path}", "")
    if path.is_file() and path.suffix == ".ckpt":
        try:
            model, model_cfg = model_from_checkpoint(path)
        except NotACheckpoint as err:  # export's own check, worded for --model
            raise UserError(f"--model '{spec}' is not a clip_hvt checkpoint ({err.reason}); give a .ckpt written by "
                            "clip_hvt.train, an export directory or OPEN_CLIP_NAME,WEIGHTS_FILE") from None
        return EvalModel(model, factory.create_tokenizer(model_cfg), factory.image_transforms(model_cfg)[1],
                         str(path), str(path))
    name, _, weights = spec.partition(",")
    if weights and name in open_clip.list_models():
        if not Path(weights).is_file():
            raise UserError(f"--model '{spec}': weights file '{weights}' does not exist")
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=weights)
        return EvalModel(model, open_clip.get_tokenizer(name), transform, name, weights)
    raise UserError(f"--model '{spec}' is not an export directory (with {CONFIG_NAME}), a clip_hvt .ckpt file, "
                    "or OPEN_CLIP_NAME,WEIGHTS_FILE with a name from open_clip.list_models() and a local file")


# ------------------------------------------------------------------------------------- samples
def read_image_file(path: str, labels: dict[str, int], **extra) -> Iterator[dict]:
    """An image folder's file as a raw sample (image bytes + ``cls`` from its class folder), for the
    evaluation pipeline's reader; a file that is not an image gives a sample without one (``no_image``)."""
    ext = path.rsplit(".", 1)[-1].lower()
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SkipSample("corrupt_shard", f"{path} ({type(err).__name__}: {err})") from None
    yield {"__key__": path, "__url__": path, **extra, "cls": str(labels[str(Path(path).parent)]).encode(),
           **({ext: data} if ext in IMAGE_KEYS else {})}


def batches(evalset: EvalSet, transform: Callable, batch_size: int, rank: int = 0, world_size: int = 1,
            num_workers: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """This rank's share of ``evalset`` through ``clip_hvt.data.pipeline.eval_loader``: batches of
    ``image`` (normalised; may be empty: a worker's trailing skips) and ``label`` or ``captions``
    (every caption of each image), with ``skipped`` counts (``SKIP_REASONS`` order)."""
    split = split_normalize(transform)  # workers ship uint8, batches are normalised here
    if evalset.task == CLASSIFICATION:
        task = dict(task="classification", num_classes=len(evalset.classnames))
    else:
        task = dict(task="retrieval", caption_key=evalset.caption_key)
    if evalset.layout == "folder":
        urls = [path for path, _ in evalset.files]
        labels = {str(Path(path).parent): label for path, label in evalset.files}
        task["read"] = partial(read_image_file, labels=labels)
    else:
        urls = evalset.shards
    for batch in eval_loader(urls, split[0] if split else transform, batch_size, rank=rank, world_size=world_size,
                             num_workers=num_workers, max_pixels=max_image_pixels, **task):
        if split and len(batch["image"]):
            batch["image"] = normalize_uint8(batch["image"], *split[1:])
        if evalset.layout == "clip_benchmark" and "captions" in batch:  # its captions: one per line of txt
            batch["captions"] = [[line.strip() for c in caps for line in c.splitlines() if line.strip()]
                                 for caps in batch["captions"]]
        yield batch


# ------------------------------------------------------------------------------------- metrics
def classification_metrics(top1: float, top5: float, count: float, class_total: torch.Tensor,
                           class_correct: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's ``acc1``, ``acc5`` (NaN under 5 classes) and ``mean_per_class_recall``
    (sklearn's balanced accuracy: mean recall over the classes that have samples)."""
    present = class_total > 0
    return {"acc1": top1 / count if count else math.nan,
            "acc5": top5 / count if count and len(class_total) >= 5 else math.nan,
            "mean_per_class_recall": (class_correct[present] / class_total[present]).mean().item()
            if present.any() else math.nan}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                      recall_k: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """CLIP_benchmark's retrieval recalls from normalised features; ``text_image[t]`` is text t's image.

    ``image_retrieval_recall@K``: share of texts whose image is among the K best images;
    ``text_retrieval_recall@K``: share of images with at least one of their texts among the K best texts.
    Computed as ranks (how many candidates score strictly higher than the best positive), in chunks of
    rows, instead of CLIP_benchmark's one-hot top-K tensor of texts x K x images.
    """
    image_rank = torch.empty(len(text_features), dtype=torch.long)
    for start in range(0, len(text_features), chunk):
        scores = text_features[start:start + chunk] @ image_features.T
        positive = scores.gather(1, text_image[start:start + chunk, None].to(scores.device))
        image_rank[start:start + chunk] = (scores > positive).sum(1).cpu()
    text_rank = torch.empty(len(image_features), dtype=torch.long)
    for start in range(0, len(image_features), chunk):
        scores = image_features[start:start + chunk] @ text_features.T
        own = text_image[None, :].to(scores.device) == torch.arange(start, start + len(scores), device=scores.device)[:, None]
        best = scores.masked_fill(~own, -math.inf).amax(1, keepdim=True)
        text_rank[start:start + chunk] = (scores > best).sum(1).cpu()
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = (image_rank < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (text_rank < k).float().mean().item()
    return metrics


# ---------------------------------------------------------------------------------- distributed
def _all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(x)
    return x


def _all_gather_rows(x: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's rows (ranks may hold different numbers of rows), in rank order."""
    if world_size == 1:
        return [x]
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    padded = torch.zeros((int(max(sizes)), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [g[:int(n)] for g, n in zip(gathered, sizes)]


def distributed_from_env(device: str) -> tuple[int, int]:
    """(rank, world size) of a ``torchrun`` or ``srun`` launch, with the process group set up; (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    from .slurm import is_slurm_launch

    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
        rank, world_size, address, port = env.global_rank(), env.world_size(), env.main_address, env.main_port
    elif is_slurm_launch():
        # Read directly: Lightning's SLURMEnvironment also insists on --ntasks-per-node, which an
        # evaluation (any number of tasks, any layout) does not need.
        world_size = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ["SLURM_NTASKS"]))
        if world_size > 1 and "SLURM_STEP_ID" not in os.environ:  # else rank 0 waits forever
            raise UserError(f"the job has {world_size} tasks but this process was started by the batch script, "
                            "not by srun, so the other ranks never start: launch with `srun python -m clip_hvt.eval ...`")
        rank = int(os.environ.get("SLURM_PROCID", 0))
        address = SLURMEnvironment.resolve_root_node_address(os.environ.get("SLURM_NODELIST", "127.0.0.1"))
        port = int(os.environ.get("MASTER_PORT", 10000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 10000))  # Lightning's
    else:
        return 0, 1
    if world_size == 1:
        return 0, 1
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world_size)
    return rank, world_size


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_set(model: torch.nn.Module, tokenizer: Callable, transform: Callable, evalset: EvalSet, *,
                 batch_size: int = 64, num_workers: int = 0, recall_k: Sequence[int] = (1, 5, 10),
                 rank: int = 0, world_size: int = 1, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 autocast: torch.autocast | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on this rank's share of ``evalset``; every rank returns the whole set's
    ``{"metrics": ..., "samples": images scored, "skipped": {reason: count}}``.

    With ``world_size`` > 1 every rank must call this: counts are summed with one ``reduce`` (default
    ``torch.distributed.all_reduce``; Lightning passes its strategy's) and retrieval features are
    gathered with ``torch.distributed``.
    """
    reduce = reduce or (lambda x: _all_reduce(x, world_size))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    context = autocast or contextlib.nullcontext()
    num_skips = len(SKIP_REASONS)
    stream = batches(evalset, transform, batch_size, rank, world_size, num_workers, max_image_pixels)
    try:
        if evalset.task == CLASSIFICATION:
            with context:
                # class x template prompts encoded ~1024 at a time: ImageNet's 80 templates make 80,000
                classifier = build_zero_shot_classifier(
                    model, tokenizer, evalset.classnames, evalset.templates, device=device,
                    num_classes_per_batch=max(1, TEXT_BATCH // len(evalset.templates))).float()
            num_classes = len(evalset.classnames)
            # top-1 hits, top-5 hits, samples, skips by reason, then per class: samples, top-1 hits
            counts = torch.zeros(3 + num_skips + 2 * num_classes, dtype=torch.float64, device=device)
            per_class = 3 + num_skips
            for batch in stream:
                counts[3:per_class] += batch["skipped"].to(device)
                if not len(batch["image"]):
                    continue
                with context:
                    features = model.encode_image(batch["image"].to(device, dtype), normalize=True)
                labels = batch["label"].to(device)
                top = (features.float() @ classifier).topk(min(5, num_classes), dim=1).indices
                hit1 = top[:, 0] == labels
                counts[0] += hit1.sum()
                counts[1] += (top == labels[:, None]).any(1).sum()
                counts[2] += len(labels)
                counts[per_class:per_class + num_classes] += torch.bincount(labels, minlength=num_classes)
                counts[per_class + num_classes:] += torch.bincount(labels[hit1], minlength=num_classes)
            counts = reduce(counts).cpu()  # one collective per rank and set, also for an empty share
            metrics = classification_metrics(counts[0].item(), counts[1].item(), counts[2].item(),
                                             counts[per_class:per_class + num_classes],
                                             counts[per_class + num_classes:])
            samples, skipped = int(counts[2]), counts[3:per_class]
        else:
            images, texts, owner, offset = [], [], [], 0
            skipped = torch.zeros(num_skips, dtype=torch.float64, device=device)
            for batch in stream:
                skipped += batch["skipped"].to(device)
                if not len(batch["image"]):
                    continue
                captions = [c for caps in batch["captions"] for c in caps]
                owner += [offset + i for i, caps in enumerate(batch["captions"]) for _ in caps]
                offset += len(batch["captions"])
                with context:
                    images.append(model.encode_image(batch["image"].to(device, dtype), normalize=True).float())
                    texts.append(model.encode_text(tokenizer(captions).to(device), normalize=True).float())
            if not images:  # an empty share still joins the gathers, with rows of the embedding width
                width = model.encode_text(tokenizer(["x"]).to(device)).shape[1]
                images, texts = [torch.zeros(0, width, device=device)], [torch.zeros(0, width, device=device)]
            image, text = torch.cat(images), torch.cat(texts)
            owner = torch.tensor(owner, dtype=torch.long, device=device)
            # ranks' image indices are local: offset each rank's by the images of the ranks before it
            image_parts = _all_gather_rows(image, world_size)
            starts = torch.tensor([0] + [len(p) for p in image_parts[:-1]]).cumsum(0).tolist()
            owner = torch.cat([o + s for o, s in zip(_all_gather_rows(owner, world_size), starts)])
            image, text = torch.cat(image_parts), torch.cat(_all_gather_rows(text, world_size))
            samples, skipped = len(image), reduce(skipped).cpu()
            metrics = (retrieval_metrics(image, text, owner, recall_k) if samples else
                       {f"{d}_retrieval_recall@{k}": math.nan for k in recall_k for d in ("image", "text")})
    finally:
        model.train(was_training)
    result = {"metrics": metrics, "samples": samples,
              "skipped": {r: int(n) for r, n in zip(SKIP_REASONS, skipped.tolist())}}
    total = sum(result["skipped"].values())
    if rank == 0 and total:
        log.warning("evaluation of '%s' skipped %d sample(s) and scored %d: %s", evalset.root, total, samples,
                    ", ".join(f"{r}={n}" for r, n in result["skipped"].items() if n))
    if rank == 0 and not samples:
        log.warning("evaluation of '%s' scored no sample: its metrics are NaN", evalset.root)
    return result


# ------------------------------------------------------------------------------------------- CLI
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "_"


def _labels(paths: Sequence[str]) -> list[str]:
    """Short names for result files: the last path part, or the whole path where those collide."""
    last = [Path(p.split(",")[0]).name or p for p in paths]
    return [_slug(n if last.count(n) == 1 else p) for n, p in zip(last, paths)]


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path, "w") as f:  # a reader sees the old file or the whole new one, never half
        json.dump(data, f, indent=1)


def format_table(rows: list[dict]) -> str:
    """One line per (model, set): samples, skips and every metric, as percentages."""
    header = ["model", "dataset", "task", "samples", "skipped"]
    names = [m for r in rows for m in r["metrics"] if m not in header]
    metrics = list(dict.fromkeys(names))
    table = [header + metrics]
    for r in rows:
        table.append([r["model"], r["dataset"], r["task"], str(r["samples"]), str(sum(r["skipped"].values()))]
                     + [f"{100 * r['metrics'][m]:.2f}" if m in r["metrics"] else "" for m in metrics])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) + len(metrics))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def main(model: list[str], data: list[str], out: str | None = None, batch_size: int = 64, num_workers: int = 2,
         recall_k: list[int] = [1, 5, 10], classnames: str | None = None, templates: str | None = None,
         device: str | None = None, precision: Literal["32", "bf16-mixed", "16-mixed"] = "32",
         max_image_pixels: int = MAX_IMAGE_PIXELS) -> list[dict]:
    """Evaluate CLIP models on zero-shot classification and retrieval sets, CLIP_benchmark's metrics.

    Args:
        model: models, each an export directory, a clip_hvt .ckpt or OPEN_CLIP_NAME,WEIGHTS_FILE;
            repeat --model or give a list. Evaluated one after the other.
        data: evaluation set directories, each recognised from its layout; repeat --data or give a list.
        out: directory for one CLIP_benchmark-style JSON per (model, set).
        batch_size: images per forward pass and rank.
        num_workers: image-decoding processes per rank.
        recall_k: the K of retrieval recall@K.
        classnames: replaces classification sets' class names: a JSON/.txt file or 'imagenet'.
        templates: replaces classification sets' templates: a JSON/.txt file, 'openai' or 'simple'.
        device: default: cuda (this rank's GPU) when available, else cpu.
        precision: 32, or autocast to bf16-mixed / 16-mixed.
        max_image_pixels: larger images are skipped (decompression-bomb guard).
    """
    sets = [load_set(d, classnames, templates) for d in data]  # all set errors before any model loads
    if not model:
        raise UserError("give at least one --model (export directory, .ckpt or OPEN_CLIP_NAME,WEIGHTS_FILE)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    created = not (dist.is_available() and dist.is_initialized())
    rank, world_size = distributed_from_env(device)
    if device == "cuda" and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))}"
    autocast = None if precision == "32" else torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    out_dir = Path(out) if out else None
    if out_dir and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for spec, model_label in zip(model, _labels(model)):
            loaded = load_model(spec)
            loaded.model.to(device)
            for evalset, set_label in zip(sets, _labels([str(s.root) for s in sets])):
                result = evaluate_set(loaded.model, loaded.tokenizer, loaded.transform, evalset,
                                      batch_size=batch_size, num_workers=num_workers, recall_k=recall_k, rank=rank,
                                      world_size=world_size, max_image_pixels=max_image_pixels, autocast=autocast)
                row = {"dataset": evalset.name, "model": loaded.name, "pretrained": loaded.pretrained,
                       "task": evalset.task, "metrics": result["metrics"], "language": "en",
                       "data": str(evalset.root), "layout": evalset.layout, "samples": result["samples"],
                       "skipped": result["skipped"]}
                rows.append(row)
                if out_dir and rank == 0:
                    write_json_atomic(out_dir / f"{set_label}_{model_label}_{evalset.task}.json", row)
            del loaded
    finally:
        if created and world_size > 1:
            dist.destroy_process_group()
    if rank == 0:
        print(format_table(rows))
        if out_dir:
            print(f"results: {out_dir}/")
    return rows


def _repeatable(args: list[str], flags: Sequence[str] = ("--model", "--data")) -> list[str]:
    """``--data a --data b`` as ``--data ["a", "b"]``: jsonargparse takes a list flag once (or as ``--data+``)."""
    for flag in flags:
        values, rest, first = [], [], None
        i = 0
        while i < len(args):
            if args[i] == flag and i + 1 < len(args) and not args[i + 1].lstrip().startswith("["):
                first = len(rest) if first is None else first
                values.append(args[i + 1])
                i += 2
                continue
            if args[i].startswith(flag + "=") and not args[i].split("=", 1)[1].lstrip().startswith("["):
                first = len(rest) if first is None else first
                values.append(args[i].split("=", 1)[1])
                i += 1
                continue
            rest.append(args[i])
            i += 1
        if values:
            args = rest[:first] + [flag, json.dumps(values)] + rest[first:]
    return args


def cli_main(args: list[str] | None = None):
    keep_freed_memory()
    return run(main, _repeatable(list(sys.argv[1:] if args is None else args)), prog="python -m clip_hvt.eval")


if __name__ == "__main__":
    cli_main()
