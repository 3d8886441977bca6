"""`megacpt verify`: the parser; the work is megacpt.train.manifest.run."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser("verify", help="check checkpoints against their manifests (sizes, BLAKE2b checksums)",
                       description="Check every checkpoint of a run (or one checkpoint) against its manifest.json: "
                                   "one line per checkpoint (and per universal/ folder); exit 0 when all are "
                                   "intact, 2 when one is damaged (the file is named).")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    add_common(p)
    p.set_defaults(target="megacpt.train.manifest:run")
