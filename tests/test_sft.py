"""`task: sft` pieces in one process: labels mask the prompt, packed examples do not see each other,
generation with left padding equals transformers' own greedy generation, EM/F1/BLEU against hand-
computed values and sacrebleu, the early-stopping rule, the packed order, and bad SFT input (one
line, exit 2, nothing written). Training runs are in tests/test_sft_train.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from helpers import sft_examples, tiny_chat_tokenizer, tiny_hf_model, tiny_run_config, write_config, write_jsonl
from megacpt.data import sft
from megacpt.data.sft import IGNORE


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    d = tmp / "model"
    tok = tiny_chat_tokenizer(d)
    tiny_hf_model(d, vocab=len(tok), max_pos=128)
    plain = tmp / "plain"  # the same tokenizer without a chat template
    tiny_chat_tokenizer(plain, chat_template=False)
    tiny_hf_model(plain, vocab=len(tok), max_pos=128)
    bare = tiny_hf_model(tmp / "bare", vocab=len(tok), max_pos=128)  # weights, no tokenizer files
    return {"tmp": tmp, "dir": d, "tok": tok, "tk": sft.load_tokenizer(d), "plain": plain, "bare": bare}


def ours(model_dir):
    from megacpt.export import load_model_source
    from megacpt.models.hf import load_full_state
    from megacpt.models.llama import Transformer

    args, _, weights, _ = load_model_source(model_dir)
    with torch.device("meta"):
        m = Transformer(args)
    load_full_state(m, weights)
    return m.eval()


def hf(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def load(chat, records, seq_len=64):
    path = write_jsonl(chat["tmp"] / "x.jsonl", records)
    return sft.load_examples(path, chat["tk"], seq_len, len(chat["tok"]))[0]


def test_labels_are_the_response_only(chat):
    """Hand-computed labels for both formats; the loss equals transformers' CE summed over the
    response positions only; the loss's gradient at every prompt position is exactly zero."""
    tok = chat["tok"]
    pr = {"prompt": "what is the capital of france?", "response": " paris"}
    msgs = {"messages": [{"role": "user", "content": "add two and three"}, {"role": "assistant", "content": "five"},
                         {"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}]}
    a, b = load(chat, [pr, msgs])
    p_ids = tok(pr["prompt"])["input_ids"]
    r_ids = tok(pr["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert a.ids.tolist() == p_ids + r_ids
    row = sft.build_row([a], 40)
    want = [IGNORE] * (len(p_ids) - 1) + r_ids + [IGNORE] * (40 - len(p_ids) - len(r_ids) + 1)
    assert row["labels"].tolist() == want
    # chat: the two assistant turns (content + <|im_end|> + newline) and nothing else
    text = tok.apply_chat_template(msgs["messages"], tokenize=False)
    assert text.count("<|im_start|>assistant\n") == 2
    pieces, predicted = [], []
    for part in text.split("<|im_start|>")[1:]:
        ids = tok("<|im_start|>" + part, add_special_tokens=False)["input_ids"]
        head = len(tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        pieces += ids
        predicted += [False] * len(ids) if not part.startswith("assistant") else [False] * head + [True] * (len(ids) - head)
    assert b.ids.tolist() == pieces and b.predict.tolist() == predicted
    assert b.reference == "hello world"
    assert tok.decode(b.prompt) == text[: text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]

    model, ref = ours(chat["dir"]), hf(chat["dir"])
    for ex in (a, b):
        row = sft.build_row([ex], len(ex.ids) - 1)
        inp, lab, seg = (torch.from_numpy(row[k])[None] for k in ("input_ids", "labels", "segments"))
        with torch.no_grad():
            logits = ref(torch.from_numpy(ex.ids[None, :-1])).logits[0].double()
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ex.ids[1:]), reduction="none")
        expect = ce[torch.from_numpy(ex.predict[1:])].sum()
        # The trainer's loss path, with the gradient at the head's input per position.
        grabbed = {}
        hook = model.lm_head.register_forward_pre_hook(lambda m, args: grabbed.update(h=args[0]))
        with torch.enable_grad():
            loss = model(inp, labels=lab, segment_ids=seg)
            hook.remove()
            (g,) = torch.autograd.grad(loss, grabbed["h"])
        loss = loss.detach()
        assert float(loss) == pytest.approx(float(expect), rel=1e-5)
        per_pos = g[0].abs().sum(-1)
        prompt_pos = lab[0] == IGNORE
        assert prompt_pos.any() and (~prompt_pos).any()
        assert torch.all(per_pos[prompt_pos] == 0)  # a prompt label cannot move the loss
        assert torch.all(per_pos[~prompt_pos] > 0)
        # changing a response token's label changes the loss
        lab2 = lab.clone()
        k = int(torch.nonzero(~prompt_pos)[0])
        lab2[0, k] = (lab2[0, k] + 1) % len(chat["tok"])
        with torch.no_grad():
            assert float(model(inp, labels=lab2, segment_ids=seg)) != pytest.approx(float(loss), rel=1e-6)


def test_packed_examples_do_not_attend_across(chat):
    a, a2, b = load(chat, [{"prompt": "what is the capital of spain?", "response": " madrid"},
                           {"prompt": "color of grass and sky please?", "response": " green and blue"},
                           {"messages": [{"role": "user", "content": "capital of italy"},
                                         {"role": "assistant", "content": "rome"}]}])
    model, ref = ours(chat["dir"]), hf(chat["dir"])
    S = 64

    def b_logits(first):
        row = sft.build_row([first, b], S)
        seg = torch.from_numpy(row["segments"])[None]
        with torch.no_grad():
            logits = model(torch.from_numpy(row["input_ids"])[None], segment_ids=seg)[0]
        assert int((seg == 0).sum()) == len(first.ids) - 1
        return logits[seg[0] == 1], row

    la, row = b_logits(a)
    la2, row2 = b_logits(a2)
    assert len(a.ids) != len(a2.ids)  # B sits at another offset in the row, with another neighbour
    torch.testing.assert_close(la, la2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        alone = ref(torch.from_numpy(b.ids[None, :-1])).logits[0]
    torch.testing.assert_close(la, alone, rtol=1e-4, atol=1e-4)
    # and the packed row's loss is the sum of the examples' own losses
    losses = []
    for ex, r in ((a, None), (b, None)):
        rr = sft.build_row([ex], len(ex.ids) - 1)
        with torch.no_grad():
            losses.append(float(model(*(torch.from_numpy(rr[k])[None] for k in ("input_ids", "labels")),
                                      segment_ids=torch.from_numpy(rr["segments"])[None])))
    with torch.no_grad():
        packed = float(model(*(torch.from_numpy(row[k])[None] for k in ("input_ids", "labels")),
                             segment_ids=torch.from_numpy(row["segments"])[None]))
    assert packed == pytest.approx(sum(losses), rel=1e-5)


def test_batched_greedy_generation_matches_transformers(chat):
    from megacpt.eval.sft import greedy_generate

    model, ref = ours(chat["dir"]), hf(chat["dir"])
    tok = chat["tok"]
    prompts = [tok(t)["input_ids"] for t in ("what is", "the capital of france is", "say")]
    got = greedy_generate(model, prompts, 6, (tok.eos_token_id,), "cpu")
    for p, g in zip(prompts, got):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert g == out


def test_exact_match_token_f1_bleu():
    import sacrebleu

    from megacpt.eval.sft import exact_match, generation_metrics, token_f1

    # SQuAD normalisation: case, punctuation and articles do not count
    assert exact_match("The Paris!", "paris") == 1.0 and exact_match("paris france", "paris") == 0.0
    # pred {a: the cat sat} vs ref {the cat sat on the mat}: normalised [cat, sat] vs [cat, sat, on, mat]
    # common 2, precision 2/2, recall 2/4 → F1 = 2·1·0.5/1.5 = 2/3
    assert token_f1("The cat sat.", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0
    # repeated tokens count as a multiset: pred [b, b, c], ref [b, c, c] → common 2, P = R = 2/3
    assert token_f1("b b c", "b c c") == pytest.approx(2 / 3)
    preds = ["The cat sat.", "paris", "hello there world", "dog"]
    refs = ["the cat sat on the mat", "Paris", "hello world", "cat"]
    m = generation_metrics(preds, refs)
    # EM: only "paris" (1 of 4); F1: 2/3, 1, 2·(2/3)·1/(5/3) = 0.8, 0
    assert m["exact_match"] == pytest.approx(0.25)
    assert m["token_f1"] == pytest.approx((2 / 3 + 1 + 0.8 + 0) / 4)
    assert m["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    assert m["bleu"] == sacrebleu.BLEU().corpus_score(preds, [refs]).score > 0


def test_early_stopping_rule():
    from megacpt.config import EarlyStoppingConfig
    from megacpt.train.early_stop import EarlyStopper

    s = EarlyStopper.from_config(EarlyStoppingConfig(metric="valid/a/loss", patience=2, min_delta=0.05))
    # 3.0 best; 2.97 is not better by > 0.05 (bad 1); 2.9 is (reset); 2.88, nan → 2 bad → stop at 50
    assert [s.update(step, v) for step, v in [(0, 3.0), (10, 2.97), (20, 2.9), (30, 2.88)]] == [None] * 4
    why = s.update(50, float("nan"))
    assert why and "valid/a/loss" in why and "best 2.9 at step 20" in why and s.stopped_at == 50
    m = EarlyStopper.from_config(EarlyStoppingConfig(metric="valid/a/token_f1", patience=1))
    assert m.mode == "max" and m.update(0, 0.2) is None and m.update(5, 0.3) is None and m.update(10, 0.3)
    again = EarlyStopper.from_config(EarlyStoppingConfig(metric="valid/a/loss", patience=2, min_delta=0.05),
                                     state=s.state())
    assert again.state() == s.state()


def test_packing_order_is_prefix_stable_and_covers_every_example(chat):
    exs = load(chat, sft_examples(30, 3), seq_len=48)
    small = sft.SFTDataset([("a", exs, 3.0), ("b", exs[:10], 1.0)], 48, 5, 20)
    big = sft.SFTDataset([("a", exs, 3.0), ("b", exs[:10], 1.0)], 48, 5, 200)
    for i in range(20):
        for k in ("input_ids", "labels", "segments"):
            assert np.array_equal(small[i][k], big[i][k])
    assert [big[i]["source"] for i in range(8)] == [0, 0, 1, 0, 0, 0, 1, 0]  # weights 3:1
    # one epoch of source a: its first rows hold every example once before any repeats
    rows = big._rows[0]
    seen, n = [], 0
    while len(set(seen)) < len(exs):
        seen += rows[n]
        n += 1
    assert sorted(seen[: len(exs)]) == list(range(len(exs)))
    assert all(sum(len(exs[j].ids) - 1 for j in r) <= 48 for r in rows)
    toks = big.tokens_per_source(8)
    assert toks["a"] == sum(big[i]["tokens"] for i in range(8) if big[i]["source"] == 0)


def test_a_source_the_blend_gives_no_rows(chat):
    # 0.95 / 0.05 over 8 samples leaves source b without a row; its example stream is endless,
    # so packing must not wait for a row that never comes.
    exs = load(chat, sft_examples(12, 3), seq_len=48)
    ds = sft.SFTDataset([("a", exs, 0.95), ("b", exs[:4], 0.05)], 48, 5, 8)
    assert ds._rows[1] == [] and len(ds._rows[0]) == 8
    assert all(ds[i]["source"] == 0 for i in range(8))


# ---- bad SFT input: one line, exit 2, nothing written -----------------------------------------

BAD = {
    "missing_response": ([{"prompt": "hi"}], "x.jsonl:1: expected {\"prompt\", \"response\"} or {\"messages\": [...]}, "
                                             "missing response"),
    "empty_response": ([{"prompt": "hi", "response": "ok"}, {"prompt": "hi", "response": "  "}],
                       "x.jsonl:2: empty response"),
    "unknown_role": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
                     "x.jsonl:1: unknown role 'bot'"),
    "no_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
    "not_json": ("{\"prompt\": \"a\", \"response\": \"b\"}\n{oops\n", "x.jsonl:2: not valid JSON"),
    "not_an_object": ("[1, 2]\n", "x.jsonl:1: expected a JSON object"),
    "empty_file": ("\n\n", "no examples"),
    "prompt_fills_seq_len": ([{"prompt": " ".join(["hello world"] * 40), "response": "yes"}],
                             "the prompt fills all data.seq_len=32 positions"),
    "no_chat_template": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                         "need a tokenizer with a chat template"),
    "missing_file": (None, "no such SFT data file"),
    "model_without_tokenizer": ([{"prompt": "a", "response": "b"}], "cannot load a tokenizer from"),
    "unknown_sft_key": ([{"prompt": "a", "response": "b"}], "unknown config key 'sft.max_tokens'"),
    "early_stopping_unknown_metric": ([{"prompt": "a", "response": "b"}],
                                      "train.early_stopping.metric 'valid/nope/loss' is not a validation metric"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_sft_input(name, chat, tmp_path, capsys, monkeypatch):
    from megacpt.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    records, fragment = BAD[name]
    data = tmp_path / "x.jsonl"
    if isinstance(records, str):
        data.write_text(records)
    elif records is not None:
        write_jsonl(data, records)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "response": "b"}])
    model = {"no_chat_template": chat["plain"], "model_without_tokenizer": chat["bare"]}.get(name, chat["dir"])
    cfg = tiny_run_config(chat["tmp"], model, tmp_path / "run", seq=32, vocab=len(chat["tok"]), task="sft")
    cfg["data"]["train"] = [{"name": "sft", "path": str(data)}]
    cfg["data"]["valid"] = [{"name": "sft", "path": good}]
    cfg["sft"] = {"max_new_tokens": 4}
    if name == "unknown_sft_key":
        cfg["sft"]["max_tokens"] = 3
    if name == "early_stopping_unknown_metric":
        cfg["train"]["early_stopping"] = {"metric": "valid/nope/loss"}
    path = write_config(tmp_path / "cfg.yaml", cfg)
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    rc = main(["train", str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    if "jsonl:" in fragment:
        assert str(data) in lines[0]  # names the file
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "run").exists()


def test_sft_config_keys(tmp_path):
    from megacpt.config import ConfigError, config_from_dict

    base = {"task": "sft", "data": {"valid": [{"name": "qa", "path": "v.jsonl"}], "seq_len": 64},
            "sft": {"max_new_tokens": 8}}
    cfg = config_from_dict(base, ["sft.eval_examples=4", "optim.embedding_lr=1e-3", "train.trainable=embeddings",
                                  "train.early_stopping.metric=valid/qa/exact_match"])
    assert cfg.sft.eval_examples == 4 and cfg.optim.embedding_lr == 1e-3 and cfg.train.trainable == "embeddings"
    from megacpt.config import early_stopping_mode

    assert early_stopping_mode(cfg.train.early_stopping) == "max"
    for over, msg in [(["train.trainable=head"], "train.trainable: must be one of"),
                      (["optim.embedding_lr=0"], "optim.embedding_lr must be > 0"),
                      (["sft.max_new_tokens=64"], "must be below data.seq_len"),
                      (["task=cpt", "train.early_stopping.metric=valid/qa/bleu"], "not a validation metric"),
                      (["phases=[{name: x, steps: 1, trainable: some}]"],
                       "phases.0.trainable: must be one of .all. | .embeddings., got .some.")]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(copy.deepcopy(base), over)
    json.dumps(cfg.to_dict())  # goes into checkpoints as JSON
