"""Tokenizers for `megacpt prepare`: an HF tokenizer (directory or cached hub id) or a
sentencepiece .model, described by a TokenizerInfo (identity for the sidecar, and a picklable
spec from which each worker process rebuilds the encoder as an Encoder).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from megacpt.errors import DataError


@dataclass
class TokenizerInfo:
    kind: str  # "hf" | "sentencepiece"
    name: str
    path: str | None
    vocab_size: int
    vocab_hash: str
    eos_id: int | None
    bos_id: int | None
    spec: dict  # what a worker needs to rebuild the encoder (picklable)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "name_or_path": self.name,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "vocab_hash": self.vocab_hash,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }


def _hash_pieces(pieces) -> str:
    h = hashlib.sha256()
    for piece, idx in pieces:
        h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()


def load_tokenizer(name: str) -> TokenizerInfo:
    """An HF tokenizer (local dir or cached hub id) or a sentencepiece .model file."""
    path = Path(name)
    if path.is_file() and path.suffix == ".model":
        return _load_sentencepiece(path)
    looks_local = path.is_absolute() or name.startswith(".") or path.suffix in (".model", ".json")
    if not path.exists() and (looks_local or name.count("/") > 1):
        raise DataError(
            f"tokenizer {name} does not exist: pass an HF tokenizer directory, a hub id, or a sentencepiece .model"
        )
    if path.is_file():
        raise DataError(f"tokenizer {name} is a file: pass its HF tokenizer directory or a sentencepiece .model")
    try:
        from transformers import AutoTokenizer  # heavy (seconds); only the main process loads it

        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer {name} ({reason}); pass an HF tokenizer dir or a .model") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Workers rebuild the exact Rust tokenizer that `tok` wraps (after whatever transformers
        # adjusted at load time) without importing transformers, which takes seconds per process.
        spec = {
            "kind": "tokenizers",
            "json": backend.to_str(),
            "encode_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
        }
    else:
        spec = {"kind": "hf", "name": name}
    vocab = tok.get_vocab()
    return TokenizerInfo(
        kind="hf",
        name=name,
        path=str(path.resolve()) if path.exists() else None,
        vocab_size=len(tok),
        vocab_hash=_hash_pieces(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))),
        eos_id=tok.eos_token_id,
        bos_id=tok.bos_token_id,
        spec=spec,
    )


def _load_sentencepiece(path: Path) -> TokenizerInfo:
    import sentencepiece as spm  # optional: needed only for .model tokenizers

    proto = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception:
        raise DataError(f"{path} is not a sentencepiece model; pass a valid .model or an HF tokenizer dir") from None
    n = sp.get_piece_size()
    eos, bos = sp.eos_id(), sp.bos_id()
    return TokenizerInfo(
        kind="sentencepiece",
        name=str(path),
        path=str(path.resolve()),
        vocab_size=n,
        vocab_hash=_hash_pieces((sp.id_to_piece(i), i) for i in range(n)),
        eos_id=eos if eos >= 0 else None,
        bos_id=bos if bos >= 0 else None,
        spec={"kind": "sentencepiece", "proto": proto},
    )


class Encoder:
    """Batch text -> list of token id lists, rebuilt inside each worker from TokenizerInfo.spec."""

    def __init__(self, spec: dict):
        kind = spec["kind"]
        self.kind = kind
        if kind == "tokenizers":
            from tokenizers import Tokenizer  # each spec imports only its own backend library

            tok = Tokenizer.from_str(spec["json"])
            # transformers turns these off per call; a saved tokenizer.json may carry them.
            tok.no_truncation()
            tok.no_padding()
            tok.encode_special_tokens = spec["encode_special_tokens"]
            self._tok = tok
            # encode_batch_fast skips computing offsets we never use.
            self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        elif kind == "sentencepiece":
            import sentencepiece as spm  # optional: needed only for .model tokenizers

            self._tok = spm.SentencePieceProcessor(model_proto=spec["proto"])
        elif kind == "hf":
            from transformers import AutoTokenizer  # heavy: only for slow tokenizers without a Rust backend

            self._tok = AutoTokenizer.from_pretrained(spec["name"])
        else:
            raise ValueError(kind)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.kind == "tokenizers":
            return [e.ids for e in self._encode(texts, add_special_tokens=False)]
        if self.kind == "sentencepiece":
            return self._tok.encode(texts, out_type=int, num_threads=1)
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        """The text of token ids, special tokens (BOS, EOS) left out; the inverse of encode for
        the lossless tokenizers prepare uses (byte-level BPE, sentencepiece with byte fallback)."""
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self._tok.decode(ids, skip_special_tokens=True)
        if self.kind == "sentencepiece":
            return self._tok.decode(ids)
        # No clean-up of spaces before punctuation: that would change the text, not restore it.
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
