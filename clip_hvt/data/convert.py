"""Convert image-caption sources (tables, folders, COCO captions) into WebDataset shards.

Data path: a source reader (`read_table`, `read_folder`, `read_coco`) lists `SourceSample`s
without touching images; `write_shards` splits them into train/val by a hash of each sample's
image identity, cuts each split into chunks of `maxcount` samples and lets worker processes
decode, resize, re-encode and write one chunk each with webdataset's `ShardWriter`. Chunks
depend only on the order of the samples, so shard names and contents do not depend on
`--workers`.

Memory stays bounded whatever the size of the source: `read_table` streams the table in chunks
of `TABLE_CHUNK_ROWS` rows, and `write_shards` cuts chunks while it reads the samples and hands
at most two per worker ahead to the pool. The folder and COCO readers list their samples in
memory (a sorted directory walk, a JSON document), which they need anyway.

Output layout (`OUTPUT` is the directory given on the command line):
    val_fraction == 0:  OUTPUT/shard-000000.tar ... OUTPUT/sizes.json
    val_fraction > 0:   OUTPUT/train/train-000000.tar ... OUTPUT/train/sizes.json
                        OUTPUT/val/val-000000.tar ...     OUTPUT/val/sizes.json
    always:             OUTPUT/stats.json (written, skipped, skip reasons with examples)

Each sample holds `jpg` (RGB JPEG), `txt` (UTF-8 caption) and `json` (dict: source, width,
height, original_width, original_height, and per source: row / image_id / captions). Sources
with several captions per image (COCO) keep all of them in `json["captions"]`; `txt` is the
first, so a reader may pick one caption per epoch at load time.
"""
import hashlib
import io
import itertools
import json
import multiprocessing
import operator
import os
import shutil
import sys
from collections import defaultdict, deque
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import pandas as pd
import webdataset as wds
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

from ..cli import UserError, run
from .check import SIZES_FILE
from .sample import MAX_IMAGE_PIXELS, SkipSample, open_image

__all__ = [
    'SourceSample', 'WriteOptions', 'SkipLog', 'TableSamples', 'read_table', 'read_folder', 'read_coco',
    'write_shards', 'table', 'folder', 'coco',
]

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
TABLE_FORMATS = {'.csv': 'csv', '.tsv': 'tsv', '.tab': 'tsv', '.parquet': 'parquet', '.pq': 'parquet'}
STATS_FILE = 'stats.json'
MAX_EXAMPLES = 5
TABLE_CHUNK_ROWS = 65_536  # rows of a table read at a time
TASKS_AHEAD_PER_WORKER = 2  # chunks handed to the pool ahead of the one waited for, per worker
# a fixed member mtime makes a rerun with the same inputs produce byte-identical shards
_TAR_MTIME = 1_700_000_000.0


@dataclass
class SourceSample:
    """One image and its caption(s) as listed by a source reader, before any file is opened."""
    key: str  # the `__key__` in the shard: unique, no dots
    image: str  # path of the image file
    split_id: str  # stable identity of the image; its hash decides train or val
    captions: tuple = ()
    caption_file: Optional[str] = None  # sidecar caption, read by the worker
    keep_all_captions: bool = False  # store every caption in json["captions"]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WriteOptions:
    """How shards are written.

    Args:
        resize: shortest side in pixels, aspect kept, never upscaled unless ``upscale``; 0 keeps sizes
            (384 covers 384 px fine-tuning of the towers at half the bytes of 512).
        upscale: also enlarge images smaller than ``resize``.
        quality: JPEG quality.
        maxcount: samples per shard at most.
        maxsize: bytes per shard; a new shard starts once exceeded.
        workers: worker processes, each writes its own shards.
        val_fraction: fraction of images (by hash of their path) written to OUTPUT/val, the rest to
            OUTPUT/train; 0 writes all shards straight into OUTPUT.
        overwrite: replace shards already in OUTPUT.
        max_pixels: images with more pixels are skipped (``image_too_large``), the reader's limit.
    """
    resize: int = 384
    upscale: bool = False
    quality: int = 95
    maxcount: int = 10000
    maxsize: float = 1e9
    workers: int = 1
    val_fraction: float = 0.0
    overwrite: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS

    def validate(self):
        checks = (
            (self.resize >= 0, f'resize must be >= 0 (0 disables resizing), got {self.resize}'),
            (1 <= self.quality <= 100, f'quality must be in 1..100, got {self.quality}'),
            (self.maxcount >= 1, f'maxcount must be >= 1, got {self.maxcount}'),
            (self.maxsize > 0, f'maxsize must be > 0 bytes, got {self.maxsize}'),
            (self.workers >= 1, f'workers must be >= 1, got {self.workers}'),
            (0.0 <= self.val_fraction < 1.0, f'val_fraction must be in [0, 1), got {self.val_fraction}'),
            (self.max_pixels > 0, f'max_pixels must be > 0, got {self.max_pixels}'),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)


