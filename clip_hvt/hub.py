"""Encoders that leave the project: the image trunk as a timm checkpoint, a Hugging Face hub folder with a model
card, CLIP_benchmark with our encoders.

``python -m clip_hvt.hub timm --src SRC --out DIR`` (or ``clip-hvt-export-timm``; SRC: an open_clip export dir written by
``clip_hvt.export``, or a ``.ckpt`` written by ``clip_hvt.train``) writes timm's own export layout through
``timm.models.save_for_hf``: ``model.safetensors`` and ``config.json`` (``architecture``, ``model_args``,
``pretrained_cfg``). After ``import clip_hvt`` (our encoders are registered by it), either of

    timm.create_model('local-dir:DIR', pretrained=True)
    timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file='DIR/model.safetensors'), **MODEL_ARGS)

rebuilds the trunk with identical features, also with ``features_only=True`` for detection/segmentation heads.

``python -m clip_hvt.hub folder --run RUN_DIR --out DIR [--push_to ORG/NAME]`` writes the open_clip export of the run's
checkpoint and a model card (``README.md``) into DIR, the layout ``open_clip.create_model_and_transforms('hf-hub:ORG/NAME')``
reads, and pushes it through open_clip's ``push_to_hf_hub`` when asked.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch

from . import export, factory, report
from .config import to_open_clip
from .cli import UserError, run


def load_open_clip(src: str | Path) -> torch.nn.Module:
    """The open_clip model of an export dir (``open_clip_config.json``) or a clip_hvt ``.ckpt``."""
    src = Path(src)
    if src.is_dir():
        if not (src / export.CONFIG_NAME).is_file():
            raise UserError(f"'{src}' has no {export.CONFIG_NAME}; give an export dir written by clip_hvt.export")
        name = json.loads((src / export.CONFIG_NAME).read_text())["model_cfg"]["vision_cfg"].get("timm_model_name")
        if name and not timm.is_model(name):
            raise UserError(f"image encoder '{name}' of '{src}' is not registered in timm: `import clip_hvt` first")
        return open_clip.create_model(f"local-dir:{src}")
    if src.is_file():
        return export.model_from_checkpoint(src)[0]
    raise UserError(f"'{src}' does not exist; give an open_clip export dir or a .ckpt")


def save_trunk(model: torch.nn.Module, out: str | Path) -> Path:
    """Write the timm trunk of an open_clip model (``model.visual.trunk``) in timm's export layout."""
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise UserError("the image tower is open_clip's own ViT, not a timm trunk; nothing to export for timm")
    out = Path(out)
    timm.models.save_for_hf(trunk, str(out), safe_serialization=True)
    return out


def export_timm(src: str, out: str) -> Path:
    """Export the image trunk of a clip_hvt model as a timm checkpoint.

    Args:
        src: open_clip export dir (clip_hvt.export) or Lightning checkpoint (.ckpt).
        out: output directory: model.safetensors + config.json (timm's layout).
    """
    path = save_trunk(load_open_clip(src), out)
    config = json.loads((path / "config.json").read_text())
    print(f"timm checkpoint in {path}: timm.create_model('local-dir:{path}', pretrained=True) "
          f"(architecture {config['architecture']}, after `import clip_hvt`)")
    return path


def clip_benchmark_main() -> None:
    """``clip-hvt-benchmark``: CLIP_benchmark's own CLI, unchanged, with clip_hvt's encoders registered in timm.

    CLIP_benchmark builds models by name through open_clip and timm and never imports clip_hvt, so an export whose
    image trunk is ours (``cvt_*``, ``*_ms``) fails there with ``Unknown model``; importing this module registers
    them first (``import clip_hvt`` does), then the arguments go to ``clip_benchmark.cli.main`` as they are.
    """
    try:
        from clip_benchmark.cli import main
    except ImportError:
        sys.exit("clip-hvt-benchmark needs CLIP_benchmark: pip install 'clip_hvt[benchmark]'")
    main()


