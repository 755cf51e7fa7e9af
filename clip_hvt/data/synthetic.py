"""Embedded default data: procedural shapes with captions, as WebDataset shards. No network.

Each image is one coloured shape on a textured background; its caption names colour and shape among
distractors (size, position, background) in varied wording; everything is a pure function of the seed.
The zero-shot set has one class per (colour, shape) on fresh samples, with other prompt templates.
Layout: ``train/``, ``val/`` (jpg, txt, json), ``zeroshot/`` (jpg, cls; classnames.json, templates.json),
each with sizes.json, and ``manifest.json`` (the parameters, written last). The set is written into a
temporary sibling and renamed into place; only an empty directory or an earlier shapes set is replaced.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from ..cli import UserError, run
from .sample import TAR_MTIME
from .shards import SIZES_FILE, write_sizes

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.44}
POSITIONS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} on the {position}",
    "a {colour} {shape}",
    "{colour} {shape}, {size}, {background} background",
    "there is a {size} {colour} {shape} in the {position} of the picture",
    "a {background} picture with a {colour} {shape}",
    "the {shape} is {colour}",
    "a {colour} {shape} placed at the {position} on a {background} backdrop",
    "one {size} {shape}, coloured {colour}",
    "{shape} in {colour}",
    "picture of a {colour} {shape} near the {position}",
)
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a drawing of a {}.", "a {} shape.")
CLASSNAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class ShapesConfig:
    seed: int = 0
    image_size: int = 72
    train_samples: int = 20000
    val_samples: int = 1000
    zeroshot_per_class: int = 20
    samples_per_shard: int = 2500
    version: int = 3  # bump when rendering or the file layout changes, so caches regenerate


# regular polygons: (corners, first corner's angle, angle step as (multiple of pi) / divisor, inner radius)
_POLYGONS = {"square": (4, math.pi / 4, 1, 2, 1.0), "triangle": (3, -math.pi / 2, 2, 3, 1.0),
             "star": (10, -math.pi / 2, 1, 5, 0.45)}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape in _POLYGONS:
        n, start, turn, divisor, inner = _POLYGONS[shape]
        angles = [angle + start + k * turn * math.pi / divisor for k in range(n)]
        pts = [((1.0 if k % 2 == 0 else inner) * math.cos(a), (1.0 if k % 2 == 0 else inner) * math.sin(a))
               for k, a in enumerate(angles)]
    else:  # cross: a plus sign of arm width 0.35r
        w = 0.35
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in base]
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _background(draw: ImageDraw.ImageDraw, kind: str, size: int, rng: random.Random) -> None:
    base = tuple(rng.randint(150, 235) for _ in range(3))
    draw.rectangle([0, 0, size, size], fill=base)
    ink = tuple(max(0, v - rng.randint(25, 60)) for v in base)
    step = rng.randint(6, 12)
    if kind == "striped":
        for x in range(-size, size, step):
            draw.line([(x, 0), (x + size, size)], fill=ink, width=2)
    elif kind == "dotted":
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=ink)
    elif kind == "checkered":
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)


def render(rng: random.Random, image_size: int, colour: str | None = None, shape: str | None = None):
    """One (PIL image, attributes) sample; colour/shape fixed when given (zero-shot classes)."""
    attrs = dict(
        shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(list(COLOURS)),
        size=rng.choice(list(SIZES)), position=rng.choice(list(POSITIONS)), background=rng.choice(BACKGROUNDS))
    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    _background(draw, attrs["background"], image_size, rng)
    px, py = POSITIONS[attrs["position"]]
    cx = (px + rng.uniform(-0.05, 0.05)) * image_size
    cy = (py + rng.uniform(-0.05, 0.05)) * image_size
    r = SIZES[attrs["size"]] * image_size / 2 * rng.uniform(0.9, 1.1)
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[attrs["colour"]])
    if attrs["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(attrs["shape"], cx, cy, r, rng.uniform(-0.3, 0.3)), fill=fill)
    return img, attrs


def caption(attrs: dict, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(**attrs)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _write_split(out: Path, split: str, samples, per_shard: int) -> None:
    out.mkdir(parents=True)
    sizes = Counter()
    # Raw bytes only (encoder=False: no pickling of any key) and the fixed mtime: same seed, same bytes.
    with wds.ShardWriter(str(out / f"shapes-{split}-%06d.tar"), maxcount=per_shard, verbose=0,
                         encoder=False, mtime=TAR_MTIME) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"{split}{i:08d}", **sample})
            sizes[os.path.basename(sink.fname)] += 1
    write_sizes(out / SIZES_FILE, sizes)


def _pairs(rng: random.Random, n: int, image_size: int):
    for _ in range(n):
        img, attrs = render(rng, image_size)
        yield {"jpg": _jpeg(img), "txt": caption(attrs, rng).encode(), "json": json.dumps(attrs).encode()}


def _zeroshot(rng: random.Random, per_class: int, image_size: int):
    for label, name in enumerate(CLASSNAMES):
        colour, shape = name.split(" ")
        for _ in range(per_class):
            img, _ = render(rng, image_size, colour=colour, shape=shape)
            yield {"jpg": _jpeg(img), "cls": str(label).encode()}


LAYOUT = frozenset({"train", "val", "zeroshot", "manifest.json"})  # all that a set holds at its top level


def _check_replaceable(root: Path) -> None:
    """Raise unless ``root`` is absent, an empty directory or a shapes set (of any version, and nothing
    else): never delete user files."""
    if not root.exists() and not root.is_symlink():
        return
    manifest = _manifest(root)
    # every version's manifest is asdict(ShapesConfig): a dict with an integer version and seed
    ours = isinstance(manifest, dict) and all(isinstance(manifest.get(k), int) for k in ("version", "seed"))
    if root.is_dir() and (not any(root.iterdir()) or (ours and {p.name for p in root.iterdir()} <= LAYOUT)):
        return
    what = "holds files that are not a shapes set" if root.is_dir() else "is not a directory"
    raise FileExistsError(
        f"{root} {what} (a shapes set has only train/, val/, zeroshot/ and its manifest.json); refusing to "
        "replace it so no files are lost. Pick a new or empty directory for the shapes data.")


def generate(root: str | os.PathLike, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """Write the set under ``root`` (into a temp dir, renamed when complete). ``root`` must be absent, empty
    or hold a shapes set (which is replaced); anything else raises FileExistsError and is left untouched."""
    given = Path(root)
    # Absolute, so the temp sibling lands next to it; through a link, replace the linked directory.
    root = Path(os.path.realpath(given) if given.is_symlink() else os.path.abspath(given))
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # A name no other writer has: Lightning prepares data on local rank 0 of every node, and nodes sharing a cache
    # (containers: the same process ids) would otherwise write into, and remove, one another's temp dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        # Separate streams per split: changing one split's size never changes another's samples.
        for split, samples in (("train", _pairs(random.Random(f"{cfg.seed}-train"), cfg.train_samples, cfg.image_size)),
                               ("val", _pairs(random.Random(f"{cfg.seed}-val"), cfg.val_samples, cfg.image_size)),
                               ("zeroshot", _zeroshot(random.Random(f"{cfg.seed}-zs"), cfg.zeroshot_per_class,
                                                      cfg.image_size))):
            _write_split(tmp / split, split, samples, cfg.samples_per_shard)
        (tmp / "zeroshot" / "classnames.json").write_text(json.dumps(list(CLASSNAMES), indent=1))
        (tmp / "zeroshot" / "templates.json").write_text(json.dumps(list(ZEROSHOT_TEMPLATES), indent=1))
        (tmp / "manifest.json").write_text(json.dumps(asdict(cfg), indent=1))
        if is_complete(root, cfg):  # another process (node) finished the same set meanwhile: it may be read already
            return given
        _check_replaceable(root)  # again: something may have been written there meanwhile
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))  # the previous set, removed once replaced
        if root.exists():
            root.rename(old)
        try:
            tmp.rename(root)
        except OSError:
            if not is_complete(root, cfg):  # else another process just put the same set there
                if old.exists() and not root.exists():
                    old.rename(root)  # put the previous set back
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left on failure: a successful run renamed it away
    return given


def is_complete(root: str | os.PathLike, cfg: ShapesConfig) -> bool:
    return _manifest(Path(root)) == asdict(cfg)


def _manifest(root: Path):
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):  # missing or unreadable
        return None


def ensure(root: str | os.PathLike, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """Generate the set under ``root`` unless a complete one with the same parameters is there (see ``generate``)."""
    if not is_complete(root, cfg):
        log.info("generating the embedded shapes data set into %s (one time)", root)
        generate(root, cfg)
    return Path(root)


def default_root(cfg: ShapesConfig) -> Path:
    """Cache directory for ``cfg``: distinct for every distinct config, so two never replace each other."""
    cache = Path(os.environ.get("CLIP_HVT_CACHE", Path.home() / ".cache" / "clip_hvt"))
    # Readable prefix, plus a stable hash of all fields (hashlib, not hash(): same across processes).
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"shapes-v{cfg.version}-seed{cfg.seed}-{cfg.image_size}px-{cfg.train_samples}-{digest}"


def make_shapes(out: str, seed: int = 0, image_size: int = 72, train_samples: int = 20000, val_samples: int = 1000,
                zeroshot_per_class: int = 20) -> None:
    """Write the embedded shapes data set (train/val image-caption shards, a zero-shot set) to ``out``: new,
    empty, or a shapes set written here before (replaced when the parameters differ); other files are kept.

    Args:
        out: output directory.
        seed: the seed every image and caption derives from.
        image_size: rendered image side in pixels.
        train_samples: image-caption pairs in train/.
        val_samples: image-caption pairs in val/.
        zeroshot_per_class: images per class in zeroshot/.
    """
    cfg = ShapesConfig(seed=seed, image_size=image_size, train_samples=train_samples, val_samples=val_samples,
                       zeroshot_per_class=zeroshot_per_class)
    try:
        root = ensure(out, cfg)
    except FileExistsError as err:
        raise UserError(str(err)) from None
    print(f"shapes data in {root}: train {train_samples}, val {val_samples}, zero-shot {zeroshot_per_class} x "
          f"{len(CLASSNAMES)} classes. Use it with --data.shapes.root {root}")


def main(args: list[str] | None = None) -> None:
    run(make_shapes, args, prog="python -m clip_hvt.data.synthetic")


if __name__ == "__main__":
    main()
