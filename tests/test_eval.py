"""clip_hvt.eval: sets recognised from their layouts, CLIP_benchmark's metrics against references
computed directly from the model, multi-caption retrieval by hand, 2 ranks = 1 rank, bad input."""
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import yaml
import torch
import webdataset as wds
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from clip_hvt import eval as ev
from clip_hvt import factory, train
from clip_hvt.data import synthetic
from clip_hvt.export import export_model
from tests.conftest import write_tar

ROOT = Path(__file__).resolve().parents[1]
from tests.conftest import TINY_MODEL_CFG as TINY_CFG
CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange circle"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    return export_model(factory.create_model(TINY_CFG), TINY_CFG, tmp_path_factory.mktemp("model") / "export")


def _images(n, fmt="JPEG", seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image, _ = synthetic.render(rng, 40)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out.append(buf.getvalue())
    return out


@torch.no_grad()
def _reference(export_dir, images, texts=None, classnames=None, templates=None):
    """Features straight from open_clip's loader and transform, PIL decoding, one batch."""
    from PIL import Image
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    model.eval()
    image = model.encode_image(torch.stack([transform(Image.open(io.BytesIO(b))) for b in images]), normalize=True)
    if classnames is not None:
        return image @ build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=None)
    return image, model.encode_text(tokenizer(texts), normalize=True)


def _cli(*args):
    return ev.cli_main([str(a) for a in args])


def _read(out_dir):
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))}


def _clip_benchmark_classification(root, images, labels, classnames, templates, per_shard=4):
    """CLIP_benchmark's webdataset layout as its ``convert_dataset`` writes it (webdataset's default
    encoder: ``cls`` as text; ``%d.tar`` shards; nshards.txt; classnames and templates one per line)."""
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (image, label) in enumerate(zip(images, labels)):
            sink.write({"__key__": "s%07d" % i, "webp": image, "cls": label})
        nshards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{nshards}\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def test_clip_benchmark_classification_layout_is_read_and_scored_like_the_model_directly(export_dir, tmp_path):
    images = _images(14, "WEBP")
    templates = ["a photo of a {c}.", "a {c} shape."]
    logits = _reference(export_dir, images, classnames=CLASSNAMES,
                        templates=[t.replace("{c}", "{}") for t in templates])
    order = logits.argsort(dim=1, descending=True)
    # labels from the reference's own ranking: top-1 hits, top-5-only hits and misses
    ranks = [(0, 3, 5)[i % 3] for i in range(len(images))]
    labels = [int(order[i, r]) for i, r in enumerate(ranks)]
    root = _clip_benchmark_classification(tmp_path / "cb_set", images, labels, CLASSNAMES, templates)
    assert len(list((root / "test").glob("*.tar"))) == 4

    rows = _cli("--model", export_dir, "--data", root, "--out", tmp_path / "out", "--batch_size", 5,
                "--num_workers", 0)
    (name, result), = _read(tmp_path / "out").items()
    assert name == "cb_set_export_zeroshot_classification.json" and result == json.loads(json.dumps(rows[0]))
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(result)
    assert result["task"] == "zeroshot_classification" and result["layout"] == "clip_benchmark"
    assert result["samples"] == len(images) and sum(result["skipped"].values()) == 0
    labels_t = torch.tensor(labels)
    recall = [(order[labels_t == c, 0] == c).float().mean().item() for c in range(len(CLASSNAMES)) if (labels_t == c).any()]
    assert result["metrics"]["acc1"] == pytest.approx(sum(r == 0 for r in ranks) / len(ranks), abs=1e-9)
    assert result["metrics"]["acc5"] == pytest.approx(sum(r < 5 for r in ranks) / len(ranks), abs=1e-9)
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recall) / len(recall), abs=1e-9)


