"""Remote shards through webdataset's gopen: http(s) against a loopback server, pipe: commands,
schemes refused at start with the fix, counts fetched once from beside the shards."""
import csv
import http.server
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from clip_hvt import train
from clip_hvt.cli import UserError
from clip_hvt.data.datamodule import WebDataModule
from clip_hvt.data.shards import ShardReadError, count_samples, expand_sources, open_url
from tests.conftest import TINY_MODEL_CFG as MODEL_CFG
from tests.conftest import write_tar
from tests.test_datamodule import good, make_dm, skipped, token_rows


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1; files named in ``drop`` are cut at half, the connection closed
    while the announced Content-Length is still owed (a peer that died mid-shard)."""

    daemon_threads = True

    def __init__(self, root: Path, drop=()):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.drop, self.requests = root, set(drop), []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold a server thread for longer

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        path = self.server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2] if name in self.server.drop else data)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Start a loopback server for a directory; every server started is shut down after the test."""
    servers = []

    def start(root, drop=()):
        server = ShardServer(Path(root), drop)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_shards(directory, counts, sizes_json=True):
    """Shards ``s-<i>.tar`` of ``counts[i]`` good samples with distinct captions; returns the captions."""
    directory.mkdir(parents=True, exist_ok=True)
    captions = []
    for i, n in enumerate(counts):
        names = [f"shard {i} sample {j}" for j in range(n)]
        write_tar(directory / f"s-{i}.tar", [(f"{i}_{j:03d}", good(c, 10 * i + j)) for j, c in enumerate(names)])
        captions += names
    if sizes_json:
        (directory / "sizes.json").write_text(json.dumps({f"s-{i}.tar": n for i, n in enumerate(counts)}))
    return captions


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])
        assert torch.equal(x["skipped"], y["skipped"])


def test_training_reads_http_shards_like_local_ones_and_fetches_sizes_json_once(tmp_path, serve):
    write_shards(tmp_path, [7, 9, 8])
    server = serve(tmp_path)
    local = make_dm(tmp_path / "s-{0..2}.tar", batch_size=4, seed=5)
    remote = make_dm(f"{server.url}/s-{{0..2}}.tar", batch_size=4, seed=5)
    assert remote.batches_per_epoch() == local.batches_per_epoch() == 24 // 4  # counts from the served sizes.json
    for _ in range(2):
        torch.manual_seed(0)  # the same random crops for both
        from_http = list(remote.train_dataloader())
        torch.manual_seed(0)
        same_batches(from_http, list(local.train_dataloader()))
    assert server.requests.count("sizes.json") == 1  # asked for three times, fetched once
    assert {r for r in server.requests if r.endswith(".tar")} <= {"s-0.tar", "s-1.tar", "s-2.tar"}


def test_http_counts_fall_back_to_img2dataset_stats_and_a_missing_count_names_what_was_tried(tmp_path, serve):
    write_shards(tmp_path, [5, 6], sizes_json=False)
    (tmp_path / "s-0_stats.json").write_text(json.dumps({"count": 7, "successes": 5}))
    server = serve(tmp_path)
    assert count_samples(expand_sources(f"{server.url}/s-0.tar")) == 5
    with pytest.raises(UserError) as err:
        count_samples(expand_sources(f"{server.url}/s-{{0..1}}.tar"))
    message = str(err.value)
    assert f"{server.url}/s-1_stats.json" in message and "exited with status 22" in message  # curl -f: HTTP 404
    assert "--data.train_num_samples N" in message


def test_http_sizes_json_that_is_not_json_is_named_in_the_error(tmp_path, serve):
    write_shards(tmp_path, [5], sizes_json=False)
    (tmp_path / "sizes.json").write_text("<html>Service Unavailable</html>")  # a proxy's answer
    server = serve(tmp_path)
    with pytest.raises(UserError) as err:
        count_samples(expand_sources(f"{server.url}/s-0.tar"))
    assert str(err.value).startswith(
        f"no sample count for shards like '{server.url}/s-0.tar': no count in {server.url}/sizes.json (not valid "
        f"JSON (line 1 col 1: Expecting value)) and no img2dataset stats ({server.url}/s-0_stats.json: "
        f"ShardReadError: command `curl {server.url}/s-0_stats.json` exited with status 22). Run ")


