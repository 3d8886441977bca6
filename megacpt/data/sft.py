"""Instruction data for `task: sft`: JSON Lines → token ids with a loss mask → packed rows.

Each line is {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]}:
- prompt/response: tokenizer(prompt) (with the tokenizer's own special tokens, e.g. a BOS) +
  tokenizer(response) + EOS. Loss on the response and the EOS, so the model learns to stop.
- messages: rendered with the tokenizer's chat template. Loss on every assistant turn: the tokens
  the template adds after the generation prompt, up to and including its end-of-turn marker. A
  turn's span comes from rendering the conversation up to it, which needs a template that renders
  a prefix of a conversation as a prefix of the whole (checked per example).
Tokenizing happens at start-up on every rank (instruction sets are small); it is deterministic,
so every rank builds the same examples and no prepare step or cache can go stale.

Packing: examples are laid end to end into rows of seq_len positions (an example of n tokens
takes n-1 positions: inputs ids[:-1], labels ids[1:]). Each example is its own segment, so the
model's document masking keeps attention inside it and restarts positions at 0; the remainder of
a row is padding (its own segment, labels ignored). An example longer than seq_len+1 tokens is
cut to fit.

Order: epoch e visits all examples of a source in a permutation seeded by (source seed, e); rows
are filled greedily in that order, epochs back to back. Blending sources uses the CPT rule
(greatest sampling error, per row). Row i is therefore a pure function of (files, tokenizer,
seq_len, seed), independent of the world size and of how many rows are asked for: resuming is
skipping `consumed_samples` rows, as for CPT.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megacpt.data.dataset import blend_assignment, source_seed
from megacpt.errors import ConfigError, DataError
from megacpt.labels import IGNORE

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: np.ndarray  # int64 (n,)
    predict: np.ndarray  # bool (n,): True where the token is a training target (response)
    prompt: list  # ids of the generation prompt (everything before the last response)
    reference: str  # the last response's text, for exact match / F1 / BLEU
    where: str  # file:line


@dataclass
class Tokenizer:
    """The transformers tokenizer plus what SFT needs from it."""

    tok: object
    path: str
    eos_id: int
    stop_ids: tuple  # generation ends at any of these

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path) -> Tokenizer:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer  # heavy (seconds): only runs with an SFT phase need it

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"sft tokenizer dir {path} does not exist; set sft.tokenizer to a dir with tokenizer files")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load a tokenizer from {path} ({first[:200]}); set sft.tokenizer to a dir with "
                          f"tokenizer files") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {path} has no EOS token; SFT appends one to every response so the model "
                          f"learns to stop: use a tokenizer that defines eos_token")
    stops = {int(tok.eos_token_id)}
    gen = p / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        stops.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    return Tokenizer(tok, str(p), int(tok.eos_token_id), tuple(sorted(stops)))


def _files(path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".jsonl")
        if not files:
            raise DataError(f"{path}: directory holds no .jsonl files; SFT data is JSON Lines of "
                            f'{{"prompt", "response"}} or {{"messages"}}')
        return files
    if not p.is_file():
        raise DataError(f"{path}: no such SFT data file; point the path at a .jsonl file or a directory of them")
    return [p]


def _chat_ids(tok, messages, where: str = "", **kw) -> list[int]:
    try:
        out = tok.apply_chat_template(messages, tokenize=True, **kw)
    except Exception as e:  # jinja raises its own types, and templates may raise on purpose
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: the tokenizer's chat template rejected these messages ({first})") from None
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in recent transformers
        out = out["input_ids"]
    return [int(i) for i in out]


def _parse_line(rec, where: str, tk: Tokenizer):
    """(ids, predict, prompt ids, reference) of one JSON record."""
    tok = tk.tok
    if not isinstance(rec, dict):
        raise DataError(f'{where}: expected a JSON object {{"prompt", "response"}} or {{"messages"}}, '
                        f"got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}")
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: each message needs a role and a content, got {str(m)[:80]}")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message content must be a string, got {type(m['content']).__name__}")
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{where}: no assistant message, so nothing to learn; add the assistant's reply")
        if any(not msgs[i]["content"].strip() for i in turns):
            raise DataError(f"{where}: empty assistant response; fill it in or drop the line")
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{where}: chat messages need a tokenizer with a chat template and {tk.path} has none; "
                            f"use prompt/response lines or set sft.tokenizer to a tokenizer with one")
        ids = _chat_ids(tok, msgs, where)
        predict = np.zeros(len(ids), dtype=bool)
        prompt = None
        for i in turns:
            start = _chat_ids(tok, msgs[:i], where, add_generation_prompt=True)
            end = _chat_ids(tok, msgs[: i + 1], where)
            if ids[: len(end)] != end or end[: len(start)] != start:
                raise DataError(f"{where}: the chat template of {tk.path} does not render a conversation's beginning "
                                f"as a prefix of the whole, so assistant turns cannot be located; use prompt/response")
            predict[len(start): len(end)] = True
            prompt = start
        reference = msgs[turns[-1]]["content"]
        return np.asarray(ids, dtype=np.int64), predict, prompt, reference
    missing = [k for k in ("prompt", "response") if k not in rec]
    if missing:
        raise DataError(f'{where}: expected {{"prompt", "response"}} or {{"messages": [...]}}, missing '
                        f"{' and '.join(missing)} (keys present: {', '.join(map(str, rec)) or 'none'})")
    prompt_text, response = rec["prompt"], rec["response"]
    if not isinstance(prompt_text, str) or not isinstance(response, str):
        raise DataError(f"{where}: prompt and response must be strings")
    if not response.strip():
        raise DataError(f"{where}: empty response; fill it in or drop the line")
    p_ids = [int(i) for i in tok(prompt_text)["input_ids"]]
    r_ids = [int(i) for i in tok(response, add_special_tokens=False)["input_ids"]] + [tk.eos_id]
    ids = np.asarray(p_ids + r_ids, dtype=np.int64)
    predict = np.zeros(len(ids), dtype=bool)
    predict[len(p_ids):] = True
    return ids, predict, p_ids, response


def load_examples(path, tk: Tokenizer, seq_len: int, vocab_size: int) -> tuple[list[Example], int]:
    """Examples of a .jsonl file (or directory of them) and how many were cut to seq_len+1 tokens."""
    out, cut = [], 0
    for f in _files(path):
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: cannot read ({e}); SFT data must be UTF-8 JSON Lines") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{f}:{n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            ids, predict, prompt, reference = _parse_line(rec, where, tk)
            if len(ids) and int(ids.max()) >= vocab_size:
                raise DataError(f"{where}: token id {int(ids.max())} ≥ model vocab {vocab_size}; the tokenizer "
                                f"{tk.path} does not belong to this model (set sft.tokenizer)")
            if len(ids) > seq_len + 1:
                ids, predict = ids[: seq_len + 1], predict[: seq_len + 1]
                cut += 1
            if not predict[1:].any():
                raise DataError(f"{where}: the prompt fills all data.seq_len={seq_len} positions, leaving no "
                                f"response token to learn; raise data.seq_len or shorten the prompt")
            out.append(Example(ids, predict, prompt, reference, where))
    if not out:
        raise DataError(f"{path}: no examples (empty file); add JSON Lines of prompt/response or messages")
    return out, cut


def pack(lengths, order, seq_len: int, num_rows: int | None = None) -> list[list[int]]:
    """Greedy in-order packing: examples of `order` fill rows of seq_len positions.

    With num_rows, `order` is an iterator that may be endless and exactly num_rows rows are
    returned; without, every example is placed and the last row may be partly empty. Row i never
    depends on num_rows (rows close only when the next example does not fit).
    """
    if num_rows == 0:  # a source the blend gives no rows (its stream may be endless)
        return []
    rows, cur, used = [], [], 0
    for k in order:
        n = int(lengths[k])
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
            if num_rows is not None and len(rows) == num_rows:
                return rows
        cur.append(int(k))
        used += n
    if cur and num_rows is None:
        rows.append(cur)
    return rows


def build_row(examples: list[Example], seq_len: int) -> dict:
    """input_ids, labels, segments (each (seq_len,) int64) of examples packed in one row."""
    inp = np.zeros(seq_len, dtype=np.int64)
    lab = np.full(seq_len, IGNORE, dtype=np.int64)
    seg = np.full(seq_len, len(examples), dtype=np.int64)  # padding: a segment of its own
    pos = 0
    for j, ex in enumerate(examples):
        n = len(ex.ids) - 1
        inp[pos: pos + n] = ex.ids[:-1]
        lab[pos: pos + n] = np.where(ex.predict[1:], ex.ids[1:], IGNORE)
        seg[pos: pos + n] = j
        pos += n
    return {"input_ids": inp, "labels": lab, "segments": seg, "tokens": pos}


def _source_seed(seed: int, name: str) -> int:
    return source_seed(seed, "sft\x00" + name)


class SFTDataset:
    """Packed rows of one or more SFT sources, blended by weight (see the module docstring).

    `ds[i]` is {"input_ids", "labels", "segments"} ((seq_len,) int64 each), "source", "tokens".
    """

    def __init__(self, sources: list[tuple[str, list[Example], float]], seq_len: int, seed: int, num_samples: int):
        self.seq_len, self.num_samples = int(seq_len), int(num_samples)
        self.names = [s[0] for s in sources]
        self.examples = [s[1] for s in sources]
        total = sum(s[2] for s in sources)
        self._source = blend_assignment([s[2] / total for s in sources], self.num_samples)
        self._positions = [np.flatnonzero(self._source == k) for k in range(len(sources))]
        self._rows, self._cum_tokens = [], []
        for (name, exs, _), pos in zip(sources, self._positions):
            lengths = np.array([len(e.ids) - 1 for e in exs], dtype=np.int64)
            rows = pack(lengths, self._stream(len(exs), _source_seed(seed, name)), self.seq_len, len(pos))
            self._rows.append(rows)
            self._cum_tokens.append(np.concatenate([[0], np.cumsum([lengths[r].sum() for r in rows])]).astype(np.int64))

    @staticmethod
    def _stream(n: int, seed: int):
        e = 0
        while True:
            yield from np.random.default_rng(np.random.SeedSequence([seed, e])).permutation(n)
            e += 1

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> dict:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        k = int(self._source[i])
        r = int(np.searchsorted(self._positions[k], i))
        row = build_row([self.examples[k][j] for j in self._rows[k][r]], self.seq_len)
        row["source"] = k
        return row

    def tokens_per_source(self, num_consumed_samples: int) -> dict[str, int]:
        """Example tokens (positions, padding excluded) each source contributed to rows [0, n)."""
        n = int(num_consumed_samples)
        return {name: int(cum[int(np.searchsorted(pos, n))])
                for name, pos, cum in zip(self.names, self._positions, self._cum_tokens)}


def rank_batches(dataset: SFTDataset, first_sample: int, mb: int, gas: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This rank's micro-batches of a global batch, in the same sample layout as CPT's."""
    import torch  # heavy: the rest of the data layer runs on numpy alone (prepare, merge, checks)

    out = []
    for m in range(gas):
        base = first_sample + m * mb * dp_size + dp_rank * mb
        rows = [dataset[base + j] for j in range(mb)]
        batch = {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in ("input_ids", "labels", "segments")}
        batch["fingerprint"] = sum(zlib.crc32(r["input_ids"].tobytes()) for r in rows)
        out.append(batch)
    return out


