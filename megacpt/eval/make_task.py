"""`megacpt make-task`: an lm-evaluation-harness task (DIR/NAME.yaml + DIR/NAME.jsonl) made from
your own held-out text, to probe a domain that no public benchmark covers.

Inputs are token shards (decoded with the tokenizer that made them) or text files (the readers of
`megacpt prepare`). Each document is cut into sentences (segment); a task item never spans two
documents. Two kinds:

- cloze (LAMBADA-style, output_type loglikelihood; metrics acc = the target is the greedy
  continuation, and perplexity): {"context": passage without its last word, "target": " word"}.
  The passage is consecutive whole sentences of one document, at most --max-tokens tokens, ending
  with a sentence. CLOZE_FILTER below says which passages are kept.
- continuation (HellaSwag-style, output_type multiple_choice; metrics acc and acc_norm):
  {"context": sentences, "choices": [K sentences], "label": index of the true next sentence}; the
  other K-1 choices are sentences of other documents, of similar length in tokens where there are.

The output is a pure function of (inputs, tokenizer, options, --seed): same inputs and seed, same
bytes. When fewer usable items exist than --n asks for, nothing is written and the command fails
(exit 2), so that a probe never silently shrinks.
"""

from __future__ import annotations

import bisect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from megacpt import atomic
from megacpt.data.indexed import IndexedDataset, list_shard_prefixes, sharded_prefixes
from megacpt.data.readers import Undecodable, resolve_inputs, to_text
from megacpt.data.sidecar import read_sidecar
from megacpt.data.tokenizer import Encoder, TokenizerInfo, load_tokenizer
from megacpt.errors import DataError, UserError
from megacpt.eval.passkey import main_passkey, parse_cells

MIN_CONTEXT_TOKENS = 16  # a shorter context says too little to predict anything from
MIN_ENDING_WORDS = 4  # continuation choices: whole sentences, not fragments like "See below."
MAX_ENDING_TOKENS = 64
MIN_TARGET_LETTERS = 3
DISTRACTOR_TRIES = 20  # random draws per missing distractor before widening the search

CLOZE_FILTER = (
    "passage = whole sentences of one document, at most max_tokens tokens, ending with . ! or ?; "
    "target = the passage's last word before that punctuation, preceded by a space, only letters "
    f"(no digits, hyphens or apostrophes), at least {MIN_TARGET_LETTERS} of them; the target does "
    "not occur as a word in the context (case-insensitive, whole words); the context (the passage "
    f"up to the space before the target) has at least {MIN_CONTEXT_TOKENS} tokens; the closing "
    "punctuation is dropped; repeated (context, target) pairs kept once"
)
CONTINUATION_FILTER = (
    "context = consecutive sentences of one document right before the ending, at most max_tokens "
    f"and at least {MIN_CONTEXT_TOKENS} tokens; ending and distractors = sentences that end with . ! "
    f"or ?, with at least {MIN_ENDING_WORDS} words and at most {MAX_ENDING_TOKENS} tokens; "
    "distractors come from other documents, preferably within 2/3..3/2 of the ending's length in "
    "tokens, all choices distinct (case-insensitive); label = position of the true ending, drawn "
    "uniformly; repeated (context, ending) pairs kept once"
)

_SPACES = re.compile(r"[^\S\n]+")
_CLOSERS = "\"'”’»)\\]"
# A sentence ends at . ! ? (plus closing quotes or brackets) followed by a space and a character
# that is not a lower-case letter ("etc. and" does not end a sentence).
_BREAK = re.compile(rf"[.!?][{_CLOSERS}]*( )(?=\S)")
_INITIALS = re.compile(r"(?:^|[\s(])(?:[^\W\d_]\.)+$")
_TERMINATED = re.compile(rf"[.!?][{_CLOSERS}]*$")
_CLOZE_END = re.compile(rf" ([^\W\d_]{{{MIN_TARGET_LETTERS},}})[.!?]+[{_CLOSERS}]*$")
_WORD = re.compile(r"[^\W\d_]+")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Sentence:
    text: str
    sep: str  # what joins it to the sentence before it: " " within a line, "\n" at a line break
    terminated: bool


def segment(text: str) -> list[Sentence]:
    """A document's sentences, whitespace normalised. A line break ends a sentence, except that a
    line starting in lower case continues an unfinished sentence before it (wrapped text)."""
    out: list[Sentence] = []
    for raw in text.split("\n"):
        line = _SPACES.sub(" ", raw).strip()
        if not line:
            continue
        for i, piece in enumerate(_split_line(line)):
            done = bool(_TERMINATED.search(piece))
            if i == 0 and out and not out[-1].terminated and piece[0].islower():
                prev = out[-1]
                out[-1] = Sentence(f"{prev.text} {piece}", prev.sep, done)
            else:
                out.append(Sentence(piece, (" " if i else "\n") if out else "", done))
    return out


