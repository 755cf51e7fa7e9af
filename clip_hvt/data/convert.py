"""Convert image-caption sources (tables, folders, COCO captions) into WebDataset shards.

A reader (`read_table`, `read_folder`, `read_coco`) lists `SourceSample`s without opening an image;
`write_shards` splits them into train/val by a hash of each image's identity, cuts each split into
chunks of `maxcount` samples while it reads (memory stays bounded) and lets worker processes decode,
resize, re-encode and write one chunk each: names and bytes do not depend on `--workers`.

Output: OUTPUT/shard-NNNNNN.tar + sizes.json, or with `val_fraction` > 0 OUTPUT/train/train-NNNNNN.tar
and OUTPUT/val/val-NNNNNN.tar, each with sizes.json; always OUTPUT/stats.json (counts, skip reasons
with examples). A sample holds `jpg`, `txt` (the first caption) and `json` (source, sizes, row or
image_id; COCO keeps every caption in `captions`).
"""
import csv
import hashlib
import io
import itertools
import json
import multiprocessing
import operator
import os
import shutil
import sys
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import pandas as pd
import pyarrow.parquet as pq
import webdataset as wds
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

from ..cli import UserError, run
from .sample import MAX_IMAGE_PIXELS, TAR_MTIME, WORKER_DIED, SkipCounter, SkipSample, nonempty, open_image
from .shards import SIZES_FILE, write_sizes

__all__ = [
    'SourceSample', 'WriteOptions', 'TableSamples', 'read_table', 'read_folder', 'read_coco',
    'write_shards', 'table', 'folder', 'coco',
]

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
TABLE_FORMATS = {'.csv': 'csv', '.tsv': 'tsv', '.tab': 'tsv', '.parquet': 'parquet', '.pq': 'parquet'}
STATS_FILE = 'stats.json'
TABLE_CHUNK_ROWS = 65_536  # rows of a table read at a time
TASKS_AHEAD_PER_WORKER = 2  # chunks handed to the pool ahead of the one waited for, per worker


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


# source readers: list samples, open no image

def _read_delimited(path: Path, fmt: str, **kwargs) -> pd.DataFrame:
    if fmt == 'tsv':  # TSV has no quoting: captions with a leading '"' must not swallow the following rows
        kwargs.update(sep='\t', quoting=csv.QUOTE_NONE)
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, **kwargs)


def _cell(value) -> str:
    return '' if value is None or (isinstance(value, float) and value != value) else str(value)


def _table_chunks(path: Path, fmt: str, columns: list) -> Iterator[dict]:
    """The table as {column: values} of at most `TABLE_CHUNK_ROWS` rows each, in row order."""
    if fmt == 'parquet':
        with pq.ParquetFile(path) as table:
            # arrow values, not pandas': a pandas batch turns ints into floats only if it has a null
            yield from (b.to_pydict() for b in table.iter_batches(batch_size=TABLE_CHUNK_ROWS, columns=columns))
    else:
        with _read_delimited(path, fmt, usecols=columns, chunksize=TABLE_CHUNK_ROWS) as reader:
            yield from (df.to_dict('list') for df in reader)


@dataclass
class TableSamples:
    """The samples of a table (see `read_table`), read anew in chunks on each iteration, so that only
    one chunk of rows is in memory. `operator.length_hint` gives the row count for parquet (from its
    metadata); a CSV/TSV would have to be read through to count it."""
    path: Path
    fmt: str
    image_col: str
    caption_col: str
    root: Path

    def __iter__(self) -> Iterator[SourceSample]:
        chunks = _table_chunks(self.path, self.fmt, list(dict.fromkeys((self.image_col, self.caption_col))))
        rows = itertools.chain.from_iterable(zip(c[self.image_col], c[self.caption_col]) for c in chunks)
        for row, (image, caption) in enumerate(rows):
            image = _cell(image).strip()
            yield SourceSample(key=f'{row:09d}', image=str(self.root / image) if image else '', split_id=image,
                               captions=(_cell(caption),), meta={'row': row})

    def __length_hint__(self):
        return pq.read_metadata(self.path).num_rows if self.fmt == 'parquet' else NotImplemented


