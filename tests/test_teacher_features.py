"""Stored teacher targets: the writer adds float16 .npy embeddings per sample, the training reader
returns them with the batch (same loss as the live teacher), and missing or pickled targets are
counted skips with their reason."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from clip_hvt.data.pipeline import train_loader
from clip_hvt.data.sample import SKIP_REASONS
from clip_hvt.data import teacher_features as writer
from clip_hvt.data.teacher_features import main as teacher_features
from clip_hvt.distill import Distill
from clip_hvt.export import export_model
from clip_hvt.factory import create_model, create_tokenizer, image_transforms
from clip_hvt.loss import build_loss
from clip_hvt.module import CLIPModule
from conftest import assert_plain_members, jpeg, write_tar

CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
       "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
SAMPLES = 12


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored")
    torch.manual_seed(1)
    export_model(create_model(CFG), CFG, root / "teacher")
    entries = [(f"{i:04d}", {"jpg": jpeg(i, size=40), "txt": f"shape number {i}".encode()}) for i in range(SAMPLES)]
    entries.append(("broken", {"jpg": b"not an image", "txt": b"lost"}))
    (root / "in").mkdir()
    write_tar(root / "in" / "part-000000.tar", entries)
    summary = teacher_features(["--shards", str(root / "in" / "part-000000.tar"), "--out", str(root / "out"),
                                "--teacher", str(root / "teacher"), "--batch_size", "5"])
    return root, summary


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def loader(urls, batch_size=SAMPLES):
    transform = image_transforms(CFG)[1]  # deterministic: the teacher saw the same pixels
    return train_loader([urls], transform, create_tokenizer(CFG), batch_size, num_batches=1, num_workers=0,
                        shuffle=1, teacher_targets=True)


def test_writer_adds_float16_embeddings_and_counts_what_it_leaves_out(stored):
    stored, summary = stored
    assert summary == {"written": SAMPLES, "skipped": {"undecodable_image": 1}}
    out = members(stored / "out" / "part-000000.tar")
    assert_plain_members(stored / "out" / "part-000000.tar")
    assert json.loads((stored / "out" / "sizes.json").read_text()) == {"part-000000.tar": SAMPLES}
    image = np.load(io.BytesIO(out["0003.teacher_image.npy"]), allow_pickle=False)
    text = np.load(io.BytesIO(out["0003.teacher_text.npy"]), allow_pickle=False)
    assert image.dtype == text.dtype == np.float16 and image.shape == (32,) and text.shape == (1, 32)
    assert abs(float(np.linalg.norm(image.astype(np.float32))) - 1) < 1e-2
    assert out["0003.txt"] == b"shape number 3" and "broken.jpg" not in out


def test_stored_targets_give_the_live_teachers_loss(stored):
    stored, _ = stored
    batch = next(iter(loader([str(stored / "out" / "part-000000.tar")])))
    assert batch["teacher_image_emb"].dtype == torch.float16 and batch["teacher_image_emb"].shape == (SAMPLES, 32)
    torch.manual_seed(2)
    live = CLIPModule(CFG, distill=Distill(teacher=str(stored / "teacher"), embed_weight=1.0))
    kept = CLIPModule(CFG, distill=Distill(teacher=str(stored / "teacher"), embed_weight=1.0, stored_targets=True))
    kept.load_state_dict(live.state_dict())
    losses = []
    for module in (live, kept):
        module.loss_fn = build_loss("clip", distill=True)
        with torch.no_grad():
            image_f, text_f = module.encode(batch["image"], batch["text"])
            targets = module.teacher_targets(batch)
            losses.append(module.distill_loss(image_f, text_f, module.model.logit_scale.exp(), None, targets))
    (live_loss, live_parts), (kept_loss, kept_parts) = losses
    torch.testing.assert_close(kept_loss, live_loss, rtol=1e-3, atol=1e-3)  # float16 targets
    for name in ("distill_loss", "embed_loss", "contrastive_loss"):
        torch.testing.assert_close(kept_parts[name], live_parts[name], rtol=1e-3, atol=1e-3)


def test_missing_and_pickled_targets_are_counted_skips(stored, tmp_path):
    stored, _ = stored
    good = members(stored / "out" / "part-000000.tar")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    entries = []
    for i in range(SAMPLES):
        sample = {ext: good[f"{i:04d}.{ext}"] for ext in ("jpg", "txt", "teacher_image.npy", "teacher_text.npy")}
        # the last two: the endless training stream has counted each once when the first batch is out
        if i == SAMPLES - 2:
            del sample["teacher_text.npy"]
        if i == SAMPLES - 1:
            sample["teacher_image.npy"] = pickled.getvalue()
        entries.append((f"{i:04d}", sample))
    write_tar(tmp_path / "bad.tar", entries)
    batch = next(iter(loader([str(tmp_path / "bad.tar")], batch_size=SAMPLES - 2)))
    counts = dict(zip(SKIP_REASONS, batch["skipped"].tolist()))
    assert counts["no_teacher_target"] == 1 and counts["npy_needs_pickle"] == 1
    assert sum(counts.values()) == 2 and len(batch["image"]) == SAMPLES - 2


def test_writer_with_a_missing_teacher_is_one_line(stored, tmp_path):
    stored, _ = stored
    with pytest.raises(SystemExit) as exc:
        teacher_features(["--shards", str(stored / "in" / "part-000000.tar"), "--out", str(tmp_path / "o"),
                          "--teacher", str(tmp_path / "none")])
    assert str(exc.value.code).startswith("python -m clip_hvt.data.teacher_features: error: teacher ")
    assert "not found" in str(exc.value.code)


PROG = "python -m clip_hvt.data.teacher_features: error: "


def run_writer(stored, shards, out, *more):
    return teacher_features(["--shards", shards, "--out", str(out), "--teacher", str(stored / "teacher"),
                             "--batch_size", "5", *more])


def test_two_inputs_of_one_name_are_refused_before_anything_is_written(stored, tmp_path):
    stored, _ = stored
    for source in ("a", "b"):  # img2dataset names every set's shards 00000.tar, ...
        (tmp_path / source).mkdir()
        shutil.copy(stored / "in" / "part-000000.tar", tmp_path / source / "00000.tar")
    with pytest.raises(SystemExit) as exc:
        run_writer(stored, f"{tmp_path}/a/00000.tar :: {tmp_path}/b/00000.tar", tmp_path / "out")
    assert exc.value.code == (f"{PROG}shards '{tmp_path}/a/00000.tar' and '{tmp_path}/b/00000.tar' would both be "
                              f"written as {tmp_path}/out/00000.tar: run once per source, each into its own --out "
                              "directory")
    assert not (tmp_path / "out").exists()


def test_pipe_command_output_is_named_after_the_shard_it_streams(stored, tmp_path):
    stored, _ = stored
    summary = run_writer(stored, f"pipe:cat {stored}/in/part-000000.tar | cat", tmp_path / "out")
    assert summary == {"written": SAMPLES, "skipped": {"undecodable_image": 1}}
    assert sorted(os.listdir(tmp_path / "out")) == ["part-000000.tar", "sizes.json"]
    assert (tmp_path / "out" / "part-000000.tar").read_bytes() == (stored / "out" / "part-000000.tar").read_bytes()
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"part-000000.tar": SAMPLES}


def test_stopped_run_leaves_only_complete_listed_shards_and_keeps_other_counts(stored, tmp_path, monkeypatch):
    stored, _ = stored
    (tmp_path / "in").mkdir()
    for i in range(2):
        shutil.copy(stored / "in" / "part-000000.tar", tmp_path / "in" / f"part-00000{i}.tar")
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.tar").write_bytes(b"another set's shard")
    (out / "part-000001.tar").write_bytes(b"written by an earlier run")
    (out / "sizes.json").write_text(json.dumps({"other.tar": 7, "part-000001.tar": 99}))
    embed, calls = writer._embed, []

    def out_of_memory(*args):  # 12 samples in batches of 5: shard 0 takes 3 calls, shard 1 stops in its second
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory")
        return embed(*args)

    monkeypatch.setattr(writer, "_embed", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run_writer(stored, f"{tmp_path}/in/part-00000{{0..1}}.tar", out)
    assert sorted(os.listdir(out)) == ["other.tar", "part-000000.tar", "part-000001.tar", "sizes.json"]
    assert (out / "part-000000.tar").read_bytes() == (stored / "out" / "part-000000.tar").read_bytes()
    assert (out / "part-000001.tar").read_bytes() == b"written by an earlier run"  # not replaced by a partial one
    assert json.loads((out / "sizes.json").read_text()) == {"other.tar": 7, "part-000000.tar": SAMPLES,
                                                            "part-000001.tar": 99}
    monkeypatch.setattr(writer, "_embed", embed)
    run_writer(stored, f"{tmp_path}/in/part-00000{{0..1}}.tar", out)  # the rerun completes it
    assert sorted(os.listdir(out)) == ["other.tar", "part-000000.tar", "part-000001.tar", "sizes.json"]
    assert (out / "part-000001.tar").read_bytes() == (stored / "out" / "part-000000.tar").read_bytes()
    assert json.loads((out / "sizes.json").read_text()) == {"other.tar": 7, "part-000000.tar": SAMPLES,
                                                            "part-000001.tar": SAMPLES}


def test_unreadable_sizes_json_in_out_is_one_line_and_nothing_is_written(stored, tmp_path):
    stored, _ = stored
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sizes.json").write_text('{"other.tar": 7,')
    with pytest.raises(SystemExit) as exc:
        run_writer(stored, str(stored / "in" / "part-000000.tar"), tmp_path / "out")
    assert exc.value.code == (f"{PROG}{tmp_path}/out/sizes.json: not valid JSON (line 1 col 17: Expecting property "
                              "name enclosed in double quotes); it lists the shards already in --out: repair it "
                              f"(python -m clip_hvt.data.check --paths {tmp_path}/out --write_sizes true) or give a "
                              "new --out")
    assert os.listdir(tmp_path / "out") == ["sizes.json"]
