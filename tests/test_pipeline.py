"""Pipeline builders: evaluation sets streamed by rank and worker, whole and disjoint; batch layout."""
import faulthandler
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_hvt.cli import UserError
from clip_hvt.data.pipeline import (MAX_EMPTY_SHARDS_IN_A_ROW, eval_loader, normalize_uint8, share, split_normalize,
                                     train_loader)
from clip_hvt.data.sample import SKIP_REASONS
from clip_hvt.factory import image_transforms
from tests.conftest import TINY_MODEL_CFG, jpeg, write_tar

TINY_CONFIG = str(Path(__file__).parent / "configs" / "tiny.yaml")


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def skipped(batches):
    total = sum(b["skipped"] for b in batches)
    return {r: n for r, n in zip(SKIP_REASONS, total.tolist()) if n}


def labelled_set(root, shard_sizes):
    """Shards of ``{jpg, cls}`` samples; the label of sample ``i`` (over the set) is ``i``."""
    urls, i = [], 0
    for s, n in enumerate(shard_sizes):
        write_tar(root / f"zs-{s}.tar", [(f"k{i + j:04d}", {"jpg": jpeg(i + j, 8), "cls": str(i + j).encode()})
                                         for j in range(n)])
        urls.append(str(root / f"zs-{s}.tar"))
        i += n
    return urls, i


@pytest.mark.parametrize("shard_sizes,world_size,workers", [
    ([5, 3, 4, 6], 2, 1),  # shards split by rank
    ([5, 3, 4, 6], 2, 2),  # by rank, then by worker
    ([7, 5], 3, 1),  # fewer shards than ranks: samples split by rank
    ([7, 5, 2], 2, 3),  # shards by rank, then samples by worker
    ([4], 5, 2),  # more readers than samples: most shares empty
])
def test_rank_shares_are_disjoint_and_cover_the_set(tmp_path, shard_sizes, world_size, workers):
    urls, total = labelled_set(tmp_path, shard_sizes)
    seen = []
    for rank in range(world_size):
        for batch in eval_loader(urls, to_tensor, 3, "classification", rank=rank, world_size=world_size,
                                 num_workers=workers, num_classes=total):
            assert len(batch["image"]) <= 3 and batch["image"].shape[1:] == (3, 8, 8)
            seen += batch["label"].tolist()
    assert sorted(seen) == list(range(total))


def test_share_splits_shards_first_then_samples():
    urls = [f"{i}.tar" for i in range(5)]
    assert share(urls, 1, 2) == (["1.tar", "3.tar"], 1, 0)
    assert share(urls[:2], 2, 3, worker=1, num_workers=2) == (urls[:2], 6, 2 + 3)


def test_retrieval_batches_hold_every_caption_and_the_first_tokenized(tmp_path):
    captions = [["a dog", "a puppy", "brown dog"], ["a cat"], ["two birds", "birds on a wire"]]
    write_tar(tmp_path / "r.tar", [(f"k{i}", {"jpg": jpeg(i, 8), "json": json.dumps({"captions": c}).encode()})
                                   for i, c in enumerate(captions)])

    def tokenizer(texts):
        return torch.tensor([[len(t)] for t in texts])

    batches = list(eval_loader([str(tmp_path / "r.tar")], to_tensor, 2, "retrieval", caption_key="json.captions",
                               tokenizer=tokenizer))
    assert [b["captions"] for b in batches] == [captions[:2], captions[2:]]
    assert torch.cat([b["text"] for b in batches]).flatten().tolist() == [len(c[0]) for c in captions]
    assert skipped(batches) == {}


def test_skips_after_the_last_batch_arrive_in_a_batch_without_images(tmp_path):
    entries = [(f"k{i}", {"jpg": jpeg(i, 8), "cls": b"0"}) for i in range(4)]
    entries += [("nolabel", {"jpg": jpeg(9, 8)}), ("notimage", {"jpg": b"<html>", "cls": b"0"})]
    write_tar(tmp_path / "a.tar", entries, cut_in=len(entries) - 1)  # and the shard breaks in the last sample
    batches = list(eval_loader([str(tmp_path / "a.tar")], to_tensor, 2, "classification", num_classes=1))
    assert [len(b["image"]) for b in batches] == [2, 2, 0]
    assert skipped(batches[2:]) == {"no_label": 1, "corrupt_shard": 1}


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="task must be 'classification' or 'retrieval'"):
        eval_loader([], to_tensor, 2, "captioning")


