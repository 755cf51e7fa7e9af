"""The shard checker reports what the training reader will skip, under the same names and counts."""
import faulthandler
import json
import os
import pickle
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_hvt.data import check
from clip_hvt.data.check import check_shard
from clip_hvt.data.convert import WriteOptions, read_folder, write_shards
from clip_hvt.data.datamodule import WebDataModule
from clip_hvt.data.sample import SKIP_REASONS
from tests.conftest import TINY_MODEL_CFG, jpeg, write_tar

REPO = Path(__file__).resolve().parents[1]


def run_check(*args):
    with pytest.raises(SystemExit) as exit_info:
        check.main([*map(str, args)])
    return exit_info.value.code


def good(i):
    return {"jpg": jpeg(i, (40, 32)), "txt": f"caption {i}".encode(), "json": b'{"row": 1}'}


def write_set(directory, entries, shard_size=4, sizes=True):
    """Shards of ``shard_size`` entries ``(key, members)`` plus sizes.json."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for start in range(0, len(entries), shard_size):
        name = f"train-{start // shard_size:06d}.tar"
        write_tar(directory / name, entries[start:start + shard_size])
        counts[name] = len(entries[start:start + shard_size])
    if sizes:
        (directory / "sizes.json").write_text(json.dumps(counts))
    return directory


def reasons(out):
    return {line.split(":")[0] for line in out.splitlines()[1:-1] if line and not line.startswith((" ", "wrote"))}


class _TouchOnLoad:
    """Unpickling this creates a file: proof that the checker never loads a pickle member."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


# One sample of each fault kind the reader skips, with the reason it is skipped for.
FAULTS = {
    "truncated jpeg": ({"jpg": jpeg(1)[:200], "txt": b"cut image"}, "undecodable_image"),
    "too many pixels": ({"jpg": jpeg(2, 64), "txt": b"huge image"}, "image_too_large"),
    "no image": ({"txt": b"a caption alone"}, "no_image"),
    "missing caption": ({"jpg": jpeg(3)}, "no_caption"),
    "empty caption": ({"jpg": jpeg(4), "txt": b"  \n"}, "empty_caption"),
    "non-UTF-8 caption": ({"jpg": jpeg(5), "txt": b"caf\xe9 cr\xe8me"}, "caption_not_utf8"),
    "pickle member": ({"jpg": jpeg(6), "txt": b"pickled", "pyd": pickle.dumps({"x": 1})}, "pickle_member"),
}
MAX_PIXELS = 2000  # the 32x32 images pass, the 64x64 one does not


def test_checker_and_training_loader_report_the_same_reasons_and_counts(tmp_path):
    entries = []
    for i, (members, _) in enumerate(FAULTS.values()):
        entries += [(f"good{i}", {"jpg": jpeg(10 + i), "txt": b"fine"}), (f"bad{i}", members)]
    entries += [("good_last", {"jpg": jpeg(30), "txt": b"fine"}), ("cut", {"jpg": jpeg(31), "txt": b"lost"})]
    write_tar(tmp_path / "faults.tar", entries, cut_in=len(entries) - 1)  # and a shard cut inside its last sample
    expected = {**Counter(reason for _, reason in FAULTS.values()), "corrupt_shard": 1}

    report = check_shard(tmp_path / "faults.tar", max_pixels=MAX_PIXELS)
    checked = Counter(p.reason for p in report.problems)

    dm = WebDataModule(train_shards=str(tmp_path / "faults.tar"), model_cfg=TINY_MODEL_CFG, batch_size=2,
                       num_workers=0, sample_shuffle=0, max_image_pixels=MAX_PIXELS,
                       train_num_samples=len(FAULTS) + 1)  # one pass over the shard
    dm.setup("fit")
    total = sum(batch["skipped"] for batch in dm.train_dataloader())
    loaded = {r: n for r, n in zip(SKIP_REASONS, total.tolist()) if n}

    assert checked == loaded == expected
    assert set(checked) <= set(SKIP_REASONS)
    assert report.samples == len(entries) - 1 and report.usable == len(FAULTS) + 1


