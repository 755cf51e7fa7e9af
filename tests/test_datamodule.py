"""WebDataModule end to end on hand-made shards: exact skip counts, equal batches per rank, weighted
sources with per-source caption keys, img2dataset output as it is, and the train CLI on faulty data."""
import csv
import io
import json
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clip_hvt import train
from clip_hvt.data import datamodule
from clip_hvt.data.datamodule import WebDataModule
from clip_hvt.data.sample import SKIP_REASONS
from tests.conftest import TINY_MODEL_CFG as MODEL_CFG
from tests.conftest import jpeg, write_tar


def good(name, seed=0):
    return {"jpg": jpeg(seed), "txt": name.encode()}


# One of each sample-level fault, with the reason the reader must count it under.
FAULTS = {
    "truncated jpeg": ({"jpg": jpeg(1)[:200], "txt": b"cut image"}, "undecodable_image"),
    "not an image": ({"jpg": b"<html>404 not found</html>", "txt": b"html page"}, "undecodable_image"),
    "too many pixels": ({"jpg": jpeg(2, size=64), "txt": b"huge image"}, "image_too_large"),
    "missing caption": ({"jpg": jpeg(3)}, "no_caption"),
    "empty caption": ({"jpg": jpeg(4), "txt": b"  \n"}, "empty_caption"),
    "non-UTF-8 caption": ({"jpg": jpeg(5), "txt": b"caf\xe9 cr\xe8me"}, "caption_not_utf8"),
    "pickle member": ({"jpg": jpeg(6), "txt": b"pickled", "pyd": pickle.dumps({"x": 1})}, "pickle_member"),
}
MAX_PIXELS = 2000  # 32x32 images pass, the 64x64 one does not


def make_dm(train_shards, rank=0, world_size=1, **kw):
    """A set-up data module; the stub trainer stands in for Lightning's rank and step."""
    kw = {"num_workers": 0, "sample_shuffle": 0, "max_image_pixels": MAX_PIXELS, **kw}
    dm = WebDataModule(train_shards=str(train_shards), model_cfg=MODEL_CFG, **kw)
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, global_step=0)
    dm.setup("fit")
    return dm


def token_rows(tokens):
    return [tuple(row.tolist()) for row in tokens]


def skipped(batches):
    total = sum(b["skipped"] for b in batches)
    return {r: n for r, n in zip(SKIP_REASONS, total.tolist()) if n}


def expected(kinds):
    return dict(Counter(FAULTS[k][1] for k in kinds))


def test_corrupt_image_and_missing_caption_are_skipped_and_batches_hold_the_rest(tmp_path):
    names = [f"caption number {i}" for i in range(12)]
    entries = [(f"{i:04d}", good(n, i)) for i, n in enumerate(names)]
    entries.insert(3, ("bad0", FAULTS["truncated jpeg"][0]))
    entries.insert(8, ("bad1", FAULTS["missing caption"][0]))
    write_tar(tmp_path / "s-0.tar", entries)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-0.tar": 12}))
    dm = make_dm(tmp_path / "s-0.tar", batch_size=4)
    batches = list(dm.train_dataloader())  # 12 // 4 = 3 batches: one pass over the one shard
    assert len(batches) == 3 and all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    assert sorted(r for b in batches for r in token_rows(b["text"])) == sorted(token_rows(dm.tokenizer(names)))
    assert skipped(batches) == {"undecodable_image": 1, "no_caption": 1}


def test_every_rank_yields_the_same_number_of_batches_over_uneven_shards(tmp_path):
    sizes = {f"s-{i}.tar": n for i, n in enumerate([3, 7, 13, 5, 12])}  # 40 samples
    for i, (name, n) in enumerate(sizes.items()):
        write_tar(tmp_path / name, [(f"{i}_{j:03d}", good(f"shard {i} sample {j}", j)) for j in range(n)])
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    lengths, yielded = [], []
    for rank in range(2):
        dm = make_dm(tmp_path / "s-{0..4}.tar", rank=rank, world_size=2, batch_size=4, num_workers=2)
        loader = dm.train_dataloader()
        batches = list(loader)
        lengths.append(len(loader))
        yielded.append(len(batches))
        assert all(b["image"].shape[0] == 4 for b in batches)
    # 40 // (4 * 2) = 5 batches per rank, rounded up to a multiple of the 2 workers
    assert lengths == [6, 6] and yielded == [6, 6]


