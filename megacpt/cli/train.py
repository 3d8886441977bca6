"""`megacpt train` and `python -m megacpt.train`: one rank of a run (a world of one when bare).

The config is loaded and checked here, before the trainer (torch, deepspeed) is imported, so a
config error costs a fraction of a second and imports neither."""

from __future__ import annotations

import argparse

from megacpt.cli.common import add_common, load, run


class _HelpConfig(argparse.Action):
    """--help-config: every config key with its type, default and description, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(load("megacpt.config:describe_config")())
        parser.exit()


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--help-config", action=_HelpConfig,
                   help="list every config key with its type, default and description, and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_common(p)
    p.set_defaults(target="megacpt.cli.train:run_train")


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="continued pre-training (one rank under a launcher)",
                       description="Train from a YAML config. Under deepspeed/torchrun/srun/mpirun this is one rank.")
    add_train_args(p)


def run_train(args) -> int:
    cfg = load("megacpt.config:load_config")(args.config, args.overrides)
    return load("megacpt.train.loop:train")(cfg)


def main(argv=None) -> int:
    """`python -m megacpt.train`: what launchers start on every rank."""
    p = argparse.ArgumentParser(prog="python -m megacpt.train")
    add_train_args(p)
    args = p.parse_args(argv)
    return run(load(args.target), args, args.debug)
