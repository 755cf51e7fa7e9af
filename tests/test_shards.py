"""Shard lists: spec expansion, sample counts, weighted resampling."""
import json
import logging
from collections import Counter

import pytest

from clip_hvt.cli import UserError
from clip_hvt.data.check import check
from clip_hvt.data.shards import WeightedResampledShards, count_samples, expand_sources
from tests.conftest import jpeg, write_tar


def touch_shards(directory, names):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return [str(directory / n) for n in names]


def test_brace_expansion_and_double_colon_give_one_list_per_source(tmp_path):
    a = touch_shards(tmp_path / "a", [f"a-{i:06d}.tar" for i in range(3)])
    b = touch_shards(tmp_path / "b", ["b-0.tar", "b-1.tar"])
    spec = f"{tmp_path}/a/a-{{000000..000002}}.tar :: {tmp_path}/b/b-{{0,1}}.tar"
    assert expand_sources(spec) == [a, b]
    assert expand_sources([f"{tmp_path}/b/b-{{0..1}}.tar"]) == [b]


def test_pattern_matching_nothing_lists_what_the_directory_holds(tmp_path):
    touch_shards(tmp_path, [f"train-{i:06d}.tar" for i in range(7)])
    with pytest.raises(FileNotFoundError) as err:
        expand_sources(f"{tmp_path}/tain-{{000000..000006}}.tar")
    message = str(err.value)
    assert "matched no files" in message and "train-000000.tar" in message and "(7 in all)" in message


def test_pattern_with_some_shards_missing_names_them(tmp_path):
    touch_shards(tmp_path, ["s-0.tar", "s-1.tar"])
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* do not exist.*s-2.tar"):
        expand_sources(f"{tmp_path}/s-{{0..2}}.tar")


def test_pattern_in_missing_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_sources(f"{tmp_path}/nowhere/s-{{0..2}}.tar")


def test_counts_come_from_sizes_json(tmp_path):
    urls = touch_shards(tmp_path, ["s-0.tar", "s-1.tar"])
    (tmp_path / "sizes.json").write_text(json.dumps({"s-0.tar": 10, "s-1.tar": 7, "other.tar": 1000}))
    assert count_samples([urls]) == 17


def test_counts_come_from_img2dataset_stats_without_sizes_json(tmp_path):
    urls = touch_shards(tmp_path, ["00000.tar", "00001.tar"])
    for name, ok in (("00000", 9), ("00001", 6)):
        stats = {"count": 10, "successes": ok, "failed_to_download": 10 - ok, "failed_to_resize": 0}
        (tmp_path / f"{name}_stats.json").write_text(json.dumps(stats))
    assert count_samples([urls]) == 15


