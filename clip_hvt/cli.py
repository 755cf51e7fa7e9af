"""One command-line convention for every clip_hvt command.

A command is a typed function with a docstring; jsonargparse derives its parser from the signature,
as LightningCLI does for training: ``--config FILE`` (repeatable; later files and flags win), dotted
overrides of nested typed arguments, ``--print_config``, type validation. Hand-written only because
jsonargparse has no notion of a user error and prints its whole usage (hundreds of options) on one:
a ``UserError`` (bad input a user can fix) and a parse error both end the command with one line,
``prog: error: ...``, an unknown key with the closest valid one; ``--debug`` shows the traceback.
Anything else is a bug and keeps its traceback. ``clip_hvt.train`` (LightningCLI) uses ``explain`` and
``one_line_errors``.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import jsonargparse
import yaml


class UserError(ValueError):
    """Bad input from a user (path, config, data): printed as one line naming the problem and the fix.

    A ``ValueError`` so library callers that catch ``ValueError`` keep working.
    """


def explain(parser: jsonargparse.ArgumentParser, err: Exception) -> str:
    """A parse error as one line; an unknown key gets "did you mean" from the keys valid at its level."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    unknown = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    key = f"{unknown[1]}.{unknown[2]}" if unknown else None
    if not unknown and (unknown := re.search(r"unrecognized arguments: --([\w.]+)", message)):
        key = unknown[1]
    if key:
        prefix, _, name = key.rpartition(".")
        try:
            known = parser.get_defaults().keys()
        except Exception:  # a parser with required arguments has no complete defaults
            known = []
        siblings = sorted({k[len(prefix) + 1:].split(".")[0] for k in known if k.startswith(f"{prefix}.")} if prefix
                          else {k.split(".")[0] for k in known})
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.5)
        message = (f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                   + (f". Valid keys under '{prefix}': {', '.join(siblings)}" if siblings and prefix else "")
                   + " (--help lists every option)")
    if cannot := re.search(r"""Parser key "([\w.]+)": Unable to load config ['"]([^'"]+)['"]""", message):
        message = (f"{cannot[1]}: could not load '{cannot[2]}' (a file named in a config is found relative to "
                   "that config file; check the path and that it is a YAML mapping)")
    if "required: model.model_cfg" in message:
        message += "; give a model config, e.g. --config configs/models/pvt_v2_b0.yaml"
    return message


def refuse_nested_configs(args: list[str]) -> None:
    """A ``config:`` key inside a ``--config`` file is a ``UserError``: jsonargparse (4.53) ignores a list
    there and, for one path, lets the file's own sections replace that file's whole sections, so neither
    composes as it reads. Files compose by repeated ``--config`` or a section naming its file."""
    paths = [b for a, b in zip(args, args[1:]) if a == "--config"] + [a[9:] for a in args if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue  # not a readable file (a YAML string, a typo): jsonargparse says what is wrong
        if isinstance(loaded, dict) and "config" in loaded:
            raise UserError(f"{path}: a config file cannot name other config files ('config:'); give them as "
                            "repeated --config before it, or name a section's file (e.g. data: data/shapes.yaml)")


# Top-level keys of a training config that a command reading only its ``model`` section accepts and ignores.
TRAIN_ONLY = ("seed_everything", "trainer", "data", "checkpoint", "ckpt_path", "export_dir", "final_validation")


@contextmanager
def one_line_errors(prog: str, debug: bool, errors: tuple[type[BaseException], ...] = (UserError,)) -> Iterator[None]:
    """``errors`` raised inside end the command with one line, ``PROG: error: ...`` (with ``debug``: the traceback)."""
    try:
        yield
    except errors as err:
        if debug:
            raise
        sys.exit(f"{prog}: error: {_own_words(err)}")


def _own_words(err: BaseException) -> str:
    """The error's message; for one a DataLoader worker raised, torch's re-raise in the main process holds
    "Caught X in DataLoader worker process N." and the worker's traceback, whose last line is the error itself."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def run(command: Callable[..., Any] | dict[str, Callable[..., Any]], args: list[str] | None = None,
        prog: str | None = None, train_config: bool = False) -> Any:
    """Parse ``args`` (default ``sys.argv[1:]``) into ``command``'s typed parameters and call it.

    ``command`` may be a dict of subcommands (``{"table": table, ...}``): the first argument names one.
    ``train_config``: ``command`` takes ``model_cfg`` (open_clip's dict) and reads the training config
    files as they are: ``--model.*`` is ``CLIPModule``'s section (``--model.model_cfg.vision_cfg.image_size
    96``), the other sections of a training config are accepted and ignored.
    """
    args = list(sys.argv[1:] if args is None else args)
    if isinstance(command, dict):
        first = next(iter(command.values()))
        prog = prog or f"python -m {first.__module__}"
        debug = ["--debug"] * ("--debug" in args)  # given before the command name too
        args = [a for a in args if a != "--debug"]
        if not args or args[0] not in command:
            given = f"unknown command '{args[0]}'" if args and not args[0].startswith("-") else "no command given"
            sys.exit(f"{prog}: error: {given}; give one of {', '.join(command)} first "
                     f"(then --help for its options)")
        return run(command[args[0]], args[1:] + debug, f"{prog} {args[0]}", train_config)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    prog = prog or f"python -m {command.__module__}"
    with one_line_errors(prog, debug):
        refuse_nested_configs(args)
    parser = jsonargparse.ArgumentParser(prog=prog, exit_on_error=False, description=inspect.getdoc(command),
                                         epilog="--debug: show the traceback of an error")
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, help="a config file (repeatable)")
    parser.add_function_arguments(command, as_positional=False, skip={"model_cfg"} if train_config else None)
    if train_config:
        from .module import CLIPModule  # the model section of the training CLI, its types and defaults

        parser.add_class_arguments(CLIPModule, "model", instantiate=False)
        for key in TRAIN_ONLY:
            parser.add_argument(f"--{key}", type=Any, default=None, help="(training only; ignored here)")
    try:
        with one_line_errors(prog, debug):
            config = parser.parse_args(args)
            init = parser.instantiate(config)
            kwargs = {name: init[name] for name in inspect.signature(command).parameters if name in init}
            if train_config:
                from .config import to_open_clip

                kwargs["model_cfg"] = to_open_clip(config.model.model_cfg)
            return command(**kwargs)
    except argparse.ArgumentError as err:
        if debug:
            raise
        sys.exit(f"{prog}: error: {explain(parser, err)}")