def _split_line(line: str) -> list[str]:
    pieces, start = [], 0
    for m in _BREAK.finditer(line):
        # Initials and abbreviations of single letters ("z. B.", "e.g.", "J. Smith") go on.
        if not line[m.end()].islower() and not _INITIALS.search(line, 0, m.start(1)):
            pieces.append(line[start : m.start(1)])
            start = m.end()
    pieces.append(line[start:])
    return pieces


def join(sents: list[Sentence], a: int, b: int) -> str:
    """Sentences a..b-1 as one passage."""
    return sents[a].text + "".join(s.sep + s.text for s in sents[a + 1 : b])


class TokenCounter:
    """Token counts with the task's tokenizer: estimates per sentence, exact per passage."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def sentences(self, sents: list[Sentence]) -> list[int]:
        # With the leading space a sentence's count is close to what it adds inside a passage.
        return [len(ids) for ids in self.encoder.encode([" " + s.text for s in sents])]

    def text(self, text: str) -> int:
        return len(self.encoder.encode([text])[0])


# --- cloze


def cloze_item(passage: str) -> dict | None:
    """The cloze item of a passage, or None when its last word fails the filter (CLOZE_FILTER;
    the token-length conditions are checked by the caller)."""
    m = _CLOZE_END.search(passage)
    if not m:
        return None
    word, context = m.group(1), passage[: m.start()]
    if word.lower() in {w.lower() for w in _WORD.findall(context)}:
        return None
    return {"context": context, "target": " " + word}


def cloze_candidates(sents: list[Sentence], counts: list[int], counter: TokenCounter, max_tokens: int) -> list[dict]:
    """Non-overlapping cloze items of one document: from each start, the longest passage within
    max_tokens whose last word passes the filter; the next passage starts after it."""
    items, a = [], 0
    while a < len(sents):
        b, total = a, 0
        while b < len(sents) and total + counts[b] <= max_tokens:
            total += counts[b]
            b += 1
        if b == a:  # one sentence longer than a whole passage may be
            a += 1
            continue
        found = None
        for end in range(b, a, -1):
            if not sents[end - 1].terminated:
                continue
            passage = join(sents, a, end)
            item = cloze_item(passage)
            if item is None or counter.text(passage) > max_tokens:
                continue
            if counter.text(item["context"]) < MIN_CONTEXT_TOKENS:
                break  # shorter passages have shorter contexts still
            found = end, item
            break
        if found is None:
            a = b
        else:
            items.append(found[1])
            a = found[0]
    return items


# --- continuation


def _ending_ok(sent: Sentence, count: int) -> bool:
    return sent.terminated and count <= MAX_ENDING_TOKENS and len(_WORD.findall(sent.text)) >= MIN_ENDING_WORDS


def continuation_candidates(sents: list[Sentence], counts: list[int], counter: TokenCounter,
                            max_tokens: int) -> list[tuple[str, str, int]]:
    """(context, ending, ending tokens) of one document: each usable ending with as many whole
    sentences before it as fit in max_tokens; contexts do not overlap earlier items' text."""
    items, floor = [], 0
    for j in range(1, len(sents)):
        if not _ending_ok(sents[j], counts[j]):
            continue
        start, total = j, 0
        while start > floor and total + counts[start - 1] <= max_tokens:
            start -= 1
            total += counts[start]
        context = join(sents, start, j) if start < j else ""
        while start < j and counter.text(context) > max_tokens:  # the estimate was low
            start += 1
            context = join(sents, start, j) if start < j else ""
        if not context or counter.text(context) < MIN_CONTEXT_TOKENS:
            continue
        items.append((context, sents[j].text, counts[j]))
        floor = j + 1
    return items


