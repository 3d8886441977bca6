import json
import math
import pickle

import numpy as np
import pytest

from megacpt.data.dataset import (
    BlendedDataset,
    PackedDataset,
    Source,
    blend_assignment,
    source_seed,
)
from megacpt.data.indexed import IndexedDatasetWriter, list_shard_prefixes
from megacpt.errors import DataError


def write_shard(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=dtype))
    return str(prefix)


def make_docs(rng, n_docs, first_id, max_len=12, empty_at=()):
    """Documents of varied lengths whose token ids are all distinct, so a window pins down its place."""
    docs, nxt = [], first_id
    for j in range(n_docs):
        n = 0 if j in empty_at else int(rng.integers(1, max_len + 1))
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return docs


@pytest.fixture
def corpus(tmp_path):
    """A directory of two shards of different dtypes; one long document and one empty one."""
    rng = np.random.default_rng(0)
    a = make_docs(rng, 9, 0, empty_at={4})
    a[2] = list(range(1000, 1030))  # longer than a sample: some windows lie inside one document
    b = make_docs(rng, 8, 2000)
    write_shard(tmp_path / "src" / "part-000", a, np.uint16)
    write_shard(tmp_path / "src" / "part-001", b, np.int32)
    return tmp_path / "src", a + b


def reference_stream(docs, orders):
    """The shuffled stream, naively: (token list, stream-document number per token)."""
    toks, ids, j = [], [], 0
    for order in orders:
        for d in order:
            toks.extend(docs[d])
            ids.extend([j] * len(docs[d]))
            j += 1
    return toks, ids


def renumber(ids):
    seen = {}
    return [seen.setdefault(x, len(seen)) for x in ids]


def test_samples_match_naive_reference_across_epochs(corpus):
    path, docs = corpus
    S = 7
    T = sum(len(d) for d in docs)
    num_samples = 3 * (T // S) + 5  # a partial last shuffle block too
    ds = PackedDataset(list_shard_prefixes(path), S, seed=3, num_samples=num_samples)
    assert len(ds) == num_samples and ds.tokens_per_epoch == T and ds.num_epochs >= 3

    orders = [ds.epoch_order(e).tolist() for e in range(ds.num_epochs)]
    for order in orders:
        assert sorted(order) == list(range(len(docs)))  # every document once per epoch
    assert orders[0] != orders[1]  # a fresh shuffle each epoch
    toks, ids = reference_stream(docs, orders)

    raws = [ds.raw_index(i) for i in range(num_samples)]
    assert len(set(raws)) == num_samples
    assert max(raws) < math.ceil(num_samples / ds.shuffle_block) * ds.shuffle_block
    assert raws != sorted(raws)  # the sample order is shuffled
    crosses_epoch = crosses_doc = inside_doc = False
    for i, k in enumerate(raws):
        window = slice(k * S, k * S + S + 1)
        sample, seg = ds[i], ds.segments(i)
        assert sample.dtype == np.int64 and sample.shape == (S + 1,)
        assert seg.dtype == np.int32 and seg.shape == (S + 1,)
        assert sample.tolist() == toks[window]
        assert seg.tolist() == renumber(ids[window])
        crosses_epoch |= k * S < T <= k * S + S
        crosses_doc |= seg[-1] > 0
        inside_doc |= seg[-1] == 0
    assert crosses_epoch and crosses_doc and inside_doc


def test_every_token_appears_in_each_epoch(corpus):
    path, docs = corpus
    S = 5
    T = sum(len(d) for d in docs)
    probe = PackedDataset(list_shard_prefixes(path), S, seed=1, num_samples=1)
    n = 3 * probe.shuffle_block  # whole blocks, so the samples tile the stream without gaps
    ds = PackedDataset(list_shard_prefixes(path), S, seed=1, num_samples=n)
    stream = np.full(n * S + 1, -1, dtype=np.int64)
    for i in range(n):
        k = ds.raw_index(i)
        stream[k * S : k * S + S + 1] = ds[i]
    assert (stream >= 0).all()
    corpus_tokens = sorted(t for d in docs for t in d)
    full_epochs = len(stream) // T
    assert full_epochs >= 2
    for e in range(full_epochs):
        assert sorted(stream[e * T : (e + 1) * T].tolist()) == corpus_tokens


def test_segments_mark_document_boundaries(tmp_path):
    p = write_shard(tmp_path / "s", [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]])
    ds = PackedDataset([p], 8, seed=0, num_samples=1)
    order = ds.epoch_order(0).tolist()
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]]
    expected_tokens, expected_seg = [], []
    for d in order:  # the single sample is the whole first epoch plus one token
        if docs[d]:
            expected_seg += [len(set(expected_seg))] * len(docs[d])
            expected_tokens += docs[d]
    assert ds[0].tolist()[:9] == expected_tokens
    assert ds.segments(0).tolist() == expected_seg


def test_deterministic_prefix_stable_and_seeded(corpus):
    path, _ = corpus
    prefixes = list_shard_prefixes(path)
    a = PackedDataset(prefixes, 6, seed=7, num_samples=100)
    b = PackedDataset(prefixes, 6, seed=7, num_samples=100)
    longer = PackedDataset(prefixes, 6, seed=7, num_samples=1000)
    other = PackedDataset(prefixes, 6, seed=8, num_samples=100)
    same = [np.array_equal(a[i], b[i]) and np.array_equal(a[i], longer[i]) for i in range(100)]
    assert all(same)
    assert any(not np.array_equal(a[i], other[i]) for i in range(100))
    restored = pickle.loads(pickle.dumps(a))
    assert all(np.array_equal(a[i], restored[i]) for i in range(0, 100, 7))
    with pytest.raises(IndexError):
        a[100]


