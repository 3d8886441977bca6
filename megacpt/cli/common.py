"""What every subcommand shares: `--debug`, the lazy loading of the module that does the work,
and the error policy (bad input: one line and exit 2; failures at run time: exit 1).

Only the CLI layer (megacpt/cli/, megacpt/__main__.py, megacpt/train/__main__.py) imports this.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megacpt.errors import UserError


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand accepts."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def load(target: str):
    """The function named by "package.module:function", imported now. The one place where the
    CLI imports the layers below it: `megacpt --help` and config errors stay free of torch."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run(func, args, debug: bool) -> int:
    """Run a subcommand: UserError -> one line on stderr and exit 2; other errors exit 1."""
    try:
        rc = func(args)
        return int(rc or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
