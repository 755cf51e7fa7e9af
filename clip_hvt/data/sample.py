"""What a sample is, and why one is skipped: the one set of rules every reader of shards imports
(training, evaluation, the checker, the converters), so they agree by construction.

Members are ``dir/key.ext`` (webdataset's ``base_plus_ext``, extensions lower-case); ``__``-prefixed
file names (``__meta__.json``) are metadata and ignored; consecutive members with one key form a
sample. The image is the first of ``IMAGE_KEYS``, decoded by Pillow under ``MAX_IMAGE_PIXELS``;
nothing is unpickled (``PICKLE_SUFFIXES`` drop the sample); captions are ``txt`` or ``json.<field>``,
labels the integer text of ``cls``. Every skip has a ``SKIP_REASONS`` name.

The tar reader is hand-written over ``tarfile`` because webdataset's hands on the partial sample of a
shard that breaks mid-stream and calls its handler once per failed read, so counts would not be exact.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from collections import Counter, defaultdict
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .shards import open_url

log = logging.getLogger(__name__)

SKIP_REASONS = {  # new reasons go at the end: checkpoints of SkipMonitor store counts in this order
    "corrupt_shard": "the shard could not be read to its end: missing, truncated, not a tar, failed open",
    "no_image": "the sample has no jpg/jpeg/png/webp member (or, converting, no readable image file)",
    "undecodable_image": "Pillow cannot decode the image bytes (truncated, not an image)",
    "image_too_large": "the image has more pixels than the pixel limit (decompression-bomb guard)",
    "no_caption": "the caption member or its JSON field is missing or not a string/list",
    "empty_caption": "the caption is empty or whitespace",
    "caption_not_utf8": "the caption is not UTF-8",
    "pickle_member": "a member with a pickle-like suffix: never unpickled, the sample is dropped",
    "no_label": "a classification sample whose cls is missing, not an integer or not a class index",
    "duplicate_member": "two members with one key and extension in a row: which one is meant is unknown",
    "no_teacher_target": "distilling from stored targets, the sample lacks teacher_image.npy/teacher_text.npy "
                         "or they do not fit its captions (python -m clip_hvt.data.teacher_features writes them)",
    "npy_needs_pickle": "an .npy member holds Python objects (loading it needs pickle): refused, never unpickled",
}
MAX_IMAGE_PIXELS = 64_000_000  # images with more pixels are skipped; 8k x 8k, far above any training size
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PICKLE_SUFFIXES = ("pyd", "pickle", "pkl", "pth", "pt")
MAX_EXAMPLES = 5  # examples kept per skip reason
# the data commands' word for a worker process that died mid-task (a process pool then cannot finish)
WORKER_DIED = ("a worker process died before finishing its task (killed: out of memory? large images are decoded at "
               "full size); run again with fewer {option}")
TARGET_MEMBERS = ("teacher_image.npy", "teacher_text.npy")  # stored teacher targets: image [D], captions [n, D]
# The mtime every writer stamps on members: fixed, so the same input gives the same bytes, and an integer,
# so each member keeps a plain 512-byte ustar header (a float, webdataset's default, adds a 1 KiB pax header
# per member: a third of a shard of small images, and half of the reader's tar parsing).
TAR_MTIME = 1_700_000_000


class SkipSample(Exception):
    """A sample (or shard) that is skipped; ``reason`` is a key of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class SkipCounter:
    """Skip counts by reason with their first few examples: the loader's workers log as they count and
    hand over new counts per batch (``take``); the converter merges its workers' ``to_dict()`` in task order."""

    def __init__(self, log_first: int | None = 5):  # None: never log
        self.total, self.examples, self._pending = Counter(), defaultdict(list), Counter()
        self.log_first = log_first

    def add(self, reason: str, where: str, count: int = 1) -> None:
        self.merge({reason: {"count": count, "examples": [where]}})
        n = self.total[reason]
        if self.log_first is not None and (n <= self.log_first or n % 1000 == 0):
            log.warning("skipped %s: %s (%d so far for this reason in this worker)", where, reason, n)

    def merge(self, other: dict) -> None:
        for reason, entry in other.items():
            self.total[reason] += entry["count"]
            self._pending[reason] += entry["count"]
            self.examples[reason] = (self.examples[reason] + entry["examples"])[:MAX_EXAMPLES]

    def to_dict(self) -> dict:
        return {r: {"count": self.total[r], "examples": self.examples[r]} for r in sorted(self.total)}

    def take(self) -> torch.Tensor:
        """The counts since the last call, one per ``SKIP_REASONS`` key."""
        counts = torch.tensor([self._pending[r] for r in SKIP_REASONS], dtype=torch.long)
        self._pending.clear()
        return counts


# member rules and the tar reader

