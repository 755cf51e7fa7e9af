"""Shards -> batches: one builder per purpose, as open_clip's ``get_wds_dataset``, all reading samples
through ``clip_hvt.data.sample``. Every batch is a dict whose ``skipped`` is a LongTensor of skip counts
(one per ``SKIP_REASONS`` key, since the worker's previous batch: summed over batches they are exact).
Usable without Lightning; ``WebDataModule`` and ``clip_hvt.eval`` are built on it.
"""
from __future__ import annotations

import itertools
import math
import os
import random
from functools import partial
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import webdataset as wds

from ..cli import UserError
from .sample import (MAX_IMAGE_PIXELS, TARGET_MEMBERS, SkipCounter, SkipSample, captions, decode_sample, label, npy,
                     read_tar)
from .shards import WeightedResampledShards

# The training stream is endless (shards are resampled), so data with nothing usable in it would never fill a
# batch and the run would wait forever: a worker stops after this many shards in a row without one sample
# (missing files, a mistyped URL, Git LFS pointers) or this many samples in a row without a usable one (a wrong
# caption key, no image member). Far above what a broken shard or source among good ones gives: 100 picks in a
# row of a source with half the weight happen with probability 2**-100; an img2dataset shard holds 10,000 samples.
MAX_EMPTY_SHARDS_IN_A_ROW = 100
MAX_SKIPS_IN_A_ROW = 50_000


def _nothing_usable(what: str, counter: SkipCounter) -> UserError:
    seen = "; ".join(f"{reason} {entry['count']} (e.g. {entry['examples'][0]})"
                     for reason, entry in counter.to_dict().items() if entry["examples"])
    return UserError(f"{what}; skipped so far in this data worker: {seen}. Check the shards with "
                     "`python -m clip_hvt.data.check --paths DIR` and the data section (patterns, caption_key)")


def read_shards(shards: Iterator[dict], counter: SkipCounter, count_shard_errors: bool = True,
                read: Callable[..., Iterator[dict]] = read_tar,
                max_empty_in_a_row: int | None = None) -> Iterator[dict]:
    """Pipeline stage: shard dicts (``url``, optional ``source``) -> raw samples carrying both.
    ``read``: url -> samples (a tar by default; ``clip_hvt.eval`` reads an image folder's files).
    ``max_empty_in_a_row``: a ``UserError`` after that many shards in a row without a sample (endless streams)."""
    empty = 0
    for shard in shards:
        extra = {"__source__": shard["source"]} if "source" in shard else {}
        empty += 1
        try:
            for sample in read(shard["url"], **extra):
                empty = 0
                yield sample
        except SkipSample as skip:
            if count_shard_errors:
                counter.add(skip.reason, skip.detail)
        if max_empty_in_a_row is not None and empty >= max_empty_in_a_row:
            raise _nothing_usable(f"{empty} shards in a row held no sample (the last: '{shard['url']}')", counter)


