"""Check WebDataset shards with the reader's own rules, and (re)write sizes.json.

Every shard is read by ``sample.read_tar`` and every sample decoded by ``sample.decode_sample`` (images in
full, same pixel limit): a fault is reported under the ``SKIP_REASONS`` name the loader counts, so this
reports what training will skip; nothing is unpickled. Shards whose samples carry ``cls`` and no caption
are checked as zero-shot shards. ``FINDINGS`` are shard-level faults training would not notice.
"""
from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..cli import UserError, run
from .sample import MAX_IMAGE_PIXELS, WORKER_DIED, SkipSample, captions, decode_sample, label, read_tar
from .shards import SIZES_FILE, _read_json, shard_sizes, write_sizes

FINDINGS = {
    "count_mismatch": "the shard holds another number of readable samples than sizes.json / _stats.json says",
    "sizes_missing": "no sizes.json and no img2dataset _stats.json beside the shards (training needs a count)",
    "sizes_unreadable": "sizes.json is not a JSON object",
    "duplicate_key": "a key appears again after other samples: the reader yields two samples with one key",
    "bad_json": "the json member is not a JSON object",
    "empty_shard": "the shard holds no sample",
}


@dataclass
class Problem:
    reason: str  # a key of SKIP_REASONS or FINDINGS
    shard: str
    where: str  # sample key or shard name
    detail: str = ""


@dataclass
class ShardReport:
    shard: str
    task: str = "retrieval"  # or "classification": cls labels, no captions
    samples: int = 0  # complete samples as the reader yields them: what sizes.json counts
    usable: int = 0  # samples training would use
    problems: list = field(default_factory=list)


def check_shard(path, caption_key: str = "txt", max_pixels: int = MAX_IMAGE_PIXELS) -> ShardReport:
    """Read one shard as the loader does and check each sample."""
    report = ShardReport(shard=str(path))

    def problem(reason, where, detail=""):
        report.problems.append(Problem(reason, report.shard, where, detail))

    seen = set()
    try:
        for sample in read_tar(str(path)):
            key = sample["__key__"]
            if report.samples == 0 and "cls" in sample and caption_key.split(".", 1)[0] not in sample:
                report.task = "classification"
            report.samples += 1
            if key in seen:
                problem("duplicate_key", key, "appears again after other samples")
            seen.add(key)
            target = partial(captions, key=caption_key) if report.task == "retrieval" else label
            try:
                decode_sample(sample, target, max_pixels)
                report.usable += 1
            except SkipSample as skip:
                problem(skip.reason, key, skip.detail)
            if "json" in sample:
                try:
                    if not isinstance(json.loads(sample["json"]), dict):
                        problem("bad_json", key, "not an object")
                except ValueError as exn:
                    problem("bad_json", key, str(exn))
    except SkipSample as skip:
        problem(skip.reason, Path(path).name, f"{skip.detail} after {report.samples} samples")
    if report.samples == 0 and not report.problems:
        problem("empty_shard", Path(path).name)
    return report


def find_shards(paths: Sequence) -> dict:
    """{directory: [tar paths]} for directories (searched recursively) and .tar files."""
    found = defaultdict(dict)
    for path in map(Path, paths):
        if path.is_dir():
            tars = sorted(path.rglob("*.tar"))
            if not tars:
                raise UserError(f"no .tar files under {path}")
        elif path.is_file():
            tars = [path]
        else:
            raise UserError(f"no such shard file or directory: {path}")
        for tar in tars:
            found[tar.parent][tar] = None  # a dict keeps order and drops a shard given twice
    return {directory: list(tars) for directory, tars in found.items()}