def test_shard_cut_at_a_member_boundary_is_a_count_mismatch(tmp_path, capsys):
    shards = write_set(tmp_path / "shards", [(f"{i:04d}", good(i)) for i in range(10)], shard_size=10)
    tar = shards / "train-000000.tar"
    offsets = write_tar(tar, [(f"{i:04d}", good(i)) for i in range(10)])
    tar.write_bytes(tar.read_bytes()[:offsets["0005.jpg"]])  # the first member of sample 5 starts here
    assert run_check("--paths", shards) == 1
    out = capsys.readouterr().out
    assert "count_mismatch: 1" in out and "_stats.json says 10, the shard holds 4 readable samples" in out
    assert "corrupt_shard: 1" in out and "no_caption" not in out


def test_img2dataset_stats_are_the_count_compared(tmp_path, capsys):
    write_tar(tmp_path / "00000.tar", [(f"{i:04d}", good(i)) for i in range(3)])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    assert run_check("--paths", tmp_path) == 1
    assert "_stats.json says 5, the shard holds 3 readable samples" in capsys.readouterr().out
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    assert run_check("--paths", tmp_path) == 0


def test_zero_shot_set_is_valid_and_bad_labels_are_found(tmp_path, capsys):
    entries = [(f"{i:04d}", {"jpg": jpeg(i), "cls": str(i % 3).encode()}) for i in range(6)]
    shards = write_set(tmp_path / "zs", entries, shard_size=3)
    assert run_check("--paths", shards) == 0
    assert "2 shards (2 zero-shot), 6 samples, 6 usable" in capsys.readouterr().out
    entries[4] = ("0004", {"jpg": jpeg(4), "cls": b"four"})
    write_set(tmp_path / "zs", entries, shard_size=3)
    assert run_check("--paths", shards) == 1
    assert reasons(capsys.readouterr().out) == {"no_label"}


def test_clean_set_and_converter_output_exit_0(tmp_path, capsys):
    shards = write_set(tmp_path / "shards", [(f"{i:04d}", good(i)) for i in range(10)])
    assert run_check("--paths", shards, "--workers", 2) == 0
    assert capsys.readouterr().out.rstrip().endswith("clean")
    for i in range(6):
        path = tmp_path / "src" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((70, 90, 3), i * 40, dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(f"grey level {i}")
    write_shards(read_folder(tmp_path / "src"), tmp_path / "out", WriteOptions(resize=32, val_fraction=0.3, maxcount=2))
    assert run_check("--paths", tmp_path / "out") == 0


def test_pickle_member_is_listed_never_loaded(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    entries = [(f"{i:04d}", good(i)) for i in range(4)]
    entries[2] = ("0002", {**good(2), "pyd": pickle.dumps(_TouchOnLoad(marker))})
    shards = write_set(tmp_path / "shards", entries)
    assert run_check("--paths", shards) == 1
    assert f"pickle_member: 1\n  {shards / 'train-000000.tar'}: 0002 (pyd)" in capsys.readouterr().out
    assert not marker.exists()


def test_findings_beyond_skips_duplicate_key_and_bad_json(tmp_path):
    entries = [(f"{i:04d}", good(i)) for i in range(3)] + [("0000", {**good(0), "json": b"[1, 2]"})]
    write_set(tmp_path / "shards", entries)
    report = check_shard(tmp_path / "shards" / "train-000000.tar")
    assert [(p.reason, p.where) for p in report.problems] == [("duplicate_key", "0000"), ("bad_json", "0000")]


def test_write_sizes_counts_the_samples_the_reader_yields(tmp_path, capsys):
    entries = [(f"{i:04d}", good(i)) for i in range(6)]
    entries[1] = ("0001", {**good(1), "jpg": b"broken"})
    shards = write_set(tmp_path / "shards", entries, shard_size=3, sizes=False)
    assert run_check("--paths", shards) == 1
    assert "sizes_missing: 2" in capsys.readouterr().out
    assert run_check("--paths", shards, "--write_sizes", "true", "--report", tmp_path / "r.json") == 1
    assert json.loads((shards / "sizes.json").read_text()) == {"train-000000.tar": 3, "train-000001.tar": 3}
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(s["samples"], s["usable"]) for s in report["shards"]] == [(3, 2), (3, 3)]
    assert [p["reason"] for p in report["problems"]] == ["undecodable_image"]


def test_sizes_json_is_read_once_per_directory_and_a_broken_one_is_named(tmp_path, capsys, monkeypatch):
    shards = write_set(tmp_path / "shards", [(f"{i:04d}", good(i)) for i in range(8)], shard_size=2)
    reads = []
    read_json = check._read_json
    monkeypatch.setattr("clip_hvt.data.shards._read_json", lambda url: reads.append(url) or read_json(url))
    monkeypatch.setattr(check, "_read_json", lambda url: reads.append(url) or read_json(url))
    assert run_check("--paths", shards) == 0
    assert reads == [str(shards / "sizes.json")] * 2  # the checker's look, then the counts of all 4 shards at once
    (shards / "sizes.json").write_text('{"train-000000.tar": 2,')
    assert run_check("--paths", shards) == 1
    assert "not valid JSON (line 1 col 24: Expecting property name enclosed in double quotes); run with " \
           "--write_sizes true" in capsys.readouterr().out


def test_write_sizes_still_compares_with_what_the_writer_recorded(tmp_path, capsys):
    # img2dataset says 5, the shard holds 3: rewriting sizes.json must not hide the loss
    write_tar(tmp_path / "00000.tar", [(f"{i:04d}", good(i)) for i in range(3)])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    assert run_check("--paths", tmp_path, "--write_sizes", "true") == 1
    assert "_stats.json says 5, the shard holds 3 readable samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3}
    # what the write repairs is no problem: a listed shard that is gone, an unreadable sizes.json
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 9}))
    assert run_check("--paths", tmp_path, "--write_sizes", "true") == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3}
    (tmp_path / "sizes.json").write_text("[3]")
    assert run_check("--paths", tmp_path, "--write_sizes", "true") == 0