def read_tar(url: str, **extra) -> Iterator[dict]:
    """Complete samples ``{"__key__", "__url__", **extra, ext: bytes}`` of one shard, in order; raises
    ``SkipSample("corrupt_shard")`` where the shard breaks, after the samples before it (the rest is lost,
    uncounted). A sample with a repeated extension is marked (``__duplicate__``) so that decoding skips it."""
    sample = None
    try:  # open_url: a missing file or a failed remote command is this shard's read error
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # stream mode would otherwise keep every header of the shard
                key, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
                if key is None or key.rsplit("/", 1)[-1].startswith("__"):  # no extension, or metadata
                    continue
                ext = ext.lower()
                if sample is not None and key != sample["__key__"]:
                    yield sample
                    sample = None
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
                sample = sample or {"__key__": key, "__url__": url, **extra}
                if ext in sample:
                    sample["__duplicate__"] = info.name
                sample[ext] = data
            # tarfile ends quietly on a cut header; a complete tar ends with a zero block
            if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
                raise EOFError(f"no end-of-archive block after {tar.offset} bytes")
    except Exception as exn:  # tarfile.ReadError, EOFError, zlib/OS errors: the shard is broken here
        raise SkipSample("corrupt_shard", f"{url} ({type(exn).__name__}: {exn})") from None
    if sample is not None:
        yield sample


# decoding: image, captions, label

def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0) -> tuple[Image.Image, tuple]:
    """Image bytes fully decoded by Pillow (the file's mode), and the size stored in the file; with
    ``min_side``, a JPEG may decode at a DCT scale keeping its shorter side >= ``min_side`` (far faster)."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own default limit; ours is the one compared explicitly below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        size = img.size
        if size[0] * size[1] > max_pixels:
            raise SkipSample("image_too_large", f"{size[0]}x{size[1]} > {max_pixels} pixels")
        scale = min_side / min(size) if min_side else 1.0
        if scale < 1:
            img.draft("RGB", (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))
        img.load()  # decode errors surface here, not later in a transform
        return img, size
    except SkipSample:
        raise
    except Image.DecompressionBombError as exn:  # PIL's hard limit, twice its default
        raise SkipSample("image_too_large", str(exn)) from None
    except Exception as exn:  # PIL raises many types for broken bytes (OSError, SyntaxError, ValueError...)
        raise SkipSample("undecodable_image", f"{type(exn).__name__}: {exn}") from None


def captions(sample: dict, key: str = "txt") -> list[str]:
    """Every non-empty caption of the sample: ``txt``, or ``json.<field>`` (a string or a list)."""
    field = None
    if key.startswith("json."):
        key, field = "json", key[len("json."):]
    raw = sample.get(key)
    if raw is None:
        raise SkipSample("no_caption", f"no {key} member")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample("caption_not_utf8") from None
    values = [text]
    if field is not None:
        try:
            value = json.loads(text).get(field)
        except (ValueError, AttributeError):
            raise SkipSample("no_caption", f"no JSON object with '{field}'") from None
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise SkipSample("no_caption", f"json '{field}' is not a string or a list of strings")
    return nonempty(values)


def nonempty(values) -> list[str]:
    """The captions stripped, empty ones dropped; ``empty_caption`` when none is left."""
    kept = [v.strip() for v in values if v.strip()]
    if not kept:
        raise SkipSample("empty_caption")
    return kept


def npy(sample: dict, ext: str) -> np.ndarray:
    """A numeric, non-empty array from a plain ``.npy`` member, read without pickle: ``npy_needs_pickle``
    when its header declares Python objects, ``no_teacher_target`` when it is missing or anything else
    (empty, an ``.npz`` or other zip, a pickle, truncated, strings)."""
    if ext not in sample:
        raise SkipSample("no_teacher_target", f"no {ext} member")
    data = sample[ext]
    stream = io.BytesIO(data)
    try:  # the header first: np.load would open a zip as NpzFile and blame any non-.npy bytes on allow_pickle
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
        count = np.prod(shape, dtype=object)  # a Python int: a forged shape cannot overflow it
        if dtype.hasobject:
            raise SkipSample("npy_needs_pickle", ext)
        if dtype.kind not in "iuf" or count == 0:
            raise SkipSample("no_teacher_target", f"{ext}: {dtype} array of shape {shape}, not non-empty numbers")
        held = len(data) - stream.tell()  # checked before reading: the header's shape sizes the allocation
        if held != count * dtype.itemsize:
            raise SkipSample("no_teacher_target", f"{ext}: {held} bytes of data for a {dtype} array of shape {shape}")
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except ValueError as exn:  # not an .npy (no magic string), a bad header, an unknown format version
        raise SkipSample("no_teacher_target", f"{ext}: {exn}") from None


def label(sample: dict, num_classes: int | None = None) -> int:
    """The integer class of ``cls``; ``no_label`` when missing, not an integer or out of range."""
    try:
        value = int(sample["cls"].decode("ascii"))
    except (KeyError, AttributeError, UnicodeDecodeError, ValueError):
        raise SkipSample("no_label") from None
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise SkipSample("no_label", f"class {value} of {num_classes}")
    return value


def decode_sample(sample: dict, target, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0):
    """(RGB image, ``target(sample)``), or ``SkipSample`` with the one reason every reader counts; checked
    in this order: members (pickle-like, duplicate), the target (caption or label), the image (the first
    of ``IMAGE_KEYS``, see ``open_image``)."""
    pickled = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in PICKLE_SUFFIXES]
    if pickled:
        raise SkipSample("pickle_member", ", ".join(pickled))
    if "__duplicate__" in sample:
        raise SkipSample("duplicate_member", sample["__duplicate__"])
    value = target(sample)
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise SkipSample("no_image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    img, _ = open_image(sample[key], max_pixels, min_side)
    return (img if img.mode == "RGB" else img.convert("RGB")), value
