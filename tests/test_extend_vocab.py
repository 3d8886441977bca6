"""`megacpt extend-vocab`: new rows initialised as specified (mean / subword, embedding and untied
head, tied = one matrix), old rows untouched, the exported dir loads in transformers with matching
sizes, new tokens encode as one id, old text encodes as before, tokens per character drop."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers import tiny_hf_model
from megacpt.cli import main
from megacpt.vocab import extend_vocab

ENGLISH = ("the of and to in is was for on that with as by at from this have it are be or an not which "
           "people house water time world system file number value error before after could would "
           "should their there about other these those while where because between under").split()
GERMAN = ("Größe Straße Bücher überschreitet Übersetzungen Berechtigungen Einstellungen konnte nicht "
          "geöffnet werden Datei Fehler Benutzer Verzeichnis Schlüssel Änderungen für über wurde").split()
NEW_TOKENS = [" Größe", " Straße", " Bücher", " überschreitet", " Berechtigungen", "ungen", " für"]


def english_text(n, seed=0):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(ENGLISH) for _ in range(rnd.randint(6, 14))).capitalize() + "." for _ in range(n)]


def german_text(n, seed=1):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(GERMAN + ENGLISH[:10]) for _ in range(rnd.randint(6, 14))) + "." for _ in range(n)]


def tiny_tokenizer(path: Path):
    """A byte-level BPE (GPT-2/SmolLM2 style) trained on English only, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(english_text(400), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(str(path))
    return tok


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Base dirs (untied and tied) sharing one tokenizer, plus a German corpus file."""
    tmp = tmp_path_factory.mktemp("vocab")
    dirs = {}
    for tied in (False, True):
        d = tmp / f"base-{'tied' if tied else 'untied'}"
        tok = tiny_tokenizer(d)
        tiny_hf_model(d, tied=tied, vocab=len(tok), hidden=16, inter=32, heads=2, kv_heads=1)
        dirs[tied] = d
    corpus = tmp / "de.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in german_text(300)))
    return tmp, dirs, corpus


def weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def old_piece_ids(base_dir, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))(text, add_special_tokens=False)["input_ids"]


def check_export(out: Path, base_dir: Path, report: dict):
    """Loads in transformers with matching sizes; new tokens are single ids; old text unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    old_tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(tok) == report["tokenizer_len"] == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    for entry in report["added"]:
        assert tok.convert_tokens_to_ids(entry["form"]) == entry["id"]
        if "\ufffd" in entry["token"]:  # part of a UTF-8 character (learned by BPE): no text of its own
            ids = [t.id for t in tok.backend_tokenizer.model.tokenize(entry["form"])]
        else:
            ids = tok(entry["token"], add_special_tokens=False)["input_ids"]
        assert ids == [entry["id"]], (entry, tok.convert_ids_to_tokens(ids))
    for text in english_text(30, seed=5):  # text without new tokens: tokenized exactly as before
        assert tok(text)["input_ids"] == old_tok(text)["input_ids"]
    for text in german_text(30, seed=6):  # encode/decode stay inverse
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    with torch.no_grad():  # runs with the new ids
        ids = torch.tensor([tok(german_text(1, seed=7)[0])["input_ids"]])
        assert torch.isfinite(model(ids).logits).all()
    return model


def test_mean_init_untied(base):
    tmp, dirs, corpus = base
    out = tmp / "ext-mean"
    r = extend_vocab(dirs[False], out, NEW_TOKENS, init="mean", report_corpus=corpus)
    assert [a["token"] for a in r["added"]] == NEW_TOKENS
    n_old = r["base_tokenizer_len"]
    assert r["new_ids"] == [n_old, n_old + len(NEW_TOKENS) + r["num_intermediate"]]
    old, new = weights(dirs[False]), weights(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[name].shape == (r["tokenizer_len"], old[name].shape[1])
        assert torch.equal(new[name][:n_old], old[name])  # old rows unchanged
        mean = old[name].float().mean(0)
        for row in range(n_old, r["tokenizer_len"]):
            torch.testing.assert_close(new[name][row], mean, rtol=0, atol=1e-6)
    for k in old:  # everything else copied bit for bit
        if k not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(old[k], new[k]), k
    check_export(out, dirs[False], r)
    c = r["corpus"]
    assert c["after"]["tokens_per_char"] < c["before"]["tokens_per_char"]
    assert c["exported_tokenizer_agrees"] and c["roundtrip_docs_ok"] == c["roundtrip_docs_checked"]
    assert json.loads((out / "extend_vocab.json").read_text())["tokenizer_len"] == r["tokenizer_len"]


def test_subword_init_untied(base):
    from tokenizers import Tokenizer

    tmp, dirs, _ = base
    out = tmp / "ext-subword"
    r = extend_vocab(dirs[False], out, NEW_TOKENS, init="subword")
    old, new = weights(dirs[False]), weights(out)
    old_model = Tokenizer.from_file(str(dirs[False] / "tokenizer.json")).model
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for entry in r["added"]:  # pieces of the token's text under the OLD tokenizer
            pieces = old_piece_ids(dirs[False], entry["token"])
            assert len(pieces) > 1
            torch.testing.assert_close(new[name][entry["id"]], old[name][pieces].float().mean(0), rtol=0, atol=1e-6)
        for entry in r["intermediate"]:  # prefixes of new tokens (e.g. partial UTF-8): pieces of their form
            pieces = [t.id for t in old_model.tokenize(entry["form"])]
            torch.testing.assert_close(new[name][entry["id"]], old[name][pieces].float().mean(0), rtol=0, atol=1e-6)
        assert torch.equal(new[name][: r["base_tokenizer_len"]], old[name])
    check_export(out, dirs[False], r)


def test_tied_shares_one_matrix(base):
    from megacpt.export import load_model_source
    from megacpt.models.hf import load_full_state
    from megacpt.models.llama import Transformer

    tmp, dirs, _ = base
    out = tmp / "ext-tied"
    r = extend_vocab(dirs[True], out, NEW_TOKENS, init="subword", pad_to_multiple_of=64)
    assert r["tied_embeddings"]
    new, old = weights(out), weights(dirs[True])
    assert "lm_head.weight" not in new  # one matrix on disk
    emb = new["model.embed_tokens.weight"]
    assert emb.shape[0] == r["vocab_size"] and r["vocab_size"] % 64 == 0
    assert r["padding_rows"] == r["vocab_size"] - r["tokenizer_len"] and "multiple of 64" in r["padding_reason"]
    assert torch.equal(emb[: r["base_tokenizer_len"]], old["model.embed_tokens.weight"])
    for entry in r["added"]:
        pieces = old_piece_ids(dirs[True], entry["token"])
        torch.testing.assert_close(emb[entry["id"]], old["model.embed_tokens.weight"][pieces].float().mean(0),
                                   rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(AutoTokenizer.from_pretrained(str(out))) == r["tokenizer_len"]
    assert model.config.vocab_size == r["vocab_size"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # megacpt's own loader (what training starts from) takes it too, tied
    args, _, src, _ = load_model_source(out)
    with torch.device("meta"):
        ours = Transformer(args)
    load_full_state(ours, src)
    assert ours.lm_head.weight is ours.embed_tokens.weight and ours.embed_tokens.weight.shape[0] == r["vocab_size"]


def test_base_with_padding_rows(base):
    """A base model with more rows than tokenizer ids (as Qwen2 ships): new ids take the spare rows."""
    tmp, dirs, _ = base
    d = tmp / "base-padded"
    tok = tiny_tokenizer(d)
    tiny_hf_model(d, vocab=len(tok) + 64, hidden=16, inter=32, heads=2, kv_heads=1)
    out = tmp / "ext-padded"
    r = extend_vocab(d, out, NEW_TOKENS[:2], init="mean")
    assert r["tokenizer_len"] < len(tok) + 64 == r["vocab_size"] and "kept the base model" in r["padding_reason"]
    old, new = weights(d), weights(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[name].shape == old[name].shape
        assert torch.equal(new[name][: len(tok)], old[name][: len(tok)])
        mean = old[name][: len(tok)].float().mean(0)  # the mean of the tokenizer's rows, not of padding
        for row in range(len(tok), r["tokenizer_len"]):
            torch.testing.assert_close(new[name][row], mean, rtol=0, atol=1e-6)
        assert torch.equal(new[name][r["tokenizer_len"]:], old[name][r["tokenizer_len"]:])  # spare rows kept


def test_cli_train_bpe(base, capsys):
    tmp, dirs, corpus = base
    out = tmp / "ext-bpe"
    k = 40
    assert main(["extend-vocab", "--model", str(dirs[False]), "--train-bpe", str(corpus), "--num-tokens", str(k),
                 "--init", "subword", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokens per character" in printed
    r = json.loads((out / "extend_vocab.json").read_text())
    assert r["num_added"] + r["num_intermediate"] == k == r["tokenizer_len"] - r["base_tokenizer_len"]
    assert not r["unreachable"]
    c = r["corpus"]
    assert c["path"] == str(corpus)  # --report-corpus defaults to the BPE corpus
    assert c["after"]["tokens_per_char"] < 0.9 * c["before"]["tokens_per_char"]
    check_export(out, dirs[False], r)


def test_cli_token_file_and_errors(base, capsys):
    tmp, dirs, corpus = base
    tokens = tmp / "tokens.txt"
    tokens.write_text("\n".join(NEW_TOKENS + [" Größe", "Haus.", " the"]) + "\n", encoding="utf-8")
    out = tmp / "ext-file"
    assert main(["extend-vocab", "--model", str(dirs[False]), "--tokens", str(tokens), "--output", str(out),
                 "--report-corpus", str(corpus)]) == 0
    r = json.loads((out / "extend_vocab.json").read_text())
    assert r["num_added"] == len(NEW_TOKENS)  # duplicate dropped
    assert {s["token"] for s in r["skipped"]} == {"Haus.", " the"}  # two pre-tokens; already a token
    capsys.readouterr()

    known = tmp / "known.txt"
    known.write_text(" the\n")
    bad = [
        ["--model", str(tmp / "nope"), "--tokens", str(tokens)],
        ["--model", str(dirs[False]), "--tokens", str(known)],
        ["--model", str(dirs[False]), "--tokens", str(tmp / "missing.txt")],
        ["--model", str(dirs[False]), "--train-bpe", str(corpus)],
        ["--model", str(dirs[False]), "--tokens", str(tokens), "--num-tokens", "5"],
    ]
    for args in bad:
        assert main(["extend-vocab", *args, "--output", str(tmp / "bad-out")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (args, err)
    assert main(["extend-vocab", "--model", str(dirs[False]), "--tokens", str(tokens),
                 "--output", str(dirs[False])]) == 2
    assert not (tmp / "bad-out").exists()


def test_parser_constants_match_the_module():
    """megacpt/cli/vocab.py writes INITS and the --max-chars default out (parsing stays torch-free)."""
    import megacpt.cli.vocab as cli_vocab
    import megacpt.vocab as vocab

    assert cli_vocab.INITS == vocab.INITS
    assert cli_vocab.DEFAULT_MAX_TRAIN_CHARS == vocab.DEFAULT_MAX_TRAIN_CHARS


@pytest.mark.parametrize("arch,tied", [("gemma3", True), ("phi3", False)])
def test_new_families_extend(base, arch, tied):
    """Gemma 3 (tied, 1+w norms, q/k norms) and Phi-3 (fused qkv_proj/gate_up_proj on disk): the
    extended model loads in transformers with the new rows; every other tensor, the fused ones
    included, is the base's bit for bit; megacpt's loader takes it."""
    from megacpt.export import load_model_source
    from megacpt.models.hf import load_full_state
    from megacpt.models.llama import Transformer

    tmp, _, _ = base
    d = tmp / f"base-{arch}"
    tok = tiny_tokenizer(d)
    # Phi-3's config defaults name token 32000 (pad/eos); this vocabulary ends at 400.
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0} if arch == "phi3" else {}
    tiny_hf_model(d, arch=arch, tied=tied, vocab=len(tok), hidden=16, inter=32, heads=2, kv_heads=1, perturb=True,
                  **ids)
    out = tmp / f"ext-{arch}"
    r = extend_vocab(d, out, NEW_TOKENS, init="mean")
    check_export(out, d, r)
    new, old = weights(out), weights(d)
    assert set(new) == set(old)
    for name, t in old.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(new[name][: t.shape[0]], t) and new[name].shape[0] == r["vocab_size"], name
        else:
            assert torch.equal(new[name], t), name
    if arch == "phi3":
        assert any(n.endswith("qkv_proj.weight") for n in new) and any(n.endswith("gate_up_proj.weight") for n in new)
    args, _, src, _ = load_model_source(out)
    with torch.device("meta"):
        ours = Transformer(args)
    load_full_state(ours, src)
    assert ours.embed_tokens.weight.shape[0] == r["vocab_size"]
