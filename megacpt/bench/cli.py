"""`megacpt bench <what>`: benchmarks that print a table and write JSON (never timing asserts)."""

from __future__ import annotations


def register(sub) -> None:
    from megacpt.cli import add_common

    p = sub.add_parser("bench", help="benchmarks (loss kernel, ...); print a table and write JSON")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    from megacpt.bench import loss

    lp = bsub.add_parser("loss", help="fused linear cross-entropy against eager, torch chunked and Liger")
    loss.add_loss_args(lp)
    add_common(lp)
    lp.set_defaults(func=loss.run_loss_bench)