def test_injected_faults_are_counted_exactly_by_reason_in_one_pass(tmp_path):
    """~5% faulty samples over three shards, one of them truncated, read once by the val loader.

    The truncated shard counts one ``corrupt_shard``: its complete samples before the cut are
    used; the sample being read at the cut and the rest of that shard are lost, uncounted.
    """
    write_tar(tmp_path / "s-0.tar", [(f"0_{j:03d}", good(f"zero {j}", j)) for j in range(20)], cut_in=12)
    kinds = list(FAULTS)
    names = []
    for shard, fault_kinds in ((1, kinds[:4]), (2, kinds[4:])):
        entries = [(f"{shard}_{j:03d}", good(f"shard {shard} sample {j}", j)) for j in range(66)]
        names += [f"shard {shard} sample {j}" for j in range(66)]
        for n, kind in enumerate(fault_kinds):
            entries.insert(5 + 15 * n, (f"{shard}_bad{n}", FAULTS[kind][0]))
        write_tar(tmp_path / f"s-{shard}.tar", entries)
    dm = make_dm(tmp_path / "s-{0..2}.tar", val_shards=str(tmp_path / "s-{0..2}.tar"), batch_size=16)
    batches = list(dm.val_dataloader())
    used = sorted(r for b in batches for r in token_rows(b["text"]))
    assert used == sorted(token_rows(dm.tokenizer([f"zero {j}" for j in range(12)] + names)))
    assert skipped(batches) == {**expected(kinds), "corrupt_shard": 1}
    assert len(kinds) / (12 + 2 * 66 + len(kinds)) == pytest.approx(0.05, abs=0.01)


def test_weighted_sources_with_a_caption_key_per_source(tmp_path):
    for src, members in (("a", {"txt": b"apple"}), ("b", {"txt": b"wrong", "json": b'{"caption": "banana"}'})):
        for i in range(4):
            write_tar(tmp_path / f"{src}-{i}.tar", [(f"{src}{i}_{j}", {"jpg": jpeg(j), **members}) for j in range(4)])
    spec = f"{tmp_path}/a-{{0..3}}.tar::{tmp_path}/b-{{0..3}}.tar"
    dm = make_dm(spec, batch_size=8, train_num_samples=400, source_weights=[3, 1],
                 caption_key=["txt", "json.caption"])
    batches = list(dm.train_dataloader())
    captions = Counter(r for b in batches for r in token_rows(b["text"]))
    apple, banana = token_rows(dm.tokenizer(["apple", "banana"]))
    assert set(captions) == {apple, banana}  # source b never falls back to its txt
    assert sum(captions.values()) == 400
    assert abs(captions[apple] / 400 - 0.75) < 0.1  # 100 shard draws at 3:1


def test_caption_key_list_must_match_the_sources(tmp_path):
    write_tar(tmp_path / "a.tar", [("x", good("x"))])
    with pytest.raises(ValueError, match="caption_key has 3 entries for 1 sources"):
        make_dm(tmp_path / "a.tar", caption_key=["txt", "json.a", "json.b"])


def test_val_caption_key_reads_val_shards_captioned_only_in_json(tmp_path):
    write_tar(tmp_path / "t-0.tar", [(f"t{j}", good(f"train {j}", j)) for j in range(8)])
    (tmp_path / "sizes.json").write_text(json.dumps({"t-0.tar": 8}))
    names = []
    for shard, n in ((0, 5), (1, 4)):
        entries = [(f"v{shard}_{j}", {"jpg": jpeg(j), "json": json.dumps({"caption": f"val {shard} {j}"}).encode()})
                   for j in range(n)]
        names += [f"val {shard} {j}" for j in range(n)]
        write_tar(tmp_path / f"v-{shard}.tar", entries)
    val = str(tmp_path / "v-{0..1}.tar")
    dm = make_dm(tmp_path / "t-0.tar", val_shards=val, val_caption_key="json.caption", batch_size=4)
    batches = list(dm.val_dataloader())
    assert sorted(r for b in batches for r in token_rows(b["text"])) == sorted(token_rows(dm.tokenizer(names)))
    assert skipped(batches) == {}
    assert len(list(dm.train_dataloader())) == 2  # training still reads txt
    # Without it the train source's txt is used: every val sample is a counted no_caption skip. No
    # sample decodes, so one batch without images carries the counts.
    dm = make_dm(tmp_path / "t-0.tar", val_shards=val, batch_size=4)
    batches = list(dm.val_dataloader())
    assert [len(b["image"]) for b in batches] == [0] and skipped(batches) == {"no_caption": 9}


# ---- img2dataset output, as img2dataset writes it (webdataset output format) ----

