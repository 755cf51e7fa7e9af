"""Train from YAML: ``python -m clip_hvt.train --config configs/quickstart.yaml [--trainer.max_steps 20]``.

Lightning's ``LightningCLI`` without subcommands (``run=False``): repeated ``--config``, dotted
overrides, ``--print_config``. One run directory, ``trainer.default_root_dir``: checkpoints go to
``<dir>/checkpoints`` unless ``checkpoint.dirpath`` is set (``--checkpoint.*`` sets the always-on
``ModelCheckpoint``), the logger writes under ``<dir>`` unless its ``save_dir`` is set (in a file or as a
flag), and ``--export_dir true`` exports to ``<dir>/export``.
After ``fit`` it runs a final validation (zero-shot and retrieval) and, with ``--export_dir``, writes
the open_clip export. Bad input ends in one line (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import glob
import importlib
import inspect
import os
import sys
import warnings

from . import gc_paused

with gc_paused():  # Lightning's import (torchmetrics, scipy, ...) is most of our start-up
    from lightning.pytorch import callbacks as pl_callbacks
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from . import slurm
    from .callbacks import ModelSummary, RichModelSummary, SkipMonitor, ZeroShotEvaluation
    from .checkpoint import ModelCheckpoint
    from .cli import UserError, explain, one_line_errors, refuse_nested_configs
    from .config import to_open_clip
    from .data.datamodule import WebDataModule
    from .export import export_from_trainer
    from .malloc import keep_freed_memory
    from .module import CLIPModule

PROG = "python -m clip_hvt.train"

# Known, harmless notices from our dependencies that would bury the run's own output; ignored while
# a run is being built and trained (``main``), not for whoever imports this module.
QUIET = (r"\.with_length\(\) only sets the value of __len__",  # we set it on purpose (epoch length)
         r"`isinstance\(treespec, LeafSpec\)` is deprecated",
         r"torch.distributed.nn.functional.all_gather is deprecated",  # open_clip's loss; still exact
         # DDP on depthwise convs ([C, 1, k, k]): the strides differ only on the size-1 dim
         r"Grad strides do not match bucket view strides",
         # --ckpt_path last with nothing to resume: we say so in one line (resume_notice)
         r"`.ckpt_path=\"last\"` is set, but there is no last checkpoint available",
         r".*ckpt_path=\"last\". is set, but there is no last checkpoint available",
         r"LightningCLI's args parameter is intended to run from within Python")  # main() passes sys.argv


# Every clip_hvt run validates by steps (val_check_interval counts steps, whatever the epoch length), with
# no sanity pass, and writes checkpoints atomically: set here once, not in each run config.
TRAINER_DEFAULTS = {"check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "plugins": [{"class_path": "clip_hvt.checkpoint.AtomicCheckpointIO"}]}


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module gets open_clip's dict (transforms, tokenizer), as the checkpoint and export hold it.
        parser.link_arguments("model.model_cfg", "data.model_cfg", compute_fn=to_open_clip, apply_on="parse")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # One run directory: the checkpoint dir (before_instantiate_classes) and the logger's save_dir derive
        # from it unless the config sets them.
        parser.set_defaults({"checkpoint.save_last": True, "trainer.default_root_dir": "."})
        parser.link_arguments(("trainer.default_root_dir", "trainer.logger"), "trainer.logger.init_args.save_dir",
                              compute_fn=_logger_save_dir, apply_on="parse")
        parser.link_arguments("model.distill", "data.distill", apply_on="parse")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from: a path, or 'last' for the run's last.ckpt")
        parser.add_argument("--export_dir", type=bool | str | None, default=None,
                            help="after training, export the model to this open_clip local-dir "
                                 "(true: <trainer.default_root_dir>/export)")
        parser.add_argument("--final_validation", type=bool, default=True,
                            help="validate once more after fit and print the final metrics")

    def parse_arguments(self, parser, args) -> None:
        refuse_nested_configs(list(sys.argv[1:] if args is None else args))
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise UserError(explain(parser, err)) from err

    def before_instantiate_classes(self) -> None:
        """Place everything of the run under ``trainer.default_root_dir`` unless given elsewhere."""
        config = self.config
        root = config.trainer.default_root_dir
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        # Rich's bar (Lightning's pick when rich is installed) shows max_epochs - 1, "Epoch 0/-2", for a
        # run bounded by max_steps; TQDM's shows the epoch alone.
        callbacks = config.trainer.callbacks or []
        if config.trainer.enable_progress_bar is not False and not any(
                "ProgressBar" in str(getattr(c, "class_path", "")) for c in callbacks):
            config.trainer.callbacks = [*callbacks, Namespace(class_path="lightning.pytorch.callbacks.TQDMProgressBar",
                                                              init_args=Namespace(refresh_rate=1))]
        if config.export_dir is True:
            config.export_dir = os.path.join(root, "export")
        elif config.export_dir is False:
            config.export_dir = None


def _logger_save_dir(root: str, logger) -> str | None:
    """The logger's ``save_dir``: as the config sets it, else (left at the logger's own default) the run
    directory. A link, not a fill-in after parsing: CSVLogger's ``save_dir`` is required at parse time."""
    init_args = getattr(logger, "init_args", None)
    if init_args is None or "save_dir" not in init_args:  # no logger, or one without a save_dir
        return None
    given = init_args.save_dir
    return root if given is None or given == _own_default(logger.class_path, "save_dir") else given


