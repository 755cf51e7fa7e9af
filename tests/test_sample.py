"""The sample's rules: every fault becomes a counted skip by its reason; nothing is ever unpickled."""
import io
import json
import pickle
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_hvt.data.pipeline import collate, decode, random_caption, read_shards
from clip_hvt.data.sample import MAX_IMAGE_PIXELS, SKIP_REASONS, SkipCounter, SkipSample, npy
from tests.conftest import jpeg as _jpeg
from tests.conftest import write_tar


def jpeg(seed=0, size=(48, 40)):
    return _jpeg(seed, size)


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class _TouchOnLoad:
    """Unpickling this creates ``path``: a probe that the reader never unpickles."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.touch, (self.path,)


def decode_all(samples, caption_keys="txt", max_image_pixels=MAX_IMAGE_PIXELS, draft_size=0):
    """Training's decoding stage over ``samples``: (image, caption) pairs and the skips by reason."""
    counter = SkipCounter(log_first=0)
    keys = [caption_keys] if isinstance(caption_keys, str) else caption_keys
    out = list(decode(iter(samples), to_tensor, partial(random_caption, keys=keys), counter,
                      max_pixels=max_image_pixels, min_side=draft_size))
    return out, {r: n for r, n in counter.total.items() if n}


def sample(key="k", **members):
    return {"__key__": key, "__url__": "shard.tar", **members}


@pytest.mark.parametrize("members,reason", [
    (dict(jpg=jpeg()[:300], txt=b"cut"), "undecodable_image"),
    (dict(jpg=b"<html>not found</html>", txt=b"html"), "undecodable_image"),
    (dict(txt=b"no image here"), "no_image"),
    (dict(jpg=jpeg()), "no_caption"),
    (dict(jpg=jpeg(), txt=b" \n\t "), "empty_caption"),
    (dict(jpg=jpeg(), txt=b"caf\xe9 latin-1"), "caption_not_utf8"),
])
def test_each_fault_is_skipped_and_counted_by_its_reason(members, reason):
    out, counts = decode_all([sample(**members), sample("good", jpg=jpeg(1), txt=b"a good one")])
    assert [caption for _, caption in out] == ["a good one"]
    assert counts == {reason: 1}


def test_image_over_pixel_limit_is_skipped_before_decoding():
    big = jpeg(size=(64, 64))  # 4096 pixels
    out, counts = decode_all([sample(jpg=big, txt=b"big")], max_image_pixels=4095)
    assert out == [] and counts == {"image_too_large": 1}
    out, counts = decode_all([sample(jpg=big, txt=b"big")], max_image_pixels=4096)
    assert len(out) == 1 and counts == {}


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pkl", "pth", "meta.pyd"])
def test_pickle_member_skips_the_sample_and_is_never_unpickled(tmp_path, ext):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_TouchOnLoad(marker))
    out, counts = decode_all([sample(jpg=jpeg(), txt=b"looks fine", **{ext: payload})])
    assert out == [] and counts == {"pickle_member": 1}
    assert not marker.exists()
    pickle.loads(payload)  # the probe works: loading it would have left the marker
    assert marker.exists()


def test_json_field_caption_and_list_of_captions_uses_all_of_them():
    captions = ["a dog on a sofa", "a sleeping puppy", "brown dog, red sofa"]
    meta = json.dumps({"captions": captions, "caption": "single"}).encode()
    samples = [sample(str(i), jpg=jpeg(), txt=b"txt caption", json=meta) for i in range(60)]
    out, counts = decode_all(samples, caption_keys="json.captions")
    assert counts == {} and set(c for _, c in out) == set(captions)
    out, _ = decode_all(samples[:2], caption_keys="json.caption")
    assert [c for _, c in out] == ["single", "single"]


@pytest.mark.parametrize("meta,reason", [(b'{"other": 1}', "no_caption"), (b"{broken", "no_caption"),
                                         (b'{"captions": []}', "no_caption"), (b'{"captions": " "}', "empty_caption")])
def test_json_caption_faults_are_counted(meta, reason):
    _, counts = decode_all([sample(jpg=jpeg(), json=meta)], caption_keys="json.captions")
    assert counts == {reason: 1}