def test_image_folder_and_clip_hvt_shards_of_the_same_images_give_the_same_numbers(export_dir, tmp_path):
    images, labels = _images(9), [i % 3 for i in range(9)]
    folder = tmp_path / "folder"
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{label}" / f"{i}.jpg").write_bytes(image)
    (folder / "classnames.json").write_text(json.dumps(CLASSNAMES[:3]))
    (folder / "templates.json").write_text(json.dumps(["a {} shape."]))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "zs-000000.tar", [(f"s{i}", {"jpg": b, "cls": str(c).encode()}) for i, (b, c) in
                                         enumerate(zip(images, labels))])
    (shards / "classnames.json").write_text(json.dumps(CLASSNAMES[:3]))
    (shards / "templates.json").write_text(json.dumps(["a {} shape."]))
    rows = _cli("--model", export_dir, "--data", folder, "--data", shards, "--num_workers", 0)
    assert [r["layout"] for r in rows] == ["folder", "clip_hvt"]
    assert rows[0]["metrics"] == rows[1]["metrics"] and rows[0]["samples"] == 9
    assert math.isnan(rows[0]["metrics"]["acc5"])  # CLIP_benchmark: no top-5 under 5 classes
    # class names from the folder names, templates from open_clip's OpenAI list when the folder has none
    (folder / "classnames.json").unlink()
    (folder / "templates.json").unlink()
    evalset = ev.load_set(folder)
    assert evalset.classnames == ["class0", "class1", "class2"] and len(evalset.templates) == 80


def test_retrieval_recall_counts_an_image_hit_when_any_of_its_captions_is_retrieved():
    # 3 images (the axes), 5 captions: image 0 has captions 0 and 1, image 1 caption 2, image 2 captions 3 and 4
    image = torch.eye(3)
    text = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.0, 0.6], [0.0, 0.8, 0.6], [0.6, 0.0, 0.8], [0.6, 0.7, 0.387]])
    owner = torch.tensor([0, 0, 1, 2, 2])
    metrics = ev.retrieval_metrics(image, text, owner, recall_k=(1, 2, 3))
    # text -> image: the own image is ranked 2nd, 1st, 1st, 1st, 3rd
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert metrics["image_retrieval_recall@3"] == 1
    # image -> text: image 0's best own caption (1) is 1st; image 1's only caption 2nd (caption 0 beats it);
    # image 2's caption 3 is 1st although its caption 4 is ranked 5th
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == 1


def _clip_benchmark_recall(scores, positive, k):
    """CLIP_benchmark's definition, literally: one-hot top-k, a hit when a positive is among them."""
    top = torch.nn.functional.one_hot(scores.topk(k, dim=1).indices, scores.shape[1])
    return ((top * positive[:, None, :]).sum((1, 2)) > 0).float().mean().item()


def test_retrieval_recall_equals_clip_benchmarks_topk_definition_on_random_features():
    torch.manual_seed(0)
    owner = torch.tensor([i for i in range(40) for _ in range(1 + i % 5)])  # 1 to 5 captions per image
    image = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    text = torch.nn.functional.normalize(image[owner] + 0.8 * torch.randn(len(owner), 8), dim=1)
    positive = torch.zeros(len(owner), 40, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    metrics = ev.retrieval_metrics(image, text, owner, recall_k=(1, 5, 10), chunk=7)
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(text @ image.T, positive, k))
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(
            _clip_benchmark_recall(image @ text.T, positive.T, k))


@pytest.mark.parametrize("layout", ["clip_benchmark", "json_captions"])
def test_multi_caption_shards_are_retrieved_with_all_captions(export_dir, tmp_path, layout):
    images = _images(6)
    captions = [[f"a {c}", f"the {c} picture", f"one {c}"][: 1 + i % 3] for i, c in enumerate(CLASSNAMES)]
    root = tmp_path / layout
    if layout == "clip_benchmark":
        (root / "test").mkdir(parents=True)
        write_tar(root / "test" / "0.tar", [(f"s{i}", {"jpg": b, "txt": "\n".join(c).encode()})
                                            for i, (b, c) in enumerate(zip(images, captions))])
        (root / "test" / "nshards.txt").write_text("1\n")
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:  # clip_hvt's COCO converter: txt is the first caption, json holds them all
        root.mkdir()
        write_tar(root / "coco-000000.tar", [(f"s{i}", {"jpg": b, "txt": c[0].encode(),
                                                        "json": json.dumps({"captions": c}).encode()})
                                             for i, (b, c) in enumerate(zip(images, captions))])
    image, text = _reference(export_dir, images, [c for caps in captions for c in caps])
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    expected = ev.retrieval_metrics(image, text, owner, recall_k=(1, 2))
    (row,) = _cli("--model", export_dir, "--data", root, "--recall_k", "[1, 2]", "--batch_size", 4,
                  "--num_workers", 0)
    assert row["task"] == "zeroshot_retrieval" and row["samples"] == 6
    assert row["metrics"] == pytest.approx(expected, abs=1e-6)


