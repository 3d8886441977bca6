"""`megacpt eval`: held-out perplexity of an HF dir, run or checkpoint."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on held-out token shards",
                       description="Reads each dataset as consecutive non-overlapping windows of seq_len+1 tokens "
                                   "(the same windows as validation during training).")
    p.add_argument("--model", required=True, metavar="HF_DIR_OR_RUN_OR_CHECKPOINT")
    p.add_argument("--data", required=True, nargs="+", metavar="[NAME=]PATH")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, metavar="OUT.json")
    add_common(p)
    p.set_defaults(target="megacpt.eval.run:main_args")
