"""Decode raw WebDataset samples into (image, caption), skipping and counting what is broken.

Only images (Pillow), UTF-8 text and JSON are ever decoded: a member with a pickle-like extension
makes the sample a counted skip, never a ``pickle.load``. Counts travel with every batch (see
``collate``) so the training process can log them and stop a run whose data is broken.
"""
from __future__ import annotations

import io
import json
import logging
import random
import warnings
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

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

    def __init__(self, log_first: int = 5):
        self.total = dict.fromkeys(SKIP_REASONS, 0)
        self._pending = dict.fromkeys(SKIP_REASONS, 0)
        self.log_first = log_first

    def add(self, reason: str, where: str) -> None:
        self.total[reason] += 1
        self._pending[reason] += 1
        n = self.total[reason]
        if n <= self.log_first or n % 1000 == 0:
            log.warning("skipped sample %s: %s (%d so far for this reason in this worker)", where, reason, n)

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler for shard-level errors: count, log, carry on with the next shard."""
        self.add("corrupt_shard", f"({type(exn).__name__}: {exn})")
        return True

    def take(self) -> torch.Tensor:
        counts = torch.tensor([self._pending[r] for r in SKIP_REASONS], dtype=torch.long)
        self._pending = dict.fromkeys(SKIP_REASONS, 0)
        return counts


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


def _image(sample: dict, max_pixels: int, draft_size: int | None) -> Image.Image:
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
            return img.convert("RGB")
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
        self.rng = random.Random(seed)
        self.source_of = source_of or {}

    def decode(self, sample: dict) -> tuple[torch.Tensor, str]:
        if any(k in sample for k in PICKLE_KEYS):
            raise SkipSample("pickle_member")
        key = self.caption_keys[self.source_of.get(sample.get("__url__"), 0) if len(self.caption_keys) > 1 else 0]
        caption = _caption(sample, key, self.rng)
        image = _image(sample, self.max_image_pixels, self.draft_size)
        return self.transform(image), caption

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, str]]:
        for sample in samples:
            try:
                yield self.decode(sample)
            except SkipSample as skip:
                self.counter.add(skip.reason, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")


def collate(samples: list[tuple[torch.Tensor, str]], tokenizer: Callable, counter: SkipCounter) -> dict:
    """Stack images, tokenize the batch's captions at once, attach skips counted since the last batch."""
    images, captions = zip(*samples)
    return {"image": torch.stack(images), "text": tokenizer(list(captions)), "skipped": counter.take()}
