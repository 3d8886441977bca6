"""Held-out perplexity on token shards, the same way in `megacpt eval` and during training.

A dataset's tokens (all its shards, in order) are read as consecutive, non-overlapping windows
of seq_len+1 tokens: inputs are the first seq_len, labels the last seq_len. Only whole windows
count, up to max_tokens input tokens. ppl = exp(mean token loss).
"""

from __future__ import annotations

import math

import numpy as np

from megacpt.data.indexed import IndexedDataset, list_shard_prefixes
from megacpt.errors import DataError


def eval_windows(path, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """(n, seq_len+1) int64 windows; max_tokens counts input tokens (n × seq_len)."""
    w = seq_len + 1
    limit = None if max_tokens is None else max(max_tokens // seq_len, 0)
    rows = []
    carry = np.zeros(0, dtype=np.int64)
    for prefix in list_shard_prefixes(path):
        toks = IndexedDataset(prefix).all_tokens
        pos = 0
        # Windows cross shard boundaries: the dataset is the concatenation of its shards.
        if len(carry):
            need = w - len(carry)
            take = np.asarray(toks[:need], dtype=np.int64)
            carry = np.concatenate([carry, take])
            pos = len(take)
            if len(carry) == w:
                rows.append(carry)
                carry = np.zeros(0, dtype=np.int64)
        n_full = (len(toks) - pos) // w
        if limit is not None:
            n_full = min(n_full, limit - len(rows))
        if n_full > 0:
            rows.extend(np.asarray(toks[pos : pos + n_full * w], dtype=np.int64).reshape(n_full, w))
            pos += n_full * w
        if limit is not None and len(rows) >= limit:
            break
        carry = np.concatenate([carry, np.asarray(toks[pos:], dtype=np.int64)])[: w]
        if len(carry) == w:
            rows.append(carry)
            carry = np.zeros(0, dtype=np.int64)
    if not rows:
        raise DataError(f"{path}: fewer than seq_len+1 = {w} tokens; cannot form one evaluation window")
    return np.stack(rows)


def summarize(loss_sum: float, tokens: int, num_bytes: float | None = None) -> dict:
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "tokens": int(tokens)}
    if num_bytes:
        out["bits_per_byte"] = loss_sum / math.log(2) / num_bytes
    return out
