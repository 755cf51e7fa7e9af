"""Train from YAML: ``python -m clip_hvt.train --config configs/quickstart.yaml [--trainer.max_steps 20]``.

Lightning's ``LightningCLI`` without subcommands (``run=False``): repeated ``--config``, dotted
overrides, ``--print_config``. After ``fit`` it runs a final validation (zero-shot and retrieval)
and, with ``--export_dir``, writes the open_clip export.
"""
from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from . import slurm
from .callbacks import SkipMonitor, ZeroShotEvaluation
from .data.datamodule import WebDataModule
from .export import export_from_trainer
from .module import CLIPModule


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_cfg", "data.model_cfg", apply_on="parse")
        parser.link_arguments("model.distill", "data.distill", apply_on="parse")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from: a path, or 'last' for the run's last.ckpt")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="after training, export the model to this open_clip local-dir")
        parser.add_argument("--final_validation", type=bool, default=True,
                            help="validate once more after fit and print the final metrics")


def _summary(metrics: dict, export_dir: str | None) -> str:
    lines = []
    if "zeroshot/top1" in metrics:
        top1, chance = metrics["zeroshot/top1"], metrics["zeroshot/chance"]
        lines.append(f"zero-shot top-1 {top1:.1%} (top-5 {metrics['zeroshot/top5']:.1%}); "
                     f"chance {chance:.1%}, so {top1 / chance:.1f}x chance")
    for key in ("val/image_to_text_R@1", "val/text_to_image_R@1"):
        if key in metrics:
            lines.append(f"{key} {metrics[key]:.1%}")
    val_skipped = {k.removeprefix("val_data/skipped_"): int(v) for k, v in metrics.items()
                   if k.startswith("val_data/skipped_") and v}
    if val_skipped:
        lines.append(f"validation skipped {sum(val_skipped.values())} sample(s) "
                     f"({', '.join(f'{k}={n}' for k, n in val_skipped.items())}); metrics are over the "
                     f"{int(metrics.get('val_data/samples', 0))} that decoded")
    if export_dir:
        lines.append(f"exported to {export_dir} (open_clip.create_model_and_transforms('local-dir:{export_dir}'))")
    return "\n".join(lines)


# Known, harmless notices from our dependencies that would bury the run's own output.
for _message in (r"\.with_length\(\) only sets the value of __len__",  # we set it on purpose (epoch length)
                 r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                 r"you need to define a `flops_per_batch`",
                 r"torch.distributed.nn.functional.all_gather is deprecated",  # open_clip's loss; still exact
                 # DDP on depthwise convs ([C, 1, k, k]): the strides differ only on the size-1 dim
                 r"Grad strides do not match bucket view strides"):
    warnings.filterwarnings("ignore", message=_message)


def build(args: list[str] | None = None) -> CLI:
    """Parse the config and build trainer, model and data module; bad input exits with one message."""
    try:
        cli = CLI(CLIPModule, WebDataModule, run=False, args=args, seed_everything_default=0,
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
        slurm.check_trainer(cli.trainer)  # tasks vs devices, nodes vs num_nodes: fail before any rank waits
    except (ValueError, FileNotFoundError) as err:  # bad model name, shard pattern, ...: no traceback
        sys.exit(f"clip_hvt.train: error: {err}")
    # Always on, whatever the config lists: skipped samples counted and a broken data set stopped;
    # the pre-timeout signal handled safely (Lightning's own SIGUSR1 save can deadlock DDP).
    for required in (SkipMonitor, slurm.RequeueOnSignal):
        if not any(isinstance(c, required) for c in cli.trainer.callbacks):
            cli.trainer.callbacks.append(required())
    for callback in cli.trainer.callbacks:  # no sets given: the data's own zero-shot set (shapes), if any
        if isinstance(callback, ZeroShotEvaluation) and callback.sets is None:
            callback.sets = cli.datamodule.zeroshot_sets
    return cli


def main(args: list[str] | None = None) -> dict:
    cli = build(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path)
    metrics = {}
    if cli.config.final_validation and data.val_shards:
        results = trainer.validate(model, datamodule=data, verbose=False)
        metrics = results[0] if results else {}
    if cli.config.export_dir:
        export_from_trainer(trainer, model, cli.config.export_dir)
    if trainer.is_global_zero:
        print(_summary(metrics, cli.config.export_dir), flush=True)
    return metrics


if __name__ == "__main__":
    main()