def test_caption_key_per_source_follows_the_source_index_of_the_sample():
    a = sample("a", jpg=jpeg(), txt=b"from txt", json=b'{"caption": "not this"}', __source__=0)
    b = sample("b", jpg=jpeg(), txt=b"not this", json=b'{"caption": "from json"}', __source__=1)
    out, _ = decode_all([a, b], caption_keys=["txt", "json.caption"])
    assert [c for _, c in out] == ["from txt", "from json"]


def test_jpeg_draft_decodes_at_reduced_size_not_below_the_target():
    out, _ = decode_all([sample(jpg=jpeg(size=(512, 384)), txt=b"x")], draft_size=100)
    assert tuple(out[0][0].shape) == (3, 192, 256)  # DCT scale 1/2: the short side stays >= 100
    out, _ = decode_all([sample(jpg=jpeg(size=(512, 384)), txt=b"x")])
    assert tuple(out[0][0].shape) == (3, 384, 512)


def test_collate_stacks_tokenizes_once_per_batch_and_hands_over_counts():
    counter = SkipCounter(log_first=0)
    calls = []

    def tokenizer(texts):
        calls.append(list(texts))
        return torch.zeros(len(texts), 4, dtype=torch.long)

    counter.add("no_caption", "x")
    counter.add("no_caption", "y")
    counter.add("corrupt_shard", "z")
    batch = collate([(torch.zeros(3, 2, 2), "a"), (torch.ones(3, 2, 2), "b")], tokenizer, counter)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["text"].shape == (2, 4) and calls == [["a", "b"]]
    assert dict(zip(SKIP_REASONS, batch["skipped"].tolist())) == {
        r: {"no_caption": 2, "corrupt_shard": 1}.get(r, 0) for r in SKIP_REASONS}
    assert collate([(torch.zeros(3, 2, 2), "c")], tokenizer, counter)["skipped"].sum() == 0  # handed over once


# ---- shard reading ----

def read(urls):
    counter = SkipCounter(log_first=0)
    samples = list(read_shards(iter(dict(url=str(u), source=7) for u in urls), counter))
    return [s["__key__"] for s in samples], counter.total["corrupt_shard"], samples


def pairs(n):
    return [(f"{i:04d}", {"jpg": jpeg(i), "txt": f"caption {i}".encode()}) for i in range(n)]


def test_complete_tar_reads_every_sample_with_url_and_members(tmp_path):
    write_tar(tmp_path / "a.tar", pairs(4))
    keys, corrupt, samples = read([tmp_path / "a.tar"])
    assert keys == ["0000", "0001", "0002", "0003"] and corrupt == 0
    assert samples[2]["txt"] == b"caption 2" and samples[2]["__url__"] == str(tmp_path / "a.tar")
    assert samples[2]["__source__"] == 7  # the source index travels with the sample


@pytest.mark.parametrize("member,into,kept", [
    ("0003.txt", 515, 3),  # inside 0003.txt's data: 0003 is being read, 0000-0002 go on
    ("0003.jpg", 700, 3),  # inside 0003's first member: its header was read, 0002 went on
    ("0003.jpg", 100, 2),  # inside 0003's header: the last full header was 0002's, so 0002 is lost too
    ("0003.jpg", 0, 2),  # exactly at a member boundary: no end-of-archive block, same as above
])
def test_truncated_tar_is_one_corrupt_shard_and_keeps_complete_samples(tmp_path, member, into, kept):
    offsets = write_tar(tmp_path / "full.tar", pairs(6))
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:offsets[member] + into])
    write_tar(tmp_path / "next.tar", [("next", {"jpg": jpeg(), "txt": b"after"})])
    keys, corrupt, samples = read([tmp_path / "cut.tar", tmp_path / "next.tar"])
    assert keys == [f"{i:04d}" for i in range(kept)] + ["next"]
    assert corrupt == 1
    assert all(set(s) >= {"jpg", "txt"} for s in samples)  # no partial sample goes on


def test_tar_without_end_of_archive_block_counts_as_corrupt(tmp_path):
    write_tar(tmp_path / "open.tar", pairs(3), end_block=False)
    keys, corrupt, _ = read([tmp_path / "open.tar"])
    assert keys == ["0000", "0001"] and corrupt == 1


