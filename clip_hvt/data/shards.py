"""Shard lists: expand webdataset specs (braces, ``::`` between sources) and check them at start, open
shards with webdataset's ``gopen`` (local, ``http(s)://``, ``gs://``, ``hf://``, ``pipe:COMMAND`` ...),
count samples from ``sizes.json`` beside the shards (open_clip's convention) or img2dataset's
``NNNNN_stats.json`` files (beside remote shards fetched once, through ``gopen``).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterator, Sequence
from urllib.parse import urlparse

import braceexpand
import torch.utils.data
import webdataset as wds
from webdataset.gopen import Pipe, gopen_schemes, set_options

from ..atomic import atomic_write
from ..cli import UserError

log = logging.getLogger(__name__)

# The external program each gopen scheme runs (webdataset.gopen): checked at start, so a missing
# tool is one clear error instead of every shard failing as corrupt.
_SCHEME_TOOLS = {"http": "curl", "https": "curl", "sftp": "curl", "ftps": "curl", "scp": "curl",
                 "htgs": "curl", "hf": "curl", "gs": "gsutil", "ais": "ais"}
SIZES_FILE = "sizes.json"  # open_clip's: shard file name -> samples
NO_FILE = "no such file"  # why a local count file gave nothing, when it is simply absent
_EXIT_WAIT_S = 60.0  # a command that has written all of a shard must exit within this


def scheme(url: str) -> str:
    """gopen's dispatch key: ``""`` or ``"file"`` for a local path, else the URL scheme."""
    return urlparse(url).scheme


def is_local(url: str) -> bool:
    return scheme(url) in ("", "file")


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def check_scheme(pattern: str, url: str) -> None:
    """Refuse at start what ``gopen`` cannot open, with the command that does. ``s3://`` is refused, not
    rewritten: the tool (aws, s5cmd), profile and ``--endpoint-url`` (R2, MinIO) are the user's choice."""
    kind = scheme(url)
    if kind in ("", "file") or kind in gopen_schemes:
        tool = _SCHEME_TOOLS.get(kind)
        if tool and shutil.which(tool) is None:
            raise UserError(f"shards like '{url}' are read with `{tool}`, which is not installed "
                            f"(or not on PATH); install it or give the shards as 'pipe:COMMAND'")
        return
    if kind == "s3":
        raise UserError(
            f"webdataset cannot open s3:// URLs ('{pattern.strip()}'): stream each shard through a command, "
            f"e.g. 'pipe:aws s3 cp {pattern.strip()} -' (S3-compatible stores: add --endpoint-url URL; "
            "or 'pipe:s5cmd cat s3://...')")
    known = ", ".join(f"{k}://" if k != "pipe" else "pipe:" for k in sorted(gopen_schemes) if k != "__default__")
    raise UserError(f"no reader for '{kind}:' in shard '{url}': give a local path, one of {known}, "
                    "or 'pipe:COMMAND' writing the shard to stdout")


def expand_sources(spec: str | Sequence[str]) -> list[list[str]]:
    """Split a spec on ``::`` into sources and brace-expand each. Local shards must exist (a typo stops
    the run at once, naming what the directory holds); remote ones are not probed, only their scheme."""
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    sources = []
    for part in parts:
        urls = list(braceexpand.braceexpand(os.path.expandvars(part.strip())))
        for kind_url in {scheme(u): u for u in urls}.values():
            check_scheme(part, kind_url)
        urls = [match for url in urls for match in _glob(url)]
        missing = [u for u in urls if is_local(u) and not os.path.isfile(_local_path(u))]
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


class ShardReadError(OSError):
    """The command streaming a shard failed; the message names the command and its exit status."""


