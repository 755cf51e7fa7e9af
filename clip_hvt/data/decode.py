"""Read WebDataset shards into raw samples and decode them into (image, caption), skipping and
counting what is broken.

A shard that cannot be read to its end (truncated, no end-of-archive block, not a tar, unreadable)
counts one ``corrupt_shard``. Its samples up to the last complete member header before the break go
on, except the sample that header belongs to (it may be incomplete); that one and the rest of the
shard are lost, uncounted (their number is unknown). Only images (Pillow), UTF-8 text and JSON
are ever decoded: a member with a pickle-like extension makes the sample a counted skip, never a
``pickle.load``. Counts travel with every batch (see ``collate``) so the training process can log
them and stop a run whose data is broken.
"""
from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import warnings
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .shards import open_url

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "corrupt_shard",      # tar stream unreadable (truncated, not a tar): counted per read error
    "no_image",
    "undecodable_image",  # truncated JPEG, bytes that are not an image
    "image_too_large",    # over max_image_pixels (decompression bomb guard)
    "no_caption",
    "empty_caption",
    "caption_not_utf8",
    "pickle_member",      # .pyd/.pickle/...: never unpickled, the sample is dropped
)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PICKLE_KEYS = ("pyd", "pickle", "pkl", "pth", "pt")


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipCounter:
    """Per-worker skip counts; ``take()`` hands over what was counted since the last call."""

    def __init__(self, log_first: int = 5, reasons: tuple[str, ...] = SKIP_REASONS):
        self.reasons = reasons
        self.total = dict.fromkeys(reasons, 0)
        self._pending = dict.fromkeys(reasons, 0)
        self.log_first = log_first

    def add(self, reason: str, where: str) -> None:
        self.total[reason] += 1
        self._pending[reason] += 1
        n = self.total[reason]
        if n <= self.log_first or n % 1000 == 0:
            log.warning("skipped sample %s: %s (%d so far for this reason in this worker)", where, reason, n)

    def take(self) -> torch.Tensor:
        counts = torch.tensor([self._pending[r] for r in self.reasons], dtype=torch.long)
        self._pending = dict.fromkeys(self.reasons, 0)
        return counts


class TarSamples:
    """Pipeline stage: shard dicts (``url``) -> raw samples ``{"__key__", "__url__", ext: bytes}``.

    Hand-written over ``tarfile`` because webdataset's reader hands on the partial sample of a shard
    that breaks mid-stream and calls its handler once per failed read, so counts would not be exact.
    A sample goes on once the next header shows a new key, or the archive ends cleanly.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        for shard in shards:
            yield from self._samples(shard["url"])

    def _samples(self, url: str) -> Iterator[dict]:
        sample = None
        try:  # open_url: a failed remote command (or missing file) is this shard's read error
            with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    tar.members = []  # stream mode would otherwise keep every header of the shard
                    key, ext = base_plus_ext(info.name)
                    if not info.isreg() or key is None or key.rsplit("/", 1)[-1].startswith("__"):
                        continue
                    if sample is not None and key != sample["__key__"]:
                        yield sample
                        sample = None
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
                    sample = sample or {"__key__": key, "__url__": url}
                    sample[ext.lower()] = data
                # tarfile ends quietly on a cut header; a complete tar ends with a zero block
                if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
                    raise EOFError(f"no end-of-archive block after {tar.offset} bytes")
        except Exception as exn:  # tarfile.ReadError, EOFError, zlib/OS errors: the shard is broken here
            self.counter.add("corrupt_shard", f"{url} ({type(exn).__name__}: {exn})")
            return
        if sample is not None:
            yield sample


def _caption(sample: dict, key: str, rng: random.Random) -> str:
    """``txt`` or ``json.<field>``; a list (e.g. all COCO captions) gives one at random."""
    field = None
    if "." in key:
        key, field = key.split(".", 1)
    raw = sample.get(key)
    if raw is None:
        raise SkipSample("no_caption")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise SkipSample("caption_not_utf8") from None
    if field is not None:
        try:
            value = json.loads(text).get(field)
        except (ValueError, AttributeError):
            raise SkipSample("no_caption") from None
        if isinstance(value, list):
            value = rng.choice(value) if value else None
        if value is None:
            raise SkipSample("no_caption")
        text = str(value)
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption")
    return text


def decode_image(sample: dict, max_pixels: int, draft_size: int | None) -> Image.Image:
    """The sample's image as RGB; ``SkipSample`` when it is missing, too large or undecodable."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise SkipSample("no_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(sample[key]))
            if img.width * img.height > max_pixels:
                raise SkipSample("image_too_large")
            if draft_size and img.format == "JPEG":
                # DCT-domain downscale: decode straight to >= draft_size instead of full size.
                img.draft("RGB", (draft_size, draft_size))
            img.load()  # decode errors surface here, inside the try, not later in the transform
            return img if img.mode == "RGB" else img.convert("RGB")
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipSample("image_too_large") from None
    except Exception:  # PIL raises many types for broken bytes (OSError, SyntaxError, ValueError...)
        raise SkipSample("undecodable_image") from None


class RobustDecoder:
    """Pipeline stage: raw samples -> (image tensor, caption), broken ones counted in ``counter``."""

    def __init__(self, transform: Callable, counter: SkipCounter,
                 caption_keys: str | Sequence[str] = "txt", max_image_pixels: int = 64_000_000,
                 draft_size: int | None = None, seed: int = 0, source_of: dict[str, int] | None = None):
        self.transform = transform
        self.counter = counter
        self.caption_keys = [caption_keys] if isinstance(caption_keys, str) else list(caption_keys)
        self.max_image_pixels = max_image_pixels
        self.draft_size = draft_size
        self.seed = seed
        self.rng = random.Random(seed)
        self.source_of = source_of or {}

    def decode(self, sample: dict) -> tuple[torch.Tensor, str]:
        if any(k.rsplit(".", 1)[-1] in PICKLE_KEYS for k in sample):
            raise SkipSample("pickle_member")
        key = self.caption_keys[self.source_of.get(sample.get("__url__"), 0) if len(self.caption_keys) > 1 else 0]
        caption = _caption(sample, key, self.rng)
        image = decode_image(sample, self.max_image_pixels, self.draft_size)
        return self.transform(image), caption

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        # forked workers hold copies of one rng: reseed per worker so their caption choices differ
        self.rng = random.Random(hash((self.seed, info.id if info else 0)))
        for sample in samples:
            try:
                yield self.decode(sample)
            except SkipSample as skip:
                self.counter.add(skip.reason, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")


def collate(samples: list[tuple[torch.Tensor, str]], tokenizer: Callable, counter: SkipCounter) -> dict:
    """Stack images, tokenize the batch's captions at once, attach skips counted since the last batch.

    webdataset's ``batched`` calls this when the first sample of the next batch arrives (or the
    stream ends), so a batch carries every skip met before that sample: summed over batches, the
    counts are exact.
    """
    images, captions = zip(*samples)
    return {"image": torch.stack(images), "text": tokenizer(list(captions)), "skipped": counter.take()}