def test_uint8_split_plus_batched_normalize_equals_open_clip_transform():
    _, val = image_transforms(TINY_MODEL_CFG)
    pil_part, mean, std = split_normalize(val)
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (40, 50, 3), dtype=np.uint8)) for i in range(3)]
    batch = torch.stack([pil_part(im) for im in images])
    assert batch.dtype == torch.uint8
    assert torch.equal(normalize_uint8(batch, mean, std), torch.stack([val(im) for im in images]))
    assert split_normalize(lambda im: im) is None  # any other transform shape: full transform in the workers


def _niceness(image) -> torch.Tensor:
    return torch.tensor([os.nice(0)])  # the worker's own priority, as the batch's "image"


@pytest.mark.parametrize("worker_nice", [0, 5])
def test_training_workers_run_worker_nice_steps_below_the_process(tmp_path, worker_nice):
    write_tar(tmp_path / "s.tar", [(f"{i:03d}", {"jpg": jpeg(i), "txt": b"a caption"}) for i in range(4)])
    loader = train_loader([[str(tmp_path / "s.tar")]], _niceness, lambda texts: torch.zeros(len(texts), 4),
                          batch_size=2, num_batches=1, num_workers=1, shuffle=1, worker_nice=worker_nice)
    batch = next(iter(loader))
    assert batch["image"].flatten().tolist() == [min(19, os.nice(0) + worker_nice)] * 2


@pytest.fixture
def ends_within_minutes():
    """Without the guard these tests would wait forever: the process is ended (with a traceback) instead."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _first_batch(urls, workers=0, **kwargs):
    loader = train_loader([urls], to_tensor, lambda texts: torch.zeros(len(texts), 4), batch_size=2, num_batches=1,
                          num_workers=workers, shuffle=1, **kwargs)
    return next(iter(loader))


def test_training_data_with_no_shard_readable_stops_with_the_reasons_instead_of_waiting_forever(tmp_path,
                                                                                                ends_within_minutes):
    # an endless resampled stream of unreadable shards would never fill a batch
    (tmp_path / "lfs.tar").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(UserError) as err:
        _first_batch([str(tmp_path / "lfs.tar"), str(tmp_path / "missing.tar")])
    message = str(err.value)
    assert message.startswith(f"{MAX_EMPTY_SHARDS_IN_A_ROW} shards in a row held no sample (the last: '")
    assert f"; skipped so far in this data worker: corrupt_shard {MAX_EMPTY_SHARDS_IN_A_ROW} (e.g. " in message
    assert "python -m clip_hvt.data.check --paths DIR" in message


def test_training_data_with_no_usable_sample_stops_with_the_reasons_instead_of_waiting_forever(tmp_path, monkeypatch,
                                                                                               ends_within_minutes):
    monkeypatch.setattr("clip_hvt.data.pipeline.MAX_SKIPS_IN_A_ROW", 30)
    write_tar(tmp_path / "s.tar", [(f"{i:03d}", {"jpg": jpeg(i), "json": b'{"caption": "x"}'}) for i in range(7)])
    with pytest.raises(UserError) as err:  # captions under json, the default key is txt
        _first_batch([str(tmp_path / "s.tar")])
    assert str(err.value).startswith("30 samples in a row were skipped, none usable; skipped so far in this data "
                                     f"worker: no_caption 30 (e.g. {tmp_path / 's.tar'}:000)")


def test_a_worker_stopping_ends_the_training_command_in_one_line(tmp_path, ends_within_minutes):
    from clip_hvt import train
    (tmp_path / "shard.tar").write_bytes(b"not a tar")
    with pytest.raises(SystemExit) as exc:  # a worker process: torch re-raises its error with the traceback
        train.main(["--config", TINY_CONFIG, "--data.shapes", "null", "--data.train_shards", str(tmp_path / "shard.tar"),
                    "--data.train_num_samples", "64", "--data.num_workers", "1",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--final_validation", "false"])
    message = str(exc.value.code)
    assert message.startswith(f"python -m clip_hvt.train: error: {MAX_EMPTY_SHARDS_IN_A_ROW} shards in a row held "
                              f"no sample (the last: '{tmp_path / 'shard.tar'}')")
    assert "\n" not in message and "Traceback" not in message
