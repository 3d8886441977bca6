"""Long-context evaluation: `megacpt eval --by-position` and `megacpt make-task --kind passkey`.

Loss by position is checked against transformers run directly on each document; the passkey
task is loaded by lm-eval itself and scored by oracle models that do (or do not) copy the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest_data import hf_tokenizer_dir, make_docs  # noqa: F401 (fixture)
from helpers import tiny_hf_model, write_shard
from megacpt.cli import main

VOCAB = 128
SEQ = 24
WIDTH = 5
# Lengths around SEQ+1 = 25: cut, exactly full, shorter, too short (skipped), empty (skipped).
DOC_LENGTHS = [40, 25, 13, 1, 7, 0, 30, 2]


@pytest.fixture(scope="module")
def model_and_docs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bypos")
    model = tiny_hf_model(tmp / "m", vocab=VOCAB, perturb=True)
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, VOCAB, n) for n in DOC_LENGTHS]
    prefix = write_shard(tmp / "held", docs)
    return tmp, model, docs, prefix


def _reference(model_dir, docs, seq, width, max_tokens=None):
    """Per-bucket (loss sum, tokens) from transformers, one document at a time."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    sums, counts, left = {}, {}, max_tokens
    for d in docs:
        w = d[: seq + 1]
        if left is not None:
            w = w[: left + 1]
        if len(w) < 2:
            continue
        ids = torch.tensor(np.asarray(w, dtype=np.int64))[None]
        with torch.no_grad():
            logits = hf(ids[:, :-1]).logits.float()
        loss = F.cross_entropy(logits[0], ids[0, 1:], reduction="none").double().numpy()
        for p, v in enumerate(loss):
            sums[p // width] = sums.get(p // width, 0.0) + float(v)
            counts[p // width] = counts.get(p // width, 0) + 1
        if left is not None:
            left -= len(w) - 1
    return sums, counts


@pytest.mark.parametrize("max_tokens", [None, 50])
def test_bucket_losses_match_transformers(model_and_docs, max_tokens, capsys):
    tmp, model, docs, prefix = model_and_docs
    out = tmp / f"r{max_tokens}.json"
    argv = ["eval", "--model", str(model), "--data", f"held={prefix}", "--by-position", str(WIDTH),
            "--seq-len", str(SEQ), "--batch-size", "3", "--json", str(out)]
    if max_tokens:
        argv += ["--max-tokens", str(max_tokens)]
    assert main(argv) == 0
    assert "loss by position" in capsys.readouterr().out
    res = json.loads(out.read_text())["held"]
    sums, counts = _reference(model, docs, SEQ, WIDTH, max_tokens)
    got = res["by_position"]
    assert got["width"] == WIDTH
    assert [b["start"] for b in got["buckets"]] == [k * WIDTH for k in sorted(sums)]
    for b in got["buckets"]:
        k = b["start"] // WIDTH
        assert b["end"] == min(b["start"] + WIDTH, SEQ)
        assert b["tokens"] == counts[k]
        assert b["loss"] == pytest.approx(sums[k] / counts[k], rel=1e-5)
        assert b["ppl"] == pytest.approx(np.exp(sums[k] / counts[k]), rel=1e-5)
    total = sum(sums.values()) / sum(counts.values())
    assert res["tokens"] == sum(counts.values())
    assert res["loss"] == pytest.approx(total, rel=1e-5)
    if max_tokens:
        assert res["tokens"] == max_tokens


def test_windows_start_at_documents_and_never_cross(model_and_docs):
    from megacpt.eval.by_position import document_windows

    _, _, docs, prefix = model_and_docs
    wins = document_windows(prefix, SEQ, None)
    kept = [d for d in docs if len(d) >= 2]
    assert len(wins) == len(kept)
    for w, d in zip(wins, kept):
        assert len(w) == min(len(d), SEQ + 1)
        assert np.array_equal(w, d[: len(w)])  # from the document's start, inside the document


@pytest.mark.parametrize("width", ["0", "-3"])
def test_bad_width_exits_2(model_and_docs, width, capsys):
    tmp, model, _, prefix = model_and_docs
    out = tmp / f"bad{width}.json"
    rc = main(["eval", "--model", str(model), "--data", f"held={prefix}", "--by-position", width, "--json", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--by-position" in err
    assert not out.exists()
