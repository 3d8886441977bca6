"""Megatron indexed dataset ("MMIDIDX" .bin/.idx), byte-compatible with Megatron-LM and GPT-NeoX.

.bin: headerless concatenation of token arrays of one dtype.
.idx (little-endian): magic(9) version<Q> dtype<B> N<Q> D+1<Q> sizes int32[N] pointers int64[N]
doc_idx int64[D+1]. Each sequence here is one document, so doc_idx = 0..N.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from array import array
from pathlib import Path

import numpy as np

from megacpt.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # 34 bytes
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 tokens (Megatron's threshold), else int32 (there is no uint32 code)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix) -> str:
    return f"{prefix}.bin"


def idx_path(prefix) -> str:
    return f"{prefix}.idx"


def write_index(path, sizes: np.ndarray, dtype: np.dtype, doc_idx: np.ndarray | None = None) -> None:
    """Write an .idx for sequences of the given lengths (pointers derived from them)."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    if doc_idx is None:
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        # Pointers in chunks: a full int64 copy would double the writer's peak memory on corpora
        # with hundreds of millions of documents.
        offset = 0
        chunk = 1 << 20
        for start in range(0, len(sizes), chunk):
            part = sizes[start : start + chunk].astype(np.int64) * dtype.itemsize
            ends = np.cumsum(part) + offset
            f.write((ends - part).tobytes(order="C"))
            offset = int(ends[-1])
        f.write(doc_idx.tobytes(order="C"))


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin/.idx, atomically.

    Everything is written under temporary names and renamed into place by `finalize()`, so a
    crash or Ctrl-C never leaves a half-written shard under the final name. Memory is bounded by
    the sizes array (4 bytes per document, in an `array`, not a list of Python ints which costs
    ~36 bytes each), never by the number of tokens.

    `finalize()` = `close()` (everything on disk under temporary names) + `commit()` (renames):
    callers that write several shards close each as it fills and commit them all at the end, so
    an error halfway leaves none of them under a final name.
    """

    def __init__(self, prefix, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"unsupported token dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = f"{bin_path(self.prefix)}.tmp.{os.getpid()}"
        self._tmp_idx = f"{idx_path(self.prefix)}.tmp.{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array("i")  # int32, as in the .idx
        # Document boundaries in sequence units; None while every sequence is its own document
        # (always, except when merging foreign shards whose documents span several sequences).
        self._doc_idx: array | None = None
        self._closed = False
        self.num_tokens = 0
        self.num_bytes = 0

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError("a document must be a 1-D token array")
        self.add_documents(arr, [arr.size])

    def add_documents(self, tokens, sizes) -> None:
        """Append several documents at once: `tokens` is their concatenation, `sizes` their lengths."""
        arr = np.asarray(tokens)
        sizes = np.asarray(sizes, dtype=np.int64)
        if arr.ndim != 1 or sizes.ndim != 1:
            raise ValueError("tokens and sizes must be 1-D arrays")
        if int(sizes.sum()) != arr.size:
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {arr.size} tokens were given")
        if arr.dtype != self.dtype:
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"token arrays must be integers, got {arr.dtype}")
            info = np.iinfo(self.dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise DataError(f"token id out of range for {self.dtype}")
            arr = arr.astype(self.dtype)
        self._write(arr.tobytes(order="C"), sizes)

    def add_raw(self, data: bytes | memoryview, sizes) -> None:
        """Append already-encoded documents (used by merge: no decode/re-encode)."""
        self._write(data, np.asarray(sizes, dtype=np.int64))

    def append_dataset(self, ds: "IndexedDataset", chunk_bytes: int = 16 << 20) -> None:
        """Append a whole shard: its .bin is streamed in chunks, its document structure kept."""
        if ds.dtype != self.dtype:
            raise DataError(f"{ds.prefix}: token dtype {ds.dtype} differs from {self.dtype}")
        n_before = len(self._sizes)
        trivial = len(ds.doc_idx) == len(ds) + 1 and bool(
            np.array_equal(ds.doc_idx, np.arange(len(ds) + 1, dtype=np.int64))
        )
        if not trivial and self._doc_idx is None:
            self._doc_idx = array("q", range(n_before + 1))
        with open(bin_path(ds.prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, chunk_bytes)
        self._sizes.frombytes(np.ascontiguousarray(ds.sizes, dtype=np.int32).tobytes())
        if self._doc_idx is not None:
            # Foreign doc_idx starts at 0; its boundaries shift by the sequences already written.
            shifted = np.asarray(ds.doc_idx[1:], dtype=np.int64) + n_before
            self._doc_idx.frombytes(shifted.tobytes())
        self.num_tokens += int(ds.num_tokens)
        self.num_bytes += int(ds.num_tokens) * self.dtype.itemsize

    def _write(self, data, sizes: np.ndarray) -> None:
        if self._closed:
            raise ValueError("writer is closed")
        if sizes.size and (sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max):
            raise DataError("document length out of range for the int32 sizes of an .idx")
        self._bin.write(data)
        n_before = len(self._sizes)
        self._sizes.frombytes(sizes.astype(np.int32).tobytes())
        if self._doc_idx is not None:
            self._doc_idx.extend(range(n_before + 1, len(self._sizes) + 1))
        self.num_tokens += int(sizes.sum())
        self.num_bytes += len(data)

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Flush .bin and write .idx, both still under temporary names."""
        if self._closed:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else np.zeros(0, np.int32)
        doc_idx = None if self._doc_idx is None else np.frombuffer(self._doc_idx, dtype=np.int64)
        write_index(self._tmp_idx, sizes, self.dtype, doc_idx)
        self._closed = True

    def commit(self) -> None:
        """Rename the closed temporary files into place."""
        if not self._closed:
            self.close()
        # .bin first, .idx last: a reader opens by the .idx, so it never sees a new index over an old .bin.
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def finalize(self) -> None:
        self.close()
        self.commit()

    def abort(self) -> None:
        try:
            self._bin.close()
        finally:
            for p in (self._tmp_bin, self._tmp_idx):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