@dataclass
class Pool:
    """Every sentence that may serve as a choice, sorted by length in tokens."""

    lengths: list[int]
    entries: list[tuple[int, str, int]]  # (tokens, text, document)

    @classmethod
    def build(cls, docs_sents, docs_counts) -> "Pool":
        entries = sorted(
            (c, s.text, d)
            for d, (sents, counts) in enumerate(zip(docs_sents, docs_counts))
            for s, c in zip(sents, counts)
            if _ending_ok(s, c)
        )
        return cls([e[0] for e in entries], entries)

    def distractors(self, ending: str, tokens: int, doc: int, k: int, rng: random.Random) -> list[str] | None:
        """k sentences of other documents, distinct from each other and from the ending, of
        similar length where the pool has them; None when the pool cannot supply k."""
        lo = bisect.bisect_left(self.lengths, (2 * tokens) // 3)
        hi = bisect.bisect_right(self.lengths, (3 * tokens + 1) // 2)
        seen = {ending.casefold()}
        chosen: list[str] = []
        for band in ((lo, hi), (0, len(self.entries))):
            for _ in range(DISTRACTOR_TRIES * k):
                if len(chosen) == k or band[1] <= band[0]:
                    break
                _, text, d = self.entries[rng.randrange(*band)]
                if d != doc and text.casefold() not in seen:
                    seen.add(text.casefold())
                    chosen.append(text)
        return chosen if len(chosen) == k else None


# --- items


@dataclass
class Options:
    kind: str
    n: int | None
    seed: int
    max_tokens: int
    choices: int


def _first_of_each(pairs, key):
    """pairs without repeats of key(pair), in order: text such as gettext catalogs repeats whole
    passages, and an item twice would count twice."""
    seen, out = set(), []
    for p in pairs:
        k = key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def make_items(docs: list[str], counter: TokenCounter, opts: Options) -> tuple[list[dict], int]:
    """The task's items (in their final order) and how many usable candidates there were."""
    rng = random.Random(opts.seed)
    docs_sents = [segment(d) for d in docs]
    docs_counts = [counter.sentences(s) if s else [] for s in docs_sents]
    if opts.kind == "cloze":
        cands = _first_of_each(
            [item
             for sents, counts in zip(docs_sents, docs_counts)
             for item in cloze_candidates(sents, counts, counter, opts.max_tokens)],
            key=lambda it: (it["context"], it["target"]),
        )
        rng.shuffle(cands)
        items = cands if opts.n is None else cands[: opts.n]
        return items, len(cands)
    conts = _first_of_each(
        [(d, cand)
         for d, (sents, counts) in enumerate(zip(docs_sents, docs_counts))
         for cand in continuation_candidates(sents, counts, counter, opts.max_tokens)],
        key=lambda dc: dc[1][:2],
    )
    rng.shuffle(conts)
    pool = Pool.build(docs_sents, docs_counts)
    items, usable = [], 0
    for d, (context, ending, tokens) in conts:
        others = pool.distractors(ending, tokens, d, opts.choices - 1, rng)
        if others is None:
            continue
        usable += 1
        if opts.n is None or len(items) < opts.n:
            label = rng.randrange(opts.choices)
            items.append({"context": context, "choices": others[:label] + [ending] + others[label:], "label": label})
    return items, usable


# --- inputs


def shard_prefixes(raw: str) -> list[str] | None:
    """The shard prefixes an input names, or None when it is a text input."""
    p = Path(raw)
    if raw.endswith((".idx", ".bin")) and p.is_file():
        return [raw[:-4]]
    if Path(raw + ".idx").is_file():
        return [raw]
    if p.is_dir() and any(p.glob("*.idx")):
        return list_shard_prefixes(raw)
    if not p.exists():
        parts = sharded_prefixes(raw)
        if parts:
            return parts
        raise DataError(f"input {raw} does not exist; pass a shard prefix (PREFIX.idx/.bin) or a text file")
    return None


def _check_tokenizer(raw: str, prefix: str, info: TokenizerInfo) -> None:
    side = read_sidecar(prefix)
    if side is None:
        return  # shards from elsewhere (Megatron, GPT-NeoX): nothing recorded to check against
    made = side.get("tokenizer", {})
    if made.get("vocab_hash") and made["vocab_hash"] != info.vocab_hash:
        raise DataError(
            f"{raw} was tokenized with {made.get('name_or_path')}, whose vocabulary differs from "
            f"{info.name}; pass that tokenizer with --tokenizer"
        )


def read_documents(paths: list[str], info: TokenizerInfo, text_key: str) -> list[str]:
    """The documents' texts, inputs in the order given: shard documents decoded, text records as
    `megacpt prepare` reads them (undecodable records skipped)."""
    encoder = Encoder(info.spec)
    docs: list[str] = []
    for raw in paths:
        prefixes = shard_prefixes(raw)
        if prefixes is not None:
            for prefix in prefixes:
                _check_tokenizer(raw, prefix, info)
                ds = IndexedDataset(prefix)
                if len(ds) and int(ds.all_tokens.max(initial=0)) >= info.vocab_size:
                    raise DataError(f"{prefix}: token ids beyond the vocabulary of {info.name}; pass the tokenizer that made it")
                docs.extend(encoder.decode(ds[i]) for i in range(len(ds)))
            continue
        for src in resolve_inputs([raw], "file", text_key):
            for loc, payload, kind in src.records():
                try:
                    text = to_text(kind, payload, text_key, src.path, src.unit, loc)
                except Undecodable:
                    continue
                if text and text.strip():
                    docs.append(text)
    return docs


# --- output


def task_config(name: str, jsonl: Path, opts: Options, meta: dict) -> dict:
    cfg = {
        "task": name,
        "dataset_path": "json",
        # lm-eval hands data_files to datasets.load_dataset, which resolves a relative path from
        # the working directory, not from this file: the path is absolute so any cwd works.
        "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}},
        "test_split": "test",
    }
    if opts.kind == "cloze":
        cfg |= {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target"}
        metrics = [("acc", "mean", True), ("perplexity", "perplexity", False)]
    else:
        cfg |= {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_target": "label",
                "doc_to_choice": "choices"}
        metrics = [("acc", "mean", True), ("acc_norm", "mean", True)]
    cfg["metric_list"] = [{"metric": m, "aggregation": a, "higher_is_better": h} for m, a, h in metrics]
    cfg["metadata"] = {"version": 1.0, **meta}
    return cfg


def render_yaml(cfg: dict, opts: Options) -> str:
    rule = CLOZE_FILTER if opts.kind == "cloze" else CONTINUATION_FILTER
    head = [
        f"# lm-evaluation-harness task written by `megacpt make-task --kind {opts.kind}` (seed {opts.seed}).",
        f"# Items: {cfg['metadata']['data_file']} next to this file. Filter: {rule}.",
        "# Moving this folder: re-run make-task there, or edit dataset_kwargs.data_files.test.",
    ]
    body = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=4096)
    return "\n".join(head) + "\n" + body


def write_task(out: Path, name: str, items: list[dict], opts: Options, meta: dict) -> tuple[Path, Path]:
    """DIR/NAME.jsonl then DIR/NAME.yaml, each written to a temporary name and renamed, the YAML
    last: lm-eval only sees the task once its data is complete."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl, yml = out / f"{name}.jsonl", out / f"{name}.yaml"
    meta = {**meta, "data_file": jsonl.name}
    data = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    text = render_yaml(task_config(name, jsonl, opts, meta), opts)
    for path, content in ((jsonl, data), (yml, text)):
        atomic.write_text(path, content)
    return yml, jsonl


def _check_args(args) -> tuple[Options, Path, str]:
    if args.n is not None and args.n < 1:
        raise UserError(f"--n {args.n} must be at least 1")
    if args.choices < 2:
        raise UserError(f"--choices {args.choices} must be at least 2 (the true ending and a distractor)")
    if args.max_tokens < 2 * MIN_CONTEXT_TOKENS:
        raise UserError(f"--max-tokens {args.max_tokens} must be at least {2 * MIN_CONTEXT_TOKENS}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a directory for NAME.yaml and NAME.jsonl")
    name = args.name or re.sub(r"\W", "_", f"{out.resolve().name}_{args.kind}")
    if not _NAME.fullmatch(name):
        raise UserError(f"task name {name!r}: use letters, digits and _ starting with a letter (pass --name)")
    opts = Options(args.kind, args.n, args.seed, args.max_tokens, args.choices)
    return opts, out, name


def main_args(args) -> int:
    opts, out, name = _check_args(args)
    if not args.inputs:
        raise UserError("no --from input given; pass token shard prefixes or text files")
    passkey = parse_cells(args.lengths, args.depths, args.n, args.seed) if opts.kind == "passkey" else None
    info = load_tokenizer(args.tokenizer)
    docs = read_documents(args.inputs, info, args.text_key)
    if passkey is not None:
        return main_passkey(args, passkey, name, out, docs, TokenCounter(Encoder(info.spec)).text)
    items, usable = make_items(docs, TokenCounter(Encoder(info.spec)), opts)
    wanted = opts.n or 1
    if usable < wanted:
        raise DataError(
            f"only {usable} usable {opts.kind} items in {len(docs)} documents (asked for {wanted}); "
            f"lower --n or add text"
        )
    meta = {"kind": opts.kind, "seed": opts.seed, "items": len(items), "max_tokens": opts.max_tokens,
            "sources": [str(p) for p in args.inputs], "tokenizer": str(args.tokenizer),
            "filter": CLOZE_FILTER if opts.kind == "cloze" else CONTINUATION_FILTER}
    if opts.kind == "continuation":
        meta["choices"] = opts.choices
    yml, _ = write_task(out, name, items, opts, meta)
    print(f"{yml}: {len(items)} {opts.kind} items (of {usable} usable) from {len(docs)} documents, task {name}")
    return 0
