"""ZeroShotEvaluation: streamed per rank, same numbers as open_clip's classifier applied directly,
broken zero-shot shards skipped and counted, no image kept between evaluations."""
import io
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image

from clip_hvt import callbacks
from clip_hvt.callbacks import ZeroShotEvaluation
from clip_hvt.data.datamodule import Shapes, WebDataModule
from clip_hvt.data.sample import SKIP_REASONS
from clip_hvt.module import CLIPModule
from tests.conftest import TINY_MODEL_CFG as TINY_CFG
from tests.conftest import write_tar
CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon", "orange cross",
              "black ring"]
TEMPLATES = ["a photo of a {}.", "a {} shape."]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "set"
    WebDataModule(shapes=_shapes(root), model_cfg=TINY_CFG).prepare_data()
    return root


def _shapes(root):
    return Shapes(root=str(root), image_size=40, train_samples=32, val_samples=8, zeroshot_per_class=1)


def _module():
    torch.manual_seed(0)
    return CLIPModule(TINY_CFG).eval()


def _dm(shapes_root):
    return WebDataModule(shapes=_shapes(shapes_root), batch_size=8, num_workers=0, model_cfg=TINY_CFG)


def _validate(callback, module, shapes_root):
    """A real CPU trainer runs one validation (retrieval + the callback) and stays attached."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    metrics = trainer.validate(module, datamodule=_dm(shapes_root), verbose=False)[0]
    return trainer, metrics


def _shapes_images(shapes_root, n):
    """The first ``n`` JPEGs of the embedded zero-shot set, as bytes."""
    images = []
    for shard in sorted((shapes_root / "zeroshot").glob("*.tar")):
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(images) >= n
    return images[:n]


def write_set(root, shards, classnames=CLASSNAMES, templates=TEMPLATES):
    """A zero-shot directory: ``shards`` is a list of (entries, cut_in) per shard."""
    root.mkdir()
    for i, (entries, cut_in) in enumerate(shards):
        write_tar(root / f"zs-{i:06d}.tar", entries, cut_in)
    (root / "classnames.json").write_text(json.dumps(classnames))
    (root / "templates.json").write_text(json.dumps(templates))
    return root


def _classifier(module, dm, classnames=CLASSNAMES, templates=TEMPLATES):
    return build_zero_shot_classifier(module.model, dm.tokenizer, classnames, templates,
                                      num_classes_per_batch=None, device="cpu")


@torch.no_grad()
def _class_order(module, dm, images, classifier):
    """Reference: every image decoded by PIL, through val_transform, one encode_image call; classes by score."""
    batch = torch.stack([dm.val_transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    logits = module.model.encode_image(batch, normalize=True) @ classifier
    return logits.argsort(dim=1, descending=True)


@torch.no_grad()
@pytest.mark.slow
def test_streamed_evaluation_matches_open_clip_classifier_applied_directly(shapes_root, tmp_path):
    module = _module()
    dm = _dm(shapes_root)
    dm.prepare_data()
    dm.setup("validate")
    images = _shapes_images(shapes_root, 17)
    order = _class_order(module, dm, images, _classifier(module, dm))
    # Labels from the reference's own ranking: rank 0 (top-1 hit), rank 2 (top-5 only), rank 6 (a miss),
    # so a lost, repeated or mislabelled image changes the numbers.
    ranks = [(0, 2, 6)[i % 3] for i in range(len(images))]
    labels = [int(order[i, r]) for i, r in enumerate(ranks)]
    entries = [(f"s{i:03d}", {"jpg": b, "cls": str(label).encode()}) for i, (b, label) in enumerate(zip(images, labels))]
    root = write_set(tmp_path / "zs", [(entries[:10], None), (entries[10:], None)])
    top1 = sum(r == 0 for r in ranks) / len(ranks)
    top5 = sum(r < 5 for r in ranks) / len(ranks)

    for batch_size in (4, 256):  # partial last batches across shards, and all in one batch
        callback = ZeroShotEvaluation(sets=[str(root)], batch_size=batch_size)
        trainer, logged = _validate(callback, module, shapes_root)
        result = callback.evaluate(trainer, module)
        assert result["zeroshot/samples"] == len(images) and result["zeroshot/skipped"] == 0
        assert result["zeroshot/top1"] == pytest.approx(top1, abs=1e-7)
        assert result["zeroshot/top5"] == pytest.approx(top5, abs=1e-7)
        assert result["zeroshot/chance"] == pytest.approx(1 / len(CLASSNAMES))
        assert logged["zeroshot/top1"] == pytest.approx(top1) and logged["zeroshot/top5"] == pytest.approx(top5)


def test_embedded_shapes_set_keeps_its_metric_names_and_values(shapes_root):
    module = _module()
    callback = ZeroShotEvaluation(sets=[str(shapes_root / "zeroshot")], batch_size=7)
    trainer, logged = _validate(callback, module, shapes_root)
    dm = trainer.datamodule
    classnames = json.loads((shapes_root / "zeroshot" / "classnames.json").read_text())
    templates = json.loads((shapes_root / "zeroshot" / "templates.json").read_text())
    labels, images = [], []
    for shard in sorted((shapes_root / "zeroshot").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            images.append(members[name])
            labels.append(int(members[name[:-4] + ".cls"]))
    order = _class_order(module, dm, images, _classifier(module, dm, classnames, templates))
    labels = torch.tensor(labels)
    assert logged["zeroshot/top1"] == pytest.approx((order[:, 0] == labels).float().mean().item())
    assert logged["zeroshot/top5"] == pytest.approx((order[:, :5] == labels[:, None]).any(1).float().mean().item())
    assert logged["zeroshot/chance"] == pytest.approx(1 / 30)
    assert logged["zeroshot/samples"] == len(images) == 30 and logged["zeroshot/skipped"] == 0


def _faulty_set(root, images):
    """One shard with a truncated JPEG, a non-image, a missing and a bad label, a pickle member and a
    truncated tail; one clean shard. Returns the directory, the injected skips and the good samples."""
    good = [{"jpg": b, "cls": str(i % len(CLASSNAMES)).encode()} for i, b in enumerate(images)]
    faulty = [
        ("g0", good[0]),
        ("truncated_jpeg", {"jpg": images[1][:200], "cls": b"1"}),
        ("g1", good[1]),
        ("not_an_image", {"jpg": b"<html>404 not found</html>", "cls": b"2"}),
        ("g2", good[2]),
        ("no_label", {"jpg": images[3]}),
        ("label_out_of_range", {"jpg": images[3], "cls": str(len(CLASSNAMES)).encode()}),
        ("pickled", {"jpg": images[4], "cls": b"0", "pyd": pickle.dumps({"x": 1})}),
        ("g3", good[3]),
        ("cut", good[4]),  # the tar ends inside this sample: it and the rest of the shard are lost
        ("lost", good[5]),
    ]
    clean = [(f"c{i}", s) for i, s in enumerate(good[6:])]
    write_set(root, [(faulty, 9), (clean, None)])
    skips = {"undecodable_image": 2, "no_label": 2, "pickle_member": 1, "corrupt_shard": 1}
    return root, skips, 4 + len(clean)


def test_broken_samples_and_truncated_shard_are_skipped_and_counted(shapes_root, tmp_path):
    module = _module()
    root, skips, scored = _faulty_set(tmp_path / "zs", _shapes_images(shapes_root, 10))
    callback = ZeroShotEvaluation(sets=[str(root)], batch_size=3)
    trainer, logged = _validate(callback, module, shapes_root)  # raised on the old reader
    for result in (logged, callback.evaluate(trainer, module)):
        assert result["zeroshot/skipped"] == sum(skips.values())
        assert {r: result[f"zeroshot/skipped_{r}"] for r in SKIP_REASONS} == {r: skips.get(r, 0) for r in SKIP_REASONS}
        assert result["zeroshot/samples"] == scored
        assert 0 <= result["zeroshot/top1"] <= result["zeroshot/top5"] <= 1


class RecordingStrategy:
    def __init__(self):
        self.reduced = []

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        self.reduced.append(tensor.clone())
        return tensor


@pytest.mark.parametrize("world_size", [2, 3, pytest.param(16, marks=pytest.mark.slow)])  # shards split by rank; samples split; most shares empty
def test_ranks_score_disjoint_shares_that_sum_to_the_whole_set_with_one_reduce_each(shapes_root, tmp_path,
                                                                                  world_size):
    module = _module()
    dm = _dm(shapes_root)
    dm.prepare_data()
    dm.setup("validate")
    root, skips, scored = _faulty_set(tmp_path / "zs", _shapes_images(shapes_root, 10))

    def counts(rank, world):
        callback = ZeroShotEvaluation(sets=[str(root)], batch_size=2)
        strategy = RecordingStrategy()
        trainer = SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0,
                                  datamodule=dm, strategy=strategy)
        callback.setup(trainer, module, "validate")
        callback.evaluate(trainer, module)
        assert len(strategy.reduced) == 1  # exactly one collective, also on a rank with nothing to score
        return strategy.reduced[0]

    whole = counts(0, 1)
    shares = [counts(rank, world_size) for rank in range(world_size)]
    assert torch.equal(sum(shares), whole)
    assert whole[2] == scored and whole[3:3 + len(SKIP_REASONS)].sum() == sum(skips.values())  # then per-class counts
    if world_size == 16:
        assert sum(int(s[2]) == 0 for s in shares) >= world_size - scored


def _held(obj, seen=None, depth=0):
    """Bytes, images and tensors reachable from ``obj``'s attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray, memoryview, Image.Image, torch.Tensor)):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, Path)):
        items = list(vars(obj).values())
    else:
        return []
    return [x for item in items for x in _held(item, seen, depth + 1)]