def write_img2dataset_shard(directory, shard_id, entries, failed=2, cut_in=None):
    """``{shard:05d}.tar`` with key.jpg/.txt/.json, ``.parquet`` of every row, ``_stats.json``."""
    rows, tar_entries = [], []
    for i, members in enumerate(entries):
        key = f"{shard_id:05d}{i:04d}"
        meta = {"url": f"https://example.com/{key}.jpg", "caption": members.get("txt", b"").decode("utf-8", "replace"),
                "key": key, "status": "success", "error_message": None, "width": 32, "height": 32,
                "original_width": 32, "original_height": 32, "exif": None, "sha256": None}
        tar_entries.append((key, {**members, "json": json.dumps(meta).encode()}))
        rows.append(meta)
    for i in range(failed):  # img2dataset lists failed downloads in the parquet only
        rows.append({"url": f"https://example.com/gone{i}.jpg", "caption": "gone", "key": f"{shard_id:05d}{len(entries) + i:04d}",
                     "status": "failed_to_download", "error_message": "HTTP Error 404"})
    write_tar(directory / f"{shard_id:05d}.tar", tar_entries, cut_in=cut_in)
    pd.DataFrame(rows).to_parquet(directory / f"{shard_id:05d}.parquet")
    stats = {"count": len(rows), "successes": len(entries), "failed_to_download": failed, "failed_to_resize": 0,
             "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5,
             "status_dict": {"success": len(entries), "HTTP Error 404": failed}}
    (directory / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))


def test_img2dataset_output_is_read_as_is_with_counts_from_its_stats(tmp_path):
    for shard in range(2):
        write_img2dataset_shard(tmp_path, shard, [good(f"shard {shard} image {i}", i) for i in range(10 + 3 * shard)])
    spec = str(tmp_path / "{00000..00001}.tar")
    dm = make_dm(spec, val_shards=spec, batch_size=4)
    assert dm.batches_per_epoch() == 23 // 4  # successes 10 + 13 from the _stats.json files
    names = [f"shard {s} image {i}" for s in range(2) for i in range(10 + 3 * s)]
    all_rows = token_rows(dm.tokenizer(names))
    val = [r for b in dm.val_dataloader() for r in token_rows(b["text"])]
    assert sorted(val) == sorted(all_rows)
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 5 and set(r for b in train_batches for r in token_rows(b["text"])) <= set(all_rows)


# ---- the train CLI on faulty img2dataset output: counts logged exactly, threshold stops the run ----

CLI_FAULTS = [(3, "truncated jpeg"), (8, "not an image"), (14, "too many pixels"), (19, "missing caption"),
              (25, "empty caption"), (30, "non-UTF-8 caption"), (36, "pickle member")]
CLI_WRITTEN, CLI_CUT = 80, 40  # the tar breaks inside entry 40 of the 80 its stats say were written


@pytest.fixture
def faulty_img2dataset(tmp_path):
    entries = [good(f"a photo number {i}", i) for i in range(CLI_WRITTEN)]
    for position, kind in CLI_FAULTS:
        entries[position] = FAULTS[kind][0]
    (tmp_path / "i2d").mkdir()
    write_img2dataset_shard(tmp_path / "i2d", 0, entries, cut_in=CLI_CUT)
    return str(tmp_path / "i2d" / "00000.tar")


def expected_counts_per_step(batch_size, steps):
    """Reference: the one shard is read again and again; each pass reads entries 0..39, then breaks.

    webdataset's ``batched`` collates a batch when the first sample of the next one arrives, so a
    batch carries the skips met before that sample.
    """
    faults = dict(CLI_FAULTS)
    counts, used, per_step = Counter(), 0, []
    while len(per_step) < steps:
        for i in range(CLI_CUT):
            if i in faults:
                counts[FAULTS[faults[i]][1]] += 1
                continue
            used += 1
            if used % batch_size == 1 and used > 1:
                per_step.append(dict(counts))
                if len(per_step) == steps:
                    return per_step
        counts["corrupt_shard"] += 1


def _cli(tiny_config, tmp_path, shard, *args, max_skip_rate=0.1, min_samples=1000):
    """The tiny config trained on ``shard`` alone: no embedded data, no validation (unless ``args`` ask), only SkipMonitor."""
    override = tmp_path / "data_only.yaml"
    override.write_text(
        "data:\n  shapes: null\ntrainer:\n  callbacks:\n    - class_path: clip_hvt.callbacks.SkipMonitor\n"
        f"      init_args: {{max_skip_rate: {max_skip_rate}, min_samples: {min_samples}, log_every_n_steps: 1}}\n")
    return train.main(["--config", tiny_config, "--config", str(override), "--data.train_shards", shard,
                       "--data.max_image_pixels", str(MAX_PIXELS), "--data.sample_shuffle", "0", *args])


