"""Shard lists: expand URL specs, check they exist, count their samples.

A spec is webdataset's: brace expansion (``train-{000000..000099}.tar``) and ``::`` between
sources (``a-{0..9}.tar::b-{0..4}.tar``). Counts come from ``sizes.json`` beside the shards
(open_clip's convention: shard basename -> samples) or, for img2dataset output, from its
``NNNNN_stats.json`` files.
"""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import braceexpand
import torch.utils.data

_REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "hf://")


def is_local(url: str) -> bool:
    return not url.startswith(_REMOTE_PREFIXES)


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def expand_sources(spec: str | Sequence[str]) -> list[list[str]]:
    """Split a spec on ``::`` into sources and brace-expand each; local paths must exist.

    Raises ``FileNotFoundError`` naming the pattern and what the directory holds when a
    local pattern matches nothing, so a typo stops the run at once instead of at step 0.
    """
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    sources = []
    for part in parts:
        urls = list(braceexpand.braceexpand(os.path.expandvars(part.strip())))
        urls = [match for url in urls for match in _glob(url)]
        local = [u for u in urls if is_local(u)]
        missing = [u for u in local if not os.path.isfile(_local_path(u))]
        if missing and len(missing) == len(urls):
            raise FileNotFoundError(_no_match_message(part, urls))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(urls)} shards of '{part}' do not exist, "
                f"e.g. {missing[:3]}. Fix the pattern or regenerate the shards.")
        sources.append(urls)
    if not sources:
        raise ValueError("empty shard spec: give a path or pattern like 'dir/train-{000000..000009}.tar'")
    return sources


def _glob(url: str) -> list[str]:
    """A local glob ('/data/*.tar') stands for its sorted matches; one matching nothing stays (reported)."""
    if is_local(url) and glob.has_magic(url):
        return sorted(glob.glob(_local_path(url))) or [url]
    return [url]


def _no_match_message(pattern: str, urls: list[str]) -> str:
    directory = os.path.dirname(_local_path(urls[0])) or "."
    if os.path.isdir(directory):
        tars = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.tar")))
        shown = (", ".join(tars[:5]) + (f", ... ({len(tars)} in all)" if len(tars) > 5 else "")) if tars else "no .tar files"
        where = f"directory '{directory}' holds {shown}"
    else:
        where = f"directory '{directory}' does not exist"
    return f"shard pattern '{pattern}' matched no files ({len(urls)} expanded); {where}."


def _count_file(path: str) -> dict[str, int]:
    with open(path) as f:
        return {k: int(v) for k, v in json.load(f).items()}


def shard_sizes(urls: Sequence[str]) -> dict[str, int] | None:
    """Samples per shard from ``sizes.json`` or img2dataset stats files; None if unknown."""
    sizes: dict[str, int] = {}
    tables: dict[str, dict[str, int]] = {}  # one read of each directory's sizes.json, not one per shard
    for url in urls:
        path = _local_path(url)
        directory, name = os.path.split(path)
        sizes_json = os.path.join(directory, "sizes.json")
        if directory not in tables:
            tables[directory] = _count_file(sizes_json) if os.path.isfile(sizes_json) else {}
        table = tables[directory]
        if table:
            if name in table:
                sizes[url] = table[name]
                continue
        stats = os.path.join(directory, name.rsplit(".", 1)[0] + "_stats.json")  # img2dataset layout
        if os.path.isfile(stats):
            with open(stats) as f:
                sizes[url] = int(json.load(f)["successes"])
            continue
        return None
    return sizes


def count_samples(sources: list[list[str]]) -> int:
    """Total samples over all sources; a clear error when a shard has no recorded count."""
    total = 0
    for urls in sources:
        sizes = shard_sizes(urls)
        if sizes is None:
            raise ValueError(
                f"no sample count for shards like '{urls[0]}': no sizes.json entry and no img2dataset "
                "_stats.json beside it. Run `python -m clip_hvt.data.check --paths DIR --write_sizes true` "
                "or set the samples per epoch in the data config (--data.train_num_samples N). "
                "Validation shards need no count: they are read once, to the end.")
        total += sum(sizes.values())
    return total


@dataclass
class ShardSplit:
    """Which part of a finite shard list this process and worker read: explicit, no env guessing."""
    rank: int = 0
    world_size: int = 1

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        mine, every = self.rank * num_workers + worker, self.world_size * num_workers
        for i, shard in enumerate(shards):
            if i % every == mine:
                yield shard


class WeightedResampledShards(torch.utils.data.IterableDataset):
    """Endless shard URLs: pick a source by weight, then a shard of it uniformly.

    Hand-written because webdataset's ``ResampledShards`` has no per-source weights, and mixing at
    shard level keeps one decoding pipeline. The seed mixes base seed, rank, worker, a
    ``stream_offset`` (the global step at (re)start) and the pass number, so ranks and epochs
    differ and a resumed run does not replay the order of the run it resumes.
    """

    def __init__(self, sources: list[list[str]], weights: Sequence[float] | None = None,
                 seed: int = 0, rank: int = 0, stream_offset: int = 0):
        super().__init__()
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"{len(weights)} source weights given for {len(sources)} sources (split by '::')")
        if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"source weights must be non-negative with a positive sum, got {list(weights)}")
        self.sources = sources
        self.weights = list(weights) if weights is not None else [len(s) for s in sources]
        self.seed, self.rank, self.stream_offset = seed, rank, stream_offset
        self._passes = 0  # persistent workers keep this object: each epoch draws a fresh sequence

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(hash((self.seed, self.rank, worker, self.stream_offset, self._passes)))
        self._passes += 1
        indices = range(len(self.sources))
        while True:
            source = rng.choices(indices, weights=self.weights)[0]
            yield dict(url=rng.choice(self.sources[source]), source=source)