class IndexedDataset:
    """Memory-mapped reader. `ds[i]` is a zero-copy numpy view of sequence i."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise DataError(f"missing shard file {p}: pass a prefix that has both .bin and .idx")
        idx_size = os.path.getsize(ipath)
        if idx_size < HEADER_SIZE:
            raise DataError(f"{ipath}: truncated index header ({idx_size} bytes); re-run megacpt prepare")
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise DataError(f"{ipath}: not a Megatron MMIDIDX index (bad magic); re-run megacpt prepare")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataError(f"{ipath}: unsupported index version {version} (expected 1)")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES or code in (6, 7):
            raise DataError(f"{ipath}: dtype code {code} is not a token dtype")
        self.dtype = np.dtype(DTYPE_CODES[code])
        (n,) = struct.unpack("<Q", header[18:26])
        (d,) = struct.unpack("<Q", header[26:34])
        expected = HEADER_SIZE + 12 * n + 8 * d
        # Multimodal indexes append int8 modes[N]; accept that trailing block too.
        self.has_modes = idx_size == expected + n and n > 0
        if idx_size not in (expected, expected + n):
            raise DataError(
                f"{ipath}: index size {idx_size} does not match its header ({n} sequences, {d} doc "
                f"entries, expected {expected} bytes); the file is truncated or corrupt"
            )
        self._idx_mmap = np.memmap(ipath, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(self._idx_mmap, dtype=np.int32, count=n, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(self._idx_mmap, dtype=np.int64, count=n, offset=HEADER_SIZE + 4 * n)
        self.doc_idx = np.frombuffer(self._idx_mmap, dtype=np.int64, count=d, offset=HEADER_SIZE + 12 * n)
        bin_size = os.path.getsize(bpath)
        total = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        if bin_size != total:
            raise DataError(
                f"{bpath}: {bin_size} bytes but its index describes {total}; the .bin is truncated or "
                f"belongs to another index — re-run megacpt prepare"
            )
        if n and (self.pointers[-1] + int(self.sizes[-1]) * self.dtype.itemsize != total):
            raise DataError(f"{ipath}: sequence pointers disagree with sizes; the index is corrupt")
        self._bin_mmap = np.memmap(bpath, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)
        self.num_tokens = total // self.dtype.itemsize
        # Token offset (not byte offset) of each sequence, for reading spans across documents.
        self.offsets = (self.pointers // self.dtype.itemsize) if n else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return self._bin_mmap[start : start + int(self.sizes[i])]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """A view of `length` tokens starting at global token offset `start` (crosses documents)."""
        return self._bin_mmap[start : start + length]

    @property
    def all_tokens(self) -> np.ndarray:
        return self._bin_mmap


def sharded_prefixes(prefix) -> list[str]:
    """PREFIX_00000, PREFIX_00001, ... as written by `megacpt prepare --max-shard-size`, sorted."""
    p = Path(prefix)
    pattern = re.compile(re.escape(p.name) + r"_(\d{5,})\.idx")
    found = []
    if p.parent.is_dir():
        for q in p.parent.iterdir():
            m = pattern.fullmatch(q.name)
            if m:
                found.append((int(m.group(1)), str(p.parent / q.name[: -len(".idx")])))
    return [name for _, name in sorted(found)]


def list_shard_prefixes(path) -> list[str]:
    """A shard prefix, a prefix split by size into PREFIX_00000..., or a directory whose *.idx
    shards are used in sorted order."""
    p = Path(path)
    if p.is_dir():
        prefixes = sorted(str(q.with_suffix("")) for q in p.glob("*.idx"))
        if not prefixes:
            raise DataError(f"{path}: directory holds no .idx/.bin shards; run megacpt prepare into it")
        return prefixes
    if not Path(idx_path(path)).is_file():
        parts = sharded_prefixes(path)
        if parts:
            return parts
        raise DataError(f"{path}: no such shard ({path}.idx missing) or directory of shards")
    return [str(path)]