def test_connection_dropped_mid_shard_is_one_corrupt_shard_like_the_same_cut_read_locally(tmp_path, serve, caplog):
    served = tmp_path / "served"
    write_shards(served, [6, 40, 5])
    server = serve(served, drop={"s-1.tar"})
    cut = tmp_path / "cut"  # the reference: the bytes the client got, read from disk
    write_shards(cut, [6, 40, 5])
    data = (cut / "s-1.tar").read_bytes()
    (cut / "s-1.tar").write_bytes(data[:len(data) // 2])

    def val_batches(spec):
        dm = make_dm(str(served / "s-0.tar"), val_shards=spec, batch_size=4, val_batch_size=4)
        return list(dm.val_dataloader()), dm.tokenizer

    with caplog.at_level(logging.WARNING):
        remote, tokenizer = val_batches(f"{server.url}/s-{{0..2}}.tar")
    local, _ = val_batches(str(cut / "s-{0..2}.tar"))
    same_batches(remote, local)
    assert skipped(remote) == {"corrupt_shard": 1}
    rows = sorted(r for b in remote for r in token_rows(b["text"]))
    assert 6 + 5 < len(rows) < 6 + 40 + 5  # the samples before the break were used, the rest lost
    assert f"command `curl {server.url}/s-1.tar` exited with status 18" in caplog.text  # curl: partial file


def test_failing_pipe_command_is_named_and_counted_and_a_working_one_reads_like_a_file(tmp_path, caplog):
    captions = write_shards(tmp_path, [6, 5])
    dm = make_dm(str(tmp_path / "s-0.tar"), val_shards=f"pipe:cat {tmp_path}/s-{{0,1,2}}.tar",
                 batch_size=4, val_batch_size=4)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.val_dataloader())
    assert sorted(r for b in batches for r in token_rows(b["text"])) == sorted(token_rows(dm.tokenizer(captions)))
    assert skipped(batches) == {"corrupt_shard": 1}  # s-2.tar does not exist: cat exits 1
    assert f"command `cat {tmp_path}/s-2.tar` exited with status 1" in caplog.text


def test_pipe_that_fails_after_a_complete_archive_is_still_a_failure(tmp_path):
    write_shards(tmp_path, [3])
    with pytest.raises(ShardReadError, match=r"command `cat .*s-0.tar; exit 3` exited with status 3"):
        with open_url(f"pipe:cat {tmp_path}/s-0.tar; exit 3") as stream:
            stream.read()


def test_pipe_sizes_json_is_read_through_the_same_command(tmp_path):
    write_shards(tmp_path, [4, 9])
    assert count_samples(expand_sources(f"pipe:cat {tmp_path}/s-{{0..1}}.tar")) == 13


def test_reader_closed_mid_shard_ends_the_command_without_an_error(tmp_path):
    pid_file = tmp_path / "pid"

    def first_bytes():
        with open_url(f"pipe:echo $$ > {pid_file}; exec yes") as stream:  # endless output
            yield stream.read(1000)

    reader = first_bytes()
    assert next(reader) == b"y\n" * 500
    reader.close()  # as webdataset does at an epoch's end: no exception, no wait for the command
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # ended and reaped


@pytest.mark.parametrize("spec", ["s3://bucket/cc3m/train-{000000..000099}.tar",
                                  "shards/a-{0..1}.tar::s3://bucket/cc3m/train-{000000..000099}.tar"])
def test_s3_urls_are_refused_at_start_with_the_pipe_command(tmp_path, spec, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    for i in range(2):
        write_tar(tmp_path / "shards" / f"a-{i}.tar", [("k", good("x"))])
    with pytest.raises(UserError) as err:
        WebDataModule(train_shards=spec, model_cfg=MODEL_CFG)
    assert "'pipe:aws s3 cp s3://bucket/cc3m/train-{000000..000099}.tar -'" in str(err.value)


def test_train_command_refuses_s3_in_one_line(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:  # one line, no traceback
        train.main(["--config", tiny_config, "--data.shapes", "null", "--data.train_shards", "s3://bucket/train-{0..9}.tar"])
    assert str(stop.value).startswith("python -m clip_hvt.train: error: webdataset cannot open s3:// URLs")
    assert "'pipe:aws s3 cp s3://bucket/train-{0..9}.tar -'" in str(stop.value)


def test_unknown_scheme_and_missing_tool_are_refused_at_start(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"no reader for 'azure:' .*http://.*pipe:"):
        expand_sources("azure://container/s-{0..3}.tar")
    monkeypatch.setenv("PATH", str(tmp_path))  # no gsutil, no curl
    with pytest.raises(UserError, match=r"read with `gsutil`, which is not installed"):
        expand_sources("gs://bucket/s-{0..3}.tar")
    with pytest.raises(UserError, match=r"read with `curl`"):
        expand_sources("https://example.org/s-{0..3}.tar")


def test_remote_urls_are_expanded_without_being_probed():
    assert expand_sources("hf://datasets/org/name/s-{0..1}.tar::pipe:aws s3 cp s3://b/x-{7,9}.tar -") == [
        ["hf://datasets/org/name/s-0.tar", "hf://datasets/org/name/s-1.tar"],
        ["pipe:aws s3 cp s3://b/x-7.tar -", "pipe:aws s3 cp s3://b/x-9.tar -"]]


@pytest.mark.slow
def test_training_over_http_goes_on_through_dropped_connections(tiny_config, tmp_path, serve, monkeypatch):
    write_shards(tmp_path / "srv", [40], sizes_json=False)
    server = serve(tmp_path / "srv", drop={"s-0.tar"})  # every read of the one shard breaks at half
    monkeypatch.chdir(tmp_path)
    override = tmp_path / "data_only.yaml"
    override.write_text(
        "data:\n  shapes: null\ntrainer:\n  callbacks:\n    - class_path: clip_hvt.callbacks.SkipMonitor\n"
        "      init_args: {max_skip_rate: 0.2, min_samples: 1, log_every_n_steps: 1}\n")
    train.main(["--config", tiny_config, "--config", str(override), "--data.train_shards", f"{server.url}/s-0.tar",
                "--data.train_num_samples", "64", "--data.sample_shuffle", "0"])
    with open(tmp_path / "runs" / "tiny" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/skipped_corrupt_shard")]
    assert sorted(int(r["step"]) for r in rows) == [0, 1, 2, 3]  # all 4 steps trained
    # about 19 of 40 samples per read: 4 batches of 16 need at least 3 reads, each one corrupt_shard
    assert sum(int(float(r["data/skipped_corrupt_shard"])) for r in rows) >= 3
