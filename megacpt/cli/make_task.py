"""`megacpt make-task`: parser only; the work is in megacpt.eval.make_task."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "make-task",
        help="write an lm-evaluation-harness task (cloze, continuation or passkey) from your own held-out text",
        description=(
            "Cut held-out documents (token shards decoded with --tokenizer, or .txt/.jsonl/.json/.parquet "
            "files) into task items and write DIR/NAME.yaml + DIR/NAME.jsonl, a task lm-eval loads with "
            "--include_path DIR. cloze: predict a passage's last word (acc, perplexity); continuation: "
            "pick the true next sentence among K (acc, acc_norm); passkey: recall a 5-digit key hidden at --depths "
            "in filler of --lengths tokens, one task per cell plus group NAME (acc). Same inputs and --seed, same bytes. "
            "Fewer usable items than --n: nothing is written (exit 2)."
        ),
    )
    p.add_argument("--from", dest="inputs", nargs="+", required=True, metavar="PATH",
                   help="shard prefixes (as written by megacpt prepare), shard directories or text files, in order")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="the tokenizer that made the shards (also measures passage lengths in tokens)")
    p.add_argument("--kind", required=True, choices=["cloze", "continuation", "passkey"])
    p.add_argument("--n", type=int, default=None, metavar="N", help="number of items (default: every usable one; passkey: per cell, default 10)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="which items, their order, distractors and labels (default 0)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for NAME.yaml and NAME.jsonl")
    p.add_argument("--name", default=None, metavar="NAME", help="task name (default: the output folder's name + _KIND)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="T",
                   help="cloze: longest passage; continuation: longest context, in tokens (default 128)")
    p.add_argument("--choices", type=int, default=4, metavar="K", help="continuation: choices per item (default 4)")
    p.add_argument("--lengths", default="256,512,1024", metavar="L[,L...]",
                   help="passkey: context lengths in tokens, one cell each (default 256,512,1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", metavar="D[,D...]",
                   help="passkey: relative depths of the key in the filler, 0 = start, 1 = end (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text (default: text)")
    add_common(p)
    p.set_defaults(target="megacpt.eval.make_task:main_args")
