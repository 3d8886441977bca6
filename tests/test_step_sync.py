"""A step's bookkeeping without communication: the global batch's token count and fingerprint
read locally (step.global_batch), DeepSpeed's norm sentinels in the non-finite check
(rollback.is_finite) and in the one all-reduced vector (step.reduce_step, in a world of one)."""

import math
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import random_docs, write_shard

from megacpt.data.dataset import BlendedDataset, Source
from megacpt.labels import IGNORE
from megacpt.train.rollback import is_finite
from megacpt.train.step import StepInputs, StepOut, global_batch, rank_batches, reduce_step


def test_global_batch_counts_and_fingerprints_the_whole_batch_on_every_rank(tmp_path):
    write_shard(tmp_path / "a", random_docs(40, 100, 1))
    ds = BlendedDataset([Source("a", str(tmp_path / "a"), 1.0)], seq_len=8, seed=3, num_samples=64)
    G, mb, first = 8, 1, 16
    # Independent reference: the samples' labels (IGNORE after a document end) and token crc32s.
    want_tokens = want_fp = 0
    for i in range(first, first + G):
        tokens, segs = ds[i]["tokens"].astype(np.int64), ds[i]["segments"]
        want_tokens += int((segs[1:] == segs[:-1]).sum())
        want_fp += zlib.crc32(tokens.tobytes())
    for dp in (1, 2, 4):
        gas = G // (mb * dp)
        for r in range(dp):
            mine, tokens, fp = global_batch(lambda d: rank_batches(ds, first, mb, gas, d, dp, True), r, dp)
            assert (tokens, fp) == (want_tokens, want_fp), (dp, r)
            assert [b["input_ids"].tolist() for b in mine] == \
                [b["input_ids"].tolist() for b in rank_batches(ds, first, mb, gas, r, dp, True)]


def test_global_batch_of_all_ignored_labels_counts_one():
    batch = {"labels": torch.full((1, 4), IGNORE), "fingerprint": 5}
    assert global_batch(lambda d: [batch], 0, 2)[1:] == (1.0, 10)


@pytest.mark.parametrize("norm", [-1.0, math.inf, -math.inf, math.nan])
def test_deepspeed_norm_sentinels_are_not_finite(norm):
    assert not is_finite(StepOut(loss=2.0, grad_norm=norm, fingerprint=0, stop_signal=False))


def test_finite_steps_and_flagged_ones():
    assert is_finite(StepOut(loss=2.0, grad_norm=0.5, fingerprint=0, stop_signal=False))
    assert is_finite(StepOut(loss=2.0, grad_norm=None, fingerprint=0, stop_signal=False))
    assert is_finite(StepOut(loss=2.0, grad_norm=0.0, fingerprint=0, stop_signal=False))
    assert not is_finite(StepOut(loss=math.nan, grad_norm=0.5, fingerprint=0, stop_signal=False))
    assert not is_finite(StepOut(loss=2.0, grad_norm=0.5, fingerprint=0, stop_signal=False, nonfinite=True))


@pytest.fixture
def world_of_one():
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("as_tensor", [True, False])
@pytest.mark.parametrize("norm,bad", [(0.75, False), (-1.0, True), (math.inf, True), (math.nan, True)])
def test_reduce_step_flags_the_sentinels(world_of_one, norm, bad, as_tensor):
    calls = []
    inputs = StepInputs([], 4.0, 0, 1, True, False, ahead=lambda: calls.append(1))
    value = torch.tensor(norm, dtype=torch.float32) if as_tensor else norm
    sums = reduce_step(torch.device("cpu"), torch.tensor(3.0, dtype=torch.float64), True, value, True, inputs)
    assert sums.nonfinite is bad and sums.stop is True and sums.loss == 3.0 and calls == [1]
    assert sums.norm == norm or (math.isnan(norm) and math.isnan(sums.norm))
    # A rank that owns neither value adds 0 but still flags its own.
    other = reduce_step(torch.device("cpu"), torch.tensor(math.nan, dtype=torch.float64), False, value, False,
                        StepInputs([], 4.0, 0, 1, False, False))
    assert (other.loss, other.norm, other.stop, other.nonfinite) == (0.0, 0.0, False, True)