def read_table(path, image_col: str = 'image', caption_col: str = 'caption', image_root=None) -> TableSamples:
    """Samples from a CSV/TSV/parquet table; relative image paths resolve against `image_root`
    (default: the table's directory). The split identity is the path as written in the table.
    Checks the file and its columns at once; rows are read, in chunks, only while iterating."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'table not found: {path}')
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in ('.gz', '.bz2', '.xz', '.zst'):
        suffixes.pop()  # pandas decompresses csv/tsv by extension
    fmt = TABLE_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise ValueError(f'{path}: unknown table format; valid suffixes: {", ".join(TABLE_FORMATS)} '
                         f'(csv/tsv optionally compressed .gz/.bz2/.xz/.zst)')
    columns = pq.read_schema(path).names if fmt == 'parquet' else list(_read_delimited(path, fmt, nrows=0).columns)
    for flag, col in (('--image_col', image_col), ('--caption_col', caption_col)):
        if col not in columns:
            raise ValueError(f'{path}: column {col!r} ({flag}) does not exist; columns are: '
                             f'{", ".join(map(repr, columns))}')
    return TableSamples(path, fmt, image_col, caption_col, Path(path.parent if image_root is None else image_root))


def read_folder(folder, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list:
    """Samples from an image folder (recursive) with a sidecar caption `<stem>.txt` per image,
    in sorted relative-path order; the split identity is the relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'image folder not found: {folder}')
    suffixes = {('' if s.startswith('.') else '.') + s.lower() for s in suffixes}
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*')
                    if p.suffix.lower() in suffixes and p.is_file())
    if not images:
        raise ValueError(f'{folder}: no images with suffixes {", ".join(sorted(suffixes))}')
    return [SourceSample(key=f'{i:09d}', image=str(folder / p), split_id=p,
                         caption_file=str((folder / p).with_suffix('.txt'))) for i, p in enumerate(images)]


def _require_keys(entries: list, keys: tuple, where: str):
    for i, entry in enumerate(entries):
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f'{where}[{i}] lacks {missing}; each entry needs {list(keys)}')


def read_coco(annotations, image_root=None) -> tuple:
    """Samples from a COCO captions JSON, one per image (sorted by id), keeping every caption in
    file order. Returns (samples, problems) where problems is a SkipCounter of annotations that
    belong to no listed image. `image_root` defaults to the JSON's directory."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f'COCO annotations not found: {annotations}')
    coco = json.loads(annotations.read_text(encoding='utf-8'))
    if not (isinstance(coco, dict) and isinstance(coco.get('images'), list)
            and isinstance(coco.get('annotations'), list)):
        raise ValueError(f'{annotations}: not a COCO captions file; expected {{"images": [{{"id", "file_name"}}, '
                         f'...], "annotations": [{{"image_id", "caption"}}, ...]}}')
    _require_keys(coco['images'], ('id', 'file_name'), f'{annotations}: images')
    _require_keys(coco['annotations'], ('image_id', 'caption'), f'{annotations}: annotations')
    captions, problems = defaultdict(list), SkipCounter(log_first=None)
    for ann in coco['annotations']:
        if isinstance(ann['caption'], str):
            captions[ann['image_id']].append(ann['caption'])
        else:  # a number, list, null: not written as its str()
            problems.add('caption not a string', f"image_id {ann['image_id']}: {json.dumps(ann['caption'])[:40]}")
    root = Path(annotations.parent if image_root is None else image_root)
    images = sorted(coco['images'], key=lambda im: im['id'])
    samples = [SourceSample(key=f'{i:09d}', image=str(root / im['file_name']), split_id=im['file_name'],
                            captions=tuple(captions.get(im['id'], ())), keep_all_captions=True,
                            meta={'image_id': im['id']}) for i, im in enumerate(images)]
    for image_id in sorted(set(captions) - {im['id'] for im in images}, key=str):
        problems.add('annotation for unknown image_id', str(image_id), count=len(captions[image_id]))
    return samples, problems


# image decoding and sample encoding (runs in workers)

def resized_size(size: tuple, short_side: int, upscale: bool = False) -> tuple:
    """(w, h) with the shortest side at `short_side` and the aspect kept; unchanged when
    `short_side` is 0 or the image is already smaller and `upscale` is False."""
    w, h = size
    if short_side <= 0 or min(w, h) == short_side or (min(w, h) < short_side and not upscale):
        return w, h
    if w <= h:
        return short_side, max(1, round(h * short_side / w))
    return max(1, round(w * short_side / h)), short_side


def _read(path: Optional[str], missing: str) -> bytes:
    """A file's bytes; a missing one skips the sample with reason `missing`."""
    if not path:
        raise SkipSample(missing, 'empty image path')
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise SkipSample(missing, f'missing: {path}') from e
    except OSError as e:
        raise SkipSample(missing, f'unreadable: {path}: {e}') from e


