"""Buckets of input positions, for loss by position: `megacpt eval --by-position`, validation sets
with data.valid[].by_position in the training loop, their config checks and `megacpt report`.

Position p is the loss of predicting token p+1 from tokens 0..p of a document. Bucket k covers
positions [k·W, (k+1)·W), the last one ending at seq_len. In metrics a bucket is `pos_START_END`:
valid/NAME/pos_0_1024/loss and /ppl.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"pos_(\d+)_(\d+)")
BUCKET_METRICS = ("loss", "ppl")


def spans(seq_len: int, width: int) -> list[tuple[int, int]]:
    """[start, end) of every bucket of positions 0..seq_len-1."""
    return [(s, min(s + width, seq_len)) for s in range(0, seq_len, width)]


def bucket_name(start: int, end: int) -> str:
    return f"pos_{start}_{end}"


def parse_bucket(name: str) -> tuple[int, int] | None:
    """(start, end) of a bucket name, or None if `name` is not one."""
    m = _NAME.fullmatch(name)
    return (int(m[1]), int(m[2])) if m else None
