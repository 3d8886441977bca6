"""`megacpt eval`: held-out perplexity and lm-evaluation-harness tasks of an HF dir, run or checkpoint."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on held-out token shards; lm-evaluation-harness tasks",
                       description="Reads each dataset as consecutive non-overlapping windows of seq_len+1 tokens "
                                   "(the same windows as validation during training). --tasks runs "
                                   "lm-evaluation-harness tasks (lm-eval's YAML format) on the same model.")
    p.add_argument("--model", required=True, metavar="HF_DIR_OR_RUN_OR_CHECKPOINT")
    p.add_argument("--data", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="held-out token shards (optional with --tasks)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--by-position", type=int, default=None, metavar="WIDTH",
                   help="loss per position bucket of WIDTH tokens; one window per document, from its start")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default=None, metavar="NAME[,NAME...]", help="lm-eval task or group names")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per item (default: each task's own, else 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N items of each task")
    p.add_argument("--tokenizer", default=None, metavar="HF_DIR",
                   help="tokenizer for task prompts (default: the model's own tokenizer files)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    add_common(p)
    p.set_defaults(target="megacpt.eval.run:main_args")
