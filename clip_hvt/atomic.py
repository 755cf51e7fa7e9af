"""Files replaced whole: written under a hidden name beside the target, flushed to disk, then renamed over it
(``os.replace``), so a reader, a resumed run or a crash sees the old file or the complete new one, never a part.
Checkpoints, evaluation results, teacher-target shards and ``sizes.json`` are written this way."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import IO, Iterator


def partial_path(path: str | os.PathLike) -> str:
    """Where ``path`` is written before the rename: hidden, beside it, matched by no ``*.ckpt`` / ``*.tar``.

    A fixed name (no pid) so the next write of the same file overwrites what a killed one left.
    """
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.partial")


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """The open hidden file (``mode``: ``"wb"`` or ``"w"``); ``path`` is replaced by it when the block ends, and
    it is removed if the block raises (Ctrl-C included)."""
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
