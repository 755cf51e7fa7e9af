"""Shard checker: data_scripts/check_shards.py over clip_hvt.data.check."""
import importlib.util
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clip_hvt.data.check import check_shard
from clip_hvt.data.convert import WriteOptions, read_folder, write_shards

REPO = Path(__file__).resolve().parents[1]


def check_main(argv):
    spec = importlib.util.spec_from_file_location('check_shards', REPO / 'data_scripts' / 'check_shards.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def jpeg_bytes(seed, size=(64, 80)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


class _TouchOnLoad:
    """Unpickling this creates a file: proof that the checker never loads a pickle member."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def good_sample(i):
    return {'__key__': f'{i:09d}', 'jpg': jpeg_bytes(i), 'txt': f'caption {i}'.encode(), 'json': b'{"row": 1}'}


def write_set(directory, samples, shard_size=4, sizes=True):
    """Shards of `shard_size` samples written as given (raw bytes, no encoding) plus sizes.json."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for start in range(0, len(samples), shard_size):
        name = f'train-{start // shard_size:06d}.tar'
        with wds.TarWriter(str(directory / name), encoder=False) as writer:
            for sample in samples[start:start + shard_size]:
                writer.write(sample)
        counts[name] = len(samples[start:start + shard_size])
    if sizes:
        (directory / 'sizes.json').write_text(json.dumps(counts))
    return directory


def reasons(capsys_out):
    return {line.split(':')[0] for line in capsys_out.splitlines() if line and not line.startswith((' ', 'wrote'))}


def test_clean_set_exits_0(tmp_path, capsys):
    shards = write_set(tmp_path / 'shards', [good_sample(i) for i in range(10)])
    assert check_main([str(shards), '--workers', '2']) == 0
    out = capsys.readouterr().out
    assert '3 shards, 10 samples, 10 with an image, 10 usable' in out and out.rstrip().endswith('clean')


def test_converter_output_is_clean(tmp_path):
    for i in range(6):
        path = tmp_path / 'src' / f'{i}.png'
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((70, 90, 3), i * 40, dtype=np.uint8)).save(path)
        path.with_suffix('.txt').write_text(f'grey level {i}')
    write_shards(read_folder(tmp_path / 'src'), tmp_path / 'out', WriteOptions(resize=32, val_fraction=0.3, maxcount=2))
    assert check_main([str(tmp_path / 'out'), '--workers', '1']) == 0