class SkipLog:
    """Counts per reason with the first few examples, mergeable across workers in task order."""

    def __init__(self):
        self.counts = defaultdict(int)
        self.examples = defaultdict(list)

    def add(self, reason: str, example: str, count: int = 1):
        self.counts[reason] += count
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(example)

    def merge(self, other: dict):
        for reason, entry in other.items():
            self.counts[reason] += entry['count']
            room = MAX_EXAMPLES - len(self.examples[reason])
            self.examples[reason].extend(entry['examples'][:room])

    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {r: {'count': self.counts[r], 'examples': self.examples[r]} for r in sorted(self.counts)}


# ---------------------------------------------------------------------------------------------
# source readers: list samples, open no image


def _table_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in ('.gz', '.bz2', '.xz', '.zst'):
        suffixes = suffixes[:-1]  # pandas decompresses csv/tsv by extension
    fmt = TABLE_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise ValueError(f'{path}: unknown table format; valid suffixes: {", ".join(TABLE_FORMATS)} '
                         f'(csv/tsv optionally compressed .gz/.bz2/.xz/.zst)')
    return fmt


def _table_columns(path: Path, fmt: str) -> list:
    if fmt == 'parquet':
        import pyarrow.parquet as pq
        return list(pq.read_schema(path).names)
    return list(_read_delimited(path, fmt, nrows=0).columns)


def _read_delimited(path: Path, fmt: str, **kwargs) -> pd.DataFrame:
    if fmt == 'tsv':
        # TSV has no quoting: captions with a leading '"' must not swallow the following rows
        kwargs.update(sep='\t', quoting=3)
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, **kwargs)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ''
    return str(value)


def _table_chunks(path: Path, fmt: str, columns: list) -> Iterator[dict]:
    """The table as {column: values} of at most `TABLE_CHUNK_ROWS` rows each, in row order."""
    if fmt == 'parquet':
        import pyarrow.parquet as pq
        with pq.ParquetFile(path) as table:
            # arrow values, not pandas': a pandas batch turns ints into floats only if it has a null
            for batch in table.iter_batches(batch_size=TABLE_CHUNK_ROWS, columns=columns):
                yield {col: batch.column(col).to_pylist() for col in columns}
        return
    with _read_delimited(path, fmt, usecols=columns, chunksize=TABLE_CHUNK_ROWS) as reader:
        for df in reader:
            yield {col: df[col].tolist() for col in columns}


class TableSamples:
    """The samples of a table (see `read_table`), read anew in chunks on each iteration, so
    that only one chunk of rows is in memory. `operator.length_hint` gives the row count for
    parquet (from its metadata); a CSV/TSV would have to be read through to count it."""

    def __init__(self, path: Path, fmt: str, image_col: str, caption_col: str, root: Path,
                 rows: Optional[int] = None):
        self.path, self.fmt, self.root, self.rows = path, fmt, root, rows
        self.image_col, self.caption_col = image_col, caption_col

    def __iter__(self) -> Iterator[SourceSample]:
        row = 0
        columns = list(dict.fromkeys((self.image_col, self.caption_col)))
        for chunk in _table_chunks(self.path, self.fmt, columns):
            for image, caption in zip(chunk[self.image_col], chunk[self.caption_col]):
                image = _cell(image).strip()
                image_path = Path(image)
                if not image_path.is_absolute():
                    image_path = self.root / image_path
                yield SourceSample(
                    key=f'{row:09d}',
                    image=str(image_path) if image else '',
                    split_id=image,
                    captions=(_cell(caption),),
                    meta={'row': row},
                )
                row += 1

    def __length_hint__(self):
        return NotImplemented if self.rows is None else self.rows


