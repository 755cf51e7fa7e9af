"""Shared test builders: a tar writer that can cut its output, JPEG bytes, a tiny model config, a tiny
Hugging Face text tower; and a free-disk check before a run with the slow tests."""
import inspect
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests never reach the network: wandb offline, Hugging Face offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS = os.path.dirname(__file__)
TINY_CONFIG = os.path.join(TESTS, "configs", "tiny.yaml")
# The most a run with the slow tests holds under pytest's temp dir at once (5.6 GiB measured: the README's blocks
# keep checkpoints of 224-px models), with a margin. Passed tests' directories are removed (pyproject.toml).
SLOW_RUN_DISK_BYTES = 7 * 2**30


def pytest_collection_finish(session):
    """A run with slow tests on a disk without room for them stops at once, saying so, instead of with
    'No space left on device' minutes in."""
    if session.config.option.collectonly or not any(item.get_closest_marker("slow") for item in session.items):
        return
    basetemp = session.config._tmp_path_factory.getbasetemp()
    free = shutil.disk_usage(basetemp).free
    if free < SLOW_RUN_DISK_BYTES:
        pytest.exit(f"{free / 2**30:.1f} GiB free under {basetemp}; the slow tests need "
                    f"{SLOW_RUN_DISK_BYTES / 2**30:.0f} GiB there at once: free some (old /tmp/pytest-of-*/ "
                    "directories of failed runs?) or run without them: python -m pytest", returncode=1)


# The smallest open_clip config with a timm tower that trains and evaluates in a second on a CPU.
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}


def jpeg(seed=0, size=32, quality=90) -> bytes:
    """JPEG bytes of random pixels; ``size`` is a side or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def assert_plain_members(path) -> None:
    """Every member of the tar at ``path`` has a plain ustar header (no pax header) and the writers' fixed mtime."""
    from clip_hvt.data.sample import TAR_MTIME

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert members and all(not m.pax_headers and m.mtime == TAR_MTIME for m in members), \
        [(m.name, m.mtime, m.pax_headers) for m in members[:3]]


def write_tar(path, entries, cut_in=None, end_block=True) -> dict:
    """Write ``[(key, {ext: bytes})]`` as a tar, members in order; returns each member's header offset.

    ``cut_in=i``: the file ends 100 bytes into the data of entry ``i``'s first member (a download cut
    mid-sample); ``end_block=False``: no end-of-archive block (a writer that died between members).
    """
    buf, offsets, starts = io.BytesIO(), {}, []
    tar = tarfile.open(fileobj=buf, mode="w")
    for key, members in entries:
        starts.append(buf.tell())
        for ext, data in members.items():
            offsets[f"{key}.{ext}"] = buf.tell()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    if end_block:
        tar.close()
    data = buf.getvalue()
    Path(path).write_bytes(data if cut_in is None else data[:starts[cut_in] + tarfile.BLOCKSIZE + 100])
    return offsets


@pytest.fixture
def tiny_config():
    return TINY_CONFIG


@pytest.fixture
def local_hf_text_tower(tmp_path):
    """A tiny BERT config and WordPiece tokenizer saved to a directory: a Hugging Face text tower, no network."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny-bert"
    path.mkdir()
    words = ["a", "small", "red", "circle", "on", "the", "left", "star", "is", "blue", "it", "'", "t", "?", ","]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##n", "##s"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:  # transformers >= 5
        tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    else:
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(str(path))
    transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32).save_pretrained(str(path))
    return path


def hf_text_cfg(path) -> dict:
    """An open_clip ``text_cfg`` for the :func:`local_hf_text_tower` at ``path`` (random init, 16 tokens)."""
    return {"context_length": 16, "hf_model_name": str(path), "hf_model_pretrained": False,
            "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}