def _own_default(class_path: str, name: str):
    """The default of ``name`` in the signature of the first class in ``class_path``'s MRO declaring it
    (``clip_hvt.loggers.WandbLogger`` passes its arguments on to Lightning's, whose ``save_dir`` is ".")."""
    module, _, cls_name = class_path.rpartition(".")
    for cls in getattr(importlib.import_module(module), cls_name).__mro__:
        parameter = inspect.signature(cls.__init__).parameters.get(name)
        if parameter is not None:
            return None if parameter.default is inspect.Parameter.empty else parameter.default
    return None


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


def _build(args: list[str] | None) -> CLI:
    cli = CLI(CLIPModule, WebDataModule, run=False, args=args, seed_everything_default=0,
              trainer_defaults=TRAINER_DEFAULTS,
              save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
              parser_kwargs={"exit_on_error": False, "prog": PROG},
              # hparams from CLIPModule's own save_hyperparameters (open_clip's dict), not the parsed namespace
              load_from_checkpoint_support=False)
    slurm.check_trainer(cli.trainer)  # tasks vs devices, nodes vs num_nodes: fail before any rank waits
    # Always on, whatever the config lists: skipped samples counted and a broken data set stopped;
    # the pre-timeout signal handled safely (Lightning's own SIGUSR1 save can deadlock DDP).
    for required in (SkipMonitor, slurm.RequeueOnSignal):
        if not any(isinstance(c, required) for c in cli.trainer.callbacks):
            cli.trainer.callbacks.append(required())
    # Lightning's summary prints 0 FLOPs (it counts only an example_input_array): ours prints the counted ones
    callbacks = cli.trainer.callbacks
    ours = {pl_callbacks.ModelSummary: ModelSummary, pl_callbacks.RichModelSummary: RichModelSummary}
    for i, callback in enumerate(callbacks):
        if type(callback) in ours:
            callbacks[i] = ours[type(callback)](max_depth=getattr(callback, "_max_depth", 1))  # private in Lightning
    for callback in cli.trainer.callbacks:  # no sets given: the data's own zero-shot set (shapes), if any
        if isinstance(callback, ZeroShotEvaluation) and callback.sets is None:
            callback.sets = cli.datamodule.zeroshot_sets
    return cli


def resume_notice(trainer, ckpt_path: str | None) -> str | None:
    """The one line said when ``--ckpt_path last`` finds nothing to resume (training then starts, as a
    first SLURM attempt needs); None otherwise. A path that does not exist is a ``UserError``."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        # Lightning's other names (hpc, best, registry[:NAME]) and remote URLs (s3://...) are Lightning's to check
        named = ckpt_path in ("hpc", "best") or ckpt_path.partition(":")[0].lower() == "registry"
        if not named and "://" not in ckpt_path and not os.path.isfile(ckpt_path):
            raise UserError(f"--ckpt_path '{ckpt_path}' is not a file; give a checkpoint written by "
                            "clip_hvt.train, or 'last' to resume the run's own last.ckpt")
        return None
    dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath]
    if any(glob.glob(os.path.join(d, "last*.ckpt")) for d in dirs):
        return None
    return f"{PROG}: no checkpoint in {', '.join(dirs) or trainer.default_root_dir}, starting from step 0"


# Lightning's word for a setting that cannot work (an accelerator the machine lacks, a callback that needs a logger)
_MISCONFIGURED = (MisconfigurationException,)


def build(args: list[str] | None = None, debug: bool = False) -> CLI:
    """Parse the config and build trainer, model and data module; bad input exits with one line."""
    # UserError, a bad model name (open_clip, timm), a shard pattern matching nothing, Lightning's refusals
    with one_line_errors(PROG, debug, (ValueError, FileNotFoundError, *_MISCONFIGURED)):
        return _build(args)


def main(args: list[str] | None = None) -> dict:
    # At exit, Python's last garbage collections walk every object still alive (the imported modules and the
    # model: 1.5-2 s); frozen (gc.freeze) they are skipped. Run at exit only, so callers in a longer process
    # (tests) keep their collections.
    atexit.register(gc.freeze)
    keep_freed_memory()
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        cli = build(args, debug)
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        with one_line_errors(PROG, debug):
            notice = resume_notice(trainer, cli.config.ckpt_path)
        if notice and trainer.is_global_zero:
            print(notice, file=sys.stderr, flush=True)
        # the data's own errors (too few samples for a batch, too many skipped) and Lightning's refusals at fit
        with one_line_errors(PROG, debug, (UserError, *_MISCONFIGURED)):
            trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path)
        metrics = {}
        if cli.config.final_validation and data.val_shards:
            # "last", the state training ended with (clip_hvt.checkpoint.ModelCheckpoint saves it; the model as it
            # is where no last.ckpt is kept). Not None: on SLURM, Lightning then loads the newest hpc_ckpt_*.ckpt
            # in the run directory, the stale state of a pre-timeout save, and the export below would write it.
            results = trainer.validate(model, datamodule=data, ckpt_path="last", verbose=False)
            metrics = results[0] if results else {}
        if cli.config.export_dir:
            export_from_trainer(trainer, model, cli.config.export_dir)
    if trainer.is_global_zero:
        print(_summary(metrics, cli.config.export_dir), flush=True)
    return metrics


def run() -> None:
    """The command (``python -m clip_hvt.train``, ``clip-hvt-train``), in a process of its own.

    What is alive now, the imported modules (about 600k objects), lives as long as the process. Imported with
    the collector paused, all of it sits in the youngest generation, and the run's collections would walk it
    (0.66 s in a 20-step quickstart run); frozen, they skip it. Not in `main`: tests call that in their process.
    """
    gc.freeze()
    main()


if __name__ == "__main__":
    run()
