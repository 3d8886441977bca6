"""`megacpt extend-vocab`: add tokens to a model's BPE tokenizer and grow its embedding and head.

    megacpt extend-vocab --model HF_DIR --tokens FILE --output HF_DIR [--init mean|subword]
    megacpt extend-vocab --model HF_DIR --train-bpe CORPUS --num-tokens K --output HF_DIR

How tokens are added, and why not `tokenizer.add_tokens`
--------------------------------------------------------
`add_tokens` creates *added tokens*: they are cut out of the raw text before the BPE model runs,
and decoded by pushing their text through the tokenizer's decoder. With the byte-level BPE of
GPT-2/Llama 3/SmolLM2/Qwen2 that decoder reads each character as one byte, so an added token such
as "für" decodes to "f\\ufffdr": encode/decode stop being inverse. We therefore extend the BPE
*model* itself. Each new token is stored in the model's own alphabet (e.g. "ĠGrÃ¶ÃŁe" for
" Größe") and made reachable by merges appended after all existing merges:

- the old merges keep their priority, so text the new tokens do not touch is tokenized exactly
  as before, and every text still decodes to itself (it is still one BPE);
- for a new token, the base BPE stops at pieces p1..pn; we append the merges (p1,p2), (p1p2,p3),
  ... . The prefixes p1p2, p1p2p3, ... are vocabulary entries too ("intermediate" tokens, listed
  separately in extend_vocab.json; with `--num-tokens K` they count towards K). A new token is
  built when its whole pre-token is the token (a word such as " Größe"), and often inside longer
  words; each one is checked to encode as one id on its own.
- merges appended later have lower priority than earlier ones, so adding a token never undoes
  an earlier one (the build checks this exactly by simulating the merges).

Token ids continue after the base tokenizer's highest id. The embedding (and an untied head) gets
one row per new id; rows are initialised as the mean of the base tokenizer's rows (`mean`) or as
the mean of the rows of the token's pieces under the old tokenizer (`subword`). With tied
embeddings there is one matrix, written once. If the base model already had more rows than its
tokenizer had ids (padding), new ids reuse those rows first. `--pad-to-multiple-of N` pads the
matrix further; the reason for every row beyond `len(tokenizer)` is recorded.

`--tokens FILE`: one token per line, as text; a trailing newline/space is dropped, a leading space
is kept. In byte-level BPE tokenizers a word in running text is a pre-token *with* its leading
space, so write " Haus" (with the space) to get a token for "Haus" after a space. A line the
pre-tokenizer would split (e.g. "Haus." or "zwei Wörter") cannot be one BPE token and is skipped.
`--train-bpe CORPUS`: a BPE with the base tokenizer's normaliser and pre-tokenizer is trained on
the corpus (text: one document per line; .jsonl: the `--text-key` field); its learned tokens that
the base vocabulary lacks are added in the order they were learned (most frequent first).

Only BPE tokenizers are supported (tokenizer.json model type BPE, without subword prefixes); not
Unigram/WordPiece. Characters a non-byte-level BPE cannot represent (byte-fallback pieces) make a
token unreachable: it is skipped.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers

from megacpt.errors import UserError
from megacpt.models.hf import HFWeights, args_from_hf_config, read_hf_config, save_hf

INITS = ("mean", "subword")
REPORT_FILE = "extend_vocab.json"
# Caps on how much corpus text is read (characters).
DEFAULT_MAX_TRAIN_CHARS = 100_000_000
DEFAULT_MAX_REPORT_CHARS = 5_000_000
# Tokenizer files copied from the base dir next to the new tokenizer.json (vocab.json, merges.txt
# and tokenizer.model are not: they would describe the old vocabulary).
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                         "chat_template.json")


# ---------------------------------------------------------------------------------------------
# Corpus


def read_corpus(path, text_key: str = "text", max_chars: int | None = None):
    """Documents of a text file (one per non-empty line) or JSON Lines file (`text_key`), .gz ok."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"corpus {path} does not exist; pass a text or .jsonl file")
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    is_jsonl = name.endswith((".jsonl", ".ndjson"))
    opener = gzip.open if p.name.endswith(".gz") else open
    chars = 0
    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        for no, line in enumerate(f, 1):
            if is_jsonl:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{no}: not valid JSON ({e.msg}); "
                                    f"pass a .jsonl file or plain text") from None
                text = obj.get(text_key) if isinstance(obj, dict) else None
                if text is None:
                    raise UserError(f"{path}:{no}: no field '{text_key}'; pass --text-key")
                text = str(text)
            else:
                text = line.rstrip("\r\n")
            if not text:
                continue
            if max_chars is not None and chars + len(text) > max_chars:
                if chars == 0:
                    yield text[:max_chars]
                return
            chars += len(text)
            yield text