# ---- the hub folder and its model card -------------------------------------------------------------

def _data_spec(data: dict) -> str:
    if data.get("train_shards"):
        weights = f" (source weights {data['source_weights']})" if data.get("source_weights") else ""
        return f"`{data['train_shards']}`{weights}, captions from `{data.get('caption_key', 'txt')}`"
    if data.get("shapes") is not None:
        return f"the embedded shapes data set (`clip_hvt.data.synthetic`, {json.dumps(data['shapes'])})"
    return "not recorded in the run's config"


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_table(evals: list[dict]) -> str:
    """A markdown table of CLIP_benchmark-style results: one row per (dataset, task), one column per metric."""
    metrics = list(dict.fromkeys(k for e in evals for k, v in e["metrics"].items() if isinstance(v, (int, float))))
    lines = ["| dataset | task | samples | " + " | ".join(metrics) + " |", "|" + "---|" * (3 + len(metrics))]
    for e in evals:
        cells = [e["dataset"], e["task"], _number(e.get("samples"))] + [_number(e["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def model_card(run_dir: Path, repo: str, evals: list[dict], steps: int | None = None) -> dict:
    """open_clip's ``model_card`` dict (``push_to_hf_hub``'s, rendered by its ``generate_readme``) of a run:
    architecture, params and GFLOPs (``clip_hvt.flops``), data (the saved config), and the evaluation table of
    ``evals`` (the published model's). ``steps``: the published checkpoint's ``global_step``; without it, the last
    logged step. Global batch and samples seen: ``clip_hvt.report``'s."""
    cfg = report.find_config(run_dir)
    row, _ = report.summarize_run(run_dir)
    model_cfg, data = to_open_clip(cfg["model"]["model_cfg"]), cfg.get("data") or {}
    steps = row["steps"] if steps is None else steps
    seen = report.samples_seen(steps, row["global_batch"])
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    name = vision.get("timm_model_name")
    ours = bool(name) and timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("clip_hvt")
    details = {
        "Architecture": f"CLIP ({row['family']}): image tower {row['image_tower']} (pool {vision.get('timm_pool')}, "
                        f"projection {vision.get('timm_proj')}), text transformer width {text.get('width')}, "
                        f"{text.get('layers')} layers, context {text.get('context_length')}; "
                        f"embedding width {model_cfg.get('embed_dim')}",
        "Image size": row["image_size"],
        "Params (M)": {"image tower": f"{row['image_params_M']:.2f}", "text tower": f"{row['text_params_M']:.2f}"},
        "GFLOPs (forward, clip_hvt.flops)": {"per image": f"{row['image_gflops']:.4g}",
                                              "per caption": f"{row['text_gflops']:.4g}"},
        "Training data": _data_spec(data),
        "Global batch size": row["global_batch"],
        "Steps": steps if steps is not None else "not logged",
        "Samples seen": seen if seen is not None else "not logged",
    }
    usage = ("```python\nimport open_clip\n" + ("import clip_hvt  # registers the image tower in timm (pip install clip_hvt)\n" if ours else "")
             + f"model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:{repo}')\n"
             f"tokenizer = open_clip.get_tokenizer('hf-hub:{repo}')\n```\n")
    card = {"tags": ["clip", "clip_hvt", "timm"], "license": "apache-2.0",
            "description": f"A CLIP model trained with clip_hvt (run `{run_dir.name}`), in open_clip's format.",
            "details": details, "usage": usage}
    if evals:
        card["comparison"] = ("Zero-shot evaluation (`clip_hvt.eval`, CLIP_benchmark's metrics):\n\n" + eval_table(evals))
    return card


def published_models(run_dir: Path, cfg: dict, ckpt: Path, out: Path) -> list[Path]:
    """The published model's paths, as evaluation results name it: the checkpoint, the hub folder (an export of it),
    and, when the checkpoint is the run's last one, the run's own exports (written from the same final weights)."""
    models = [ckpt.resolve(), out.resolve()]
    if ckpt.name == "last.ckpt" and ckpt.resolve().is_relative_to(run_dir.resolve()):
        models += [m for m in report.run_models(run_dir, cfg) if m.suffix != ".ckpt"]
    return list(dict.fromkeys(models))


def folder(run: str, out: str, ckpt: str | None = None, evals: list[str] | None = None, push_to: str | None = None,
           private: bool = False, ema: bool | None = None) -> Path:
    """Write a run's model as an open_clip hub folder (export + model card README.md); optionally push it.

    Args:
        run: the run directory (trainer.default_root_dir: config.yaml, checkpoints/, logs).
        out: output directory (open_clip_config.json, open_clip_model.safetensors, README.md).
        ckpt: checkpoint to publish; default RUN/checkpoints/last.ckpt.
        evals: more directories of evaluation JSONs (clip_hvt.eval --out) besides those under the run; the card
            shows the results of the published model only (see ``published_models``).
        push_to: Hugging Face repo (ORG/NAME) to push to through open_clip's push_to_hf_hub (needs a token and network).
        private: create the pushed repo private.
        ema: as clip_hvt.export's --ema.
    """
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' does not exist; give a training run's trainer.default_root_dir")
    if push_to:  # before any work: pushing needs a token and the network
        import huggingface_hub

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise UserError(f"--push_to {push_to}: the Hugging Face hub is offline (HF_HUB_OFFLINE is set); unset it")
        if huggingface_hub.get_token() is None:
            raise UserError(f"--push_to {push_to}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        cfg = report.find_config(run_dir)
    except ValueError as err:
        raise UserError(f"'{run_dir}' has {err}; give the run directory clip_hvt.train wrote") from None
    ckpt = ckpt or run_dir / "checkpoints" / "last.ckpt"
    models = published_models(run_dir, cfg, Path(ckpt), Path(out))
    given = []
    for directory in evals or []:
        if not Path(directory).is_dir():
            raise UserError(f"evaluation directory '{directory}' does not exist; give clip_hvt.eval's --out")
        given += report.read_eval_jsons(Path(directory))
    if evals and not report.evals_of(given, models):
        raise UserError(f"--evals {' '.join(evals)}: none of its {len(given)} results is of the published model "
                        f"({', '.join(map(str, models))}); evaluate it: python -m clip_hvt.eval --model {models[0]}")
    found = report.evals_of(report.read_eval_jsons(run_dir) + given, models)
    loaded = export.load_checkpoint(ckpt)
    model, model_cfg = export.model_from_loaded(loaded, ema, ckpt)
    name = Path(out).resolve().name
    card = model_card(run_dir, push_to or f"ORG/{name}", found, loaded.get("global_step"))
    path = export.export_model(model, model_cfg, out)
    from open_clip.push_to_hf_hub import generate_readme

    # the card open_clip's push_to_hf_hub writes into a repo without a README.md: the hub shows what is here
    (path / "README.md").write_text(generate_readme(dict(card), push_to.split("/")[-1] if push_to else name))
    print(f"hub folder in {path} ({len(found)} evaluation results in its card)")
    if push_to:
        model_cfg = to_open_clip(model_cfg)
        open_clip.push_to_hf_hub(model, factory.create_tokenizer(model_cfg), model_cfg, push_to, private=private,
                                 model_card=card, safe_serialization=True)
        print(f"pushed to https://huggingface.co/{push_to}: open_clip.create_model_and_transforms('hf-hub:{push_to}')")
    return path


COMMANDS = {"timm": export_timm, "folder": folder}


def main(args: list[str] | None = None) -> Any:
    """``python -m clip_hvt.hub {timm,folder} ...``; without a command, ``timm`` (the ``clip-hvt-export-timm`` script)."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in COMMANDS:
        return run(COMMANDS, args, prog="python -m clip_hvt.hub")
    return run(export_timm, args, prog="clip-hvt-export-timm")


if __name__ == "__main__":
    main()
