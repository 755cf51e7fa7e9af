"""Converters to WebDataset shards: python -m clip_hvt.data.convert {table,folder,coco}."""
import csv
import faulthandler
import io
import json
import operator
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import clip_hvt.data.convert as convert
_write_chunk = convert._write_chunk  # before any test patches it
from clip_hvt.data.convert import SourceSample, WriteOptions, read_table, resized_size, write_shards
from conftest import assert_plain_members

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 96), (96, 64), (80, 80), (72, 90), (90, 66)]  # (w, h)


def run_convert(*args):
    """The command as run from a shell: its exit status (an error message is a string status)."""
    with pytest.raises(SystemExit) as exit_info:
        convert.main([*map(str, args)])
    return exit_info.value.code


def make_image(path, size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def read_shard_dir(directory):
    """{key: {ext: bytes}} over all tars in a directory, and sizes.json vs counted members."""
    samples, counted = {}, {}
    for tar_path in sorted(Path(directory).glob('*.tar')):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            for name in names:
                key, ext = name.split('.', 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(name).read()
            counted[tar_path.name] = len({n.split('.', 1)[0] for n in names})
    with open(Path(directory) / 'sizes.json') as f:
        assert json.load(f) == counted
    return samples


def decoded(sample):
    img = Image.open(io.BytesIO(sample['jpg']))
    img.load()
    return img


def write_table(path, rows, columns=('image', 'caption')):
    df = pd.DataFrame(rows, columns=list(columns))
    if path.suffix == '.parquet':
        df.to_parquet(path)
    elif path.suffix == '.tsv':
        df.to_csv(path, sep='\t', index=False, quoting=csv.QUOTE_NONE)
    else:
        df.to_csv(path, index=False)


def captioned_images(root, n, prefix='img'):
    rows = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        make_image(root / prefix / f'{i:03d}.png', size, seed=i)
        rows.append((f'{prefix}/{i:03d}.png', f'"{i}" café ☕ caption'))
    return rows


@pytest.mark.parametrize('suffix', ['.csv', '.tsv', '.parquet'])
def test_table_round_trip_keeps_captions_and_resizes_shortest_side(tmp_path, suffix):
    rows = captioned_images(tmp_path, 12)
    table = tmp_path / f'captions{suffix}'
    write_table(table, rows)
    out = tmp_path / 'out'
    assert run_convert('table', '--path', table, '--output', out, '--write.resize', 48, '--write.maxcount', 5,
                       '--write.workers', 2) == 0
    samples = read_shard_dir(out)
    assert sorted(p.name for p in out.glob('*.tar')) == ['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar']
    assert_plain_members(out / 'shard-000000.tar')
    assert len(samples) == len(rows)
    for sample in samples.values():
        meta = json.loads(sample['json'])
        image, caption = rows[meta['row']]
        assert meta['source'] == image
        assert sample['txt'].decode('utf-8') == caption
        w0, h0 = SIZES[meta['row'] % len(SIZES)]
        img = decoded(sample)
        assert img.mode == 'RGB' and min(img.size) == 48
        assert (meta['original_width'], meta['original_height']) == (w0, h0)
        assert img.size == resized_size((w0, h0), 48)
        assert abs(img.size[0] / img.size[1] - w0 / h0) < 1 / 48


def test_resize_never_upscales_unless_asked():
    assert resized_size((64, 96), 80) == (64, 96)
    assert resized_size((64, 96), 80, upscale=True) == (80, 120)
    assert resized_size((300, 200), 100) == (150, 100)
    assert resized_size((300, 200), 0) == (300, 200)


def test_upscale_option_enlarges_small_images(tmp_path):
    rows = captioned_images(tmp_path, 2)
    table = tmp_path / 't.csv'
    write_table(table, rows)
    for flags, short in (([], 64), (['--write.upscale', 'true'], 100), (['--write.resize', '0'], 64)):
        out = tmp_path / f'out{len(flags)}{short}'
        run_convert('table', '--path', table, '--output', out, '--write.resize', 100, *flags)
        assert {min(decoded(s).size) for s in read_shard_dir(out).values()} == {short}


def test_table_image_root_resolves_relative_paths(tmp_path):
    rows = captioned_images(tmp_path / 'images', 3)
    table = tmp_path / 'tables' / 't.csv'
    table.parent.mkdir()
    write_table(table, rows)
    samples = read_table(table, image_root=tmp_path / 'images')
    assert [s.image for s in samples] == [str(tmp_path / 'images' / r[0]) for r in rows]
    stats = write_shards(samples, tmp_path / 'out', WriteOptions(resize=0))
    assert stats['written'] == 3 and stats['skipped'] == 0


def test_missing_column_error_lists_existing_columns(tmp_path, capsys):
    table = tmp_path / 't.csv'
    write_table(table, [('a.png', 'x', 'y')], columns=('path', 'caption', 'url'))
    listed = "columns are: 'path', 'caption', 'url'"
    with pytest.raises(ValueError, match=r"'image' \(--image_col\) does not exist; " + listed):
        read_table(table)
    status = run_convert('table', '--path', table, '--output', tmp_path / 'out', '--image_col', 'path',
                         '--caption_col', 'text')
    assert "'text' (--caption_col) does not exist; " + listed in status and '\n' not in status


def test_stats_count_injected_problems(tmp_path):
    rows = captioned_images(tmp_path, 6)
    rows[1] = (rows[1][0], '   ')  # empty caption
    rows[4] = (rows[4][0], '')  # empty caption
    rows.append(('img/missing.png', 'no such file'))
    rows.append(('img/gone.jpg', 'no such file either'))
    (tmp_path / 'img' / 'broken.jpg').write_bytes(b'this is not a JPEG')
    rows.append(('img/broken.jpg', 'broken image'))
    truncated = make_image(tmp_path / 'img' / 'truncated.jpg', (80, 80), seed=99)
    truncated.write_bytes(truncated.read_bytes()[:400])
    rows.append(('img/truncated.jpg', 'truncated image'))
    table = tmp_path / 't.csv'
    write_table(table, rows)
    stats = write_shards(read_table(table), tmp_path / 'out', WriteOptions(resize=32, maxcount=3, workers=2))
    reasons = {r: e['count'] for r, e in stats['skip_reasons'].items()}
    assert reasons == {'empty_caption': 2, 'no_image': 2, 'undecodable_image': 2}
    assert stats['skip_reasons']['no_image']['examples'] == [
        str(tmp_path / 'img/missing.png'), str(tmp_path / 'img/gone.jpg')]
    assert stats['skip_reasons']['undecodable_image']['examples'] == [
        str(tmp_path / 'img/broken.jpg'), str(tmp_path / 'img/truncated.jpg')]
    assert stats['written'] == len(rows) - 6 == len(read_shard_dir(tmp_path / 'out'))
    with open(tmp_path / 'out' / 'stats.json') as f:
        assert json.load(f)['skip_reasons'] == stats['skip_reasons']


def test_images_above_max_pixels_are_skipped_as_the_reader_skips_them(tmp_path):
    rows = captioned_images(tmp_path, 3)  # 64x96, 96x64, 80x80: 6144 and 6400 pixels
    table = tmp_path / 't.csv'
    write_table(table, rows)
    stats = write_shards(read_table(table), tmp_path / 'out', WriteOptions(max_pixels=6200))
    assert stats['written'] == 2
    assert stats['skip_reasons'] == {'image_too_large': {'count': 1, 'examples': [str(tmp_path / rows[2][0])]}}


def test_split_is_deterministic_disjoint_and_independent_of_workers_and_order(tmp_path):
    rows = captioned_images(tmp_path, 40)
    table = tmp_path / 't.csv'
    write_table(table, rows)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f'out{workers}'
        write_shards(read_table(table), out, WriteOptions(resize=32, maxcount=7, workers=workers, val_fraction=0.25))
        outputs[workers] = out
    for split in ('train', 'val'):
        tars = sorted(p.name for p in (outputs[1] / split).glob('*.tar'))
        assert tars == sorted(p.name for p in (outputs[2] / split).glob('*.tar'))
        for name in tars:
            assert (outputs[1] / split / name).read_bytes() == (outputs[2] / split / name).read_bytes()

    sources = {split: {json.loads(s['json'])['source'] for s in read_shard_dir(outputs[1] / split).values()}
               for split in ('train', 'val')}
    assert sources['train'].isdisjoint(sources['val'])
    assert sources['train'] | sources['val'] == {r[0] for r in rows}
    assert 0 < len(sources['val']) < 20

    shuffled = tmp_path / 'shuffled.csv'
    write_table(shuffled, random.Random(0).sample(rows, len(rows)))
    write_shards(read_table(shuffled), tmp_path / 'out_shuffled', WriteOptions(resize=32, val_fraction=0.25))
    val = {json.loads(s['json'])['source'] for s in read_shard_dir(tmp_path / 'out_shuffled' / 'val').values()}
    assert val == sources['val']


def test_existing_output_is_refused_without_overwrite(tmp_path):
    rows = captioned_images(tmp_path, 5)
    table = tmp_path / 't.csv'
    write_table(table, rows)
    out = tmp_path / 'out'
    write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=2))
    assert len(list(out.glob('*.tar'))) == 3
    (out / 'notes.md').write_text('kept')
    with pytest.raises(FileExistsError, match='already holds shards.*; pass --write.overwrite true to replace'):
        write_shards(read_table(table), out, WriteOptions(resize=0))
    write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=10, overwrite=True))
    assert sorted(p.name for p in out.glob('*.tar')) == ['shard-000000.tar']
    assert len(read_shard_dir(out)) == 5
    assert (out / 'notes.md').read_text() == 'kept'


