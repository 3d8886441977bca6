"""`megacpt train` and `python -m megacpt.train`: one rank of a run (a world of one when bare)."""

from __future__ import annotations

import argparse


def add_train_args(p: argparse.ArgumentParser) -> None:
    from megacpt.cli import add_common

    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. --set optim.lr=3e-4 (repeatable)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_common(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from megacpt.train.loop import run

    return run(args.config, args.overrides)


def register(sub) -> None:
    p = sub.add_parser("train", help="continued pre-training (one rank under a launcher)",
                       description="Train from a YAML config. Under deepspeed/torchrun/srun/mpirun this is one rank.")
    add_train_args(p)


def main(argv=None) -> int:
    from megacpt.cli import run

    p = argparse.ArgumentParser(prog="python -m megacpt.train")
    add_train_args(p)
    args = p.parse_args(argv)
    return run(args.func, args, args.debug)
