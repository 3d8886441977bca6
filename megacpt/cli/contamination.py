"""`megacpt contamination`: the parser; the work is megacpt.eval.contamination.main_args."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser("contamination", help="eval items sharing a token n-gram with the training shards",
                       description="For each eval set and each training source: the fraction of eval items (and "
                                   "of their tokens) that share a token n-gram with the source's shards. Eval sets "
                                   "are lm-eval task YAMLs/dirs with local JSON data (tokenized with --tokenizer, "
                                   "each string field on its own) or token shards (one item per document). "
                                   "See docs/CONTAMINATION.md.")
    p.add_argument("--train", required=True, nargs="+", metavar="[NAME=]PREFIX",
                   help="a training source: shard prefix or directory of shards (name: its base name)")
    p.add_argument("--eval", required=True, nargs="+", metavar="[NAME=]TASK_DIR_OR_PREFIX",
                   help="an lm-eval task YAML or directory of them, or a shard prefix or directory of shards")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the training shards' tokenizer (needed for task eval sets)")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length in tokens (default 13)")
    p.add_argument("--exact", action="store_true",
                   help="compare n-grams as token tuples in a Python set (no hashing; slow, for small data)")
    p.add_argument("--workers", type=int, default=1, help="processes scanning the training shards")
    p.add_argument("--max-train-tokens", type=int, default=None, metavar="N",
                   help="scan at most N tokens per source, in blocks spread over its shards (default: all)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the report here")
    add_common(p)
    p.set_defaults(target="megacpt.eval.contamination:main_args")
