"""One command-line convention for every clip_hvt command except ``train`` (LightningCLI's).

A command is a typed function with a docstring; jsonargparse derives its parser from the signature,
as LightningCLI does for training: ``--config FILE`` (repeatable; later files and flags win), dotted
overrides of nested typed arguments, ``--print_config``, type validation and "did you mean" on
unknown keys. Hand-written only because jsonargparse has no notion of a user error: a ``UserError``
(bad input a user can fix) ends the command with one line, ``prog: error: ...``; ``--debug`` shows
its traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import jsonargparse


class UserError(ValueError):
    """Bad input from a user (path, config, data): printed as one line naming the problem and the fix.

    A ``ValueError`` so library callers that catch ``ValueError`` keep working.
    """


def run(command: Callable[..., Any], args: list[str] | None = None, prog: str | None = None) -> Any:
    """Parse ``args`` (default ``sys.argv[1:]``) into ``command``'s typed parameters and call it."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    prog = prog or f"python -m {command.__module__}"
    try:
        return jsonargparse.auto_cli(command, args=args, as_positional=False, prog=prog,
                                     epilog="--debug: show the traceback of an error")
    except UserError as err:
        if debug:
            raise
        sys.exit(f"{prog}: error: {err}")
