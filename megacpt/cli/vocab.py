"""`megacpt extend-vocab`: the parser; the work is megacpt.vocab.run."""

from __future__ import annotations

from megacpt.cli.common import add_common

# The same as megacpt.vocab.INITS and DEFAULT_MAX_TRAIN_CHARS (tests/test_extend_vocab.py checks),
# written out so that parsing imports neither torch nor tokenizers.
INITS = ("mean", "subword")
DEFAULT_MAX_TRAIN_CHARS = 100_000_000


def add_parsers(sub) -> None:
    p = sub.add_parser("extend-vocab", help="add tokens to a model's tokenizer and resize its embeddings",
                       description="Add tokens (a list, or learned by a BPE on a new corpus) to an HF model's "
                                   "BPE tokenizer, resize the embedding and head, initialise the new rows, "
                                   "and write a new HF dir whose tokenizer and model agree.")
    p.add_argument("--model", required=True, metavar="HF_DIR", help="base Hugging Face model dir (with tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", metavar="FILE",
                     help="one token per line, as text; keep a leading space for word-initial tokens (' Haus')")
    src.add_argument("--train-bpe", metavar="CORPUS", help="learn new tokens with a BPE on this text/.jsonl corpus")
    p.add_argument("--num-tokens", type=int, metavar="K",
                   help="with --train-bpe: number of new vocabulary entries (intermediate merge tokens included)")
    p.add_argument("--init", choices=INITS, default="mean",
                   help="new rows: mean of all rows (mean) or of the token's pieces under the old tokenizer (subword)")
    p.add_argument("--output", required=True, metavar="HF_DIR")
    p.add_argument("--report-corpus", metavar="FILE",
                   help="report tokens per character before/after on this corpus (default: the --train-bpe corpus)")
    p.add_argument("--text-key", default="text", help="field of .jsonl records holding the text (default: text)")
    p.add_argument("--pad-to-multiple-of", type=int, default=1, metavar="N",
                   help="pad the embedding rows up to a multiple of N (e.g. 64 for tensor cores); default 1")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_TRAIN_CHARS,
                   help="characters of the --train-bpe corpus to read at most")
    add_common(p)
    p.set_defaults(target="megacpt.vocab:run")