def encode_sample(sample: SourceSample, opts: WriteOptions) -> dict:
    """Read, decode, resize and re-encode one sample into the dict ShardWriter writes.
    Raises SkipSample when it cannot be written."""
    captions = sample.captions
    if sample.caption_file is not None:
        try:
            captions = (_read(sample.caption_file, 'no_caption').decode('utf-8'),)
        except UnicodeDecodeError as e:
            raise SkipSample('caption_not_utf8', sample.caption_file) from e
    if not captions:
        raise SkipSample('no_caption')
    captions = nonempty(captions)
    img, original = open_image(_read(sample.image, 'no_image'), opts.max_pixels, min_side=opts.resize)
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # 90 degree turns
            original = original[::-1]
        img = ImageOps.exif_transpose(img)
        if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
            # transparent areas become white rather than whatever colour sits under the alpha
            rgba = img.convert('RGBA')
            img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert('RGB') if img.mode != 'RGB' else img
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
    return {'__key__': sample.key, 'jpg': buf.getvalue(), 'txt': captions[0].encode('utf-8'),
            'json': json.dumps(meta, ensure_ascii=False).encode('utf-8')}


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
    log, shards, writer = SkipCounter(log_first=None), Counter(), None
    for sample in samples:
        try:
            encoded = encode_sample(sample, opts)
        except SkipSample as e:
            log.add(e.reason, sample.image or f'row {sample.meta.get("row", sample.key)}')
        else:
            writer = writer or wds.ShardWriter(os.path.join(tmpdir, f'{chunk:06d}-%04d.tar'), maxcount=opts.maxcount,
                                               maxsize=opts.maxsize, verbose=0, encoder=False, mtime=TAR_MTIME)
            writer.write(encoded)
            shards[writer.fname] += 1
        _tick()
    if writer is not None:
        writer.close()
    return {'chunk': chunk, 'tmpdir': tmpdir, 'shards': list(shards.items()), 'skipped': log.to_dict()}


def split_of(split_id: str, val_fraction: float) -> str:
    """'val' for a stable `val_fraction` of identities, whatever the order or worker count."""
    digest = hashlib.sha256(split_id.encode('utf-8')).digest()
    return 'val' if int.from_bytes(digest[:8], 'big') < val_fraction * 2 ** 64 else 'train'