def test_broken_samples_are_skipped_and_counted(export_dir, tmp_path):
    images = _images(5)
    root = tmp_path / "zs"
    root.mkdir()
    write_tar(root / "a.tar", [("g0", {"jpg": images[0], "cls": b"0"}), ("trunc", {"jpg": images[1][:100], "cls": b"1"}),
                               ("nolabel", {"jpg": images[2]}), ("g1", {"jpg": images[3], "cls": b"1"}),
                               ("bad", {"jpg": b"not an image", "cls": b"2"})])
    write_tar(root / "b.tar", [("g2", {"jpg": images[4], "cls": b"2"}), ("cut", {"jpg": images[0], "cls": b"0"})],
              cut_in=1)
    (root / "classnames.json").write_text(json.dumps(CLASSNAMES))
    (root / "templates.json").write_text(json.dumps(["a {}"]))
    (row,) = _cli("--model", export_dir, "--data", root, "--num_workers", 0)
    assert row["samples"] == 3
    assert {r: n for r, n in row["skipped"].items() if n} == {"undecodable_image": 2, "no_label": 1, "corrupt_shard": 1}


def _mixed_sets(tmp_path):
    """A classification set of 3 uneven shards and a multi-caption retrieval set of 2."""
    images = _images(11)
    zs = tmp_path / "zs"
    zs.mkdir()
    for s, part in enumerate([range(0, 5), range(5, 7), range(7, 11)]):
        write_tar(zs / f"zs-{s}.tar", [(f"s{i}", {"jpg": images[i], "cls": str(i % 6).encode()}) for i in part])
    (zs / "classnames.json").write_text(json.dumps(CLASSNAMES))
    (zs / "templates.json").write_text(json.dumps(["a photo of a {}.", "a {}."]))
    rt = tmp_path / "captions"
    rt.mkdir()
    for s, part in enumerate([range(0, 7), range(7, 11)]):
        write_tar(rt / f"r-{s}.tar", [(f"s{i}", {"jpg": images[i], "txt": "\n".join(
            f"caption {j} of {CLASSNAMES[i % 6]}" for j in range(1 + i % 3)).encode()}) for i in part])
    return zs, rt


