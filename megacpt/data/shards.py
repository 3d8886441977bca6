"""What `megacpt prepare` writes under --output PREFIX: training shards (PREFIX, or PREFIX_00000...
when split by size), PREFIX_valid when holding out, and the sidecar PREFIX.json; all or nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from megacpt.data.indexed import IndexedDatasetWriter, bin_path, idx_path
from megacpt.data.sidecar import sidecar_path, write_sidecar


class ShardSet:
    """Training shards: PREFIX, or PREFIX_00000, PREFIX_00001, ... when split by size."""

    def __init__(self, prefix: str, dtype, max_bytes: int | None):
        self.prefix, self.dtype, self.max_bytes = prefix, np.dtype(dtype), max_bytes
        self.writers: list[IndexedDatasetWriter] = []
        self._new()

    def _new(self):
        if self.writers:
            self.writers[-1].close()  # full: on disk under its temporary name until commit
        name = self.prefix if self.max_bytes is None else f"{self.prefix}_{len(self.writers):05d}"
        self.writers.append(IndexedDatasetWriter(name, self.dtype))

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        if self.max_bytes is None:
            self.writers[-1].add_documents(tokens, sizes)
            return
        item = self.dtype.itemsize
        ends = np.cumsum(sizes) * item  # byte end of each document within this batch
        done_docs, done_bytes = 0, 0
        while done_docs < len(sizes):
            w = self.writers[-1]
            room = self.max_bytes - w.num_bytes
            # documents that still fit entirely in the current shard
            k = int(np.searchsorted(ends[done_docs:] - done_bytes, room, side="right"))
            if k == 0:
                if w.num_documents:
                    self._new()
                    continue
                k = 1  # a single document larger than a shard gets a shard of its own
            end_bytes = int(ends[done_docs + k - 1])
            w.add_documents(
                tokens[done_bytes // item : end_bytes // item], sizes[done_docs : done_docs + k]
            )
            done_docs += k
            done_bytes = end_bytes

    @property
    def num_documents(self):
        return sum(w.num_documents for w in self.writers)

    @property
    def num_tokens(self):
        return sum(w.num_tokens for w in self.writers)


def _family(prefix: str) -> list[Path]:
    """Existing files that a prepare run with this --output writes (to replace stale ones)."""
    p = Path(prefix)
    if not p.parent.is_dir():
        return []
    pat = re.compile(re.escape(p.name) + r"(_\d{5,}|_valid)?\.(bin|idx)|" + re.escape(p.name) + r"\.json")
    return [q for q in p.parent.iterdir() if pat.fullmatch(q.name)]


class PrepareOutput:
    """The writers of one prepare run. Nothing appears under a final name before commit(); abort()
    takes back everything written so far, including the output directory when this run made it."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._out_dir = Path(prefix).parent
        self._made_dir = not self._out_dir.exists()
        self.train: ShardSet | None = None
        self.valid: IndexedDatasetWriter | None = None
        self._committed: list[str] = []

    def open(self, dtype, max_bytes: int | None, with_valid: bool) -> None:
        self.train = ShardSet(self.prefix, dtype, max_bytes)
        self.valid = IndexedDatasetWriter(f"{self.prefix}_valid", dtype) if with_valid else None

    def add(self, tokens: np.ndarray, sizes: np.ndarray, held_out: np.ndarray) -> None:
        """One batch: `sizes` per record (-1: the record made no document), `held_out` per record
        (True: the document goes to PREFIX_valid)."""
        keep = sizes >= 0
        is_valid = held_out & keep
        if self.valid is not None and is_valid.any():
            # Route tokens by document: expand the per-record flag to a per-token mask.
            token_valid = np.repeat(is_valid[keep], sizes[keep])
            self.valid.add_documents(tokens[token_valid], sizes[is_valid])
            self.train.add(tokens[~token_valid], sizes[keep & ~is_valid])
        else:
            self.train.add(tokens, sizes[keep])

    @property
    def num_documents(self) -> int:
        return self.train.num_documents + (self.valid.num_documents if self.valid else 0)

    def commit(self, sidecar: dict) -> None:
        """Move the shards into place, then the sidecar, then remove what an earlier run left."""
        for w in self.train.writers:
            w.close()
        if self.valid is not None:
            self.valid.close()
        writers = self.train.writers + ([self.valid] if self.valid is not None else [])
        new_files = {os.path.abspath(f(w.prefix)) for w in writers for f in (bin_path, idx_path)}
        new_files.add(os.path.abspath(sidecar_path(self.prefix)))
        stale = [q for q in _family(self.prefix) if os.path.abspath(q) not in new_files]
        for w in writers:
            w.commit()
            self._committed += [bin_path(w.prefix), idx_path(w.prefix)]
        write_sidecar(self.prefix, sidecar)
        # Leftovers of an earlier run with this prefix (e.g. more size-split shards) would be
        # picked up by a directory glob and silently mixed in: the prefix now means this run only.
        for q in stale:
            q.unlink(missing_ok=True)

    def abort(self) -> None:
        if self.train is not None:
            for w in self.train.writers:
                w.abort()
        if self.valid is not None:
            self.valid.abort()
        for p in self._committed:  # an interruption while renaming: take back what was renamed
            Path(p).unlink(missing_ok=True)
        if self._made_dir:
            try:
                self._out_dir.rmdir()
            except OSError:
                pass
