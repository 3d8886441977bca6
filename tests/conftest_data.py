"""Offline fixtures for the data tests: tiny tokenizers trained here, and a generated corpus.

Not a conftest.py (the lead owns that): test modules import what they need from here.
"""

from __future__ import annotations

import random

import pytest

WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or his which "
    "tokens model data train shard index merge prepare corpus language text document sentence "
    "über straße Größe naïve café 東京 日本語 🙂 α β γ 123 4567 , . ; : ! ? ( ) - "
).split()


def make_docs(n: int, seed: int = 0, max_words: int = 40, newlines: bool = True) -> list[str]:
    """n documents of pseudo-text; with newlines, some hold single line breaks (no blank lines)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        if newlines and len(words) > 6 and rng.random() < 0.3:
            words.insert(rng.randint(1, len(words) - 1), "\n")
        docs.append(" ".join(words).replace(" \n ", "\n"))
    return docs


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (vocab ~400) saved as an HF tokenizer directory, EOS and BOS defined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_docs(300, seed=1), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>", pad_token="<pad>")
    out = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def big_vocab_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer with 70,000 entries: enough to need int32 tokens (no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < 70_000:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("big_tok")
    hf.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A tiny sentencepiece unigram model (.model file); ids: unk 0, bos 1, eos 2."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    text = d / "train.txt"
    text.write_text("\n".join(make_docs(400, seed=2, newlines=False)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(d / "sp"),
        vocab_size=120,
        character_coverage=1.0,
        model_type="unigram",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return str(d / "sp.model")
