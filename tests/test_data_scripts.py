"""data_scripts/*.sh: the dataset recipes, run with their network tools replaced by local stand-ins."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import jpeg

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "data_scripts"


def run_script(name, *args, tmp_path, tools=None, env=None):
    """Run a script with ``tools`` ({name: python source}) first on PATH; returns the CompletedProcess."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, source in (tools or {}).items():
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{source}")
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(["bash", str(SCRIPTS / name), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


NO_NETWORK = "import os, sys; sys.exit(f'network tool called: {os.path.basename(sys.argv[0])} ' + ' '.join(sys.argv[1:]))"


def coco_split(root, split, image_ids):
    (root / f"{split}2017").mkdir(parents=True)
    images, annotations = [], []
    for image_id in image_ids:
        name = f"{image_id:012d}.jpg"
        (root / f"{split}2017" / name).write_bytes(jpeg(image_id, size=40))
        images.append({"id": image_id, "file_name": name})
        annotations += [{"id": len(annotations), "image_id": image_id, "caption": f"image {image_id} caption {j}"}
                        for j in range(2)]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"captions_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))


def test_coco_converts_both_splits_with_every_caption_and_downloads_nothing_already_there(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "shards"
    coco_split(root, "train", range(1, 6))
    coco_split(root, "val", range(100, 103))
    done = run_script("coco.sh", root, out, tmp_path=tmp_path, tools={"curl": NO_NETWORK, "unzip": NO_NETWORK},
                      env={"WORKERS": "1", "RESIZE": "32"})
    assert done.returncode == 0, done.stderr
    for split, ids in (("train", range(1, 6)), ("val", range(100, 103))):
        assert json.loads((out / split / "sizes.json").read_text()) == {"shard-000000.tar": len(ids)}
        with tarfile.open(out / split / "shard-000000.tar") as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
        assert sorted(m["image_id"] for m in metas) == list(ids)
        assert all(m["captions"] == [f"image {m['image_id']} caption {j}" for j in range(2)] for m in metas)
        assert json.loads((out / split / "check.json").read_text())["problems"] == []


def test_coco_fails_on_a_missing_part_it_cannot_fetch(tmp_path):
    root = tmp_path / "coco"
    coco_split(root, "train", range(1, 3))  # no val2017: the script must try to fetch it, and stop
    done = run_script("coco.sh", root, tmp_path / "shards", tmp_path=tmp_path,
                      tools={"curl": NO_NETWORK, "unzip": NO_NETWORK}, env={"WORKERS": "1", "RESIZE": "32"})
    assert done.returncode != 0
    assert done.stderr.rstrip().endswith("val2017.zip http://images.cocodataset.org/zips/val2017.zip")
    assert "network tool called: curl -fL --retry 3 -o" in done.stderr


# img2dataset's webdataset output for a TSV of local image paths: NNNNN.tar (9-digit keys) + NNNNN_stats.json
FAKE_IMG2DATASET = r'''
import csv, io, json, sys, tarfile
from pathlib import Path
args = sys.argv[1:]
opts = {}
for i, a in enumerate(args):  # later flags win, as in img2dataset's own parser
    if a.startswith("--"):
        opts[a[2:]] = args[i + 1]
out = Path(opts["output_folder"]); out.mkdir(parents=True)
(out / "argv.json").write_text(json.dumps(args))
rows = list(csv.DictReader(open(opts["url_list"]), delimiter="\t"))
with tarfile.open(out / "00000.tar", "w") as tar:
    for i, row in enumerate(rows):
        for ext, data in (("jpg", Path(row[opts["url_col"]]).read_bytes()), ("txt", row[opts["caption_col"]].encode())):
            info = tarfile.TarInfo(f"{i:09d}.{ext}"); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
claimed = int(opts.get("claim", len(rows)))  # --claim N: a stats file that says N
(out / "00000_stats.json").write_text(json.dumps({"successes": claimed, "count": len(rows)}))
'''


def url_list(tmp_path, n=4):
    rows = ["url\tcaption"]
    for i in range(n):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"{tmp_path / f'{i}.jpg'}\ta photo number {i}")
    (tmp_path / "list.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "list.tsv"


def test_img2dataset_output_is_checked_and_counted_and_user_flags_come_last(tmp_path):
    out = tmp_path / "shards"
    done = run_script("img2dataset.sh", url_list(tmp_path), out, "--input_format", "tsv", "--url_col", "url",
                      "--caption_col", "caption", "--image_size", "256", tmp_path=tmp_path,
                      tools={"img2dataset": FAKE_IMG2DATASET}, env={"PROCESSES": "1"})
    assert done.returncode == 0, done.stderr
    argv = json.loads((out / "argv.json").read_text())
    assert argv[argv.index("--output_format") + 1] == "webdataset"
    assert argv.index("--image_size") < len(argv) - 2 and argv[-2:] == ["--image_size", "256"]  # ours, then the user's
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4}
    assert json.loads((out / "check.json").read_text())["problems"] == []


def test_img2dataset_shard_short_of_its_stats_fails_the_script_with_the_reason(tmp_path):
    out = tmp_path / "shards"
    done = run_script("img2dataset.sh", url_list(tmp_path), out, "--url_col", "url", "--caption_col", "caption",
                      "--claim", "6", tmp_path=tmp_path, tools={"img2dataset": FAKE_IMG2DATASET},
                      env={"PROCESSES": "1"})
    assert done.returncode == 1
    assert "_stats.json says 6, the shard holds 4 readable samples" in done.stdout


def test_img2dataset_missing_is_one_line_with_the_install_command(tmp_path):
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}  # no img2dataset anywhere on it
    done = run_script("img2dataset.sh", "list.tsv", tmp_path / "out", tmp_path=tmp_path, env=env)
    assert done.returncode == 2 and done.stderr.strip().endswith("img2dataset not found: pip install img2dataset")


FAKE_HF = r'''
import json, sys
from pathlib import Path
args = sys.argv[1:]
local = Path(args[args.index("--local-dir") + 1]); (local / "test").mkdir(parents=True)
(local / "call.json").write_text(json.dumps(args))
'''


def test_clip_benchmark_fetches_the_test_split_of_each_set_into_its_own_directory(tmp_path):
    out = tmp_path / "sets"
    done = run_script("clip_benchmark.sh", out, "imagenet1k", "mscoco_captions", tmp_path=tmp_path,
                      tools={"hf": FAKE_HF})
    assert done.returncode == 0, done.stderr
    for name in ("imagenet1k", "mscoco_captions"):
        call = json.loads((out / f"wds_{name}" / "call.json").read_text())
        assert call[:2] == ["download", f"clip-benchmark/wds_{name}"]
        assert call[call.index("--repo-type") + 1] == "dataset"
        assert [call[i + 1] for i, a in enumerate(call) if a == "--include"] == ["test/*", "*.txt"]


@pytest.mark.parametrize("script", ["coco.sh", "img2dataset.sh", "clip_benchmark.sh"])
def test_usage_without_arguments(script, tmp_path):
    done = run_script(script, tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("usage:")