@pytest.mark.slow
def test_two_gloo_ranks_give_the_numbers_of_one(export_dir, tmp_path):
    zs, rt = _mixed_sets(tmp_path)
    args = ["--model", str(export_dir), "--data", str(zs), "--data", str(rt), "--num_workers", "1",
            "--batch_size", "3", "--device", "cpu"]
    one = _cli(*args, "--out", tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "clip_hvt.eval", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _read(tmp_path / "two")
    assert len(two) == 2 and proc.stdout.count("zeroshot_retrieval") == 1  # only rank 0 prints and writes
    for row in one:
        other = next(r for r in two.values() if r["dataset"] == row["dataset"])
        assert other["samples"] == row["samples"] == 11 and other["skipped"] == row["skipped"]
        assert other["metrics"] == pytest.approx(row["metrics"], abs=1e-9)


@pytest.mark.parametrize("make, args, message", [
    (lambda p: (p / "notes.txt").write_text("x"), (), "is no evaluation set: no \\*.tar shards and no class "
                                                     "sub-folders with images; supported layouts: clip_hvt zero-shot"),
    (lambda p: (p / "classnames.json").write_text("[]"), (), "has class names but no \\*.tar shards"),
    (lambda p: ((p / "test").mkdir(), (p / "classnames.txt").write_text("a\n")), (),
     "in CLIP_benchmark's layout but test/ has no \\*.tar shards"),
    (lambda p: (write_tar(p / "a.tar", []), (p / "classnames.json").write_text('["a"]'),
                (p / "templates.json").write_text('["a photo"]')), (),
     "template 'a photo' .* has no '{}' \\(or CLIP_benchmark's '{c}'\\) for the class name"),
])
def test_bad_sets_stop_with_one_line_naming_what_is_valid(export_dir, tmp_path, make, args, message):
    data = tmp_path / "set"
    data.mkdir()
    make(data)
    with pytest.raises(SystemExit) as exc:
        _cli("--model", export_dir, "--data", data, *args)
    text = str(exc.value.code)
    assert "\n" not in text and text.startswith("python -m clip_hvt.eval: error:")
    import re
    assert re.search(message, text), text


@pytest.mark.parametrize("model", ["not_there", "plain_dir", "notes.txt", "garbage.ckpt", "ViT-B-32,missing.pt"])
def test_a_model_that_is_not_an_export_or_checkpoint_stops_with_one_line(export_dir, tmp_path, model):
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    zs, _ = _mixed_sets(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _cli("--model", tmp_path / model if "," not in model else model, "--data", zs)
    text = str(exc.value.code)
    assert "\n" not in text
    if model.endswith(".pt"):
        assert "weights file 'missing.pt' does not exist" in text
    elif model.endswith(".ckpt"):
        assert "is not a clip_hvt checkpoint" in text
    else:
        assert "is not an export directory (with open_clip_config.json), a clip_hvt .ckpt file, or " \
               "OPEN_CLIP_NAME,WEIGHTS_FILE" in text


@pytest.mark.slow
def test_eval_of_a_trained_checkpoint_and_its_export_equals_the_training_time_evaluation(tiny_config, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    shapes = tmp_path / "shapes"
    sets = [str(shapes / "zeroshot"), str(shapes / "val")]  # zero-shot classification and caption retrieval
    callbacks = yaml.safe_load(Path(tiny_config).read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("ZeroShotEvaluation"):
            callback["init_args"] = {"sets": sets, "batch_size": 7}
    (tmp_path / "sets.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    logged = train.main(["--config", tiny_config, "--config", str(tmp_path / "sets.yaml"),
                         "--data.shapes.root", str(shapes), "--export_dir", "export"])
    assert logged["zeroshot/zeroshot/samples"] == 30 and logged["zeroshot/val/samples"] == 48

    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"  # saved at the last step, as validated
    rows = _cli("--model", ckpt, "--model", tmp_path / "export", "--data", sets[0], "--data", sets[1],
                "--batch_size", 16, "--num_workers", 0, "--out", tmp_path / "eval")
    assert len(rows) == 4 and len(_read(tmp_path / "eval")) == 4
    for row in rows:
        assert row["samples"] == logged[f"zeroshot/{row['dataset']}/samples"]
        for name, value in row["metrics"].items():
            assert value == pytest.approx(logged[f"zeroshot/{row['dataset']}/{name}"], abs=1e-6), (row["model"], name)
    classification = rows[0]["metrics"]
    assert classification["acc1"] == pytest.approx(logged["zeroshot/zeroshot/top1"], abs=1e-6)
    assert 0 < classification["acc5"] < 1  # a real, not degenerate, number


def test_a_multi_task_slurm_job_not_launched_by_srun_stops_instead_of_waiting(export_dir, tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))] + ["GROUP_RANK", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "eval")
    zs, _ = _mixed_sets(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _cli("--model", export_dir, "--data", zs)
    assert "the job has 4 tasks but this process was started by the batch script, not by srun" in str(exc.value.code)


def test_an_open_clip_name_with_local_weights_scores_like_the_export_of_those_weights(export_dir, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "clip-hvt-test-tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / "configs")  # as a model name shipped with open_clip would be
    zs, rt = _mixed_sets(tmp_path)
    rows = _cli("--model", f"clip-hvt-test-tiny,{export_dir / 'open_clip_model.safetensors'}", "--model", export_dir,
                "--data", zs, "--data", rt, "--num_workers", 0)
    assert [(r["model"], r["pretrained"]) for r in rows[:2]] == [
        ("clip-hvt-test-tiny", str(export_dir / "open_clip_model.safetensors"))] * 2
    assert [r["metrics"] for r in rows[:2]] == [r["metrics"] for r in rows[2:]]
