"""The MMIDIDX .bin/.idx format, checked against the spec with struct/numpy, not our own code."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megacpt.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    dtype_for_vocab,
    list_shard_prefixes,
)
from megacpt.errors import DataError

# The spec (REFERENCES.md §1), restated here on purpose rather than imported.
SPEC_MAGIC = b"MMIDIDX\x00\x00"
SPEC_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def write_by_hand(prefix, docs, dtype, doc_idx=None):
    """Write a shard straight from the spec: .bin = concatenated arrays, .idx = header + arrays."""
    dtype = np.dtype(dtype)
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    sizes = [len(d) for d in docs]
    pointers, acc = [], 0
    for n in sizes:
        pointers.append(acc)
        acc += n * dtype.itemsize
    doc_idx = list(range(len(docs) + 1)) if doc_idx is None else doc_idx
    with open(f"{prefix}.idx", "wb") as f:
        f.write(SPEC_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", SPEC_CODES[dtype.type]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def parse_by_hand(prefix):
    """Parse an .idx/.bin pair field by field with struct; returns a dict of everything."""
    raw = open(f"{prefix}.idx", "rb").read()
    out = {"magic": raw[:9]}
    (out["version"],) = struct.unpack_from("<Q", raw, 9)
    (out["code"],) = struct.unpack_from("<B", raw, 17)
    (n,) = struct.unpack_from("<Q", raw, 18)
    (d,) = struct.unpack_from("<Q", raw, 26)
    out["n"], out["d"] = n, d
    out["sizes"] = list(struct.unpack_from(f"<{n}i", raw, 34))
    out["pointers"] = list(struct.unpack_from(f"<{n}q", raw, 34 + 4 * n))
    out["doc_idx"] = list(struct.unpack_from(f"<{d}q", raw, 34 + 12 * n))
    out["idx_len"] = len(raw)
    out["expected_len"] = 34 + 12 * n + 8 * d
    out["bin"] = open(f"{prefix}.bin", "rb").read()
    return out


def random_docs(n, vocab, seed=0, max_len=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, max_len)).tolist() for _ in range(n)]


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 65_000), (np.int32, 200_000), (np.uint8, 256)])
def test_hand_written_shard_reads_back(tmp_path, dtype, vocab):
    docs = random_docs(37, vocab)
    docs[3] = []  # zero-length sequences are legal
    prefix = tmp_path / "hand"
    write_by_hand(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs)
    assert ds.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
    flat = [t for d in docs for t in d]
    assert ds.all_tokens.tolist() == flat
    assert ds.tokens(5, 20).tolist() == flat[5:25]


def test_hand_written_shard_with_multi_sequence_documents(tmp_path):
    # Megatron's sentence-split shards: several sequences per document, doc_idx not 0..N.
    docs = random_docs(6, 1000, seed=3)
    write_by_hand(tmp_path / "m", docs, np.uint16, doc_idx=[0, 2, 5, 6])
    ds = IndexedDataset(tmp_path / "m")
    assert ds.doc_idx.tolist() == [0, 2, 5, 6]
    assert [ds[i].tolist() for i in range(6)] == docs


def assert_matches_spec(prefix, docs, dtype, doc_idx=None):
    dtype = np.dtype(dtype)
    got = parse_by_hand(prefix)
    assert got["magic"] == SPEC_MAGIC
    assert got["version"] == 1
    assert got["code"] == SPEC_CODES[dtype.type]
    assert got["n"] == len(docs)
    assert got["d"] == (len(docs) + 1 if doc_idx is None else len(doc_idx))
    assert got["sizes"] == [len(d) for d in docs]
    expected_pointers = np.concatenate([[0], np.cumsum([len(d) * dtype.itemsize for d in docs])[:-1]]).tolist() if docs else []
    assert got["pointers"] == expected_pointers
    assert got["doc_idx"] == (list(range(len(docs) + 1)) if doc_idx is None else doc_idx)
    assert got["idx_len"] == got["expected_len"]
    assert got["bin"] == b"".join(np.asarray(d, dtype=dtype).tobytes() for d in docs)


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 65_000), (np.int32, 2**31 - 1)])
def test_writer_output_matches_spec(tmp_path, dtype, vocab):
    docs = random_docs(50, vocab, seed=1)
    docs[0] = []
    prefix = tmp_path / "w"
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs[:20]:
            w.add_document(d)
        # bulk path: many documents as one concatenation + sizes
        rest = docs[20:]
        w.add_documents(np.array([t for d in rest for t in d], dtype=np.int64), [len(d) for d in rest])
    assert_matches_spec(prefix, docs, dtype)
    assert sorted(os.listdir(tmp_path)) == ["w.bin", "w.idx"]  # no temporaries left


def test_writer_empty_shard_matches_spec(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.uint16):
        pass
    assert_matches_spec(tmp_path / "e", [], np.uint16)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0


def test_writer_append_dataset_matches_spec(tmp_path):
    a, b = random_docs(10, 5000, seed=4), random_docs(7, 5000, seed=5)
    write_by_hand(tmp_path / "a", a, np.uint16)
    write_by_hand(tmp_path / "b", b, np.uint16, doc_idx=[0, 3, 7])  # foreign multi-sequence docs
    with IndexedDatasetWriter(tmp_path / "ab", np.uint16) as w:
        w.append_dataset(IndexedDataset(tmp_path / "a"))
        w.append_dataset(IndexedDataset(tmp_path / "b"), chunk_bytes=7)
    # document boundaries are kept: a's 10 single-sequence docs, then b's shifted by 10
    assert_matches_spec(tmp_path / "ab", a + b, np.uint16, doc_idx=list(range(11)) + [13, 17])


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_close_then_commit(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "c", np.uint16)
    w.add_document([5, 6])
    w.close()
    assert not (tmp_path / "c.idx").exists() and not (tmp_path / "c.bin").exists()
    w.commit()
    assert IndexedDataset(tmp_path / "c")[0].tolist() == [5, 6]


def test_writer_rejects_out_of_range_token(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "r", np.uint16)
    with pytest.raises(DataError):
        w.add_document([70_000])
    w.abort()
    assert os.listdir(tmp_path) == []


@pytest.fixture
def good_shard(tmp_path):
    docs = random_docs(12, 1000, seed=7)
    write_by_hand(tmp_path / "g", docs, np.uint16)
    return tmp_path / "g"


def _patch(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset : offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


def test_reader_rejects_truncated_bin(good_shard):
    raw = open(f"{good_shard}.bin", "rb").read()
    open(f"{good_shard}.bin", "wb").write(raw[:-2])
    with pytest.raises(DataError, match="truncated"):
        IndexedDataset(good_shard)


def test_reader_rejects_bad_magic(good_shard):
    _patch(f"{good_shard}.idx", 0, b"NOTMMIDX\x00")
    with pytest.raises(DataError, match="magic"):
        IndexedDataset(good_shard)


def test_reader_rejects_bad_version(good_shard):
    _patch(f"{good_shard}.idx", 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match="version"):
        IndexedDataset(good_shard)


@pytest.mark.parametrize("code", [0, 6, 7, 9, 255])
def test_reader_rejects_bad_dtype_code(good_shard, code):
    _patch(f"{good_shard}.idx", 17, struct.pack("<B", code))
    with pytest.raises(DataError, match="dtype"):
        IndexedDataset(good_shard)


@pytest.mark.parametrize("keep", [0, 20, 33, 60, -1])
def test_reader_rejects_truncated_idx(good_shard, keep):
    raw = open(f"{good_shard}.idx", "rb").read()
    open(f"{good_shard}.idx", "wb").write(raw[:keep])
    with pytest.raises(DataError):
        IndexedDataset(good_shard)


def test_reader_rejects_missing_files(tmp_path, good_shard):
    os.remove(f"{good_shard}.bin")
    with pytest.raises(DataError, match="missing"):
        IndexedDataset(good_shard)


def test_dtype_for_vocab():
    assert dtype_for_vocab(32_000) == np.uint16
    assert dtype_for_vocab(65_499) == np.uint16
    assert dtype_for_vocab(65_500) == np.int32
    assert dtype_for_vocab(128_256) == np.int32


def test_list_shard_prefixes(tmp_path):
    for name in ["c_00001", "c_00000", "c_00010"]:
        write_by_hand(tmp_path / name, [[1]], np.uint16)
    write_by_hand(tmp_path / "c_valid", [[1]], np.uint16)
    # a size-split prefix expands to its numbered parts in numeric order, without _valid
    assert list_shard_prefixes(tmp_path / "c") == [str(tmp_path / n) for n in ["c_00000", "c_00001", "c_00010"]]
    assert list_shard_prefixes(tmp_path / "c_valid") == [str(tmp_path / "c_valid")]
    assert len(list_shard_prefixes(tmp_path)) == 4
    with pytest.raises(DataError):
        list_shard_prefixes(tmp_path / "nope")