def blend_sources(tmp_path, weights):
    rng = np.random.default_rng(1)
    sources = []
    for k, w in enumerate(weights):
        # Source k owns ids [1000k, 1000k + 1000): a sample's tokens reveal where it came from.
        write_shard(tmp_path / f"s{k}", make_docs(rng, 15, 1000 * k, max_len=9))
        sources.append(Source(f"src{k}", str(tmp_path / f"s{k}"), w))
    return sources


def naive_blend(weights, n):
    total = sum(weights)
    counts, out = [0] * len(weights), []
    for i in range(n):
        errors = [w / total * (i + 1) - c for w, c in zip(weights, counts)]
        best = errors.index(max(errors))
        counts[best] += 1
        out.append(best)
    return out


def test_blend_proportions_and_per_source_accounting(tmp_path):
    weights = [5.0, 3.0, 2.0]
    sources = blend_sources(tmp_path, weights)
    n = 10_000
    ds = BlendedDataset(sources, seq_len=8, seed=11, num_samples=n, vocab_size=4000)
    assert ds.source_names == ["src0", "src1", "src2"]
    src = np.array([ds.source_of(i) for i in range(n)])
    assert src.tolist() == naive_blend(weights, n)
    for k, w in enumerate(weights):
        assert abs((src == k).mean() - w / sum(weights)) < 0.01
    for m in (0, 1, 37, 5000, n):
        expected = {f"src{k}": int((src[:m] == k).sum()) * 8 for k in range(3)}
        assert ds.tokens_per_source(m) == expected
    for i in range(0, n, 97):
        item = ds[i]
        assert item["source"] == src[i]
        assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (9,)
        assert item["segments"].dtype == np.int32 and item["segments"].shape == (9,)
        assert (item["tokens"] // 1000 == src[i]).all()
    # Each source's samples are that source's own dataset, in order.
    k = 1
    rank = [i for i in range(200) if src[i] == k]
    own = PackedDataset([str(tmp_path / "s1")], 8, source_seed(11, "src1"), len(rank))
    for j, i in enumerate(rank):
        assert np.array_equal(ds[i]["tokens"], own[j])


def test_blend_prefix_stable_and_deterministic(tmp_path):
    sources = blend_sources(tmp_path, [1.0, 1.0])
    short = BlendedDataset(sources, 6, seed=2, num_samples=100)
    long = BlendedDataset(sources, 6, seed=2, num_samples=1000)
    again = BlendedDataset(sources, 6, seed=2, num_samples=100)
    reseeded = BlendedDataset(sources, 6, seed=3, num_samples=100)
    for i in range(100):
        assert short[i]["source"] == long[i]["source"] == again[i]["source"]
        assert np.array_equal(short[i]["tokens"], long[i]["tokens"])
        assert np.array_equal(short[i]["tokens"], again[i]["tokens"])
    assert any(not np.array_equal(short[i]["tokens"], reseeded[i]["tokens"]) for i in range(100))
    assert blend_assignment([0.5, 0.5], 4).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weight(tmp_path, weight):
    sources = blend_sources(tmp_path, [1.0, 1.0])
    sources[1] = Source("books", sources[1].path, weight)
    with pytest.raises(DataError, match="books"):
        BlendedDataset(sources, 4, 0, 10)


def test_duplicate_names_and_no_sources(tmp_path):
    sources = blend_sources(tmp_path, [1.0, 1.0])
    with pytest.raises(DataError, match="duplicate"):
        BlendedDataset([sources[0], Source("src0", sources[1].path, 1.0)], 4, 0, 10)
    with pytest.raises(DataError):
        BlendedDataset([], 4, 0, 10)


def test_vocab_overflow_in_token_ids(tmp_path):
    p = write_shard(tmp_path / "web", [[1, 2, 3], [4, 700, 5]])
    with pytest.raises(DataError) as e:
        BlendedDataset([Source("web", p, 1.0)], 2, 0, 4, vocab_size=500)
    msg = str(e.value)
    assert p in msg and "700" in msg and "500" in msg and "document 1" in msg
    BlendedDataset([Source("web", p, 1.0)], 2, 0, 4, vocab_size=701)  # 700 fits


def test_vocab_overflow_in_sidecar(tmp_path):
    p = write_shard(tmp_path / "web", [[1, 2, 3], [4, 5]])
    (tmp_path / "web.json").write_text(json.dumps({"format": "megacpt-tokenized", "vocab_size": 5000}))
    with pytest.raises(DataError, match="vocabulary of 5000 tokens but the model has 1000"):
        BlendedDataset([Source("web", p, 1.0)], 2, 0, 4, vocab_size=1000)
    BlendedDataset([Source("web", p, 1.0)], 2, 0, 4, vocab_size=5000)


def test_corpus_too_small_or_empty(tmp_path):
    p = write_shard(tmp_path / "tiny", [[1, 2], [3, 4, 5]])
    with pytest.raises(DataError, match="5 tokens"):
        PackedDataset([p], 5, 0, 1)
    PackedDataset([p], 4, 0, 3)  # exactly seq_len + 1 tokens is enough
    e = write_shard(tmp_path / "empty", [[], []])
    with pytest.raises(DataError, match="empty corpus"):
        BlendedDataset([Source("e", e, 1.0)], 4, 0, 1)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope"):
        BlendedDataset([Source("nope", str(tmp_path / "missing"), 1.0)], 4, 0, 1)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no .idx"):
        BlendedDataset([Source("d", str(tmp_path / "emptydir"), 1.0)], 4, 0, 1)
