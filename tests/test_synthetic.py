"""The embedded shapes data: deterministic by seed, counts recorded, zero-shot set complete."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from clip_hvt.data import synthetic
from conftest import assert_plain_members

REPO = Path(__file__).resolve().parents[1]
SMALL = synthetic.ShapesConfig(train_samples=60, val_samples=20, zeroshot_per_class=2, samples_per_shard=25)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = synthetic.generate(tmp_path / "a", SMALL)
    b = synthetic.generate(tmp_path / "b", SMALL)
    c = synthetic.generate(tmp_path / "c", synthetic.ShapesConfig(**{**SMALL.__dict__, "seed": 1}))
    assert _digest(a) == _digest(b)
    assert _digest(a)["train/shapes-train-000000.tar"] != _digest(c)["train/shapes-train-000000.tar"]
    assert_plain_members(a / "train" / "shapes-train-000000.tar")


def test_sizes_json_matches_shards_and_captions_name_colour_and_shape(tmp_path):
    root = synthetic.generate(tmp_path / "s", SMALL)
    sizes = json.loads((root / "train" / "sizes.json").read_text())
    assert sizes == {"shapes-train-000000.tar": 25, "shapes-train-000001.tar": 25, "shapes-train-000002.tar": 10}
    samples = list(wds.WebDataset(str(root / "train" / "shapes-train-{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 60
    wordings = set()
    for sample in samples:
        attrs, caption = json.loads(sample["json"]), sample["txt"].decode()
        assert attrs["colour"] in caption and attrs["shape"] in caption
        wordings.add(caption.replace(attrs["colour"], "C").replace(attrs["shape"], "S").split()[0])
    assert len(wordings) >= 4  # captions vary in wording


def test_zeroshot_set_has_every_class_and_templates(tmp_path):
    root = synthetic.generate(tmp_path / "s", SMALL)
    classnames = json.loads((root / "zeroshot" / "classnames.json").read_text())
    assert classnames == list(synthetic.CLASSNAMES) and len(classnames) == 30
    labels = [int(s["cls"]) for s in wds.WebDataset(str(root / "zeroshot" / "shapes-zeroshot-{000000..000002}.tar"),
                                                    shardshuffle=False)]
    assert sorted(labels) == sorted(list(range(30)) * 2)
    assert all("{}" in t for t in json.loads((root / "zeroshot" / "templates.json").read_text()))


def test_ensure_regenerates_only_when_parameters_change(tmp_path):
    root = synthetic.ensure(tmp_path / "s", SMALL)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    synthetic.ensure(root, SMALL)
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    bigger = synthetic.ShapesConfig(**{**SMALL.__dict__, "val_samples": 30})
    synthetic.ensure(root, bigger)
    assert json.loads((root / "manifest.json").read_text())["val_samples"] == 30


def test_make_shapes_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "clip_hvt.data.synthetic", "--out", str(tmp_path / "d"),
                          "--train_samples", "30", "--val_samples", "10", "--zeroshot_per_class", "1"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert "--data.shapes.root" in out.stdout
    assert json.loads((tmp_path / "d" / "train" / "sizes.json").read_text()) == {"shapes-train-000000.tar": 30}


def _with(**changes):
    return synthetic.ShapesConfig(**{**SMALL.__dict__, **changes})


def test_directory_with_user_files_is_refused_and_kept(tmp_path):
    root = tmp_path / "mine"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("keep me")
    (root / "sub" / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(FileExistsError, match="not a shapes set") as err:
        synthetic.ensure(root, SMALL)
    assert str(root) in str(err.value) and "empty directory" in str(err.value)
    assert (root / "notes.txt").read_text() == "keep me" and (root / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp directory left behind


def test_user_file_added_to_a_shapes_set_is_not_deleted(tmp_path):
    root = synthetic.generate(tmp_path / "s", SMALL)
    (root / "results.csv").write_text("mine")
    with pytest.raises(FileExistsError):
        synthetic.ensure(root, _with(val_samples=30))
    assert (root / "results.csv").read_text() == "mine" and synthetic.is_complete(root, SMALL)


def test_a_plain_file_and_a_foreign_manifest_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        synthetic.generate(tmp_path / "f", SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"files": ["a", "b"]}))
    with pytest.raises(FileExistsError):
        synthetic.ensure(other, SMALL)
    assert (tmp_path / "f").read_text() == "x" and (other / "manifest.json").is_file()


def test_make_shapes_refuses_a_directory_with_user_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("draft")
    out = subprocess.run([sys.executable, "-m", "clip_hvt.data.synthetic", "--out", str(tmp_path / "d"),
                          "--train_samples", "30"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "not a shapes set" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "d" / "thesis.tex").read_text() == "draft"


def test_empty_directory_and_older_shapes_set_are_replaced(tmp_path):
    (tmp_path / "e").mkdir()
    assert synthetic.ensure(tmp_path / "e", SMALL) == tmp_path / "e" and synthetic.is_complete(tmp_path / "e", SMALL)
    old = synthetic.generate(tmp_path / "s", _with(version=1, train_samples=30))  # stands for an older release
    fresh = synthetic.generate(tmp_path / "ref", SMALL)
    synthetic.ensure(old, SMALL)
    assert _digest(old) == _digest(fresh)  # fully replaced: no stale shard of the old set remains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "ref", "s"]


def test_failed_generation_leaves_the_previous_set_and_no_temp_dir(tmp_path, monkeypatch):
    root = synthetic.generate(tmp_path / "s", SMALL)
    before = _digest(root)
    write_split = synthetic._write_split

    def crash_on_val(out, split, samples, per_shard):
        if split == "val":
            raise RuntimeError("disk full")
        write_split(out, split, samples, per_shard)

    monkeypatch.setattr(synthetic, "_write_split", crash_on_val)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.ensure(root, _with(val_samples=30))
    assert _digest(root) == before and synthetic.is_complete(root, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_two_writers_of_one_set_at_once_leave_it_complete_and_written_once(tmp_path, monkeypatch):
    # two nodes preparing the shapes data in one shared cache; in containers they share process ids too
    monkeypatch.setattr("os.getpid", lambda: 1)
    write_split, started, finished = synthetic._write_split, [], []

    def the_other_node_finishes_first(out, split, samples, per_shard):
        if split == "val" and not started:
            started.append(out)
            finished.append(_digest(synthetic.generate(tmp_path / "s", SMALL)))  # while this one is half-way
        write_split(out, split, samples, per_shard)

    monkeypatch.setattr(synthetic, "_write_split", the_other_node_finishes_first)
    synthetic.generate(tmp_path / "s", SMALL)
    assert synthetic.is_complete(tmp_path / "s", SMALL) and _digest(tmp_path / "s") == finished[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp dir left by either


def test_default_root_differs_for_every_parameter(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_HVT_CACHE", str(tmp_path))
    base = synthetic.default_root(SMALL)
    assert base.parent == tmp_path and base == synthetic.default_root(_with())  # stable
    changed = [_with(val_samples=21), _with(zeroshot_per_class=3), _with(samples_per_shard=26), _with(seed=1),
               _with(image_size=40), _with(train_samples=61), _with(version=1)]
    roots = {synthetic.default_root(c) for c in changed}
    assert len(roots) == len(changed) and base not in roots