@contextlib.contextmanager
def open_url(url: str) -> Iterator[BinaryIO]:
    """Open a shard (or a file beside it) with webdataset's ``gopen``, adding what its ``Pipe`` lacks: a
    failed command raises one ``ShardReadError`` naming it and its exit status (gopen raises only if a
    read sees the exit, else at close or in ``__del__``); a reader that stops early ends the command."""
    stream = wds.gopen(url)
    if not isinstance(stream, Pipe):
        with stream:
            yield stream
        return
    set_options(stream, ignore_errors=True)  # the exit status is judged here, once
    proc, argv = stream.proc, stream.args[0][0]
    # pipe: the user's own command; gopen's curl/gsutil lines may hold a token (hf://): name the program
    command = argv if isinstance(argv, str) else f"{argv[0]} {url}"
    error = None
    try:
        yield stream
        # read what follows the archive (a tar's record padding); more than 1 MiB is not ours to judge
        if len(stream.stream.read(1 << 20)) == 1 << 20:
            _stop(stream)
            return
    except GeneratorExit:  # the reader was closed mid-shard (epoch end): not the command's failure
        _stop(stream)
        raise
    except Exception as exn:
        error = exn
    try:  # a stream that broke because its command failed has ended with it: wait briefly then
        status = proc.wait(timeout=1.0 if error else _EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        _stop(stream)
        if error:
            raise error from None  # the command is fine, the bytes it sends are not
        raise ShardReadError(f"command `{command}` still running {_EXIT_WAIT_S:.0f} s after its output ended") from None
    finally:
        stream.stream.close()
    if status not in stream.ignore_status:
        raise ShardReadError(f"command `{command}` exited with status {status}") from error
    if error:
        raise error


def _stop(stream: Pipe) -> None:
    """End a pipe we no longer read: close our end (the writer gets SIGPIPE), then terminate it."""
    stream.stream.close()
    stream.proc.terminate()
    try:
        stream.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        stream.proc.kill()
        stream.proc.wait()


# ``pipe:`` commands: the shard is the last word ending in .tar; a file beside it replaces its name.
_PIPE_SHARD = re.compile(r"[^/\s]+\.(?:tar|tar\.gz|tgz)(?=\s|$)")


def _shard_name(url: str) -> re.Match | None:
    """Where the shard's file name sits in ``url`` (for ``pipe:``, in the command)."""
    pattern = _PIPE_SHARD if scheme(url) == "pipe" else re.compile(r"[^/\\]+$")
    found = list(pattern.finditer(url if scheme(url) == "pipe" else url.split("?", 1)[0]))
    return found[-1] if found else None


def beside(url: str, name: str) -> str | None:
    """The URL of file ``name`` in the shard's directory (same scheme or command); None if unknown."""
    shard = _shard_name(url)
    return url[:shard.start()] + name + url[shard.end():] if shard else None


def write_sizes(path: str | os.PathLike, sizes: dict[str, int]) -> None:
    """``sizes.json`` (shard file name -> samples, open_clip's format), sorted by name, replaced whole."""
    with atomic_write(path, "w") as f:
        json.dump(dict(sorted(sizes.items())), f, indent=1)


def _json_object(data: bytes) -> tuple[dict | None, str]:
    """Parsed JSON object, or (None, what is wrong with the text)."""
    try:
        table = json.loads(data)
    except json.JSONDecodeError as exn:
        return None, f"not valid JSON (line {exn.lineno} col {exn.colno}: {exn.msg})"
    except ValueError as exn:  # bytes that are not UTF-8
        return None, f"not valid JSON ({exn})"
    return (table, "") if isinstance(table, dict) else (None, f"not a JSON object but a {type(table).__name__}")


@functools.lru_cache(maxsize=None)  # fetched once per process, however often counts are asked for
def _fetch_json(url: str) -> tuple[dict | None, str]:
    """A remote JSON object, or (None, why not)."""
    try:
        with open_url(url) as f:
            data = f.read()
    except Exception as exn:  # 404 (curl exit 22), no network: no count from this file
        return None, f"{type(exn).__name__}: {exn}"
    return _json_object(data)


def _read_json(url: str) -> tuple[dict | None, str]:
    """A JSON object file beside shards, or (None, why not): missing, unreadable, malformed."""
    if not is_local(url):
        return _fetch_json(url)
    path = _local_path(url)
    if not os.path.isfile(path):
        return None, NO_FILE
    try:
        with open(path, "rb") as f:
            return _json_object(f.read())
    except OSError as exn:
        return None, f"unreadable ({exn.strerror or exn})"


def _count(value) -> int | None:
    """A recorded sample count (an int, or its digits as written by some tools); None if it is none."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _shown(value) -> str:
    """A JSON value as written, cut short: for messages."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stats_count(url: str) -> tuple[int | None, str]:
    """img2dataset's ``NNNNN_stats.json`` beside shard ``NNNNN.tar``: its ``successes``."""
    stats_url = beside(url, _shard_name(url)[0].rsplit(".", 1)[0] + "_stats.json")  # shard_sizes checked the name
    table, why = _read_json(stats_url)
    if table is None:
        return None, f"{stats_url}: {why}"
    count = _count(table.get("successes"))
    if count is None:
        return None, f"{stats_url}: " + (f"'successes' is {_shown(table['successes'])}, not a sample count"
                                         if "successes" in table else "no 'successes' in it")
    return count, ""


def shard_sizes(urls: Sequence[str], missing_ok: bool = False) -> tuple[dict[str, int] | None, str]:
    """Samples per shard from ``sizes.json`` or img2dataset stats files; (None, what was tried) if unknown.
    A malformed file gives no count (named in the reason, or logged when stats files give the counts).
    ``missing_ok``: every shard is looked up and those without a count are left out (``clip_hvt.data.check``)."""
    sizes: dict[str, int] = {}
    unlisted: dict[str, str] = {}  # shard -> why sizes.json gives no count for it
    tables: dict[str, tuple[dict | None, str]] = {}  # one read of each directory's sizes.json, not one per shard
    for url in urls:
        sizes_url = beside(url, SIZES_FILE)
        if sizes_url is None:
            return None, "no word ending in .tar in the command, so no file beside it can be named"
        if sizes_url not in tables:
            tables[sizes_url] = _read_json(sizes_url)
            why = tables[sizes_url][1]
            if why and not is_local(url):
                log.info("no counts from %s (%s): trying img2dataset _stats.json files", sizes_url, why)
            elif why and why != NO_FILE:  # a file there but broken: not passed over in silence
                log.warning("no counts from %s (%s): trying img2dataset _stats.json files", sizes_url, why)
        table, why = tables[sizes_url]
        name = _shard_name(url)[0]
        count = _count(table.get(name)) if table else None
        if count is not None:
            sizes[url] = count
        elif table is None:
            unlisted[url] = "not in sizes.json" if why == NO_FILE else f"no count in {sizes_url} ({why})"
        else:
            unlisted[url] = ("not in sizes.json" if name not in table
                             else f"no count in {sizes_url} ('{name}' is {_shown(table[name])})")
    if not unlisted:
        return sizes, ""
    if missing_ok:
        with ThreadPoolExecutor(1 if is_local(next(iter(unlisted))) else 32) as pool:
            counts = dict(zip(unlisted, pool.map(_stats_count, unlisted)))
        return {**sizes, **{url: count for url, (count, _) in counts.items() if count is not None}}, ""
    first_url, first_why = next(iter(unlisted.items()))
    first, why = _stats_count(first_url)  # a missing count stops here, before fetching the rest
    if first is None:
        return None, f"{first_why} and no img2dataset stats ({why})"
    with ThreadPoolExecutor(1 if is_local(first_url) else 32) as pool:  # remote: one request per shard, in parallel
        counts = list(pool.map(_stats_count, list(unlisted)[1:]))
    for (url, listed_why), (count, why) in zip(unlisted.items(), [(first, "")] + counts):
        if count is None:
            return None, f"'{url}': {listed_why} and no img2dataset stats ({why})"
        sizes[url] = count
    return sizes, ""


def count_samples(sources: list[list[str]]) -> int:
    """Total samples over all sources; a clear error when a shard has no recorded count."""
    total = 0
    for urls in sources:
        sizes, why = shard_sizes(urls)
        if sizes is None:
            raise UserError(
                f"no sample count for shards like '{urls[0]}': {why}. "
                "Run `python -m clip_hvt.data.check --paths DIR --write_sizes true` (remote shards: on a copy, "
                "then upload its sizes.json beside them) or set the samples per epoch in the data config "
                "(--data.train_num_samples N). Validation shards need no count: they are read once, to the end.")
        total += sum(sizes.values())
    return total


class WeightedResampledShards(torch.utils.data.IterableDataset):
    """Endless shard URLs: a source picked by weight, then one of its shards uniformly (webdataset's
    ``ResampledShards`` has no per-source weights). The seed mixes base seed, rank, worker, a
    ``stream_offset`` (the global step at (re)start) and the pass number: ranks and epochs differ and a
    resumed run does not replay the order of the run it resumes."""

    def __init__(self, sources: list[list[str]], weights: Sequence[float] | None = None,
                 seed: int = 0, rank: int = 0, stream_offset: int = 0):
        super().__init__()
        if weights is not None and len(weights) != len(sources):
            raise UserError(f"{len(weights)} source weights given for {len(sources)} sources (split by '::')")
        if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
            raise UserError(f"source weights must be non-negative with a positive sum, got {list(weights)}")
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
