"""The split of a global batch over data-parallel ranks covers it exactly, whatever the dp size."""

import numpy as np
from helpers import random_docs, write_shard

from megacpt.data.dataset import BlendedDataset, Source
from megacpt.train.step import rank_batches


def test_global_batch_is_the_same_for_any_dp_size(tmp_path):
    write_shard(tmp_path / "a", random_docs(40, 100, 1))
    write_shard(tmp_path / "b", random_docs(40, 100, 2))
    ds = BlendedDataset([Source("a", str(tmp_path / "a"), 0.7), Source("b", str(tmp_path / "b"), 0.3)],
                        seq_len=8, seed=3, num_samples=64)
    G, mb = 8, 1

    def seen(dp):
        rows = []
        for r in range(dp):
            for b in rank_batches(ds, 16, mb, G // (mb * dp), r, dp, False):
                rows += [tuple(x) for x in b["input_ids"].tolist()]
        return sorted(rows)

    expected = sorted(tuple(ds[16 + i]["tokens"][:-1].tolist()) for i in range(G))
    assert seen(1) == seen(2) == seen(4) == expected


def test_mask_eos_loss_ignores_cross_document_labels(tmp_path):
    write_shard(tmp_path / "a", [np.array([1, 2, 3, 99]), np.array([4, 5, 6, 7, 8, 99]), np.array([9, 10, 11, 12, 99])])
    ds = BlendedDataset([Source("a", str(tmp_path / "a"), 1.0)], seq_len=8, seed=0, num_samples=1)
    (b,) = rank_batches(ds, 0, 1, 1, 0, 1, True)
    seg = b["segments"][0]
    labels = b["labels"][0]
    tokens = ds[0]["tokens"]
    for t in range(8):
        same_doc = ds[0]["segments"][t] == ds[0]["segments"][t + 1]
        assert (labels[t] == -100) == (not same_doc)
        if same_doc:
            assert labels[t] == tokens[t + 1]
    assert seg.tolist() == ds[0]["segments"][:-1].tolist()
