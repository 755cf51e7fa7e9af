"""The embedded shapes data: deterministic by seed, counts recorded, zero-shot set complete."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import webdataset as wds

from clip_hvt.data import synthetic

MAKE_SHAPES = Path(__file__).resolve().parents[1] / "data_scripts" / "make_shapes.py"
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
    out = subprocess.run([sys.executable, str(MAKE_SHAPES), str(tmp_path / "d"), "--train-samples", "30",
                          "--val-samples", "10", "--zeroshot-per-class", "1"], capture_output=True, text=True, check=True)
    assert "--data.shapes.root" in out.stdout
    assert json.loads((tmp_path / "d" / "train" / "sizes.json").read_text()) == {"shapes-train-000000.tar": 30}
