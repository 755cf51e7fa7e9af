"""Stored teacher targets: copy shards adding each sample's teacher embeddings, so distillation reads
targets instead of running the teacher (MobileCLIP's reinforced data, without augmentations).

Each sample gains ``teacher_image.npy`` (the teacher's unit image embedding, ``[D]``, through its own
evaluation preprocessing) and ``teacher_text.npy`` (one per caption, ``[n, D]``, in ``sample.captions``
order), float16 plain ``.npy``; shards keep their names, with ``sizes.json``. Samples the training
reader would skip are left out and counted by reason. Train with ``model.distill.stored_targets true``.
Each shard is written under a hidden name and renamed when complete, then listed in ``sizes.json``: a run
that stops (Ctrl-C, CUDA out of memory) leaves complete, listed shards only.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds

from ..atomic import atomic_write
from ..cli import UserError, run
from ..distill import Distill, Teacher
from ..malloc import keep_freed_memory
from .pipeline import decode, read_shards
from .sample import TAR_MTIME, TARGET_MEMBERS, SkipCounter, captions
from .shards import SIZES_FILE, _json_object, _shard_name, expand_sources, write_sizes


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def _output_names(urls: list[str], out: str) -> dict[str, str]:
    """{input shard: its output file name}: the shard's own name (for ``pipe:``, the word naming it).
    Two inputs of one name (img2dataset names every set's shards 00000.tar, ...) would overwrite each other."""
    firsts: dict[str, str] = {}  # output name -> the input written under it
    for url in urls:
        shard = _shard_name(url)
        if shard is None:
            raise UserError(f"no shard file name in '{url}': the command must name its shard, a word ending in .tar")
        other = firsts.setdefault(shard[0], url)
        if other != url:
            raise UserError(f"shards '{other}' and '{url}' would both be written as {Path(out) / shard[0]}: "
                            "run once per source, each into its own --out directory")
    return {url: name for name, url in firsts.items()}


@torch.no_grad()
def _embed(teacher: Teacher, batch: list, device: torch.device) -> list[dict]:
    """The samples of ``batch`` ((image tensor, (sample, captions)) pairs) with their teacher targets."""
    images, targets = zip(*batch)
    image_f = teacher.model.encode_image(torch.stack(images).to(device), normalize=True).float().cpu().numpy()
    tokens = teacher.tokenizer([c for _, caps in targets for c in caps]).to(device)
    text_f = teacher.model.encode_text(tokens, normalize=True).float().cpu().numpy()
    texts = np.split(text_f, np.cumsum([len(caps) for _, caps in targets])[:-1])  # each sample's captions
    return [{"__key__": sample["__key__"], **{k: v for k, v in sample.items() if not k.startswith("__")},
             TARGET_MEMBERS[0]: npy_bytes(image), TARGET_MEMBERS[1]: npy_bytes(text)}
            for (sample, _), image, text in zip(targets, image_f, texts)]


def add_teacher_features(shards: str, out: str, teacher: str, weights: str | None = None,
                         caption_key: str = "txt", batch_size: int = 64, device: str = "cpu") -> dict:
    """Copy shards adding the teacher's image and caption embeddings per sample (float16 ``.npy``).

    Args:
        shards: input shards (webdataset spec: braces, globs; one source).
        out: output directory; shards keep their file names; ``sizes.json`` is written (counts of other shards
            already listed there are kept).
        teacher: an open_clip export directory, or an open_clip model name with ``weights``.
        weights: local weights file of a teacher given by model name.
        caption_key: ``txt`` or ``json.<field>``, as the training run's ``data.caption_key``.
        batch_size: samples embedded at a time.
        device: where the teacher runs (``cpu``, ``cuda``).
    """
    try:
        urls = [u for source in expand_sources(shards) for u in source]
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    out_dir = Path(out)
    if out_dir.resolve() in {Path(u).resolve().parent for u in urls}:
        raise UserError(f"--out {out} is the input directory: give a new directory (shards keep their names)")
    names = _output_names(urls, out)
    sizes_path = out_dir / SIZES_FILE
    listed, why = _json_object(sizes_path.read_bytes()) if sizes_path.is_file() else ({}, "")  # kept, added to
    if listed is None:
        raise UserError(f"{sizes_path}: {why}; it lists the shards already in --out: repair it "
                        f"(python -m clip_hvt.data.check --paths {out} --write_sizes true) or give a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Teacher.load(Distill(teacher=teacher, weights=weights, precision="32"))
    model.model.to(device)
    # open_clip's evaluation transform for the teacher's preprocess config, as create_model_and_transforms
    preprocess = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**model.model.visual.preprocess_cfg), is_train=False)
    # the training reader's stages: the samples it would use, skips counted and logged under its reasons
    counter, written = SkipCounter(), {}
    for url, name in names.items():
        compress = wds.TarWriter.tarmode(name)[2:] or False  # by the final name (.tar.gz: gzipped)
        with atomic_write(out_dir / name) as f:
            with wds.TarWriter(f, mtime=TAR_MTIME, compress=compress) as sink:
                written[name] = 0
                items = decode(read_shards([{"url": url}], counter), preprocess,
                               lambda sample, rng: (sample, captions(sample, caption_key)), counter)
                for batch in wds.batched(batch_size, collation_fn=None)(items):
                    for sample in _embed(model, batch, torch.device(device)):
                        sink.write(sample)
                    written[name] += len(batch)
            if name in listed:  # a shard written before is replaced: its count goes first
                del listed[name]
                write_sizes(sizes_path, listed)
        listed[name] = written[name]
        write_sizes(sizes_path, listed)
    total = sum(written.values())
    print(f"wrote {total} samples with teacher targets to {out_dir} ({len(written)} shards); skipped "
          + (", ".join(f"{k}={n}" for k, n in sorted(counter.total.items())) or "none"))
    return {"written": total, "skipped": dict(counter.total)}


def main(args: list[str] | None = None) -> dict:
    keep_freed_memory()
    return run(add_teacher_features, args, prog="python -m clip_hvt.data.teacher_features")


if __name__ == "__main__":
    main()
