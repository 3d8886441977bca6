"""`megacpt eval --by-position WIDTH`: held-out loss as a function of the position in a document.

Windows start at document starts (the shard index's document boundaries), one per document: its
first min(len, seq_len+1) tokens, so a window never crosses into the next document and position p
means "p tokens after the document's start". Documents shorter than 2 tokens have nothing to
predict and are skipped; --max-tokens bounds the input tokens in all (the last window is cut to
fit). Per-token losses are summed per input position, then per bucket k = [k·W, (k+1)·W).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megacpt.data.indexed import IndexedDataset, list_shard_prefixes
from megacpt.errors import DataError, UserError
from megacpt.eval.perplexity import summarize
from megacpt.positions import spans


def document_tokens(ds: IndexedDataset):
    """Each document's tokens; a document may span several sequences of the index (doc_idx)."""
    doc_idx = np.asarray(ds.doc_idx, dtype=np.int64)
    for j in range(len(doc_idx) - 1):
        s0, s1 = int(doc_idx[j]), int(doc_idx[j + 1])
        if s1 <= s0:
            continue
        start = int(ds.offsets[s0])
        yield ds.tokens(start, int(ds.sizes[s0:s1].astype(np.int64).sum()))


def document_windows(path, seq_len: int, max_tokens: int | None) -> list[np.ndarray]:
    """One int64 window per document (its first min(len, seq_len+1) tokens), all shards in order,
    until max_tokens input tokens."""
    windows, inputs = [], 0
    for prefix in list_shard_prefixes(path):
        for doc in document_tokens(IndexedDataset(prefix)):
            if len(doc) < 2:
                continue
            w = np.asarray(doc[: seq_len + 1], dtype=np.int64)
            if max_tokens is not None:
                w = w[: max_tokens - inputs + 1]
                if len(w) < 2:
                    return windows
            windows.append(w)
            inputs += len(w) - 1
    if not windows:
        raise DataError(f"{path}: no document of 2 or more tokens; nothing to evaluate by position")
    return windows


def position_losses(model, windows: list[np.ndarray], seq_len: int, batch_size: int = 4):
    """(loss sum, token count) per input position, float64 and int64 arrays of length seq_len."""
    sums, counts = np.zeros(seq_len, np.float64), np.zeros(seq_len, np.int64)
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            n = max(len(w) for w in batch) - 1
            ids = torch.zeros(len(batch), n + 1, dtype=torch.long)
            for r, w in enumerate(batch):
                ids[r, : len(w)] = torch.from_numpy(w)
            # Right padding: under the causal mask a real position never sees the padding after it.
            logits = model(ids[:, :-1].to(device)).float()
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(device), reduction="none").cpu()
            real = np.arange(n)[None, :] < np.array([len(w) - 1 for w in batch])[:, None]
            accumulate(sums, counts, loss.double().numpy(), real)
    return sums, counts


def accumulate(sums: np.ndarray, counts: np.ndarray, loss: np.ndarray, real: np.ndarray) -> None:
    """Add a batch's per-token losses (rows, n) at its real positions (bool, same shape; padding
    and ignored labels False) into the per-position sums and counts, in place."""
    n = loss.shape[1]
    sums[:n] += np.where(real, loss, 0.0).sum(axis=0)
    counts[:n] += real.sum(axis=0)


def bucket(sums: np.ndarray, counts: np.ndarray, width: int) -> dict:
    """{"width": W, "buckets": [{start, end, loss, ppl, tokens}, ...]}; buckets after the longest
    window (no tokens) are left out, the last one ends at seq_len."""
    buckets = []
    for start, end in spans(len(sums), width):
        tokens = int(counts[start:end].sum())
        if tokens == 0:
            break  # counts never rise with position: every later bucket is empty too
        buckets.append({"start": start, "end": end, **summarize(float(sums[start:end].sum()), tokens)})
    return {"width": width, "buckets": buckets}


def check_width(width: int | None) -> None:
    if width is not None and width <= 0:
        raise UserError(f"--by-position {width}: the bucket width must be a positive number of tokens, e.g. 128")


def evaluate_by_position(model, windows: list[np.ndarray], seq_len: int, width: int, batch_size: int = 4) -> dict:
    """One data set's {loss, ppl, tokens, by_position}."""
    sums, counts = position_losses(model, windows, seq_len, batch_size)
    return {**summarize(float(sums.sum()), int(counts.sum())), "by_position": bucket(sums, counts, width)}


def print_table(name: str, result: dict) -> None:
    print(f"{name}: loss by position (bucket width {result['by_position']['width']})")
    print(f"  {'positions':<16}{'loss':>10}{'ppl':>12}{'tokens':>10}")
    for b in result["by_position"]["buckets"]:
        span = f"{b['start']}-{b['end']}"
        print(f"  {span:<16}{b['loss']:>10.4f}{b['ppl']:>12.3f}{b['tokens']:>10}")