def _truncate(data):
    return data[:len(data) // 2]


FAULTS = {
    # name: (how sample 5 of 8 is broken, the reason expected)
    'truncated jpeg': (lambda s: {**s, 'jpg': _truncate(s['jpg'])}, 'undecodable image'),
    'non-image bytes': (lambda s: {**s, 'jpg': b'<html>404 not found</html>'}, 'undecodable image'),
    'empty caption': (lambda s: {**s, 'txt': b' \n '}, 'empty caption'),
    'non-utf8 caption': (lambda s: {**s, 'txt': 'caf\xe9'.encode('latin-1')}, 'non-UTF-8 caption'),
    'no caption member': (lambda s: {k: v for k, v in s.items() if k != 'txt'}, 'missing caption'),
    'json list': (lambda s: {**s, 'json': b'[1, 2]'}, 'bad json'),
}


@pytest.mark.parametrize('fault', sorted(FAULTS))
def test_injected_sample_fault_is_found_with_its_reason(tmp_path, capsys, fault):
    corrupt, reason = FAULTS[fault]
    samples = [good_sample(i) for i in range(8)]
    samples[5] = corrupt(samples[5])
    shards = write_set(tmp_path / 'shards', samples)
    assert check_main([str(shards), '--workers', '1']) == 1
    out = capsys.readouterr().out
    assert reasons(out) - {'2 shards, 8 samples, 8 with an image, 7 usable', '1 problems'} == {reason}
    assert f'train-000001.tar: {5:09d}' in out


def test_pickle_member_is_listed_never_loaded(tmp_path, capsys):
    marker = tmp_path / 'unpickled'
    samples = [good_sample(i) for i in range(4)]
    # a pickle built on purpose: loading it would create `marker`
    samples[2] = {**samples[2], 'pyd': pickle.dumps(_TouchOnLoad(marker))}
    shards = write_set(tmp_path / 'shards', samples)
    assert check_main([str(shards), '--workers', '1']) == 1
    out = capsys.readouterr().out
    assert f'pickle-like member: 1\n  {shards / "train-000000.tar"}: {2:09d}.pyd' in out
    assert not marker.exists()


def test_truncated_tar_is_found(tmp_path, capsys):
    shards = write_set(tmp_path / 'shards', [good_sample(i) for i in range(8)])
    tar = shards / 'train-000001.tar'
    tar.write_bytes(_truncate(tar.read_bytes()))
    assert check_main([str(shards), '--workers', '2']) == 1
    out = capsys.readouterr().out
    assert 'truncated tar: 1\n  ' + f'{tar}: train-000001.tar (' in out
    assert 'sizes.json mismatch: 1' in out  # sizes.json still promises 4 samples


def test_images_above_max_pixels_fail_as_decompression_bombs(tmp_path, capsys):
    shards = write_set(tmp_path / 'shards', [good_sample(i) for i in range(2)])  # 64x80 = 5120 pixels
    assert check_main([str(shards), '--max-pixels', '5000', '--workers', '1']) == 1
    assert 'decompression bomb: 2' in capsys.readouterr().out
    assert check_main([str(shards), '--max-pixels', '6000', '--workers', '1']) == 0


def test_duplicate_key_is_found(tmp_path):
    samples = [good_sample(i) for i in range(3)] + [good_sample(0)]
    write_set(tmp_path / 'shards', samples)
    report = check_shard(tmp_path / 'shards' / 'train-000000.tar')
    assert [(p.reason, p.where) for p in report.problems] == [('duplicate key', f'{0:09d}')]


def test_write_sizes_counts_samples_with_an_image(tmp_path, capsys):
    samples = [good_sample(i) for i in range(6)]
    samples[1] = {**samples[1], 'jpg': b'broken'}  # attempted by the reader: counted
    samples[4] = {k: v for k, v in samples[4].items() if k != 'jpg'}  # nothing to attempt: not counted
    shards = write_set(tmp_path / 'shards', samples, shard_size=3, sizes=False)
    assert check_main([str(shards), '--workers', '1']) == 1
    assert 'sizes.json missing: 1' in capsys.readouterr().out
    assert check_main([str(shards), '--workers', '1', '--write-sizes', '--report', str(tmp_path / 'r.json')]) == 1
    assert json.loads((shards / 'sizes.json').read_text()) == {'train-000000.tar': 3, 'train-000001.tar': 2}
    report = json.loads((tmp_path / 'r.json').read_text())
    assert [(s['samples'], s['with_image'], s['usable']) for s in report['shards']] == [(3, 3, 2), (3, 2, 2)]
    assert sorted(p['reason'] for p in report['problems']) == ['no image', 'undecodable image']


def test_usage_errors_exit_2(tmp_path):
    for argv in ([str(tmp_path / 'nowhere')], [str(tmp_path)], [str(tmp_path), '--workers', '0']):
        with pytest.raises(SystemExit) as exit_info:
            check_main(argv)
        assert exit_info.value.code == 2


def test_cli_exit_status_from_a_checkout(tmp_path):
    samples = [good_sample(i) for i in range(3)]
    samples[0] = {**samples[0], 'txt': b''}
    shards = write_set(tmp_path / 'shards', samples)
    result = subprocess.run([sys.executable, str(REPO / 'data_scripts' / 'check_shards.py'), str(shards)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert 'empty caption: 1' in result.stdout