def read_token_file(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"token file {path} does not exist; pass a file with one token per line")
    tokens = [line.rstrip() for line in p.read_text(encoding="utf-8").splitlines()]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise UserError(f"token file {path} has no tokens; write one token per line")
    return tokens


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer_json(model_dir) -> dict:
    """The base fast tokenizer as tokenizer.json data (converted by transformers if only a slow one exists)."""
    d = Path(model_dir)
    path = d / "tokenizer.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    try:
        from transformers import AutoTokenizer  # heavy (seconds): only for a model dir without tokenizer.json

        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise UserError(f"{model_dir} has no tokenizer.json and no tokenizer transformers can load ({e})") from None
    if not hasattr(tok, "backend_tokenizer"):
        raise UserError(f"{model_dir}: the tokenizer is not a fast (tokenizers) tokenizer; extend-vocab needs one")
    return json.loads(tok.backend_tokenizer.to_str())


def _tokenizer_from(data: dict):
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


class BPEExtender:
    """Adds vocabulary entries and merges to a tokenizer.json BPE model (see the module doc)."""

    def __init__(self, data: dict, source: str = "tokenizer.json"):
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise UserError(f"{source}: tokenizer model is {model.get('type')!r}; "
                            f"extend-vocab supports BPE tokenizers only")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise UserError(f"{source}: BPE with subword prefixes/suffixes is not supported by extend-vocab")
        self.data = data
        self.old = _tokenizer_from(data)
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.merge_as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
        self.merges: list[tuple[str, str]] = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                                              for m in model["merges"]]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.added_contents = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        ids = list(self.vocab.values()) + list(self.added_contents.values())
        self.base_len = max(ids) + 1  # ids run 0..base_len-1; new ids continue from here
        self.next_id = self.base_len
        self.new_entries: list[str] = []  # in id order
        self.byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))

    # -- forms ---------------------------------------------------------------------------------
    def form_of(self, text: str) -> tuple[str | None, str]:
        """The token's string in the BPE model's alphabet, or (None, why not)."""
        norm = self.old.normalizer.normalize_str(text) if self.old.normalizer else text
        pieces = self.old.pre_tokenizer.pre_tokenize_str(norm) if self.old.pre_tokenizer else [(norm, None)]
        if len(pieces) != 1:
            return None, f"the pre-tokenizer splits it into {len(pieces)} pieces"
        return pieces[0][0], ""

    def text_of(self, form: str) -> str:
        if self.old.decoder is None:
            return form
        return self.old.decoder.decode([form])

    def known(self, form: str) -> bool:
        return form in self.vocab or form in self.added_contents

    def old_pieces(self, form: str) -> list[str]:
        return [t.value for t in self.old.model.tokenize(form)]

    # -- merges --------------------------------------------------------------------------------
    def simulate(self, form: str) -> list[str]:
        """Pieces of one pre-token under the extended BPE: the old BPE's result, then all merges
        (old and new) in priority order, leftmost first on ties, as `tokenizers` applies them."""
        pieces = self.old_pieces(form)
        while len(pieces) > 1:
            best, at = None, -1
            for i in range(len(pieces) - 1):
                r = self.ranks.get((pieces[i], pieces[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            pieces[at : at + 2] = [pieces[at] + pieces[at + 1]]
        return pieces

    def plan(self, form: str) -> tuple[list[tuple[str, str]], list[str]] | None:
        """(merges, new vocab entries) that make `form` one token; None if its pieces cannot be
        joined (characters outside the vocabulary)."""
        pieces = self.simulate(form)
        if "".join(pieces) != form or any(p not in self.vocab for p in pieces):
            return None
        merges, entries = [], []
        cur = pieces[0]
        for p in pieces[1:]:
            merges.append((cur, p))
            cur = cur + p
            if cur not in self.vocab and cur not in entries:
                entries.append(cur)
        return merges, entries

    def add(self, form: str, plan) -> list[str]:
        merges, entries = plan
        for e in entries:
            self.vocab[e] = self.next_id
            self.next_id += 1
            self.new_entries.append(e)
        for m in merges:
            if m not in self.ranks:
                self.ranks[m] = len(self.merges)
                self.merges.append(m)
        got = self.simulate(form)
        if got != [form]:  # cannot happen (later merges never pre-empt earlier ones); be loud if it does
            raise RuntimeError(f"internal error: new token {form!r} encodes as {got} after adding its merges")
        return entries

    def to_json(self) -> dict:
        data = json.loads(json.dumps(self.data))
        as_strings = self.merge_as_strings and not any(" " in a or " " in b for a, b in self.merges)
        data["model"]["vocab"] = dict(self.vocab)
        data["model"]["merges"] = [f"{a} {b}" if as_strings else [a, b] for a, b in self.merges]
        return data


def learn_bpe_tokens(data: dict, corpus, num_tokens: int, text_key: str = "text",
                     max_chars: int = DEFAULT_MAX_TRAIN_CHARS) -> list[str]:
    """Tokens (in model form, learning order) of a BPE trained on `corpus` with the base tokenizer's
    normaliser and pre-tokenizer, that the base vocabulary does not have."""
    base = BPEExtender(data)
    blank = json.loads(json.dumps(data))
    blank["added_tokens"] = []
    blank["post_processor"] = None
    blank["model"] = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": {},
                      "merges": []}
    tk = _tokenizer_from(blank)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if base.byte_level else []
    docs = list(read_corpus(corpus, text_key, max_chars))
    if not docs:
        raise UserError(f"corpus {corpus} has no text; pass a non-empty text or .jsonl file")
    size = len(alphabet) + 4 * num_tokens + 1000
    for _ in range(4):  # grow the trained vocabulary until enough tokens are new to the base
        trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=2, show_progress=False,
                                      initial_alphabet=alphabet, special_tokens=[])
        tk.train_from_iterator(docs, trainer=trainer)
        merges = json.loads(tk.to_str())["model"]["merges"]
        learned = []
        for m in merges:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if not base.known(a + b) and a + b not in learned:
                learned.append(a + b)
        # intermediates may use up part of K: keep a margin of candidates
        if len(learned) >= 2 * num_tokens or len(merges) < size - len(alphabet) - 1:
            break
        size *= 2
    return learned


# ---------------------------------------------------------------------------------------------
# Weights


def _init_rows(matrix, new_ids, pieces_ids, init: str, n_real: int):
    """Fill rows `new_ids` of `matrix` (fp32 math, stored in its dtype)."""
    mean = matrix[:n_real].float().mean(0)
    for row, ids in zip(new_ids, pieces_ids):
        if init == "subword" and ids:
            matrix[row] = matrix[torch.tensor(ids)].float().mean(0).to(matrix.dtype)
        else:
            matrix[row] = mean.to(matrix.dtype)


def _resized(t, rows: int):
    out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype)
    n = min(rows, t.shape[0])
    out[:n] = t[:n]
    return out