def _prepare_output(output: Path, overwrite: bool) -> list[Path]:
    """The shards and count files already in ``output`` (refused unless ``overwrite``). They are replaced only once
    the new set is complete (``write_shards``): a conversion that fails half-way leaves the old set as it was."""
    existing = sorted(p for d in (output, output / 'train', output / 'val') if d.is_dir() for p in d.iterdir()
                      if p.suffix == '.tar' or p.name in (SIZES_FILE, STATS_FILE) or p.name.startswith('.partial-'))
    if existing and not overwrite:
        shown = ', '.join(str(p) for p in existing[:3]) + (' ...' if len(existing) > 3 else '')
        raise FileExistsError(f'{output} already holds shards ({shown}); pass --write.overwrite true to replace them')
    for p in existing:
        if p.name.startswith('.partial-') and p.is_dir():  # an interrupted conversion's unfinished shards
            shutil.rmtree(p)
    output.mkdir(parents=True, exist_ok=True)
    return [p for p in existing if not p.name.startswith('.partial-')]


def _chunk_tasks(samples: Iterable, tmpdirs: dict, opts: WriteOptions) -> Iterator[tuple]:
    """`_write_chunk` tasks cut while `samples` is read: each split's samples in order, `maxcount`
    per chunk, the shorter last ones at the end. Holds one unfinished chunk per split."""
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
    rest = iter(tasks)
    # a look at the first tasks: fewer than two need no pool, fewer than `workers` fewer processes
    head = list(itertools.islice(rest, workers)) if workers > 1 else []
    if len(head) <= 1:
        with tqdm(total=total, unit='img', desc='writing shards') as bar:
            _tick = bar.update
            try:
                yield from map(_write_chunk, itertools.chain(head, rest))
            finally:
                _tick = lambda: None
        return
    counter = multiprocessing.Value('q', 0)
    # concurrent.futures, not multiprocessing.Pool: a worker killed (for memory) breaks the executor, where a Pool
    # replaces it and waits forever for the task it held
    with ProcessPoolExecutor(len(head), initializer=_init_worker, initargs=(counter,)) as pool:
        # the first submits start the workers before tqdm starts its monitor thread: forking a threaded process can
        # deadlock
        in_flight = deque(pool.submit(_write_chunk, task) for task in head)
        with tqdm(total=total, unit='img', desc='writing shards') as bar:
            def result_of(pending):
                while not pending.done():
                    wait([pending], timeout=0.5)
                    bar.update(counter.value - bar.n)
                bar.update(counter.value - bar.n)
                try:
                    return pending.result()
                except BrokenProcessPool:
                    raise UserError(WORKER_DIED.format(option='--write.workers')) from None

            for task in rest:
                in_flight.append(pool.submit(_write_chunk, task))
                if len(in_flight) > TASKS_AHEAD_PER_WORKER * len(head):
                    yield result_of(in_flight.popleft())
            while in_flight:
                yield result_of(in_flight.popleft())