@dataclass
class EvalSet:
    name: str
    rows: list  # build_row dicts, examples packed in file order
    prompts: list  # generation prompts of the first sft.eval_examples examples
    references: list


def build(cfg, phases, vocab_size: int, tokenizer_dir) -> tuple[Tokenizer, dict, int]:
    """Sets each phase's dataset; returns the tokenizer, the held-out sets and the number of
    examples cut to fit. Every input problem is a DataError/ConfigError naming file and line."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: add at least one {name, path, weight} source of SFT JSON Lines")
    tdir = cfg.sft.tokenizer or tokenizer_dir
    if not tdir:
        raise ConfigError("sft.tokenizer is not set and the model has no HF dir to take the tokenizer from; "
                          "set sft.tokenizer")
    tk = load_tokenizer(tdir)
    S = cfg.data.seq_len
    cache, cut = {}, 0

    def examples(src, group, i):
        nonlocal cut
        if src.path not in cache:
            try:
                cache[src.path] = load_examples(src.path, tk, S, vocab_size)
            except DataError as e:
                raise DataError(f"{group}.{i} ({src.name}): {e}") from None
            cut += cache[src.path][1]
        return cache[src.path][0]

    for p in phases:
        srcs = [(s.name, examples(s, "data.train", i), s.weight) for i, s in enumerate(p.sources)]
        p.dataset = SFTDataset(srcs, S, p.seed, (p.steps + cfg.train.max_rollbacks) * p.global_batch)
    sets = {}
    keep = S - cfg.sft.max_new_tokens
    for i, v in enumerate(cfg.data.valid):
        exs = examples(v, "data.valid", i)
        rows = [build_row([exs[j] for j in r], S) for r in pack([len(e.ids) - 1 for e in exs], range(len(exs)), S)]
        gen = exs[: cfg.sft.eval_examples]
        # Prompt and generation share the sequence: a long prompt keeps its end.
        sets[v.name] = EvalSet(v.name, rows, [e.prompt[-keep:] for e in gen], [e.reference for e in gen])
    return tk, sets, cut
