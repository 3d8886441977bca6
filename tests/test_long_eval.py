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


# --- passkey

LENGTHS = (256, 512)
DEPTHS = (0.0, 0.5, 1.0)
KEY_RE = re.compile(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.")


@pytest.fixture(scope="module")
def filler(tmp_path_factory):
    path = tmp_path_factory.mktemp("filler") / "held.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(150, seed=7, max_words=40)))
    return path


def _passkey(out, filler_path, tok, seed=1, n=4, *extra):
    argv = ["make-task", "--kind", "passkey", "--from", str(filler_path), "--tokenizer", tok,
            "--lengths", ",".join(map(str, LENGTHS)), "--depths", ",".join(map(str, DEPTHS)),
            "--n", str(n), "--seed", str(seed), "--output", str(out), "--name", "pk", *extra]
    assert main(argv) == 0
    return Path(out)


def _cells():
    return [f"pk_L{length}_D{round(d * 100)}" for length in LENGTHS for d in DEPTHS]


def test_passkey_deterministic_depth_and_length(tmp_path, filler, hf_tokenizer_dir):
    from transformers import AutoTokenizer

    a = _passkey(tmp_path / "a", filler, hf_tokenizer_dir)
    first = {p.name: p.read_bytes() for p in sorted(a.iterdir())}
    assert set(first) == {"pk.yaml"} | {f"{c}.{x}" for c in _cells() for x in ("yaml", "jsonl")}
    _passkey(tmp_path / "a", filler, hf_tokenizer_dir)  # same seed, same place: same bytes
    assert {p.name: p.read_bytes() for p in sorted(a.iterdir())} == first
    _passkey(tmp_path / "b", filler, hf_tokenizer_dir, seed=2)
    assert (tmp_path / "b" / "pk_L256_D50.jsonl").read_bytes() != first["pk_L256_D50.jsonl"]
    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    question = "What is the pass key? The pass key is"
    for length in LENGTHS:
        for depth in DEPTHS:
            items = [json.loads(x) for x in (a / f"pk_L{length}_D{round(depth * 100)}.jsonl").read_text().splitlines()]
            assert len(items) == 4
            for it in items:
                m = KEY_RE.search(it["context"])
                assert m and it["target"] == " " + m.group(1)
                assert it["context"].endswith(" " + question)
                filler_text = it["context"][: -len(question) - 1].replace(m.group(0), "", 1)
                assert abs(m.start() / len(filler_text) - depth) < 0.03
                n_tok = len(tok(it["context"], add_special_tokens=False)["input_ids"])
                assert abs(n_tok - length) <= 0.1 * length


class _Oracle:
    """Builds an lm-eval LM that answers with the key it finds in the context (or a wrong one)."""

    @staticmethod
    def make(forgetful: bool):
        from lm_eval.api.model import LM  # heavy: only these tests need lm-eval

        class Oracle(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                out = []
                for req in requests:
                    context, continuation = req.args
                    key = KEY_RE.search(context).group(1)
                    if forgetful:
                        key = f"{(int(key) - 10000 + 1) % 90000 + 10000}"
                    out.append((0.0, True) if continuation == " " + key else (-10.0, False))
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Oracle()


@pytest.mark.parametrize("forgetful", [False, True])
def test_passkey_loads_in_lm_eval_and_oracle_scores(tmp_path, filler, hf_tokenizer_dir, forgetful):
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    from megacpt.eval.tasks import summarize

    out = _passkey(tmp_path / "t", filler, hf_tokenizer_dir, n=3)
    tm = TaskManager(include_path=str(out), include_defaults=False)
    loaded = get_task_dict(["pk"], tm)
    assert sorted(t for g in loaded.values() for t in g) == sorted(_cells())
    res = lm_eval.simple_evaluate(model=_Oracle.make(forgetful), tasks=["pk"], task_manager=tm,
                                  bootstrap_iters=0)
    want = 0.0 if forgetful else 1.0
    for cell in _cells():
        assert res["results"][cell]["acc,none"] == want
    assert res["results"]["pk"]["acc,none"] == want
    table = summarize(res)
    assert table["pk"]["acc"] == want and table["pk_L512_D100"]["acc"] == want


@pytest.mark.parametrize("lengths,depths", [("256,x", "0"), ("32", "0"), ("256", "1.5"), ("256", "0.5,0.501")])
def test_passkey_bad_cells_exit_2_and_write_nothing(tmp_path, filler, hf_tokenizer_dir, lengths, depths, capsys):
    out = tmp_path / "none"
    rc = main(["make-task", "--kind", "passkey", "--from", str(filler), "--tokenizer", hf_tokenizer_dir,
               "--lengths", lengths, "--depths", depths, "--output", str(out)])
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_passkey_filler_too_short_exits_2(tmp_path, hf_tokenizer_dir, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "only a few words here"}) + "\n")
    out = tmp_path / "none"
    rc = main(["make-task", "--kind", "passkey", "--from", str(short), "--tokenizer", hf_tokenizer_dir,
               "--lengths", "256", "--depths", "0", "--output", str(out)])
    assert rc == 2 and "fewer than the longest cell" in capsys.readouterr().err
    assert not out.exists()
