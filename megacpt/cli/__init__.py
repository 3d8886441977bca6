"""`megacpt` command line: argument parsing only; the work happens in the modules it names.

Each module in _PARSERS defines `add_parsers(subparsers)`, which adds its subcommand(s) and sets
`target="package.module:function"` (a function of the parsed arguments). Parsers import nothing
heavy; the target module is imported by megacpt.cli.common.load only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megacpt.cli.common import add_common, load, run

__all__ = ["add_common", "build_parser", "main", "run"]

# Modules that add subcommands, in the order `--help` lists them.
_PARSERS = [
    "megacpt.cli.prepare",
    "megacpt.cli.train",
    "megacpt.cli.eval",
    "megacpt.cli.contamination",
    "megacpt.cli.make_task",
    "megacpt.cli.export",
    "megacpt.cli.verify",
    "megacpt.cli.bench",
    "megacpt.cli.preflight",
    "megacpt.cli.report",
    "megacpt.cli.vocab",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacpt", description="Continued pre-training of decoder LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _PARSERS:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(load(args.target), args, getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