def read_table(
        path,
        image_col: str = 'image',
        caption_col: str = 'caption',
        image_root=None,
) -> TableSamples:
    """Samples from a CSV/TSV/parquet table; relative image paths resolve against `image_root`
    (default: the table's directory). The split identity is the path as written in the table.
    Checks the file and its columns at once; rows are read, in chunks, only while iterating."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'table not found: {path}')
    fmt = _table_format(path)
    columns = _table_columns(path, fmt)
    for flag, col in (('--image_col', image_col), ('--caption_col', caption_col)):
        if col not in columns:
            raise ValueError(f'{path}: column {col!r} ({flag}) does not exist; columns are: '
                             f'{", ".join(map(repr, columns))}')
    rows = None
    if fmt == 'parquet':
        import pyarrow.parquet as pq
        rows = pq.read_metadata(path).num_rows
    root = Path(image_root) if image_root is not None else path.parent
    return TableSamples(path, fmt, image_col, caption_col, root, rows)


def read_folder(folder, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list:
    """Samples from an image folder (recursive) with a sidecar caption `<stem>.txt` per image,
    in sorted relative-path order; the split identity is the relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'image folder not found: {folder}')
    suffixes = {('' if s.startswith('.') else '.') + s.lower() for s in suffixes}
    images = sorted(
        (p for p in folder.rglob('*') if p.suffix.lower() in suffixes and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not images:
        raise ValueError(f'{folder}: no images with suffixes {", ".join(sorted(suffixes))}')
    return [
        SourceSample(
            key=f'{i:09d}',
            image=str(p),
            split_id=p.relative_to(folder).as_posix(),
            caption_file=str(p.with_suffix('.txt')),
        )
        for i, p in enumerate(images)
    ]


def _require_keys(entries: list, keys: tuple, where: str):
    for i, entry in enumerate(entries):
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f'{where}[{i}] lacks {missing}; each entry needs {list(keys)}')


def read_coco(annotations, image_root=None) -> tuple:
    """Samples from a COCO captions JSON, one per image (sorted by id), keeping every caption in
    file order. Returns (samples, problems) where problems is a SkipLog of annotations that
    belong to no listed image. `image_root` defaults to the JSON's directory."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f'COCO annotations not found: {annotations}')
    with open(annotations, encoding='utf-8') as f:
        coco = json.load(f)
    if not (isinstance(coco, dict) and isinstance(coco.get('images'), list)
            and isinstance(coco.get('annotations'), list)):
        raise ValueError(f'{annotations}: not a COCO captions file; expected {{"images": [{{"id", "file_name"}}, '
                         f'...], "annotations": [{{"image_id", "caption"}}, ...]}}')
    _require_keys(coco['images'], ('id', 'file_name'), f'{annotations}: images')
    _require_keys(coco['annotations'], ('image_id', 'caption'), f'{annotations}: annotations')
    captions = defaultdict(list)
    for ann in coco['annotations']:
        captions[ann['image_id']].append(_cell(ann.get('caption')))
    root = Path(image_root) if image_root is not None else annotations.parent
    images = sorted(coco['images'], key=lambda im: im['id'])
    samples = [
        SourceSample(
            key=f'{i:09d}',
            image=str(root / im['file_name']),
            split_id=im['file_name'],
            captions=tuple(captions.get(im['id'], ())),
            keep_all_captions=True,
            meta={'image_id': im['id']},
        )
        for i, im in enumerate(images)
    ]
    problems = SkipLog()
    listed = {im['id'] for im in images}
    for image_id in sorted(set(captions) - listed, key=str):
        problems.add('annotation for unknown image_id', str(image_id), count=len(captions[image_id]))
    return samples, problems


# ---------------------------------------------------------------------------------------------
# image decoding and sample encoding (runs in workers)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        # transparent areas become white rather than whatever colour sits under the alpha
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB') if img.mode != 'RGB' else img


def resized_size(size: tuple, short_side: int, upscale: bool = False) -> tuple:
    """(w, h) with the shortest side at `short_side` and the aspect kept; unchanged when
    `short_side` is 0 or the image is already smaller and `upscale` is False."""
    w, h = size
    short = min(w, h)
    if short_side <= 0 or short == short_side or (short < short_side and not upscale):
        return w, h
    if w <= h:
        return short_side, max(1, round(h * short_side / w))
    return max(1, round(w * short_side / h)), short_side


def _load_image(path: str) -> bytes:
    if not path:
        raise SkipSample('no_image', 'empty image path')
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError as e:
        raise SkipSample('no_image', f'missing: {path}') from e
    except OSError as e:
        raise SkipSample('no_image', f'unreadable: {path}: {e}') from e


def _captions(sample: SourceSample) -> list:
    captions = sample.captions
    if sample.caption_file is not None:
        try:
            with open(sample.caption_file, 'rb') as f:
                captions = (f.read().decode('utf-8'),)
        except FileNotFoundError as e:
            raise SkipSample('no_caption', sample.caption_file) from e
        except UnicodeDecodeError as e:
            raise SkipSample('caption_not_utf8', sample.caption_file) from e
    if not captions:
        raise SkipSample('no_caption')
    kept = [c.strip() for c in captions if c.strip()]
    if not kept:
        raise SkipSample('empty_caption')
    return kept


def encode_sample(sample: SourceSample, opts: WriteOptions) -> dict:
    """Read, decode, resize and re-encode one sample into the dict ShardWriter writes.
    Raises SkipSample when it cannot be written."""
    captions = _captions(sample)
    img, original = open_image(_load_image(sample.image), opts.max_pixels, min_side=opts.resize)
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # 90 degree turns
            original = original[::-1]
        img = _to_rgb(ImageOps.exif_transpose(img))
        size = resized_size(img.size, opts.resize, opts.upscale)
        if size != img.size:
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format='JPEG', quality=opts.quality)
    except Exception as e:  # corrupt EXIF or pixel data PIL only notices now: skip, do not stop the run
        raise SkipSample('undecodable_image', f'{type(e).__name__}: {e}') from e
    meta = {'source': sample.split_id, 'width': size[0], 'height': size[1],
            'original_width': original[0], 'original_height': original[1], **sample.meta}
    if sample.keep_all_captions:
        meta['captions'] = captions
    return {
        '__key__': sample.key,
        'jpg': buf.getvalue(),
        'txt': captions[0].encode('utf-8'),
        'json': json.dumps(meta, ensure_ascii=False).encode('utf-8'),
    }


# ---------------------------------------------------------------------------------------------
# parallel writing

_tick: Callable[[], None] = lambda: None  # per-process progress hook, set by _init_worker


def _init_worker(counter):
    global _tick

    def tick():
        with counter.get_lock():
            counter.value += 1
    _tick = tick


def _write_chunk(task) -> dict:
    """Write one chunk of samples to `<tmpdir>/<chunk>-NNNN.tar` (usually one shard; more when
    maxsize cuts it). Returns the tmpdir, the shards with their counts and the skip log, plain
    data only."""
    chunk, tmpdir, samples, opts = task
    log, shards, writer = SkipLog(), {}, None
    for sample in samples:
        try:
            encoded = encode_sample(sample, opts)
        except SkipSample as e:
            log.add(e.reason, sample.image or f'row {sample.meta.get("row", sample.key)}')
        else:
            if writer is None:
                writer = wds.ShardWriter(
                    os.path.join(tmpdir, f'{chunk:06d}-%04d.tar'), maxcount=opts.maxcount,
                    maxsize=opts.maxsize, verbose=0, encoder=False, mtime=_TAR_MTIME)
            writer.write(encoded)
            shards[writer.fname] = shards.get(writer.fname, 0) + 1
        _tick()
    if writer is not None:
        writer.close()
    return {'chunk': chunk, 'tmpdir': tmpdir, 'shards': list(shards.items()), 'skipped': log.to_dict()}


def split_of(split_id: str, val_fraction: float) -> str:
    """'val' for a stable `val_fraction` of identities, whatever the order or worker count."""
    digest = hashlib.sha256(split_id.encode('utf-8')).digest()
    return 'val' if int.from_bytes(digest[:8], 'big') < val_fraction * 2 ** 64 else 'train'


def _split_dirs(output: Path, val_fraction: float) -> dict:
    if val_fraction == 0:
        return {'shard': output}
    return {'train': output / 'train', 'val': output / 'val'}


def _prepare_output(output: Path, overwrite: bool):
    dirs = [output, output / 'train', output / 'val']
    existing = sorted(
        p for d in dirs if d.is_dir() for p in d.iterdir()
        if p.suffix == '.tar' or p.name in (SIZES_FILE, STATS_FILE) or p.name.startswith('.partial-'))
    if existing and not overwrite:
        shown = ', '.join(str(p) for p in existing[:3]) + (' ...' if len(existing) > 3 else '')
        raise FileExistsError(f'{output} already holds shards ({shown}); pass --overwrite to replace them')
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _chunk_tasks(samples: Iterable, tmpdirs: dict, opts: WriteOptions) -> Iterator[tuple]:
    """`_write_chunk` tasks cut while `samples` is read: each split's samples in order,
    `maxcount` per chunk, each split's shorter last chunk once `samples` is exhausted. Holds one
    unfinished chunk per split, whatever the number of samples."""
    chunks = itertools.count()
    pending = {name: [] for name in tmpdirs}
    for sample in samples:
        name = split_of(sample.split_id, opts.val_fraction) if opts.val_fraction else 'shard'
        pending[name].append(sample)
        if len(pending[name]) == opts.maxcount:
            yield next(chunks), str(tmpdirs[name]), pending[name], opts
            pending[name] = []
    for name, rest in pending.items():
        if rest:
            yield next(chunks), str(tmpdirs[name]), rest, opts


def _run_chunks(tasks: Iterable, total: Optional[int], workers: int) -> Iterator[dict]:
    """Results of `_write_chunk` in task order, with a per-image progress bar. `tasks` is read
    lazily: the pool gets at most TASKS_AHEAD_PER_WORKER tasks per worker ahead of the result
    waited for (Pool.imap would drain the whole iterator into its queue)."""
    global _tick
    tasks = iter(tasks)
    # a look at the first tasks: fewer than two need no pool, fewer than `workers` fewer processes
    head = list(itertools.islice(tasks, workers)) if workers > 1 else []
    tasks = itertools.chain(head, tasks)
    if workers == 1 or len(head) <= 1:
        with tqdm(total=total, unit='img', desc='writing shards') as bar:
            _tick = bar.update
            try:
                for task in tasks:
                    yield _write_chunk(task)
            finally:
                _tick = lambda: None
        return
    counter = multiprocessing.Value('q', 0)
    # the pool forks before tqdm starts its monitor thread: forking a threaded process can deadlock
    with multiprocessing.Pool(len(head), initializer=_init_worker, initargs=(counter,)) as pool:
        with tqdm(total=total, unit='img', desc='writing shards') as bar:
            def result_of(pending):
                while not pending.ready():
                    pending.wait(0.5)
                    bar.update(counter.value - bar.n)
                bar.update(counter.value - bar.n)
                return pending.get()

            in_flight = deque()
            for task in tasks:
                in_flight.append(pool.apply_async(_write_chunk, (task,)))
                if len(in_flight) > TASKS_AHEAD_PER_WORKER * len(head):
                    yield result_of(in_flight.popleft())
            while in_flight:
                yield result_of(in_flight.popleft())


def write_shards(
        samples: Iterable,
        output,
        opts: WriteOptions = WriteOptions(),
        source_problems: Optional[SkipLog] = None,
        source: str = '',
) -> dict:
    """Write `samples` as WebDataset shards under `output`; returns (and writes) stats.json.
    `samples` is read once, while shards are written; the progress bar's total is its
    `operator.length_hint` (none for a plain iterator)."""
    opts.validate()
    output = Path(output)
    _prepare_output(output, opts.overwrite)
    split_dirs = _split_dirs(output, opts.val_fraction)
    tmpdirs = {}
    for name, directory in split_dirs.items():
        directory.mkdir(parents=True, exist_ok=True)
        tmpdirs[name] = output / f'.partial-{name}'
        tmpdirs[name].mkdir()
    split_of_tmpdir = {str(tmpdir): name for name, tmpdir in tmpdirs.items()}
    total = operator.length_hint(samples, -1)

    # per split in task order: the shards written, and skips merged as they were in one list of tasks
    shards, logs = {name: [] for name in split_dirs}, {name: SkipLog() for name in split_dirs}
    try:
        tasks = _chunk_tasks(samples, tmpdirs, opts)
        with closing(_run_chunks(tasks, total if total >= 0 else None, opts.workers)) as results:
            for result in results:
                name = split_of_tmpdir[result['tmpdir']]
                shards[name].extend(result['shards'])
                logs[name].merge(result['skipped'])
    except BaseException:
        # the source may fail half-way (a malformed CSV row): leave no partial shards behind
        for tmpdir in tmpdirs.values():
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise

    log, splits = SkipLog(), {}
    for name, directory in split_dirs.items():
        sizes = {}
        for tmp_name, count in shards[name]:
            final = f'{name}-{len(sizes):06d}.tar'
            os.replace(tmp_name, directory / final)
            sizes[final] = count
        tmpdirs[name].rmdir()
        with open(directory / SIZES_FILE, 'w') as f:
            json.dump(sizes, f, indent=1)
        splits[name] = {'directory': str(directory), 'samples': sum(sizes.values()), 'shards': len(sizes)}
        log.merge(logs[name].to_dict())

    stats = {
        'source': source,
        'written': sum(s['samples'] for s in splits.values()),
        'skipped': log.total(),
        'skip_reasons': log.to_dict(),
        'splits': splits,
        'source_problems': source_problems.to_dict() if source_problems else {},
        'options': asdict(opts),
    }
    with open(output / STATS_FILE, 'w') as f:
        json.dump(stats, f, indent=1)
    return stats


# ---------------------------------------------------------------------------------------------
# commands: python -m clip_hvt.data.convert {table,folder,coco} ...


def _print_stats(stats: dict) -> int:
    for name, split in stats['splits'].items():
        print(f'{split["directory"]}: {split["samples"]} samples in {split["shards"]} shards')
    print(f'written {stats["written"]}, skipped {stats["skipped"]}')
    for reason, entry in {**stats['skip_reasons'], **stats['source_problems']}.items():
        print(f'  {reason}: {entry["count"]} (e.g. {", ".join(map(str, entry["examples"][:3]))})')
    return 0 if stats['written'] else 1


def _user_errors(convert: Callable[[], dict]) -> int:
    try:
        return _print_stats(convert())
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad path, column, format, existing output
        raise UserError(str(e)) from e


def table(path: str, output: str, image_col: str = 'image', caption_col: str = 'caption',
          image_root: Optional[str] = None, write: WriteOptions = WriteOptions()) -> int:
    """CSV / TSV / parquet table (image path + caption columns) -> WebDataset shards, streamed in chunks of rows.

    Args:
        path: .csv, .tsv (optionally .gz/.bz2/.xz/.zst) or .parquet.
        output: output directory for shards, sizes.json and stats.json.
        image_col: column with image paths.
        caption_col: column with captions.
        image_root: directory relative image paths start from (default: the table's).
        write: how shards are written.
    """
    return _user_errors(lambda: write_shards(read_table(path, image_col, caption_col, image_root), output, write,
                                             source=path))


def folder(path: str, output: str, suffixes: list[str] = list(IMAGE_SUFFIXES),
           write: WriteOptions = WriteOptions()) -> int:
    """Image folder (recursive) with a sidecar caption per image (a/b/cat.jpg + a/b/cat.txt) -> WebDataset shards.

    Args:
        path: image folder, searched recursively.
        output: output directory for shards, sizes.json and stats.json.
        suffixes: image file suffixes.
        write: how shards are written.
    """
    return _user_errors(lambda: write_shards(read_folder(path, suffixes), output, write, source=path))


def coco(path: str, output: str, image_root: Optional[str] = None, write: WriteOptions = WriteOptions()) -> int:
    """COCO captions JSON -> WebDataset shards, one sample per image, every caption in json["captions"].

    Args:
        path: COCO captions JSON (images[] with id/file_name, annotations[] with image_id/caption).
        output: output directory for shards, sizes.json and stats.json.
        image_root: directory file_name is relative to (default: the JSON's).
        write: how shards are written.
    """
    def convert():
        samples, problems = read_coco(path, image_root)
        return write_shards(samples, output, write, problems, source=path)
    return _user_errors(convert)


def main(args: Optional[list] = None) -> None:
    sys.exit(run({'table': table, 'folder': folder, 'coco': coco}, args, prog='python -m clip_hvt.data.convert'))


if __name__ == '__main__':
    main()