def test_counts_sum_over_sources(tmp_path):
    a = touch_shards(tmp_path / "a", ["s-0.tar"])
    b = touch_shards(tmp_path / "b", ["00000.tar"])
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"s-0.tar": 4}))
    (tmp_path / "b" / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    assert count_samples([a, b]) == 9


def test_missing_count_is_a_clear_error(tmp_path):
    urls = touch_shards(tmp_path, ["s-0.tar", "s-1.tar"])
    (tmp_path / "sizes.json").write_text(json.dumps({"s-0.tar": 10}))  # s-1 not listed
    with pytest.raises(UserError, match=r"no sample count .*python -m clip_hvt.data.check") as err:
        count_samples([urls])
    message = str(err.value)
    assert message.startswith(f"no sample count for shards like '{urls[0]}': not in sizes.json and no img2dataset "
                              f"stats ({tmp_path}/s-1_stats.json: no such file). Run `python -m clip_hvt.data.check")
    assert "--data.train_num_samples N" in message and "Validation shards need no count" in message
    assert "val_num_samples" not in message  # no such option


def _no_count_error(tmp_path, shard: str, count_file: str, text: bytes) -> str:
    """``count_samples``' error for the one shard ``shard`` beside a ``count_file`` holding ``text``."""
    urls = touch_shards(tmp_path, [shard])
    (tmp_path / count_file).write_bytes(text)
    with pytest.raises(UserError) as err:
        count_samples([urls])
    return str(err.value)


@pytest.mark.parametrize("text,why", [
    (b'{"s-0.tar": ', "not valid JSON (line 1 col 13: Expecting value)"),  # a write cut short
    (b'{"s-0.tar": "\xe9"}', "not valid JSON ('utf-8' codec can't decode byte 0xe9 in position 13"),
    (b'[["s-0.tar", 4]]', "not a JSON object but a list"),
    (b'{"s-0.tar": null}', "'s-0.tar' is null"),
    (b'{"s-0.tar": [4]}', "'s-0.tar' is [4]"),
    (b'{"s-0.tar": -4}', "'s-0.tar' is -4"),
], ids=["truncated", "not_utf8", "list", "null", "list_value", "negative"])
def test_malformed_sizes_json_is_a_one_line_error_naming_the_file(tmp_path, text, why):
    message = _no_count_error(tmp_path, "s-0.tar", "sizes.json", text)
    assert message.startswith(f"no sample count for shards like '{tmp_path / 's-0.tar'}': no count in "
                              f"{tmp_path}/sizes.json ({why}")
    assert f"and no img2dataset stats ({tmp_path}/s-0_stats.json: no such file). Run `python -m " \
           "clip_hvt.data.check --paths DIR --write_sizes true`" in message


def test_malformed_sizes_json_is_logged_when_stats_files_give_the_counts(tmp_path, caplog):
    urls = touch_shards(tmp_path, ["00000.tar"])
    (tmp_path / "sizes.json").write_text('{"00000.tar": 3,}')
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    with caplog.at_level(logging.WARNING):
        assert count_samples([urls]) == 4
    assert f"no counts from {tmp_path}/sizes.json (not valid JSON (line 1 col 17: Expecting property name" \
           in caplog.text


@pytest.mark.parametrize("text,why", [
    (b'{"count": 5, "succ', "not valid JSON (line 1 col 14: Unterminated string"),
    (b'{"count": 5}', "no 'successes' in it"),
    (b'{"count": 5, "successes": null}', "'successes' is null, not a sample count"),
    (b'{"count": 5, "successes": "five"}', "'successes' is \"five\", not a sample count"),
    (b"5", "not a JSON object but a int"),
], ids=["truncated", "no_successes", "null", "text", "number"])
def test_malformed_img2dataset_stats_is_a_one_line_error_naming_the_file(tmp_path, text, why):
    message = _no_count_error(tmp_path, "00000.tar", "00000_stats.json", text)
    assert message.startswith(f"no sample count for shards like '{tmp_path / '00000.tar'}': not in sizes.json and "
                              f"no img2dataset stats ({tmp_path}/00000_stats.json: {why}")


def test_check_reports_and_rewrites_bad_counts(tmp_path, capsys):
    for i in range(2):
        write_tar(tmp_path / f"0000{i}.tar", [(f"{i}{j}", {"jpg": jpeg(j), "txt": b"a caption"}) for j in range(3)])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": None}))
    (tmp_path / "00001_stats.json").write_text('{"count": 3, "succ')
    assert check(str(tmp_path)) == 1
    assert (f"sizes_missing: 2\n  {tmp_path}/sizes.json: 00000.tar (run with --write_sizes true)\n"
            f"  {tmp_path}/sizes.json: 00001.tar (run with --write_sizes true)\n") in capsys.readouterr().out
    assert check(str(tmp_path), write_sizes=True) == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3}
    assert count_samples(expand_sources(str(tmp_path / "0000{0..1}.tar"))) == 6


def _draws(shards, n):
    it = iter(shards)
    return [next(it) for _ in range(n)]


def test_resampling_follows_source_weights():
    sources = [["a0", "a1"], ["b0", "b1", "b2", "b3", "b4", "b5"]]
    draws = _draws(WeightedResampledShards(sources, weights=[3, 1], seed=1), 4000)
    by_source = Counter(d["source"] for d in draws)
    assert abs(by_source[0] / 4000 - 0.75) < 0.03
    assert all(d["url"] in sources[d["source"]] for d in draws)
    assert set(d["url"] for d in draws) == set(sources[0] + sources[1])  # uniform within a source reaches all


def test_resampling_defaults_to_weights_by_shard_count():
    sources = [["a0"], ["b0", "b1", "b2"]]
    draws = _draws(WeightedResampledShards(sources, seed=0), 4000)
    assert abs(Counter(d["source"] for d in draws)[1] / 4000 - 0.75) < 0.03


def test_resampling_differs_by_rank_and_stream_offset_and_repeats_for_equal_seeds():
    sources = [[f"s{i}" for i in range(50)]]

    def urls(**kw):
        return [d["url"] for d in _draws(WeightedResampledShards(sources, seed=3, **kw), 40)]

    assert urls(rank=0) == urls(rank=0)
    assert urls(rank=0) != urls(rank=1)
    assert urls(rank=0, stream_offset=0) != urls(rank=0, stream_offset=100)


@pytest.mark.parametrize("weights,match", [([1.0], "1 source weights given for 2 sources"),
                                           ([1.0, -1.0], "non-negative"), ([0.0, 0.0], "positive sum")])
def test_bad_weights_are_rejected(weights, match):
    with pytest.raises(UserError, match=match):
        WeightedResampledShards([["a"], ["b"]], weights=weights)


def test_each_pass_over_the_resampler_draws_a_fresh_sequence():
    shards = WeightedResampledShards([[f"s{i}" for i in range(50)]], seed=3)
    first, second = _draws(shards, 40), _draws(shards, 40)
    assert first != second  # a new epoch of a persistent worker does not replay the last one
