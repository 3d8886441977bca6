"""Training samples: packing across documents, blending sources by weight, a deterministic order.

The whole order is a pure function of (sources, seq_len, seed) and nothing else — not the world
size, not the number of workers, and not even `num_samples`. A run resumes by skipping
`consumed_samples`, and a run extended to more samples sees exactly the samples it saw before,
followed by new ones.

One source (`PackedDataset`):
  1. Its shards, in the order given, form one corpus of D documents and T tokens.
  2. Epoch e is a permutation of all D documents, seeded by (source seed, e). Epochs follow each
     other as one endless token stream; a sample may straddle two epochs.
  3. Raw sample k is the window stream[k*S : k*S + S + 1] (S = seq_len): consecutive samples
     share one token, the last label of one being the first input of the next (Megatron).
  4. Raw samples are shuffled inside fixed blocks of B = min(T // S, 2**20) samples, each block
     with its own seed (source seed, block). B depends on the corpus and S only, which is what
     keeps sample i independent of num_samples; the last block is built whole even when
     num_samples ends inside it. A block is about one epoch of samples, so the shuffle mixes the
     whole corpus while its index stays bounded for very large corpora.

Blend (`BlendedDataset`): sample i goes to the source whose count so far lies furthest below
weight × (i + 1) (ties to the earlier source) and is that source's next sample. That rule is
sequential, so the first n assignments never depend on how many follow.

Nothing here copies tokens: index arrays only (document order per epoch with cumulative token
offsets, the sample shuffle, the blend assignment). A sample is gathered from the shard memmaps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from megacpt.data.indexed import IndexedDataset, list_shard_prefixes
from megacpt.data.sidecar import read_sidecar
from megacpt.errors import DataError

MAX_SHUFFLE_BLOCK = 1 << 20
VOCAB_SCAN_CHUNK = 1 << 24  # tokens per read when checking ids: bounded memory on huge shards

# Distinct streams of randomness drawn from one source seed.
_DOC_SHUFFLE = 0
_SAMPLE_SHUFFLE = 1


def _check_index(i, n: int) -> int:
    """Sample index i of n, negative counting from the end (as a sequence's)."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample {i} out of range for {n} samples")
    return i


@dataclass(frozen=True)
class Source:
    name: str
    path: str  # shard prefix, or a directory whose shards are all used in sorted order
    weight: float


def source_seed(seed: int, name: str) -> int:
    """Seed of one source, from the run seed and the source's name.

    Hashing the name (not the source's position) lets a source be added to or removed from a blend
    without reshuffling the others. Python's hash() is salted per process, so sha256.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # SeedSequence only takes non-negative entropy; the modulo keeps negative seeds usable and distinct.
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, stream, int(index)]))


class PackedDataset:
    """Fixed-length samples of seq_len + 1 tokens from one corpus (see the module docstring)."""

    def __init__(self, prefixes: list[str], seq_len: int, seed: int, num_samples: int):
        if int(seq_len) < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}")
        if int(num_samples) < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.prefixes = [str(p) for p in prefixes]
        if not self.prefixes:
            raise DataError("no shards given for a data source; point its path at a prefix or a directory")
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.shards = [IndexedDataset(p) for p in self.prefixes]

        # One table over all shards: the corpus is the documents of each shard, in prefix order.
        self._doc_size = np.concatenate([s.sizes.astype(np.int64) for s in self.shards])
        self._doc_offset = np.concatenate([np.asarray(s.offsets, dtype=np.int64) for s in self.shards])
        self._doc_shard = np.concatenate(
            [np.full(len(s), k, dtype=np.int32) for k, s in enumerate(self.shards)]
        )
        self.num_documents = len(self._doc_size)
        self.tokens_per_epoch = int(self._doc_size.sum())
        where = ", ".join(self.prefixes)
        if self.tokens_per_epoch == 0:
            raise DataError(f"empty corpus ({where}): no tokens; re-run megacpt prepare on non-empty input")
        if self.tokens_per_epoch < self.seq_len + 1:
            raise DataError(
                f"corpus {where} has {self.tokens_per_epoch} tokens, fewer than one sample of "
                f"seq_len+1 = {self.seq_len + 1}; add data or lower seq_len"
            )

        S, T = self.seq_len, self.tokens_per_epoch
        self.shuffle_block = int(min(T // S, MAX_SHUFFLE_BLOCK))
        num_blocks = -(-self.num_samples // self.shuffle_block)
        num_raw = num_blocks * self.shuffle_block
        tokens_needed = num_raw * S + 1 if num_raw else 0
        self.num_epochs = -(-tokens_needed // T)

        self._doc_id_dtype = np.int32 if self.num_documents < 2**31 else np.int64
        if self.num_epochs:
            self._stream_docs = np.concatenate([self.epoch_order(e) for e in range(self.num_epochs)])
        else:
            self._stream_docs = np.zeros(0, dtype=self._doc_id_dtype)
        # _stream_cum[j] = stream position of the j-th document of the stream (documents of all
        # epochs back to back); a sample's documents are found by binary search on it.
        self._stream_cum = np.zeros(len(self._stream_docs) + 1, dtype=np.int64)
        np.cumsum(self._doc_size[self._stream_docs], out=self._stream_cum[1:])

        blocks = [
            b * self.shuffle_block + _rng(self.seed, _SAMPLE_SHUFFLE, b).permutation(self.shuffle_block)
            for b in range(num_blocks)
        ]
        self._raw = (np.concatenate(blocks) if blocks else np.zeros(0, np.int64))[: self.num_samples]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Documents (indices into the corpus, shards in prefix order) in the order epoch `epoch` reads them."""
        perm = _rng(self.seed, _DOC_SHUFFLE, epoch).permutation(self.num_documents)
        return perm.astype(self._doc_id_dtype, copy=False)

    def raw_index(self, i: int) -> int:
        """Which window of the stream sample i is: it covers stream tokens [k*S, k*S + S + 1)."""
        return int(self._raw[_check_index(i, self.num_samples)])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> np.ndarray:
        return self._read(i)[0]

    def segments(self, i) -> np.ndarray:
        """Document number of each position of sample i, counted 0, 1, 2... from its first document.

        For document masking: positions restart and attention stops where the number changes.
        (The label of a document's last token is then the next document's first token; whether to
        train on it is the trainer's call.)
        """
        return self._read(i)[1]

    def sample(self, i) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, segments) of sample i in one read."""
        return self._read(i)

    def _read(self, i):
        S = self.seq_len
        start = int(self._raw[_check_index(i, self.num_samples)]) * S
        end = start + S + 1
        cum = self._stream_cum
        first = int(np.searchsorted(cum, start, side="right")) - 1
        last = int(np.searchsorted(cum, end, side="left"))  # documents [first, last) cover the window
        docs = self._stream_docs[first:last]
        lo = np.maximum(cum[first:last], start)
        n = np.minimum(cum[first + 1 : last + 1], end) - lo
        # Empty documents take no positions and must not take a segment number either.
        keep = n > 0
        docs, lo, n = docs[keep], lo[keep], n[keep]
        src = self._doc_offset[docs] + (lo - cum[first:last][keep])  # token offset inside its shard
        shard = self._doc_shard[docs]

        tokens = np.empty(S + 1, dtype=np.int64)
        if len(docs) == 1:
            tokens[:] = self.shards[int(shard[0])].tokens(int(src[0]), S + 1)
        else:
            # One gather per shard instead of a Python loop over what may be hundreds of short documents.
            out_start = np.cumsum(n) - n
            index = np.repeat(src - out_start, n) + np.arange(S + 1, dtype=np.int64)
            if (shard == shard[0]).all():
                tokens[:] = self.shards[int(shard[0])].all_tokens[index]
            else:
                pos_shard = np.repeat(shard, n)
                for k in np.unique(shard):
                    mask = pos_shard == k
                    tokens[mask] = self.shards[int(k)].all_tokens[index[mask]]
        segments = np.repeat(np.arange(len(docs), dtype=np.int32), n)
        return tokens, segments

    def __reduce__(self):
        # The order is a pure function of these arguments: rebuild in the receiving process rather
        # than pickle memmaps (which would copy whole shards) and index arrays.
        return (PackedDataset, (self.prefixes, self.seq_len, self.seed, self.num_samples))


def blend_assignment(weights, num_samples: int) -> np.ndarray:
    """Source of each of the first num_samples samples, by greatest sampling error.

    `weights` must already be normalised. Errors are recomputed from (i + 1) at each step rather
    than accumulated, so no rounding drift builds up over millions of samples.
    """
    w = [float(x) for x in weights]
    k = len(w)
    dtype = np.uint8 if k <= 256 else np.int32
    if k == 1:
        return np.zeros(num_samples, dtype=dtype)
    counts = [0] * k
    out = bytearray(num_samples) if dtype == np.uint8 else [0] * num_samples
    others = range(1, k)
    for i in range(num_samples):
        t = i + 1
        best, best_err = 0, w[0] * t - counts[0]
        for s in others:
            err = w[s] * t - counts[s]
            if err > best_err:
                best, best_err = s, err
        counts[best] += 1
        out[i] = best
    if dtype == np.uint8:
        return np.frombuffer(bytes(out), dtype=np.uint8).copy()
    return np.asarray(out, dtype=dtype)


def check_vocab(prefix: str, vocab_size: int, shard: IndexedDataset | None = None) -> None:
    """DataError if the shard at `prefix` holds token ids the model cannot embed.

    Two checks: the sidecar PREFIX.json written by prepare (the tokenizer's vocabulary, cheap), then
    every token id, read in chunks so memory stays bounded. Nothing is cached: a shard rewritten
    in place is checked again.
    """
    vocab_size = int(vocab_size)
    try:
        # Also finds the sidecar of PREFIX_00000-style split shards and of PREFIX_valid.
        meta = read_sidecar(prefix)
    except (OSError, ValueError) as e:
        raise DataError(f"{prefix}: unreadable shard metadata ({e}); delete it or re-run megacpt prepare") from None
    tok_vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if isinstance(tok_vocab, int) and tok_vocab > vocab_size:
        raise DataError(
            f"{prefix}: tokenized with a vocabulary of {tok_vocab} tokens but the model has "
            f"{vocab_size}; re-run megacpt prepare with the model's tokenizer"
        )
    ds = shard if shard is not None else IndexedDataset(prefix)
    tokens = ds.all_tokens
    info = np.iinfo(ds.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return  # every id this dtype can hold is in range
    for start in range(0, len(tokens), VOCAB_SCAN_CHUNK):
        chunk = tokens[start : start + VOCAB_SCAN_CHUNK]
        if int(chunk.max()) < vocab_size and (info.min >= 0 or int(chunk.min()) >= 0):
            continue
        pos = start + int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
        doc = int(np.searchsorted(ds.offsets, pos, side="right")) - 1
        raise DataError(
            f"{prefix}: token id {int(tokens[pos])} (document {doc}) is outside the model's "
            f"vocabulary of {vocab_size} tokens; re-run megacpt prepare with the model's tokenizer"
        )


class BlendedDataset:
    """Samples of several sources, mixed by weight (see the module docstring).

    `ds[i]` is {"tokens": int64 (seq_len+1,), "source": source index, "segments": int32 (seq_len+1,)}.
    """

    def __init__(
        self,
        sources: list[Source],
        seq_len: int,
        seed: int,
        num_samples: int,
        vocab_size: int | None = None,
    ):
        sources = list(sources)
        if not sources:
            raise DataError("no data sources configured; add at least one source with a path and a weight")
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"duplicate data source name(s) {dupes}; give every source a unique name")
        for s in sources:
            try:
                w = float(s.weight)
            except (TypeError, ValueError):
                w = float("nan")
            if not math.isfinite(w) or w <= 0:
                raise DataError(
                    f"data source {s.name!r}: weight {s.weight!r} must be a positive finite number; "
                    f"fix it or remove the source"
                )
        if int(num_samples) < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")

        self.sources = sources
        self.source_names = names
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        total = sum(float(s.weight) for s in sources)
        self.weights = [float(s.weight) / total for s in sources]

        prefixes = []
        for s in sources:
            try:
                prefixes.append(list_shard_prefixes(s.path))
            except DataError as e:
                raise DataError(f"data source {s.name!r}: {e}") from None
        if vocab_size is not None:
            for s, ps in zip(sources, prefixes):
                for p in ps:
                    try:
                        check_vocab(p, vocab_size)
                    except DataError as e:
                        raise DataError(f"data source {s.name!r}: {e}") from None

        self._source = blend_assignment(self.weights, self.num_samples)
        # Sorted sample positions of each source: a sample's rank among its source's samples, and
        # per-source counts over any prefix, are binary searches.
        self._positions = [np.flatnonzero(self._source == k) for k in range(len(sources))]
        self.datasets = []
        for s, ps, pos in zip(sources, prefixes, self._positions):
            try:
                self.datasets.append(PackedDataset(ps, self.seq_len, source_seed(self.seed, s.name), len(pos)))
            except DataError as e:
                raise DataError(f"data source {s.name!r}: {e}") from None

    def __len__(self) -> int:
        return self.num_samples

    def source_of(self, i) -> int:
        return int(self._source[_check_index(i, self.num_samples)])

    def __getitem__(self, i) -> dict:
        i = _check_index(i, self.num_samples)
        k = int(self._source[i])
        rank = int(np.searchsorted(self._positions[k], i))
        tokens, segments = self.datasets[k].sample(rank)
        return {"tokens": tokens, "source": k, "segments": segments}

    def tokens_per_source(self, num_consumed_samples: int) -> dict[str, int]:
        """Tokens (seq_len per sample) each source contributed to samples [0, n)."""
        n = int(num_consumed_samples)
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"num_consumed_samples {n} outside [0, {self.num_samples}]")
        return {
            name: int(np.searchsorted(pos, n)) * self.seq_len
            for name, pos in zip(self.source_names, self._positions)
        }

    def __reduce__(self):
        # Rebuilt from its arguments in the receiving process (see PackedDataset.__reduce__); the
        # vocabulary scan already passed here, so it is not repeated.
        return (BlendedDataset, (self.sources, self.seq_len, self.seed, self.num_samples))
