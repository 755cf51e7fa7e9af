"""Stored teacher targets: copy shards adding each sample's teacher embeddings, so distillation reads
targets instead of running the teacher (MobileCLIP's reinforced data, without augmentations).

Each sample gains ``teacher_image.npy`` (the teacher's unit image embedding, ``[D]``, through its own
evaluation preprocessing) and ``teacher_text.npy`` (one per caption, ``[n, D]``, in ``sample.captions``
order), float16 plain ``.npy``; shards keep their names, with ``sizes.json``. Samples the training
reader would skip are left out and counted by reason. Train with ``model.distill.stored_targets true``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds

from ..cli import UserError, run
from ..distill import Distill, Teacher
from ..malloc import keep_freed_memory
from .pipeline import decode, read_shards
from .sample import TAR_MTIME, TARGET_MEMBERS, SkipCounter, captions
from .shards import SIZES_FILE, expand_sources


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


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
        out: output directory; shards keep their file names; ``sizes.json`` is written.
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
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Teacher.load(Distill(teacher=teacher, weights=weights, precision="32"))
    model.model.to(device)
    # open_clip's evaluation transform for the teacher's preprocess config, as create_model_and_transforms
    preprocess = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**model.model.visual.preprocess_cfg), is_train=False)
    # the training reader's stages: the samples it would use, skips counted and logged under its reasons
    counter, sizes = SkipCounter(), {}
    for url in urls:
        with wds.TarWriter(str(out_dir / Path(url).name), mtime=TAR_MTIME) as sink:
            sizes[Path(url).name] = 0
            items = decode(read_shards([{"url": url}], counter), preprocess,
                           lambda sample, rng: (sample, captions(sample, caption_key)), counter)
            for batch in wds.batched(batch_size, collation_fn=None)(items):
                for sample in _embed(model, batch, torch.device(device)):
                    sink.write(sample)
                sizes[Path(url).name] += len(batch)
    (out_dir / SIZES_FILE).write_text(json.dumps(sizes, indent=1))
    total = sum(sizes.values())
    print(f"wrote {total} samples with teacher targets to {out_dir} ({len(sizes)} shards); skipped "
          + (", ".join(f"{k}={n}" for k, n in sorted(counter.total.items())) or "none"))
    return {"written": total, "skipped": dict(counter.total)}


def main(args: list[str] | None = None) -> dict:
    keep_freed_memory()
    return run(add_teacher_features, args, prog="python -m clip_hvt.data.teacher_features")


if __name__ == "__main__":
    main()