def test_an_overwrite_that_fails_half_way_leaves_the_old_set_as_it_was(tmp_path, monkeypatch):
    rows = captioned_images(tmp_path, 8)
    table = tmp_path / 't.csv'
    write_table(table, rows)
    out = tmp_path / 'out'
    write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=3))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert sorted(map(str, before)) == ['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar', 'sizes.json',
                                        'stats.json']
    table.write_text(table.read_text() + 'img/x.png,"unterminated caption\n')
    monkeypatch.setattr(convert, 'TABLE_CHUNK_ROWS', 3)  # the bad row comes after new shards were written
    with pytest.raises(pd.errors.ParserError):
        write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=2, val_fraction=0.3, overwrite=True))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    assert not list(out.rglob('.partial-*'))
    write_table(table, rows[:5])  # a complete overwrite with fewer shards: none of the old set is left
    write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=2, val_fraction=0.3, overwrite=True))
    assert not list(out.glob('shard-*.tar'))
    sizes = {split: json.loads((out / split / 'sizes.json').read_text()) for split in ('train', 'val')}
    assert sum(n for s in sizes.values() for n in s.values()) == 5
    assert sorted(p.name for p in out.rglob('*.tar')) == sorted(n for s in sizes.values() for n in s)


def test_folder_round_trip_with_sidecar_captions(tmp_path):
    src = tmp_path / 'src'
    captions = {}
    for i, rel in enumerate(['a/cat.png', 'a/b/dog.jpg', 'fish.webp', 'c/bird.png', 'c/nocap.png', 'c/latin1.png']):
        make_image(src / rel, SIZES[i % len(SIZES)], seed=i)
        if rel == 'c/latin1.png':
            (src / rel).with_suffix('.txt').write_bytes('caf\xe9'.encode('latin-1'))
        elif rel != 'c/nocap.png':
            captions[rel] = f'a photo of {Path(rel).stem}\nsecond line'
            (src / rel).with_suffix('.txt').write_text(captions[rel] + '\n', encoding='utf-8')
    (src / 'readme.md').write_text('not an image')
    out = tmp_path / 'out'
    assert run_convert('folder', '--path', src, '--output', out, '--write.resize', 40, '--write.workers', 2) == 0
    samples = read_shard_dir(out)
    got = {json.loads(s['json'])['source']: s['txt'].decode('utf-8') for s in samples.values()}
    assert got == captions
    assert all(min(decoded(s).size) == 40 for s in samples.values())
    stats = json.loads((out / 'stats.json').read_text())
    assert stats['skip_reasons'] == {
        'no_caption': {'count': 1, 'examples': [str(src / 'c/nocap.png')]},
        'caption_not_utf8': {'count': 1, 'examples': [str(src / 'c/latin1.png')]},
    }


