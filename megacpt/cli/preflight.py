"""`megacpt preflight` and `python -m megacpt.preflight`: the parser; the work is megacpt.preflight.run."""

from __future__ import annotations

import argparse

from megacpt.cli.common import add_common, load, run

TARGET = "megacpt.preflight:run"
DESCRIPTION = (
    "Check a launch before a long job: all ranks meet, an all-reduce of a known tensor gives the known "
    "answer on every rank, and each rank's host, device and free memory are listed. Run it under the "
    "launcher the training uses (srun, deepspeed --module megacpt.preflight, torchrun -m megacpt.preflight, "
    "mpirun); rank 0 prints a table and every rank exits 1 if anything is wrong."
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for all ranks and for each collective (default 300)")
    p.add_argument("--size-mb", type=float, default=None, metavar="MB",
                   help="payload of the timed all-reduce (default 64 on GPU, 8 on CPU)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the table as JSON (rank 0)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_common(p)
    p.set_defaults(target=TARGET)


def add_parsers(sub) -> None:
    p = sub.add_parser("preflight", help="check ranks, all-reduce and devices under a launcher",
                       description=DESCRIPTION)
    add_args(p)


def main(argv=None) -> int:
    """`python -m megacpt.preflight` (megacpt/preflight/__main__.py): the same options, on its own."""
    p = argparse.ArgumentParser(prog="python -m megacpt.preflight", description=DESCRIPTION)
    add_args(p)
    args = p.parse_args(argv)
    return run(load(args.target), args, args.debug)