def decode(samples: Iterator[dict], transform: Callable, target: Callable, counter: SkipCounter,
           max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0, seed: int = 0,
           max_skips_in_a_row: int | None = None) -> Iterator[tuple]:
    """Pipeline stage: raw samples -> (transformed image, ``target(sample, rng)``); skips counted.
    ``max_skips_in_a_row``: a ``UserError`` after that many skipped samples in a row (endless streams)."""
    info = torch.utils.data.get_worker_info()
    # forked workers hold copies of one rng: seeded per worker so their caption choices differ
    target = partial(target, rng=random.Random(hash((seed, info.id if info else 0))))
    skips = 0
    for sample in samples:
        try:
            img, value = decode_sample(sample, target, max_pixels, min_side)
        except SkipSample as skip:
            counter.add(skip.reason, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")
            skips += 1
            if max_skips_in_a_row is not None and skips >= max_skips_in_a_row:
                raise _nothing_usable(f"{skips} samples in a row were skipped, none usable", counter) from None
            continue
        skips = 0
        yield transform(img), value


def random_caption(sample: dict, rng: random.Random, keys: Sequence[str]) -> str:
    """One caption, read with the caption key of the sample's source; a list gives one at random."""
    return rng.choice(captions(sample, keys[sample.get("__source__", 0)]))


def caption_and_targets(sample: dict, rng: random.Random, keys: Sequence[str]) -> tuple:
    """``random_caption``'s caption with the teacher's stored embeddings of the image and of that caption
    (``teacher_image.npy`` [D], ``teacher_text.npy`` [captions, D]; see ``clip_hvt.data.teacher_features``)."""
    texts = captions(sample, keys[sample.get("__source__", 0)])
    image_emb, text_emb = (npy(sample, member) for member in TARGET_MEMBERS)
    text_emb = text_emb.reshape(-1, text_emb.shape[-1]) if text_emb.ndim else text_emb
    if image_emb.ndim != 1 or text_emb.shape != (len(texts), image_emb.shape[0]):
        raise SkipSample("no_teacher_target", f"shapes {image_emb.shape}, {text_emb.shape} for {len(texts)} caption(s)")
    i = rng.randrange(len(texts))
    return texts[i], image_emb, text_emb[i]


def collate(items: list[tuple], tokenizer: Callable, counter: SkipCounter,
            teacher_tokenizer: Callable | None = None) -> dict:
    """Training batch: images stacked, captions tokenized at once, skips since the last batch; when
    distilling, the captions also tokenized the teacher's way and the stored teacher targets."""
    images, targets = zip(*items)
    texts = [t[0] if isinstance(t, tuple) else t for t in targets]
    batch = {"image": torch.stack(images), "text": tokenizer(texts), "skipped": counter.take()}
    if teacher_tokenizer is not None:
        batch["teacher_text"] = teacher_tokenizer(texts)
    if isinstance(targets[0], tuple):
        batch["teacher_image_emb"] = torch.from_numpy(np.stack([t[1] for t in targets]))
        batch["teacher_text_emb"] = torch.from_numpy(np.stack([t[2] for t in targets]))
    return batch


def lower_priority(worker_id: int, nice: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker runs ``nice`` steps below the process it serves. Where every
    core is busy, a multi-threaded op of the training process otherwise waits a scheduler slice for each core
    a worker holds (benchmarks/README.md, bench_train)."""
    os.nice(nice)


def train_loader(sources: list[list[str]], transform: Callable, tokenizer: Callable, batch_size: int,
                 num_batches: int, *, num_workers: int = 4, weights: Sequence[float] | None = None,
                 caption_keys: Sequence[str] = ("txt",), shuffle: int = 2000, seed: int = 0, rank: int = 0,
                 step: int = 0, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0,
                 teacher_targets: bool = False, teacher_tokenizer: Callable | None = None,
                 worker_nice: int = 0) -> wds.WebLoader:
    """Endless weighted resampling of ``sources``: batches ``{"image", "text", "skipped"}``, ``num_batches``
    rounded up to a multiple of the workers, the same on every rank. ``step`` (the global step at (re)start)
    joins the seeds, so a resumed run does not replay the order of the run it resumes. ``teacher_targets``:
    batches also carry the stored ``teacher_image_emb`` / ``teacher_text_emb``; ``teacher_tokenizer``: and
    ``teacher_text``, the captions tokenized the teacher's way. ``worker_nice``: :func:`lower_priority`."""
    counter = SkipCounter()
    workers = max(1, num_workers)
    per_worker = math.ceil(num_batches / workers)  # with_epoch counts per worker: same total on every rank
    stream_seed = hash((seed, rank, step))
    pipeline = wds.DataPipeline(
        WeightedResampledShards(sources, weights, seed=seed, rank=rank, stream_offset=step),
        partial(read_shards, counter=counter, max_empty_in_a_row=MAX_EMPTY_SHARDS_IN_A_ROW),
        wds.shuffle(shuffle, initial=min(shuffle, 500), seed=stream_seed),  # else seeded from pid and time
        partial(decode, transform=transform, counter=counter, max_pixels=max_pixels, min_side=min_side,
                target=partial(caption_and_targets if teacher_targets else random_caption, keys=list(caption_keys)),
                seed=stream_seed, max_skips_in_a_row=MAX_SKIPS_IN_A_ROW),
        wds.batched(batch_size, partial=False, collation_fn=partial(collate, tokenizer=tokenizer, counter=counter,
                                                                    teacher_tokenizer=teacher_tokenizer)),
    ).with_epoch(per_worker)
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                           worker_init_fn=partial(lower_priority, nice=worker_nice) if worker_nice else None)
    return loader.with_length(per_worker * workers)


def share(urls: Sequence[str], rank: int, world_size: int, worker: int = 0, num_workers: int = 1):
    """(shards, every, offset): this reader reads ``shards`` and keeps samples ``i % every == offset``. Shards
    are split by rank, then by worker; a level with fewer shards than parts splits by sample instead (all its
    readers read the same shards), and every level below it then does too."""
    urls, every, offset = list(urls), 1, 0
    for part, parts in ((rank, world_size), (worker, num_workers)):
        if every == 1 and len(urls) >= parts:
            urls = urls[part::parts]
        else:
            offset, every = offset + part * every, every * parts
    return urls, every, offset


def _eval_samples(urls: Sequence[str], rank: int, world_size: int, counter: SkipCounter,
                  read: Callable[..., Iterator[dict]] = read_tar) -> Iterator[dict]:
    info = torch.utils.data.get_worker_info()
    mine, every, offset = share(urls, rank, world_size, *((info.id, info.num_workers) if info else (0, 1)))
    # readers that read the same shards: only the first counts their shard errors
    samples = read_shards(({"url": u} for u in mine), counter, count_shard_errors=offset == 0, read=read)
    yield from itertools.islice(samples, offset, None, every)


def _eval_batches(items: Iterator[tuple], batch_size: int, counter: SkipCounter, key: str,
                  tokenizer: Callable | None) -> Iterator[dict]:
    """Batches as soon as they are full (``wds.batched`` waits for the next item, and the skips met
    meanwhile); skips met after the last batch come in an extra batch without images."""
    def collate(items: list[tuple], skipped: torch.Tensor) -> dict:
        images = torch.stack([i for i, _ in items]) if items else torch.empty(0)
        targets = [t for _, t in items]
        if key == "label":
            return {"image": images, "label": torch.tensor(targets, dtype=torch.long), "skipped": skipped}
        batch = {"image": images, "captions": targets, "skipped": skipped}
        if tokenizer is not None:
            batch["text"] = tokenizer([c[0] for c in targets])
        return batch

    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield collate(batch, counter.take())
            batch = []
    skipped = counter.take()
    if batch or skipped.any():
        yield collate(batch, skipped)


def eval_loader(urls: Sequence[str], transform: Callable, batch_size: int,
                task: Literal["classification", "retrieval"], *, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, num_classes: int | None = None, caption_key: str = "txt",
                tokenizer: Callable | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                min_side: int = 0, read: Callable[..., Iterator[dict]] = read_tar) -> wds.WebLoader:
    """This rank's share (see ``share``) of an evaluation set, each shard read once, in batches:
    ``{"image", "label", "skipped"}`` (classification) or ``{"image", "captions", "skipped"}`` with every
    caption of each image, plus ``"text"`` (the first caption, tokenized) given a ``tokenizer``. A
    worker's last batch holds no image when only skips are left to report. ``min_side`` > 0 lets
    JPEGs decode at a reduced DCT scale (validation during training)."""
    if task == "classification":
        target, key = (lambda sample, rng: label(sample, num_classes)), "label"
    elif task == "retrieval":
        target, key = (lambda sample, rng: captions(sample, caption_key)), "captions"
    else:
        raise ValueError(f"task must be 'classification' or 'retrieval', got {task!r}")
    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        lambda: _eval_samples(urls, rank, world_size, counter, read),
        partial(decode, transform=transform, target=target, counter=counter, max_pixels=max_pixels,
                min_side=min_side),
        partial(_eval_batches, batch_size=batch_size, counter=counter, key=key, tokenizer=tokenizer),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)


def split_normalize(transform):
    """Split open_clip's ``[..., ToTensor, Normalize]`` into a uint8 part and (mean, std), so workers ship
    uint8 images (4x less inter-process traffic) and batches are normalized on the device; None for a
    transform of another shape (the full transform is used then)."""
    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    return T.Compose([*steps[:-2], T.PILToTensor()]), tuple(steps[-1].mean), tuple(steps[-1].std)


def normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """ToTensor (/255) then Normalize, batched, on whatever device ``images`` is on."""
    return TF.normalize(images.float().div_(255), mean, std, inplace=True)