def test_coco_keeps_all_captions_in_file_order(tmp_path):
    images, annotations, expected = [], [], {}
    for image_id in (7, 3, 11, 5):
        file_name = f'{image_id:012d}.jpg'
        make_image(tmp_path / 'train2017' / file_name, SIZES[image_id % len(SIZES)], seed=image_id)
        images.append({'id': image_id, 'file_name': file_name, 'width': 0, 'height': 0})
        n_captions = 0 if image_id == 11 else image_id % 4 + 1
        expected[image_id] = [f'image {image_id} caption {j}' for j in range(n_captions)]
    for j in range(5):  # interleave images so grouping, not adjacency, collects the captions
        for image_id, caps in expected.items():
            if j < len(caps):
                annotations.append({'id': len(annotations), 'image_id': image_id, 'caption': caps[j]})
    annotations.append({'id': 99, 'image_id': 404, 'caption': 'no such image'})
    annotations += [{'id': 100, 'image_id': 12, 'caption': 7}, {'id': 101, 'image_id': 12, 'caption': ['a']}]
    ann_path = tmp_path / 'annotations' / 'captions.json'
    ann_path.parent.mkdir()
    ann_path.write_text(json.dumps({'images': images, 'annotations': annotations}))

    out = tmp_path / 'out'
    assert run_convert('coco', '--path', ann_path, '--output', out, '--image_root', tmp_path / 'train2017',
                       '--write.resize', 32) == 0
    samples = read_shard_dir(out)
    got = {}
    for sample in samples.values():
        meta = json.loads(sample['json'])
        assert sample['txt'].decode('utf-8') == meta['captions'][0]
        got[meta['image_id']] = meta['captions']
    assert got == {k: v for k, v in expected.items() if v}
    stats = json.loads((out / 'stats.json').read_text())
    no_caption = str(tmp_path / 'train2017' / f'{11:012d}.jpg')
    assert stats['skip_reasons'] == {'no_caption': {'count': 1, 'examples': [no_caption]}}
    assert stats['source_problems'] == {  # counted, not written as "7" or "['a']"
        'annotation for unknown image_id': {'count': 1, 'examples': ['404']},
        'caption not a string': {'count': 2, 'examples': ['image_id 12: 7', 'image_id 12: ["a"]']}}