@pytest.mark.slow
def test_no_image_is_kept_between_evaluations_and_scoring_streams(shapes_root, tmp_path, monkeypatch):
    module = _module()
    images = _shapes_images(shapes_root, 20)
    root = write_set(tmp_path / "zs", [([(f"s{i:03d}", {"jpg": b, "cls": str(i % 7).encode()})
                                         for i, b in enumerate(images)], None)])
    callback = ZeroShotEvaluation(sets=[str(root)], batch_size=3)
    trainer, _ = _validate(callback, module, shapes_root)
    assert _held(callback) == []
    state = {k: v for k, v in vars(callback).items() if not callable(v)}  # Lightning binds the module's log
    assert len(pickle.dumps(state)) < sum(map(len, images)) / 10

    # Decoding runs at most one batch ahead of scoring: images are not all read, then scored.
    transformed, encoded = [], []
    encode, build_transform = module.model.encode_image, callbacks.image_transform_v2

    def counting_transform(*args, **kw):
        transform = build_transform(*args, **kw)
        return lambda image: transformed.append(1) or transform(image)

    def recording_encode(batch, **kw):
        encoded.append((len(transformed), batch.shape[0]))
        return encode(batch, **kw)

    monkeypatch.setattr(callbacks, "image_transform_v2", counting_transform)
    module.model.encode_image = recording_encode
    try:
        callback.evaluate(trainer, module)
    finally:
        del module.model.encode_image  # the class's method again
    assert [n for _, n in encoded] == [3] * 6 + [2]
    done = 0
    for seen, n in encoded:
        done += n
        assert seen == done  # the batch being scored is all that was decoded and not yet scored
    assert _held(callback) == []


