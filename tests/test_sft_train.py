"""Fine-tuning runs end to end, on vocabularies extended by `megacpt extend-vocab` (tied and
untied): `task: sft` with an embeddings-only first stage and a separate embedding LR, over 2 ZeRO-3
ranks against one process, stopped at the stage boundary and resumed; early stopping; export →
transformers reload → the same perplexity as `megacpt eval`.

Launches are the expensive part: five, made once per module (R1 one process with a checkpoint per
step; R2 2-rank ZeRO-3; R3 the same stopped after the embeddings stage and resumed; R4 the tied
model at an LR high enough to make the held-out loss worse, with early stopping)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import (read_metrics, run_ok, sft_examples, tiny_chat_tokenizer, tiny_hf_model, tiny_run_config,
                     train_losses, write_config, write_jsonl, write_shard)

pytestmark = pytest.mark.slow

ZERO3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
NEW = [" Größe", " Straße", " Bücher", " überschreitet"]
LR, EMB_LR, WD, BETAS = 1e-3, 5e-3, 0.1, (0.9, 0.95)
EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")


def german(n, seed):
    rnd = np.random.default_rng(seed)
    return [{"prompt": "say" + "".join(rnd.choice(NEW, 2)), "response": "".join(rnd.choice(NEW, 3))} for _ in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megacpt.vocab import extend_vocab

    tmp = tmp_path_factory.mktemp("sft_train")
    models = {}
    for tied in (False, True):
        base = tmp / f"base-{tied}"
        tok = tiny_chat_tokenizer(base)
        tiny_hf_model(base, tied=tied, vocab=len(tok), max_pos=128, seed=1)
        models[tied] = tmp / f"ext-{tied}"
        extend_vocab(base, models[tied], NEW, init="mean")
    train = write_jsonl(tmp / "train.jsonl", sft_examples(40, 1) + german(20, 2))
    valid = write_jsonl(tmp / "valid.jsonl", sft_examples(4, 3) + german(2, 4))
    vocab = json.loads((models[False] / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, 2000)
    ids[::7] = vocab - 1  # the new rows are certainly in the perplexity data
    write_shard(tmp / "ppl", [ids])

    def cfg(name, tied=False, zero=0, **over):
        c = tiny_run_config(tmp, models[tied], tmp / name, steps=2, zero=zero, gb=4, mb=1, seq=48, task="sft",
                            deepspeed=ZERO3 if zero == 3 else {})
        c["data"].update(train=[{"name": "chat", "path": train, "weight": 1.0}], valid=[{"name": "sft", "path": valid}])
        c["optim"].update(lr=LR, min_lr=LR, weight_decay=WD, embedding_lr=EMB_LR)
        c["schedule"] = {"kind": "constant", "warmup_steps": 0}
        c["train"].update(trainable="embeddings", eval_interval=2)
        c["phases"] = [{"name": "full", "steps": 2, "trainable": "all"}]
        c["sft"] = {"eval_examples": 4, "max_new_tokens": 4}
        c["checkpoint"] = {"interval": 100, "keep": 5}
        for k, v in over.items():
            node = c
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
        return write_config(tmp / f"{name}.yaml", c)

    run_ok(1, cfg("single", **{"checkpoint.interval": 1}))
    run_ok(2, cfg("zero3", zero=3))
    split = cfg("zero3_split", zero=3)
    first = run_ok(2, split, "train.stop_after=2")
    run_ok(2, split)
    hot = cfg("tied_hot", tied=True, zero=3, phases=[], **{
        "train.trainable": "all", "train.steps": 8, "train.eval_interval": 1, "optim.lr": 0.3, "optim.min_lr": 0.3, "optim.embedding_lr": None,
        "train.early_stopping": {"metric": "valid/sft/loss", "patience": 2}})
    hot_out = run_ok(2, hot)
    return {"tmp": tmp, "models": models, "first_stdout": first.stdout, "hot_cfg": hot, "hot_stdout": hot_out.stdout,
            **{n: tmp / n for n in ("single", "zero3", "zero3_split", "tied_hot")}}


def steps(run):
    return train_losses(run)


def valid_lines(run):
    return [r for r in read_metrics(run) if "valid/sft/loss" in r]


def test_sft_zero3_two_ranks_matches_one_process(runs):
    a, b = steps(runs["single"]), steps(runs["zero3"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    la = torch.tensor([a[s]["loss"] for s in range(1, 5)], dtype=torch.float64)
    lb = torch.tensor([b[s]["loss"] for s in range(1, 5)], dtype=torch.float64)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert la.std() > 0 and [a[s]["samples_fingerprint"] for s in a] == [b[s]["samples_fingerprint"] for s in b]
    assert [a[s]["trainable"] for s in a] == ["embeddings", "embeddings", "all", "all"]
    assert all(a[s]["lr_embedding"] == pytest.approx(EMB_LR) and a[s]["lr"] == pytest.approx(LR) for s in a)
    va, vb = valid_lines(runs["single"]), valid_lines(runs["zero3"])
    assert [v["step"] for v in va] == [v["step"] for v in vb] == [0, 2, 4]
    for x, y in zip(va, vb):
        assert y["valid/sft/loss"] == pytest.approx(x["valid/sft/loss"], rel=1e-5)
        for k in ("exact_match", "token_f1", "bleu"):
            assert 0 <= x[f"valid/sft/{k}"] <= (100 if k == "bleu" else 1)
            assert y[f"valid/sft/{k}"] == pytest.approx(x[f"valid/sft/{k}"], abs=1e-9)
    # response tokens only: far fewer tokens than positions (prompts and padding are not counted)
    assert a[4]["tokens/chat"] <= 4 * 4 * 48


def _weights(path):
    from megacpt.models.hf import as_weights
    from megacpt.train.consolidate import checkpoint_weights

    w = checkpoint_weights(path) if (path / "megacpt_state.json").is_file() else as_weights(path)
    return {k: w.get(k).float() for k in w.keys()}


def test_embeddings_only_stage_leaves_the_rest_bit_identical(runs):
    init = _weights(runs["models"][False])
    for ckpt in (runs["single"] / "checkpoints" / "step_00000001", runs["single"] / "checkpoints" / "step_00000002",
                 runs["zero3_split"] / "checkpoints" / "step_00000002"):  # ZeRO-3, 2 ranks
        w = _weights(ckpt)
        assert w.keys() == init.keys()
        for k in w:
            if k in EMBEDDINGS:
                assert not torch.equal(w[k], init[k]), (ckpt, k)
            else:
                assert torch.equal(w[k], init[k]), (ckpt, k)
    after = _weights(runs["single"] / "checkpoints" / "step_00000003")
    assert all(not torch.equal(after[k], init[k]) for k in after)  # the next stage trains everything


def _adam_step_size(w0, w1, lr):
    """|update| per element of one AdamW step (decoupled weight decay removed), where it moved."""
    wd = WD if w0.dim() >= 2 else 0.0
    delta = (w1.double() - w0.double() * (1 - lr * wd)).abs()
    return delta[delta > 1e-3 * lr]


def test_embedding_and_body_lrs_against_adam(runs):
    """Adam's update has a known size: on the first step with gradient g, lr·g/(|g|+eps) ≈ lr per
    element; for a parameter whose moments are zero after k-1 zero-gradient steps (the frozen body at
    the first step after the stage), lr·(1-β1)/(1-β1^k) / sqrt((1-β2)/(1-β2^k))."""
    ck = runs["single"] / "checkpoints"
    w0, w1 = _weights(runs["models"][False]), _weights(ck / "step_00000001")
    for k in EMBEDDINGS:
        size = _adam_step_size(w0[k], w1[k], EMB_LR)
        assert size.numel() > 100 and float(size.median()) == pytest.approx(EMB_LR, rel=1e-2), k
    w2, w3 = _weights(ck / "step_00000002"), _weights(ck / "step_00000003")
    b1, b2 = BETAS
    factor = (1 - b1) / (1 - b1 ** 3) / math.sqrt((1 - b2) / (1 - b2 ** 3))
    for k in w2:
        if k not in EMBEDDINGS:
            size = _adam_step_size(w2[k], w3[k], LR)
            assert float(size.median()) == pytest.approx(LR * factor, rel=1e-2), k


def test_resume_across_the_stage_boundary_is_bit_identical(runs):
    from helpers import checkpoint_tensors

    assert "stopped at step 2/4 (train.stop_after)" in runs["first_stdout"]
    a, b = steps(runs["zero3"]), steps(runs["zero3_split"])
    for key in ("loss", "grad_norm", "samples_fingerprint", "tokens/chat", "lr_embedding"):
        assert [a[s][key] for s in range(1, 5)] == [b[s][key] for s in range(1, 5)], key
    assert [v["valid/sft/loss"] for v in valid_lines(runs["zero3"])] == \
        [v["valid/sft/loss"] for v in valid_lines(runs["zero3_split"])]
    ta = checkpoint_tensors(runs["zero3"] / "checkpoints" / "step_00000004")
    tb = checkpoint_tensors(runs["zero3_split"] / "checkpoints" / "step_00000004")
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def expected_stop(values: list[tuple[int, float]], patience: int) -> int | None:
    """Reference: the step of the evaluation that makes `patience` in a row without a new minimum."""
    best, bad = math.inf, 0
    for step, v in values:
        if v < best:
            best, bad = v, 0
        else:
            bad += 1
            if bad == patience:
                return step
    return None


def test_early_stopping_stops_at_the_expected_eval(runs, capsys):
    from megacpt.cli import main

    run = runs["tied_hot"]
    lines = read_metrics(run)
    evals = [(r["step"], r["valid/sft/loss"]) for r in lines if "valid/sft/loss" in r]
    stop = expected_stop(evals, 2)
    assert stop is not None and stop < 8, evals  # the LR is high enough to make it worse
    assert evals[-1][0] == stop and max(steps(run)) == stop
    events = [r for r in lines if r.get("event") == "early_stop"]
    assert len(events) == 1 and events[0]["step"] == stop and events[0]["best"] == min(v for _, v in evals)
    assert f"stopped at step {stop}/8 (early stopping: valid/sft/loss did not improve" in runs["hot_stdout"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stop:08d}"
    # starting it again does nothing: the run stays stopped
    capsys.readouterr()
    assert main(["train", str(runs["hot_cfg"])]) == 0
    assert "stopped early" in capsys.readouterr().out
    assert len(read_metrics(run)) == len(lines)


@pytest.mark.parametrize("run", ["zero3", "tied_hot"])
def test_extended_vocab_export_reloads_with_the_same_perplexity(runs, run, tmp_path):
    """Untied (R2) and tied (R4) extended vocabularies, both 2-rank ZeRO-3 runs."""
    import transformers

    from megacpt.cli import main
    from megacpt.eval.perplexity import eval_windows

    out = tmp_path / "hf"
    assert main(["export", str(runs[run]), "--output", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings == (run == "tied_hot")
    assert model.config.vocab_size == len(tok) and all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1
                                                       for t in NEW)
    w = torch.from_numpy(eval_windows(runs["tmp"] / "ppl", 32, 1024))
    with torch.no_grad():
        logits = model(w[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), w[:, 1:].reshape(-1))
    assert main(["eval", "--model", str(runs[run]), "--data", f"ppl={runs['tmp'] / 'ppl'}", "--seq-len", "32",
                 "--max-tokens", "1024", "--json", str(tmp_path / "e.json")]) == 0
    ours = json.loads((tmp_path / "e.json").read_text())["ppl"]
    assert ours["tokens"] == 1024
    assert math.exp(float(loss)) == pytest.approx(ours["ppl"], rel=1e-3)
    assert math.exp(float(loss)) == pytest.approx(ours["ppl"], rel=1e-5)  # in fact much closer
