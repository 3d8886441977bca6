"""`megacpt` command line: argument parsing only; the work happens in the modules it calls.

Each subcommand module exposes `register(subparsers)` which adds its parser(s) and sets
`func(args) -> int | None`. Heavy imports (torch, deepspeed, transformers) stay inside the
functions so that `megacpt --help` and bad-input errors are fast.
"""

from __future__ import annotations

import argparse
import sys

from megacpt.errors import UserError

# Modules that add subcommands, in the order `--help` lists them.
_SUBCOMMAND_MODULES = [
    "megacpt.data.prepare",
    "megacpt.train.cli",
    "megacpt.eval.cli",
    "megacpt.export",
    "megacpt.bench.cli",
    "megacpt.preflight",
    "megacpt.report",
    "megacpt.vocab",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="megacpt", description="Continued pre-training of decoder LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):  # not built yet
                continue
            raise
        mod.register(sub)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand accepts."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args.func, args, getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