def test_no_sets_evaluates_nothing_with_a_one_line_notice(caplog):
    callback = ZeroShotEvaluation()
    trainer = SimpleNamespace(is_global_zero=True)
    callback.setup(trainer, None, "fit")
    assert "zero-shot evaluation: no sets given" in caplog.text
    assert callback.evaluate(trainer, None) == {}


def test_skip_monitor_resumes_counts_of_a_run_that_knew_fewer_reasons():
    from clip_hvt.callbacks import SkipMonitor
    monitor = SkipMonitor()
    monitor.load_state_dict({"skipped": [1, 2, 3, 4, 5, 6, 7, 8], "used": 100})  # the 8 reasons of older releases
    assert dict(zip(SKIP_REASONS, monitor.skipped.tolist())) == {
        "corrupt_shard": 1, "no_image": 2, "undecodable_image": 3, "image_too_large": 4, "no_caption": 5,
        "empty_caption": 6, "caption_not_utf8": 7, "pickle_member": 8, "no_label": 0, "duplicate_member": 0,
        "no_teacher_target": 0, "npy_needs_pickle": 0}
    assert monitor.state_dict() == {"skipped": [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], "used": 100}


def test_model_summary_prints_the_counted_flops_of_a_pair_instead_of_zero(caplog):
    import logging

    from lightning.pytorch import Trainer

    from clip_hvt import flops
    from clip_hvt.callbacks import ModelSummary
    from clip_hvt.module import CLIPModule
    from conftest import TINY_MODEL_CFG

    module = CLIPModule(TINY_MODEL_CFG)
    module.tower_costs = flops.model_costs(TINY_MODEL_CFG)  # what CLIPModule.setup counts
    expected = module.tower_costs["image_flops"] + module.tower_costs["text_flops"]
    assert expected > 0
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.callbacks.model_summary"):
        ModelSummary().on_fit_start(trainer, module)
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
    summary = caplog.text
    assert f"{get_human_readable_count(expected):<10}Total Flops" in summary
    assert "FLOPs" not in summary.split("\n")[1]  # the per-layer column of zeros is gone