def test_console_module_runs(tmp_path):
    rows = captioned_images(tmp_path, 3)
    table = tmp_path / 't.tsv'
    write_table(table, rows)
    out = tmp_path / 'out'
    result = subprocess.run(
        [sys.executable, '-m', 'clip_hvt.data.convert', 'table', '--path', str(table), '--output', str(out)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert 'written 3, skipped 0' in result.stdout
    assert len(read_shard_dir(out)) == 3


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x96, shown turned by 90 degrees: 96x64
    pixels = np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    (tmp_path / 'img').mkdir()
    Image.fromarray(pixels).save(tmp_path / 'img' / 'turned.jpg', exif=exif)
    table = tmp_path / 't.csv'
    write_table(table, [('img/turned.jpg', 'turned')])
    write_shards(read_table(table), tmp_path / 'out', WriteOptions(resize=48))
    (sample,) = read_shard_dir(tmp_path / 'out').values()
    meta = json.loads(sample['json'])
    assert decoded(sample).size == (72, 48)
    assert (meta['original_width'], meta['original_height'], meta['width'], meta['height']) == (96, 64, 72, 48)


def written_files(out):
    """{relative path: bytes} of everything under `out`, stats.json without its directories."""
    files = {}
    for path in sorted(p for p in Path(out).rglob('*') if p.is_file()):
        data = path.read_bytes()
        if path.name == 'stats.json':
            stats = json.loads(data)
            for split in stats['splits'].values():
                split['directory'] = Path(split['directory']).relative_to(out).as_posix()
            data = json.dumps(stats).encode()
        files[path.relative_to(out).as_posix()] = data
    return files


@pytest.mark.parametrize('suffix', ['.csv', '.tsv', '.parquet'])
def test_table_read_in_small_chunks_writes_the_same_shards(tmp_path, monkeypatch, suffix):
    rows = captioned_images(tmp_path, 17)
    rows[2] = (rows[2][0], '  ')  # empty caption
    rows[9:9] = [(f'img/missing{i}.png', f'missing {i}') for i in range(7)]
    table = tmp_path / f't{suffix}'
    write_table(table, rows)
    opts = WriteOptions(resize=32, maxcount=4, val_fraction=0.3)
    whole = write_shards(read_table(table), tmp_path / 'whole', opts)
    assert whole['written'] == 16 and whole['skipped'] == 8

    chunks = []
    table_chunks = convert._table_chunks

    def spy(*args):
        for chunk in table_chunks(*args):
            chunks.append({len(values) for values in chunk.values()})
            yield chunk
    monkeypatch.setattr(convert, 'TABLE_CHUNK_ROWS', 3)
    monkeypatch.setattr(convert, '_table_chunks', spy)
    chunked = write_shards(read_table(table), tmp_path / 'chunked', opts)
    assert chunks and all(len(sizes) == 1 and sizes.pop() <= 3 for sizes in chunks)
    assert len(chunks) >= len(rows) // 3
    assert written_files(tmp_path / 'chunked') == written_files(tmp_path / 'whole')
    assert chunked['skip_reasons'] == whole['skip_reasons']
    # the progress bar's total: parquet has its row count in the metadata, a CSV must be read to count
    assert operator.length_hint(read_table(table), -1) == (len(rows) if suffix == '.parquet' else -1)


def test_write_shards_reads_samples_only_as_chunks_are_written(tmp_path, monkeypatch):
    read = []

    def samples():  # missing images: each is skipped without decoding anything
        for i in range(20):
            read.append(i)
            yield SourceSample(key=f'{i:09d}', image=str(tmp_path / f'{i}.png'), split_id=str(i), captions=('c',))

    read_at_chunk = []
    write_chunk = convert._write_chunk

    def spy(task):
        read_at_chunk.append(len(read))
        return write_chunk(task)
    monkeypatch.setattr(convert, '_write_chunk', spy)
    stats = write_shards(samples(), tmp_path / 'out', WriteOptions(maxcount=3, workers=1))
    assert stats['skip_reasons']['no_image']['count'] == 20
    assert read_at_chunk == [3, 6, 9, 12, 15, 18, 20]


def test_pool_is_fed_a_bounded_number_of_tasks_ahead(tmp_path):
    opts = WriteOptions(maxcount=2, workers=2)
    handed_out = []

    def tasks():
        for chunk in range(20):
            handed_out.append(chunk)
            samples = [SourceSample(key=f'{chunk:06d}{i}', image=str(tmp_path / f'{chunk}-{i}.png'), split_id='x',
                                    captions=('c',)) for i in range(opts.maxcount)]
            yield chunk, str(tmp_path), samples, opts

    ahead = convert.TASKS_AHEAD_PER_WORKER * opts.workers
    results = []
    for result in convert._run_chunks(tasks(), None, opts.workers):
        results.append(result)
        # the result waited for, and at most `ahead` tasks behind it
        assert len(handed_out) <= len(results) + ahead
    assert [r['chunk'] for r in results] == list(range(20))
    assert all(r['skipped']['no_image']['count'] == 2 for r in results)


def test_malformed_row_mid_stream_leaves_no_partial_shards(tmp_path, monkeypatch, capsys):
    rows = captioned_images(tmp_path, 8)
    table = tmp_path / 't.csv'
    write_table(table, rows)
    table.write_text(table.read_text() + 'img/x.png,"unterminated caption\n')
    monkeypatch.setattr(convert, 'TABLE_CHUNK_ROWS', 3)  # the bad row comes after shards were written
    out = tmp_path / 'out'
    with pytest.raises(pd.errors.ParserError, match='EOF inside string'):
        write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=2, val_fraction=0.3))
    assert not [p for p in out.rglob('*') if p.is_file() or p.name.startswith('.partial')]
    assert 'EOF inside string' in run_convert('table', '--path', table, '--output', out, '--write.maxcount', 2,
                                              '--write.workers', 2)
    assert not [p for p in out.rglob('*') if p.is_file() or p.name.startswith('.partial')]
    write_table(table, rows)  # fixed: no --overwrite needed
    assert write_shards(read_table(table), out, WriteOptions(resize=0, maxcount=2))['written'] == 8


def _killed_on_chunk_1(task):
    if task[0] == 1:  # the worker dies as the out-of-memory killer would end it
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_chunk(task)


def test_a_worker_killed_mid_conversion_ends_in_one_line_not_a_wait(tmp_path, monkeypatch):
    faulthandler.dump_traceback_later(300, exit=True)  # the bug this guards: a pool waiting forever
    try:
        rows = captioned_images(tmp_path, 8)
        table = tmp_path / 't.csv'
        write_table(table, rows)
        monkeypatch.setattr(convert, '_write_chunk', _killed_on_chunk_1)  # the forked workers inherit it
        message = run_convert('table', '--path', table, '--output', tmp_path / 'out', '--write.maxcount', 2,
                              '--write.workers', 2, '--write.resize', 0)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert message == ('python -m clip_hvt.data.convert table: error: a worker process died before finishing its '
                       'task (killed: out of memory? large images are decoded at full size); run again with fewer '
                       '--write.workers')
    assert not [p for p in (tmp_path / 'out').rglob('*') if p.is_file() or p.name.startswith('.partial')]
