"""`megacpt prepare` and `megacpt merge`: parsers only; the work is in megacpt.data.prepare/merge."""

from __future__ import annotations

import argparse

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    _add_prepare(sub)
    _add_merge(sub)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text into Megatron .bin/.idx shards",
        description=(
            "Tokenize .txt, .jsonl, .json, .parquet files or save_to_disk dataset directories into "
            "PREFIX.bin/.idx (+ PREFIX.json sidecar). Each record becomes one document followed by "
            "EOS. Output appears atomically; files of an earlier run with the same PREFIX are replaced."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories of files, or save_to_disk dirs (in this order)")
    p.add_argument("--tokenizer", required=True, metavar="DIR_OR_MODEL", help="HF tokenizer dir/hub id or sentencepiece .model")
    p.add_argument("--output", required=True, metavar="PREFIX", help="output prefix, e.g. data/corpus")
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text (dotted for nested JSON; default: text)")
    p.add_argument(
        "--text-mode",
        choices=["file", "blocks", "lines"],
        default="file",
        help="plain text: one document per file (default), per blank-line separated block, or per line",
    )
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: usable CPU cores)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE", help="split output into PREFIX_00000... of at most SIZE bytes of .bin (e.g. 100MB, 1GiB)")
    p.add_argument("--bos", action="store_true", help="prepend BOS to every document")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS (default: append)")
    p.add_argument("--valid-fraction", type=float, default=0.0, metavar="F", help="hold out this fraction of documents into PREFIX_valid")
    p.add_argument("--num-shards", type=int, default=1, metavar="N", help="split the input documents into N contiguous parts (with --shard-index)")
    p.add_argument("--shard-index", type=int, default=None, metavar="I", help="which part to process (0-based; e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--on-decode-error", choices=["skip", "error"], default="error", help="records that are not valid UTF-8: skip (counted in the sidecar) or stop (default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: when stderr is a terminal)")
    add_common(p)
    p.set_defaults(target="megacpt.data.prepare:main_args")


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="concatenate tokenized shards without re-tokenizing",
        description="Concatenate shard prefixes (or directories of shards) in order into OUTPUT.bin/.idx + OUTPUT.json.",
    )
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="shard prefixes, size-split prefixes or directories, in order")
    p.add_argument("--output", required=True, metavar="PREFIX", help="merged output prefix")
    add_common(p)
    p.set_defaults(target="megacpt.data.merge:main_args")