def tokens_per_char(tokenizer, docs: list[str]) -> dict:
    enc = tokenizer.encode_batch(docs, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in enc)
    chars = sum(len(d) for d in docs)
    return {"tokens": tokens, "chars": chars, "tokens_per_char": tokens / chars if chars else float("nan")}


# ---------------------------------------------------------------------------------------------
# The whole operation


@dataclass(frozen=True)
class ModelForms:
    """Tokens already in the BPE model's alphabet (as learn_bpe_tokens returns them), added in order
    while the new vocabulary entries, intermediates included, stay within `max_new`."""

    forms: list[str]
    max_new: int | None = None


@dataclass
class _Picked:
    """What happened to each requested token: added, only added as a prefix, or skipped (and why)."""

    added: list[str] = field(default_factory=list)
    intermediate: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Rows:
    """The resized embedding: ids 0..new_len-1, vocab_size rows, and how each new row starts."""

    new_len: int
    vocab_size: int
    padding_reason: str | None
    new_ids: list[int]  # rows of the new ids, initialised by `init`
    pieces_ids: list[list[int]]  # old-tokenizer pieces of each new id (subword init)
    pad_rows: list[int]  # rows past the new ids that did not exist before: mean init, whatever `init`


def extend_vocab(model_dir, out_dir, new_tokens: list[str] | ModelForms, init: str = "mean", *, report_corpus=None,
                 text_key: str = "text", pad_to_multiple_of: int = 1,
                 max_report_chars: int = DEFAULT_MAX_REPORT_CHARS) -> dict:
    """Add `new_tokens` (text, or ModelForms) to the HF model in `model_dir`; write tokenizer +
    resized model to `out_dir`. Returns the report (also written to out_dir/extend_vocab.json)."""
    if init not in INITS:
        raise UserError(f"init {init!r} is not one of {', '.join(INITS)}")
    if int(pad_to_multiple_of) < 1:
        raise UserError(f"pad_to_multiple_of must be ≥ 1, got {pad_to_multiple_of}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = read_hf_config(model_dir)
    args = args_from_hf_config(cfg, str(model_dir / "config.json"))
    if out_dir.resolve() == model_dir.resolve():
        raise UserError("--output must differ from --model (the base directory is read while the output is written)")
    data = load_tokenizer_json(model_dir)
    ext = BPEExtender(data, str(model_dir / "tokenizer.json"))
    if args.vocab_size < ext.base_len:
        raise UserError(f"{model_dir}: the tokenizer has ids up to {ext.base_len - 1} but the model only "
                        f"{args.vocab_size} embedding rows; the tokenizer does not belong to this model")
    if isinstance(new_tokens, ModelForms):
        picked = _pick(ext, new_tokens.forms, forms=True, max_new=new_tokens.max_new)
    else:
        picked = _pick(ext, new_tokens, forms=False, max_new=None)
    rows = _plan_rows(ext, args.vocab_size, int(pad_to_multiple_of))
    new_backend, exported = _write(model_dir, out_dir, ext, cfg, args, rows, init)
    # Checks on what was written: the exported tokenizer is the one we built, sizes agree.
    if len(exported) != rows.new_len:
        raise RuntimeError(f"exported tokenizer has {len(exported)} tokens, expected {rows.new_len}")
    unreachable = [e for e in picked.added if [t.value for t in new_backend.model.tokenize(e)] != [e]]
    report = _report(model_dir, init, ext, args, rows, picked, unreachable, len(data["model"]["merges"]))
    if report_corpus is not None:
        docs = list(read_corpus(report_corpus, text_key, max_report_chars))
        if not docs:
            raise UserError(f"report corpus {report_corpus} has no text")
        report["corpus"] = {"path": str(report_corpus), **_corpus_report(docs, ext.old, new_backend, exported)}
    _write_json_atomic(out_dir / REPORT_FILE, report)
    return report


def _pick(ext: BPEExtender, new_tokens: list[str], forms: bool, max_new: int | None) -> _Picked:
    """Add what can be added of `new_tokens` to `ext`, in order (de-duplicated), up to `max_new` entries."""
    p = _Picked()
    for tok in dict.fromkeys(new_tokens):
        if max_new is not None and len(ext.new_entries) >= max_new:
            break
        form, why = (tok, "") if forms else ext.form_of(tok)
        if form is None:
            p.skipped.append({"token": tok, "reason": why})
            continue
        if form in p.intermediate:  # asked for, and already added as a prefix of an earlier token
            p.intermediate.remove(form)
            p.added.append(form)
            continue
        if ext.known(form):
            p.skipped.append({"token": tok, "reason": "already in the vocabulary"})
            continue
        plan = ext.plan(form)
        if plan is None:
            p.skipped.append({"token": tok, "reason": "has characters the base vocabulary cannot represent"})
            continue
        if max_new is not None and len(ext.new_entries) + len(plan[1]) > max_new:
            continue
        entries = ext.add(form, plan)
        p.added.append(form)
        p.intermediate.extend(e for e in entries if e != form)
    if not ext.new_entries:
        reasons = sorted({s["reason"] for s in p.skipped})
        raise UserError(f"no token could be added ({len(p.skipped)} skipped: {'; '.join(reasons)}); "
                        f"pass tokens the vocabulary lacks")
    return p


def _plan_rows(ext: BPEExtender, base_rows: int, multiple: int) -> _Rows:
    """Rows: at least the base model's (`base_rows`), padded up to a multiple of `multiple`."""
    new_len = ext.next_id
    rows = max(base_rows, new_len)
    vocab_size = -(-rows // multiple) * multiple
    reasons = []
    if base_rows > new_len:
        reasons.append(f"kept the base model's {base_rows} rows (more than its tokenizer's ids)")
    if vocab_size > rows:
        reasons.append(f"padded to a multiple of {multiple} (pad_to_multiple_of)")
    return _Rows(new_len=new_len, vocab_size=vocab_size, padding_reason="; ".join(reasons) or None,
                 new_ids=list(range(ext.base_len, new_len)),
                 pieces_ids=[[ext.vocab[p] for p in ext.old_pieces(e)] for e in ext.new_entries],
                 pad_rows=list(range(max(new_len, base_rows), vocab_size)))


def _write(model_dir: Path, out_dir: Path, ext: BPEExtender, cfg: dict, args, rows: _Rows, init: str):
    """Write the new tokenizer and the resized model to `out_dir` (through a temporary dir next to
    it); returns (the new tokenizers backend, the tokenizer transformers reads back from out_dir)."""
    from transformers import AutoTokenizer  # heavy (seconds to import): only once a model is written

    weights = HFWeights(model_dir)
    resize = {"embed_tokens.weight"} | (set() if args.tie_word_embeddings else {"lm_head.weight"})
    if "lm_head.weight" in resize and "lm_head.weight" not in weights:
        raise UserError(f"{model_dir}: config says untied embeddings but lm_head.weight is missing")

    def tensors():
        for name in weights.keys():
            if args.tie_word_embeddings and name == "lm_head.weight":
                continue
            t = weights.get(name)
            if name in resize:
                t = _resized(t, rows.vocab_size)
                _init_rows(t, rows.new_ids, rows.pieces_ids, init, ext.base_len)
                _init_rows(t, rows.pad_rows, [[]] * len(rows.pad_rows), "mean", ext.base_len)
            yield name, t

    new_data = ext.to_json()
    new_backend = _tokenizer_from(new_data)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.extend-vocab-", dir=out_dir.parent) as tmp:
        stage, final = Path(tmp) / "stage", Path(tmp) / "final"
        stage.mkdir()
        for f in _TOKENIZER_SIDE_FILES:
            if (model_dir / f).is_file():
                shutil.copy2(model_dir / f, stage / f)
        (stage / "tokenizer.json").write_text(json.dumps(new_data, ensure_ascii=False), encoding="utf-8")
        hf_tok = AutoTokenizer.from_pretrained(str(stage))
        hf_tok.save_pretrained(str(final))
        if (model_dir / "generation_config.json").is_file():
            shutil.copy2(model_dir / "generation_config.json", final / "generation_config.json")
        save_hf(tensors(), replace(args, vocab_size=rows.vocab_size), cfg, out_dir, source_dir=final)
    return new_backend, AutoTokenizer.from_pretrained(str(out_dir))


def _report(model_dir: Path, init: str, ext: BPEExtender, args, rows: _Rows, picked: _Picked,
            unreachable: list[str], base_merges: int) -> dict:
    return {
        "base_model": str(model_dir),
        "init": init,
        "base_tokenizer_len": ext.base_len,
        "tokenizer_len": rows.new_len,
        "base_vocab_size": args.vocab_size,
        "vocab_size": rows.vocab_size,
        "padding_rows": rows.vocab_size - rows.new_len,
        "padding_reason": rows.padding_reason,
        "tied_embeddings": args.tie_word_embeddings,
        "new_ids": [ext.base_len, rows.new_len],
        "num_added": len(picked.added),
        "num_intermediate": len(picked.intermediate),
        "added": [{"token": ext.text_of(f), "form": f, "id": ext.vocab[f]} for f in picked.added],
        "intermediate": [{"token": ext.text_of(f), "form": f, "id": ext.vocab[f]} for f in picked.intermediate],
        "skipped": picked.skipped,
        "unreachable": unreachable,
        "merges_added": len(ext.merges) - base_merges,
    }


def _corpus_report(docs: list[str], old, new_backend, exported) -> dict:
    """Tokens per character before/after on `docs`, and checks that the exported tokenizer encodes
    as the one built and that decoding gives back what the old tokenizer decodes."""
    before, after = tokens_per_char(old, docs), tokens_per_char(new_backend, docs)
    sample = docs[:200]
    enc = exported.backend_tokenizer.encode_batch(sample, add_special_tokens=False)
    agree = all(e.ids == n.ids for e, n in zip(enc, new_backend.encode_batch(sample, add_special_tokens=False)))
    roundtrip = sum(new_backend.decode(e.ids) == old.decode(o.ids)
                    for e, o in zip(enc, old.encode_batch(sample, add_special_tokens=False)))
    return {"docs": len(docs), "before": before, "after": after,
            "reduction": 1 - after["tokens_per_char"] / before["tokens_per_char"],
            "exported_tokenizer_agrees": agree,
            "roundtrip_docs_ok": roundtrip, "roundtrip_docs_checked": len(sample)}


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Command


def run(args) -> int:
    """`megacpt extend-vocab` (parser: megacpt/cli/vocab.py)."""
    if args.tokens is not None:
        if args.num_tokens is not None:
            raise UserError("--num-tokens goes with --train-bpe, not --tokens; drop it")
        tokens = read_token_file(args.tokens)
        report_corpus = args.report_corpus
    else:
        if args.num_tokens is None or args.num_tokens < 1:
            raise UserError("--train-bpe needs --num-tokens K (K ≥ 1 new vocabulary entries)")
        data = load_tokenizer_json(args.model)
        learned = learn_bpe_tokens(data, args.train_bpe, args.num_tokens, args.text_key, args.max_chars)
        tokens = ModelForms(learned, max_new=args.num_tokens)
        report_corpus = args.report_corpus or args.train_bpe
    r = extend_vocab(args.model, args.output, tokens, args.init, report_corpus=report_corpus, text_key=args.text_key,
                     pad_to_multiple_of=args.pad_to_multiple_of)
    print(f"added {r['num_added']} tokens (+{r['num_intermediate']} intermediate), ids {r['new_ids'][0]}.."
          f"{r['new_ids'][1] - 1}; tokenizer {r['base_tokenizer_len']} -> {r['tokenizer_len']}, "
          f"model vocab_size {r['base_vocab_size']} -> {r['vocab_size']}"
          + (f" ({r['padding_reason']})" if r["padding_reason"] else ""))
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} (see {REPORT_FILE}), e.g. {r['skipped'][0]['token']!r}: "
              f"{r['skipped'][0]['reason']}")
    if r["unreachable"]:
        print(f"warning: {len(r['unreachable'])} added tokens do not encode as one id", file=sys.stderr)
    c = r.get("corpus")
    if c:
        print(f"tokens per character on {c['path']}: {c['before']['tokens_per_char']:.4f} -> "
              f"{c['after']['tokens_per_char']:.4f} ({100 * c['reduction']:.1f}% fewer tokens)")
    print(f"wrote {args.output} ({REPORT_FILE})")
    return 0