def check_sizes(directory: Path, reports: Sequence, write: bool = False) -> list:
    """Shards whose sample count differs from the count training reads (``shards.shard_sizes``: sizes.json,
    else img2dataset's _stats.json). ``write`` then rewrites sizes.json from ``reports``, keeping entries of
    other shards that still exist: what the write repairs (a missing count, a listed shard that is gone) is
    no problem then, but a count that differs from what the writer recorded is still one."""
    path = directory / SIZES_FILE
    sizes, why = _read_json(str(path))  # training's reader of the file
    unreadable = path.exists() and sizes is None
    problems = [Problem("sizes_unreadable", str(path), SIZES_FILE, f"{why}; run with --write_sizes true")
                ] if unreadable and not write else []
    # every shard's count at once: one read of sizes.json for the directory, not one per shard
    recorded = {} if unreadable else shard_sizes([r.shard for r in reports], missing_ok=True)[0]
    for report in reports:
        expected = recorded.get(report.shard)
        if expected is None and not write:
            problems.append(Problem("sizes_missing", str(path), Path(report.shard).name, "run with --write_sizes true"))
        elif expected is not None and expected != report.samples:
            problems.append(Problem("count_mismatch", report.shard, Path(report.shard).name, f"sizes.json / "
                                    f"_stats.json says {expected}, the shard holds {report.samples} readable samples"))
    for name in sorted(sizes if isinstance(sizes, dict) and not write else {}):
        if not (directory / name).exists():
            problems.append(Problem("count_mismatch", str(path), name, "listed shard does not exist"))
    if write:
        sizes = {k: v for k, v in (sizes if isinstance(sizes, dict) else {}).items() if (directory / k).exists()}
        sizes.update({Path(r.shard).name: r.samples for r in reports})
        write_sizes(path, sizes)
        print(f"wrote {path}")
    return problems


def summarize(reports: Sequence, problems: Sequence, max_list: int = 20) -> str:
    """Totals, then problems grouped by reason with up to ``max_list`` entries each (0: all)."""
    zeroshot = sum(r.task == "classification" for r in reports)
    lines = [f"{len(reports)} shards ({zeroshot} zero-shot), {sum(r.samples for r in reports)} samples, "
             f"{sum(r.usable for r in reports)} usable"]
    for reason, found in itertools.groupby(sorted(problems, key=attrgetter("reason")), key=attrgetter("reason")):
        found = list(found)
        lines.append(f"{reason}: {len(found)}")
        shown = found[:max_list or None]
        lines.extend(f"  {p.shard}: {p.where}" + (f" ({p.detail})" if p.detail else "") for p in shown)
        if len(shown) < len(found):
            lines.append(f"  ... {len(found) - len(shown)} more")
    lines.append("clean" if not problems else f"{len(problems)} problems")
    return "\n".join(lines)


def check(paths: str | list[str], workers: int = 1, caption_key: str = "txt", max_image_pixels: int = MAX_IMAGE_PIXELS,
          write_sizes: bool = False, max_list: int = 20, report: str | None = None) -> int:
    """Check WebDataset shards the way the training reader sees them; exit status 1 when problems are found.

    Args:
        paths: a shard directory (searched recursively) or .tar file, or a list of them (``[a, b]``).
        workers: processes checking shards in parallel.
        caption_key: ``txt`` or ``json.<field>``, as ``data.caption_key`` in training.
        max_image_pixels: larger images are skipped, as ``data.max_image_pixels`` in training.
        write_sizes: (re)write sizes.json in each directory from the samples found.
        max_list: problems listed per reason (0: all).
        report: write every count and problem to this JSON file.
    """
    if workers < 1 or max_image_pixels < 1 or max_list < 0:
        raise UserError("--workers and --max_image_pixels must be >= 1, --max_list >= 0")
    groups = find_shards([paths] if isinstance(paths, str) else paths)
    tars = [t for group in groups.values() for t in group]
    check_one = partial(check_shard, caption_key=caption_key, max_pixels=max_image_pixels)
    if workers == 1 or len(tars) == 1:
        found = [check_one(t) for t in tqdm(tars, unit="shard", desc="checking shards")]
    else:  # concurrent.futures: a worker killed (for memory) breaks the executor, where a Pool would wait forever
        try:
            with ProcessPoolExecutor(min(workers, len(tars))) as pool:
                # map submits every task, starting the workers, before tqdm starts its monitor thread: forking a
                # threaded process can deadlock
                found = list(tqdm(pool.map(check_one, tars), total=len(tars), unit="shard", desc="checking shards"))
        except BrokenProcessPool:
            raise UserError(WORKER_DIED.format(option="--workers")) from None
    reports = dict(zip(tars, found))
    problems = [p for r in reports.values() for p in r.problems]
    for directory, group in groups.items():
        problems += check_sizes(directory, [reports[t] for t in group], write_sizes)
    print(summarize(list(reports.values()), problems, max_list))
    if report:
        Path(report).write_text(json.dumps({
            "shards": [{k: v for k, v in asdict(r).items() if k != "problems"} for r in reports.values()],
            "problems": [asdict(p) for p in problems]}, indent=1))
    return 1 if problems else 0


def main(args: list[str] | None = None) -> None:
    sys.exit(run(check, args, prog="python -m clip_hvt.data.check"))


if __name__ == "__main__":
    main()
