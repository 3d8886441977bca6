"""`megacpt report`: the parser; the work is megacpt.report.run."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="plots and an HTML page for one or more runs",
                       description="Plot training loss, learning rate, throughput and per-domain validation "
                                   "perplexity of one or more runs (overlaid) into PNGs, report.json and index.html.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", required=True, metavar="DIR")
    add_common(p)
    p.set_defaults(target="megacpt.report:run")
