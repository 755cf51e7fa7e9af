"""Checkpoint writes that survive preemption: a kill at any moment leaves the previous file usable.

Lightning's ``TorchCheckpointIO`` serialises into memory and commits through an fsspec
transaction, which for local paths writes a temp file in the *system* temp dir and
``shutil.move``s it: a copy, not an atomic rename, whenever that dir is on another file system
(``/tmp`` vs. a shared ``runs/`` on a cluster), and never ``fsync``ed, so a node crash can leave a
zero-length ``last.ckpt``. Here the temp file lives beside the target, is flushed to disk, and
``os.replace`` swaps it in; remote paths (``s3://``...) keep Lightning's behaviour.

Use it as a trainer plugin (``trainer.plugins: clip_hvt.checkpoint.AtomicCheckpointIO``). It
covers every file Lightning writes through the checkpoint IO: step checkpoints, ``last.ckpt``
(``save_last: true`` saves it in full) and the ``hpc_ckpt_*.ckpt`` written on SLURM's pre-timeout
signal. ``save_last: link`` instead deletes ``last.ckpt`` before linking the new one (not atomic), so
configs here use ``save_last: true``.

``ModelCheckpoint`` (the training command's ``checkpoint`` section) is Lightning's, with ``last.ckpt``
written at the end of training whenever the last step was not saved yet.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic import atomic_write


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that replaces ``path`` only once the complete file is on disk."""
    with atomic_write(path) as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-temp, fsync, ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the state training ended with.

    Lightning 2.6 writes ``last`` at the end of training only if no checkpoint was written before, so a run
    whose last step is not a multiple of ``every_n_train_steps`` ended with ``last.ckpt`` up to that many
    steps behind: resuming or exporting from it silently lost them. Same class name as Lightning's, so the
    callback's state key in checkpoints is unchanged.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        # _should_skip_saving_checkpoint: not fitting, a dev run, or this step already saved
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