def test_every_shard_is_compared_after_a_first_mismatch(tmp_path, capsys):
    for shard in range(3):
        write_tar(tmp_path / f"{shard:05d}.tar", [(f"{shard}{i:03d}", good(i)) for i in range(2)])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 5, "00001.tar": 2, "00002.tar": 7}))
    assert run_check("--paths", tmp_path, "--report", tmp_path / "r.json") == 1
    problems = json.loads((tmp_path / "r.json").read_text())["problems"]
    assert [(p["reason"], p["where"]) for p in problems] == [("count_mismatch", "00000.tar"), ("count_mismatch", "00002.tar")]


def test_user_errors_end_in_one_line(tmp_path, capsys):
    for args, message in ((["--paths", tmp_path / "nowhere"], "no such shard file or directory"),
                          (["--paths", tmp_path], "no .tar files under"),
                          (["--paths", tmp_path, "--workers", "0"], "--workers and --max_image_pixels must be >= 1")):
        code = run_check(*args)
        assert message in str(code) and "\n" not in str(code)


def test_console_module_exit_status(tmp_path):
    shards = write_set(tmp_path / "shards", [("0000", {**good(0), "txt": b""}), ("0001", good(1))])
    result = subprocess.run([sys.executable, "-m", "clip_hvt.data.check", "--paths", str(shards)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert "empty_caption: 1" in result.stdout


def _killed_on_the_second_shard(url, **kwargs):
    if str(url).endswith("s1.tar"):  # the worker dies as the out-of-memory killer would end it
        os.kill(os.getpid(), signal.SIGKILL)
    return check_shard(url, **kwargs)


def test_a_worker_killed_mid_check_ends_in_one_line_not_a_wait(tmp_path, monkeypatch):
    for s in range(3):
        write_tar(tmp_path / f"s{s}.tar", [(f"{s}{i:03d}", good(i)) for i in range(2)])
    monkeypatch.setattr(check, "check_shard", _killed_on_the_second_shard)  # the forked workers inherit it
    faulthandler.dump_traceback_later(300, exit=True)  # the bug this guards: a pool waiting forever
    try:
        code = run_check("--paths", tmp_path, "--workers", "2")
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert code == ("python -m clip_hvt.data.check: error: a worker process died before finishing its task (killed: "
                    "out of memory? large images are decoded at full size); run again with fewer --workers")
