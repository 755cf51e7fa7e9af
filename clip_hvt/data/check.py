"""Check WebDataset shards the way the reader will see them, and (re)write sizes.json.

Members are grouped into samples as webdataset does (regular files, key = name up to the first
dot of the basename, consecutive members with one key form a sample, `__*__` members skipped).
Every image is fully decoded under PIL's decompression-bomb limit; nothing is ever unpickled:
members with pickle-like suffixes are only listed.

sizes.json counts every sample that has an image member, decodable or not: that is the number
of samples the reader will attempt per epoch (it skips and counts bad ones at decode time), so
the epoch length derived from sizes.json matches what the loader iterates. Shards written by
the converters hold only usable samples, so there the two counts agree.
"""
import json
import multiprocessing
import re
import tarfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from .convert import SIZES_FILE, SkipSample, decode_image, pil_limits

__all__ = ['Problem', 'ShardReport', 'check_shard', 'check_shards', 'find_shards', 'sizes_problems',
           'write_sizes', 'summarize']

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')  # the reader's image keys
CAPTION_EXT = 'txt'
PICKLE_SUFFIXES = ('pyd', 'pickle', 'pkl', 'pth', 'pt')
_SKIP_META = re.compile(r'__[^/]*__($|/)')  # webdataset's tar_file_iterator skip_meta


@dataclass
class Problem:
    reason: str
    shard: str
    where: str  # sample key or member name
    detail: str = ''


@dataclass
class ShardReport:
    shard: str
    samples: int = 0  # samples as webdataset yields them
    with_image: int = 0  # samples holding an image member: what sizes.json counts
    usable: int = 0  # decodable image and a non-empty UTF-8 caption
    problems: list = field(default_factory=list)


class _Truncated(Exception):
    pass


def _members(tar: tarfile.TarFile) -> Iterator[tuple]:
    """(name, bytes) of regular members; _Truncated when the archive ends inside a member."""
    try:
        for info in tar:
            if info.isreg() and not _SKIP_META.match(info.name):
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise _Truncated(f'{info.name}: {len(data)} of {info.size} bytes')
                yield info.name, data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _Truncated(f'{type(e).__name__}: {e}') from e


def _check_sample(key: str, files: dict) -> list:
    """(reason, detail) for each fault of one sample; empty when usable."""
    faults = []
    images = [ext for ext in IMAGE_EXTS if ext in files]
    if not images:
        faults.append(('no image', f'members: {sorted(files)}'))
    for ext in images:
        try:
            decode_image(files[ext])
        except SkipSample as e:
            faults.append((e.reason, f'{ext}: {e.detail}'))
    if CAPTION_EXT not in files:
        faults.append(('missing caption', f'members: {sorted(files)}'))
    else:
        try:
            if not files[CAPTION_EXT].decode('utf-8').strip():
                faults.append(('empty caption', ''))
        except UnicodeDecodeError as e:
            faults.append(('non-UTF-8 caption', str(e)))
    if 'json' in files:
        try:
            meta = json.loads(files['json'])
            if not isinstance(meta, dict):
                faults.append(('bad json', f'a {type(meta).__name__}, not a dict'))
        except ValueError as e:
            faults.append(('bad json', str(e)))
    return faults


def check_shard(path, max_pixels: Optional[int] = Image.MAX_IMAGE_PIXELS) -> ShardReport:
    """Read one shard member by member, group samples and check each."""
    report = ShardReport(shard=str(path))

    def problem(reason, where, detail=''):
        report.problems.append(Problem(reason, report.shard, where, detail))

    def finish(key, files):
        report.samples += 1
        report.with_image += any(ext in files for ext in IMAGE_EXTS)
        faults = _check_sample(key, files)
        report.usable += not faults
        for reason, detail in faults:
            problem(reason, key, detail)

    try:
        tar = tarfile.open(path, 'r:')
    except (tarfile.TarError, OSError) as e:
        problem('unreadable tar', Path(path).name, f'{type(e).__name__}: {e}')
        return report
    seen, key, files = set(), None, {}
    with tar, pil_limits(max_pixels):
        try:
            for name, data in _members(tar):
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue  # no extension: the reader ignores it
                suffix = suffix.lower()
                if suffix.rsplit('.', 1)[-1] in PICKLE_SUFFIXES:
                    problem('pickle-like member', name)
                if prefix != key:
                    if key is not None:
                        finish(key, files)
                    if prefix in seen:
                        problem('duplicate key', prefix, 'appears again after other samples')
                    seen.add(prefix)
                    key, files = prefix, {}
                if suffix in files:
                    problem('duplicate member', name)
                files[suffix] = data
        except _Truncated as e:
            problem('truncated tar', Path(path).name, f'{e} after {report.samples} samples')
        if key is not None:
            finish(key, files)
    if report.samples == 0 and not report.problems:
        problem('empty shard', Path(path).name)
    return report