def write_shards(samples: Iterable, output, opts: WriteOptions = WriteOptions(),
                 source_problems: Optional[SkipCounter] = None, source: str = '') -> dict:
    """Write `samples` as WebDataset shards under `output`; returns (and writes) stats.json.
    `samples` is read once, while shards are written; the progress bar's total is its
    `operator.length_hint` (none for a plain iterator)."""
    opts.validate()
    output = Path(output)
    old = _prepare_output(output, opts.overwrite)
    split_dirs = {'shard': output} if opts.val_fraction == 0 else {n: output / n for n in ('train', 'val')}
    tmpdirs = {name: output / f'.partial-{name}' for name in split_dirs}
    for directory in [*split_dirs.values(), *tmpdirs.values()]:
        directory.mkdir(exist_ok=True)
    split_of_tmpdir = {str(tmpdir): name for name, tmpdir in tmpdirs.items()}
    total = operator.length_hint(samples, -1)
    # per split in task order: the shards written, and skips merged as they were in one list of tasks
    shards, logs = {name: [] for name in split_dirs}, {name: SkipCounter(log_first=None) for name in split_dirs}
    try:
        with closing(_run_chunks(_chunk_tasks(samples, tmpdirs, opts), total if total >= 0 else None,
                                 opts.workers)) as results:
            for result in results:
                name = split_of_tmpdir[result['tmpdir']]
                shards[name].extend(result['shards'])
                logs[name].merge(result['skipped'])
    except BaseException:
        # the source may fail half-way (a malformed CSV row): leave no partial shards behind
        for tmpdir in tmpdirs.values():
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    # The new set is complete: the old counts go first (no sizes.json may describe other shards), then the new shards
    # take their names and the old shards left over are removed.
    for p in old:
        if p.suffix != '.tar':
            p.unlink()
    log, splits, written = SkipCounter(log_first=None), {}, set()
    for name, directory in split_dirs.items():
        sizes = {}
        for tmp_name, count in shards[name]:
            final = f'{name}-{len(sizes):06d}.tar'
            os.replace(tmp_name, directory / final)
            sizes[final] = count
            written.add(directory / final)
        tmpdirs[name].rmdir()
        write_sizes(directory / SIZES_FILE, sizes)
        splits[name] = {'directory': str(directory), 'samples': sum(sizes.values()), 'shards': len(sizes)}
        log.merge(logs[name].to_dict())
    for p in old:
        if p.suffix == '.tar' and p not in written:
            p.unlink()
    stats = {'source': source, 'written': sum(s['samples'] for s in splits.values()),
             'skipped': sum(log.total.values()), 'skip_reasons': log.to_dict(), 'splits': splits,
             'source_problems': source_problems.to_dict() if source_problems else {}, 'options': asdict(opts)}
    (output / STATS_FILE).write_text(json.dumps(stats, indent=1))
    return stats


# commands: python -m clip_hvt.data.convert {table,folder,coco} ...

def _convert(read: Callable[[], tuple], output: str, write: WriteOptions, source: str) -> int:
    """Write the shards of what `read` lists (samples, source problems); print stats, exit 1 if none written."""
    try:
        samples, problems = read()
        stats = write_shards(samples, output, write, problems, source=source)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad path, column, format, existing output
        raise UserError(str(e)) from e
    for split in stats['splits'].values():
        print(f'{split["directory"]}: {split["samples"]} samples in {split["shards"]} shards')
    print(f'written {stats["written"]}, skipped {stats["skipped"]}')
    for reason, entry in {**stats['skip_reasons'], **stats['source_problems']}.items():
        print(f'  {reason}: {entry["count"]} (e.g. {", ".join(map(str, entry["examples"][:3]))})')
    return 0 if stats['written'] else 1


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
    return _convert(lambda: (read_table(path, image_col, caption_col, image_root), None), output, write, path)


def folder(path: str, output: str, suffixes: list[str] = list(IMAGE_SUFFIXES),
           write: WriteOptions = WriteOptions()) -> int:
    """Image folder (recursive) with a sidecar caption per image (a/b/cat.jpg + a/b/cat.txt) -> WebDataset shards.

    Args:
        path: image folder, searched recursively.
        output: output directory for shards, sizes.json and stats.json.
        suffixes: image file suffixes.
        write: how shards are written.
    """
    return _convert(lambda: (read_folder(path, suffixes), None), output, write, path)


def coco(path: str, output: str, image_root: Optional[str] = None, write: WriteOptions = WriteOptions()) -> int:
    """COCO captions JSON -> WebDataset shards, one sample per image, every caption in json["captions"].

    Args:
        path: COCO captions JSON (images[] with id/file_name, annotations[] with image_id/caption).
        output: output directory for shards, sizes.json and stats.json.
        image_root: directory file_name is relative to (default: the JSON's).
        write: how shards are written.
    """
    return _convert(lambda: read_coco(path, image_root), output, write, path)


def main(args: Optional[list] = None) -> None:
    sys.exit(run({'table': table, 'folder': folder, 'coco': coco}, args, prog='python -m clip_hvt.data.convert'))


if __name__ == '__main__':
    main()