@pytest.mark.slow
def test_cli_trains_on_faulty_img2dataset_output_and_logs_exact_skip_counts(tiny_config, tmp_path, monkeypatch,
                                                                            faulty_img2dataset):
    monkeypatch.chdir(tmp_path)
    _cli(tiny_config, tmp_path, faulty_img2dataset)  # tiny: 4 steps of 16, no sizes.json: stats say 80
    with open(tmp_path / "runs" / "tiny" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/skipped_no_caption")]
    logged = {int(r["step"]): {reason: int(float(r[f"data/skipped_{reason}"])) for reason in SKIP_REASONS}
              for r in rows}
    reference = expected_counts_per_step(16, 4)
    assert reference[-1]["corrupt_shard"] == 1 and reference[-1]["undecodable_image"] == 4  # 64 samples: two passes
    assert sorted(logged) == [0, 1, 2, 3]  # trained all 4 steps through the faults
    for step, counts in enumerate(reference):
        assert logged[step] == {reason: counts.get(reason, 0) for reason in SKIP_REASONS}


@pytest.mark.slow
def test_cli_stops_when_the_skip_rate_passes_the_threshold(tiny_config, tmp_path, monkeypatch, faulty_img2dataset):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:  # the command's one line, not a traceback
        _cli(tiny_config, tmp_path, faulty_img2dataset, max_skip_rate=0.05, min_samples=16)
    first = expected_counts_per_step(16, 1)[0]  # the first batch already passes 5%
    n = sum(first.values())
    message = str(err.value.code)
    assert message.startswith("python -m clip_hvt.train: error: ") and "\n" not in message
    assert f"{n} of {n + 16} samples skipped ({n / (n + 16):.1%} > max_skip_rate 5.0%)" in message
    assert ", ".join(f"{r}={first[r]}" for r in SKIP_REASONS if r in first) in message
    assert "python -m clip_hvt.data.check" in message


@pytest.mark.slow
def test_validation_skips_are_counted_per_pass_logged_and_summarised(tiny_config, tmp_path, monkeypatch,
                                                                     faulty_img2dataset, capsys):
    monkeypatch.chdir(tmp_path)
    metrics = _cli(tiny_config, tmp_path, faulty_img2dataset, "--data.val_shards", faulty_img2dataset,
                   "--trainer.max_steps", "2")
    # validation reads the shard once: each fault once, then the tar breaks inside entry 40
    expected = Counter(FAULTS[kind][1] for _, kind in CLI_FAULTS) + Counter(corrupt_shard=1)
    assert {r: int(metrics[f"val_data/skipped_{r}"]) for r in SKIP_REASONS} == \
        {r: expected.get(r, 0) for r in SKIP_REASONS}
    assert metrics["val_data/samples"] == CLI_CUT - len(CLI_FAULTS)
    out = capsys.readouterr().out
    assert f"validation skipped {sum(expected.values())} sample(s) (" in out
    assert f"metrics are over the {CLI_CUT - len(CLI_FAULTS)} that decoded" in out


def test_shapes_and_train_shards_together_is_an_error_naming_both(tmp_path):
    write_tar(tmp_path / "a.tar", [("x", good("x"))])
    with pytest.raises(ValueError, match="data.shapes and data.train_shards are both set"):
        WebDataModule(train_shards=str(tmp_path / "a.tar"), shapes=datamodule.Shapes(root=str(tmp_path / "s")))


def test_shapes_data_names_its_zero_shot_set_and_shards_give_none(tmp_path):
    shapes = datamodule.Shapes(root=str(tmp_path / "s"))
    assert WebDataModule(shapes=shapes).zeroshot_sets == [str(tmp_path / "s" / "zeroshot")]
    write_tar(tmp_path / "a.tar", [("x", good("x"))])
    assert WebDataModule(train_shards=str(tmp_path / "a.tar")).zeroshot_sets == []


def test_shard_glob_reads_every_match_and_a_glob_matching_nothing_is_named(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"part-{i}.tar", [(f"k{i}", good(f"shard {i}", i))])
    write_tar(tmp_path / "other.tar", [("o", good("other"))])
    dm = make_dm(f"{tmp_path}/part-*.tar", val_shards=f"{tmp_path}/part-*.tar", batch_size=1, train_num_samples=3)
    assert sorted(r for b in dm.val_dataloader() for r in token_rows(b["text"])) == \
        sorted(token_rows(dm.tokenizer([f"shard {i}" for i in range(3)])))
    with pytest.raises(FileNotFoundError, match=r"shard pattern '.*typo-\*.tar' matched no files"):
        make_dm(f"{tmp_path}/typo-*.tar")