def find_shards(paths: Sequence) -> dict:
    """{directory: [tar paths]} for directories (searched recursively) and .tar files."""
    found = defaultdict(dict)
    for path in map(Path, paths):
        if path.is_dir():
            tars = sorted(path.rglob('*.tar'))
            if not tars:
                raise FileNotFoundError(f'no .tar files under {path}')
        elif path.is_file():
            tars = [path]
        else:
            raise FileNotFoundError(f'no such shard file or directory: {path}')
        for tar in tars:
            found[tar.parent][tar] = None  # a dict keeps order and drops a shard given twice
    return {directory: list(tars) for directory, tars in found.items()}


def _check_one(args) -> ShardReport:
    return check_shard(*args)


def check_shards(tars: Sequence, workers: int = 1, max_pixels: Optional[int] = Image.MAX_IMAGE_PIXELS) -> list:
    """ShardReports in the order of `tars`, checked by `workers` processes."""
    tasks = [(str(t), max_pixels) for t in tars]
    if workers <= 1 or len(tasks) <= 1:
        return [_check_one(task) for task in tqdm(tasks, unit='shard', desc='checking shards')]
    # the pool forks before tqdm starts its monitor thread: forking a threaded process can deadlock
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        results = pool.imap(_check_one, tasks)
        return list(tqdm(results, total=len(tasks), unit='shard', desc='checking shards'))


def _read_sizes(directory: Path) -> Optional[dict]:
    try:
        with open(directory / SIZES_FILE) as f:
            sizes = json.load(f)
        return sizes if isinstance(sizes, dict) else None
    except (OSError, ValueError):
        return None


def sizes_problems(directory, reports: Sequence) -> list:
    """Disagreements between sizes.json in `directory` and the checked shards in it."""
    directory = Path(directory)
    where = str(directory / SIZES_FILE)
    if not (directory / SIZES_FILE).exists():
        if any(directory.glob('*_stats.json')):
            return []  # img2dataset layout: the reader counts from its stats files
        return [Problem('sizes.json missing', where, directory.name, 'run with --write-sizes')]
    sizes = _read_sizes(directory)
    if sizes is None:
        return [Problem('sizes.json unreadable', where, SIZES_FILE, 'not a JSON object; run with --write-sizes')]
    problems = []
    for report in reports:
        name = Path(report.shard).name
        if sizes.get(name) != report.with_image:
            problems.append(Problem('sizes.json mismatch', where, name,
                                    f'says {sizes.get(name)}, shard has {report.with_image} samples with an image'))
    for name in sorted(sizes):
        if not (directory / name).exists():
            problems.append(Problem('sizes.json mismatch', where, name, 'listed shard does not exist'))
    return problems


def write_sizes(directory, reports: Sequence) -> dict:
    """Write sizes.json for the checked shards, keeping entries of other shards that still exist."""
    directory = Path(directory)
    sizes = {k: v for k, v in (_read_sizes(directory) or {}).items() if (directory / k).exists()}
    sizes.update({Path(r.shard).name: r.with_image for r in reports})
    sizes = dict(sorted(sizes.items()))
    with open(directory / SIZES_FILE, 'w') as f:
        json.dump(sizes, f, indent=1)
    return sizes


def summarize(reports: Sequence, problems: Sequence, max_list: int = 20) -> str:
    """Totals, then problems grouped by reason with up to `max_list` entries each (0: all)."""
    lines = [
        f'{len(reports)} shards, {sum(r.samples for r in reports)} samples, '
        f'{sum(r.with_image for r in reports)} with an image, {sum(r.usable for r in reports)} usable'
    ]
    by_reason = defaultdict(list)
    for p in problems:
        by_reason[p.reason].append(p)
    for reason in sorted(by_reason):
        found = by_reason[reason]
        lines.append(f'{reason}: {len(found)}')
        shown = found if max_list == 0 else found[:max_list]
        lines.extend(f'  {p.shard}: {p.where}' + (f' ({p.detail})' if p.detail else '') for p in shown)
        if len(shown) < len(found):
            lines.append(f'  ... {len(found) - len(shown)} more')
    lines.append('clean' if not problems else f'{len(problems)} problems')
    return '\n'.join(lines)


def report_dict(reports: Sequence, problems: Sequence) -> dict:
    """Everything found, for --report."""
    return {
        'shards': [{k: v for k, v in asdict(r).items() if k != 'problems'} for r in reports],
        'problems': [asdict(p) for p in problems],
    }