def test_not_a_tar_and_missing_file_each_count_one_corrupt_shard(tmp_path):
    (tmp_path / "junk.tar").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(3000)))
    write_tar(tmp_path / "ok.tar", pairs(2))
    keys, corrupt, _ = read([tmp_path / "junk.tar", tmp_path / "gone.tar", tmp_path / "ok.tar"])
    assert keys == ["0000", "0001"] and corrupt == 2


def test_meta_members_and_upper_case_extensions(tmp_path):
    write_tar(tmp_path / "a.tar", [("__meta__", {"json": b"{}"}), ("x", {"JPG": jpeg(), "txt": b"x"})])
    keys, corrupt, samples = read([tmp_path / "a.tar"])
    assert keys == ["x"] and corrupt == 0 and "jpg" in samples[0]


def test_duplicate_member_skips_its_sample_and_meta_members_anywhere_are_ignored(tmp_path):
    write_tar(tmp_path / "a.tar", [("d", {"jpg": jpeg(), "txt": b"first"}), ("d", {"txt": b"second"}),
                                   ("dir/__meta__", {"json": b"{}"}), ("ok", {"jpg": jpeg(1), "txt": b"fine"})])
    keys, corrupt, samples = read([tmp_path / "a.tar"])
    assert keys == ["d", "ok"] and corrupt == 0
    out, counts = decode_all([{k: v for k, v in s.items() if k != "__source__"} for s in samples])
    assert [c for _, c in out] == ["fine"] and counts == {"duplicate_member": 1}


def test_every_skip_reason_has_a_one_line_meaning():
    assert all(meaning and "\n" not in meaning for meaning in SKIP_REASONS.values())


def saved(save, *args, **kw) -> bytes:
    buffer = io.BytesIO()
    save(buffer, *args, **kw)
    return buffer.getvalue()


GOOD_NPY = saved(np.save, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("data,reason,detail", [
    (b"", "no_teacher_target", "EOF: reading magic string"),
    (b"PK\x03\x04" + b"\0" * 40, "no_teacher_target", "magic string is not correct"),  # a zip
    (saved(np.savez, a=np.ones(3, np.float32)), "no_teacher_target", "magic string is not correct"),
    (b"<html>not found</html>", "no_teacher_target", "magic string is not correct"),
    (pickle.dumps(np.ones(3, np.float32)), "no_teacher_target", "magic string is not correct"),
    (saved(np.save, np.array([{"a": 1}], dtype=object), allow_pickle=True), "npy_needs_pickle", ""),
    (saved(np.save, np.zeros(0, np.float32)), "no_teacher_target", "float32 array of shape (0,), not non-empty"),
    (saved(np.save, np.array(["a", "b"])), "no_teacher_target", "<U1 array of shape (2,), not non-empty"),
    (GOOD_NPY[:-4], "no_teacher_target", "20 bytes of data for a float32 array of shape (2, 3)"),
], ids=["empty", "zip", "npz", "html", "pickle", "object_array", "empty_array", "strings", "truncated"])
def test_npy_member_that_is_not_a_numeric_array_is_a_skip_by_its_reason(data, reason, detail):
    with pytest.raises(SkipSample) as skip:
        npy({"t.npy": data}, "t.npy")
    assert skip.value.reason == reason and detail in skip.value.detail


def test_npy_object_array_is_refused_from_its_header_and_never_unpickled(tmp_path):
    probe = tmp_path / "unpickled"
    data = saved(np.save, np.array([_TouchOnLoad(probe)], dtype=object), allow_pickle=True)
    with pytest.raises(SkipSample) as skip:
        npy({"t.npy": data}, "t.npy")
    assert (skip.value.reason, skip.value.detail) == ("npy_needs_pickle", "t.npy") and not probe.exists()


def test_npy_reads_a_numeric_array_and_a_missing_member_is_a_skip():
    array = npy({"t.npy": GOOD_NPY}, "t.npy")
    assert type(array) is np.ndarray and array.dtype == np.float32
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(SkipSample, match="no_teacher_target: no t.npy member"):
        npy({}, "t.npy")
