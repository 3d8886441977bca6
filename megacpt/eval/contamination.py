"""`megacpt contamination`: which evaluation items share a token n-gram with the training shards.

Everything happens in token-id space. The evaluation side is small: every n-gram of every item is
hashed to 64 bits into a sorted array (`--exact`: a Python set of token tuples). The training side
may be larger than memory: each shard is read in blocks of BLOCK_TOKENS tokens (with n-1 tokens of
overlap, so no n-gram is lost at a block edge), the rolling hashes of a block are computed with
numpy and looked up in the evaluation array; worker processes take ranges of the shards. Each
process holds one block and the evaluation structures, whatever the size of the corpus.

Definitions (docs/CONTAMINATION.md has the JSON schema and the false-positive rate):
- an item is one JSON record of a task's evaluated split, or one document of an evaluation shard;
  each string of a record (also inside lists and objects) is tokenized on its own, so no n-gram
  spans two fields;
- an item is contaminated by a source when one of its n-grams occurs in the source's tokens; its
  covered tokens are those inside such an n-gram;
- a field shorter than n tokens contributes no n-gram; an item with no n-gram at all is "short",
  counted in `short_items` and left out of `checked_items`, the denominator of `item_fraction`.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from megacpt import atomic
from megacpt.data.indexed import IndexedDataset, bin_path, list_shard_prefixes
from megacpt.data.sidecar import read_sidecar
from megacpt.data.tokenizer import Encoder, TokenizerInfo, load_tokenizer
from megacpt.data.workers import close_pool
from megacpt.errors import DataError, UserError
from megacpt.eval.task_yaml import parse_task_yaml

HASH_BITS = 64
BLOCK_TOKENS = 1 << 16  # training tokens hashed at once by one process (~40 bytes each; cache-sized)
CHUNK_TOKENS = 4 << 20  # n-gram start positions per worker task (small: even shares per worker)
LISTED_IDS = 20  # contaminated item ids written per source in the JSON
_ENCODE_BATCH = 1024

# splitmix64's constants: an odd base for the polynomial and the finaliser's multipliers.
_SEED = np.uint64(0x9E3779B97F4A7C15)
_BASE = np.uint64(0xC2B2AE3D27D4EB4F)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S6, _S63, _ONE = np.uint64(6), np.uint64(63), np.uint64(1)


# ----------------------------------------------------------------------------- hashing


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: a bijection of uint64 that spreads every input bit."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def ngram_hashes(tokens, n: int) -> np.ndarray:
    """The 64-bit hash of every n-gram of `tokens` (len - n + 1 values, none when shorter).

    Each token id is mixed first (ids are small, structured integers), the n mixed values are
    combined as a polynomial in an odd base modulo 2^64 and the result is mixed again, so equal
    n-grams always hash equal and distinct ones collide like random 64-bit values would.
    """
    t = np.asarray(tokens).astype(np.uint64)
    count = t.size - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    t += _SEED
    _mix64(t)
    h = t[:count].copy()
    for j in range(1, n):
        h *= _BASE
        h += t[j : j + count]
    return _mix64(h)


class Matcher:
    """Finds the evaluation n-grams present in a block of training tokens.

    Hashed: `keys` is the sorted array of distinct evaluation hashes; a bit set indexed by the
    top bits of a hash discards most training n-grams before the binary search. Exact: `keys`
    holds the distinct n-grams as rows of a 2-D array, looked up as tuples in a dict. Worker
    processes rebuild their Matcher from the keys alone.
    """

    def __init__(self, n: int, keys: np.ndarray, exact: bool):
        self.n, self.keys, self.exact = n, keys, exact
        self._build()

    def _build(self) -> None:
        if self.exact:
            self._ids = {k: i for i, k in enumerate(map(tuple, self.keys.tolist()))}
            return
        # A bit set of 32-64 bits per key, indexed by a hash's top bits: 1 in 32 training n-grams or
        # fewer goes on to the binary search, and the set stays small enough for the CPU caches.
        bits = min(max(math.ceil(math.log2(max(len(self.keys), 1))) + 5, 12), 31)
        self._shift = np.uint64(HASH_BITS - bits)
        self._bits = np.zeros(1 << (bits - 6), dtype=np.uint64)
        slot = self.keys >> self._shift
        np.bitwise_or.at(self._bits, slot >> _S6, np.left_shift(_ONE, slot & _S63))

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    def hits(self, block: np.ndarray) -> np.ndarray:
        """Ids (positions in `keys`) of the evaluation n-grams that occur in `block`, sorted, unique."""
        if self.exact:
            if block.size < self.n:
                return np.zeros(0, np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(block, self.n).tolist()
            found = {self._ids.get(w) for w in map(tuple, windows)}
            found.discard(None)
            return np.array(sorted(found), dtype=np.int64)
        h = ngram_hashes(block, self.n)
        slot = h >> self._shift
        h = h[((self._bits[slot >> _S6] >> (slot & _S63)) & _ONE).astype(bool)]
        if not h.size or not self.keys.size:
            return np.zeros(0, np.int64)
        # Sorted queries walk the keys in order: several times faster than scattered ones.
        h.sort()
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        return np.unique(pos[self.keys[pos] == h]).astype(np.int64)


# ----------------------------------------------------------------------------- evaluation inputs


@dataclass
class EvalSet:
    name: str
    path: str
    kind: str  # "task" | "shards" | "tokens"
    items: list  # per item: a list of 1-D token arrays (its fields)


def _read_task_yaml(path: Path, depth: int = 0) -> dict:
    """A task YAML, with the file named by its `include:` (lm-eval's inheritance) merged beneath."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = parse_task_yaml(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read the task YAML ({e.strerror}); pass an existing file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise DataError(f"{path}: malformed YAML{line}{problem}; fix the task file") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: a task YAML must be a mapping of keys (task, dataset_path, ...)")
    include = cfg.pop("include", None)
    if include:
        if depth >= 8:
            raise DataError(f"{path}: `include:` nested more than 8 deep; flatten the task files")
        base = _read_task_yaml(path.parent / str(include), depth + 1)
        base.update(cfg)
        cfg = base
    return cfg


def _task_data_files(path: Path, cfg: dict) -> list[Path]:
    """The local JSON files of the split lm-eval evaluates (test_split, else validation_split)."""
    fix = "contamination reads tasks with `dataset_path: json` and local `dataset_kwargs: {data_files: ...}`"
    if cfg.get("dataset_path") != "json":
        raise DataError(f"{path}: dataset_path is {cfg.get('dataset_path')!r}, not local data; {fix}")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise DataError(f"{path}: no dataset_kwargs.data_files; {fix}")
    split = cfg.get("test_split") or cfg.get("validation_split") or "train"
    if isinstance(files, dict):
        if split not in files:
            raise DataError(f"{path}: data_files has no {split!r} split (the split the task evaluates)")
        files = files[split]
    files = [files] if isinstance(files, str) else list(files)
    found = []
    for f in files:
        p = Path(str(f))
        # lm-eval hands relative paths to `datasets`, which reads them from the working directory;
        # tasks are usually written with paths next to the YAML, so that is tried first.
        candidates = [p] if p.is_absolute() else [path.parent / p, Path.cwd() / p]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"{path}: data file {f} not found (looked next to the YAML and in the working directory)")
        found.append(hit)
    return found


def _read_records(path: Path) -> list:
    """JSON Lines records (a .json file holding one JSON array is read as that list)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: invalid JSON ({e}); fix the data file") from None
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise DataError(f"{path}:{lineno}: not a JSON record; the task's data must be JSON Lines") from None
    return records


def _strings(value):
    """Every string in a record, in order, looking inside lists and objects."""
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _tokenize_items(records: list, encoder: Encoder) -> list:
    """Each record -> a list of token arrays, one per string field."""
    fields = [list(_strings(r)) for r in records]
    flat = [s for f in fields for s in f]
    ids = []
    for i in range(0, len(flat), _ENCODE_BATCH):
        ids.extend(encoder.encode(flat[i : i + _ENCODE_BATCH]))
    items, k = [], 0
    for f in fields:
        items.append([np.asarray(x, dtype=np.int64) for x in ids[k : k + len(f)]])
        k += len(f)
    return items


def _task_yamls(path: Path) -> list[tuple[Path, dict]]:
    """(file, config) of every task in a YAML file or a directory of them (groups skipped)."""
    if path.is_file():
        cfg = _read_task_yaml(path)
        if isinstance(cfg.get("task"), list):
            raise DataError(f"{path}: a group of tasks; pass the tasks' own YAML files or their directory")
        return [(path, cfg)]
    found = []
    for p in sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]):
        cfg = _read_task_yaml(p)
        if not isinstance(cfg.get("task"), list):
            found.append((p, cfg))
    return found


def _load_tasks(path: Path, name: str | None, tokenizer) -> list[EvalSet]:
    tasks = _task_yamls(path)
    if not tasks:
        raise DataError(f"{path}: holds only task groups, no task YAML; pass the tasks' own files")
    if name and len(tasks) > 1:
        raise UserError(f"{name}={path}: NAME= names one eval set but {path} holds {len(tasks)} tasks; drop NAME=")
    sets = []
    for yaml_path, cfg in tasks:
        records = [r for f in _task_data_files(yaml_path, cfg) for r in _read_records(f)]
        task = cfg.get("task") if isinstance(cfg.get("task"), str) else yaml_path.stem
        sets.append(EvalSet(name or task, str(yaml_path), "task", _tokenize_items(records, tokenizer())))
    return sets


def _load_shards(path: str, name: str | None) -> EvalSet:
    items = []
    for prefix in list_shard_prefixes(path):
        ds = IndexedDataset(prefix)
        items.extend([ds[i]] for i in range(len(ds)))
    return EvalSet(name or Path(path.rstrip("/")).name, path, "shards", items)


def _is_task_path(p: Path) -> bool:
    if p.is_file():
        return p.suffix in (".yaml", ".yml")
    return p.is_dir() and not any(p.glob("*.idx")) and any([*p.rglob("*.yaml"), *p.rglob("*.yml")])


def load_eval_sets(entries, tokenizer: str | None) -> tuple[list[EvalSet], TokenizerInfo | None]:
    """(name or None, source) pairs -> EvalSets, and the tokenizer if one was loaded. A source is
    a task YAML or directory of them, a shard prefix or directory of shards, or a sequence of 1-D
    token arrays (one item each)."""
    cache: dict = {}

    def encoder() -> Encoder:
        if tokenizer is None:
            raise UserError("an lm-eval task was given as --eval: pass --tokenizer DIR (the training shards' tokenizer)")
        if "enc" not in cache:
            cache["info"] = load_tokenizer(str(tokenizer))
            cache["enc"] = Encoder(cache["info"].spec)
        return cache["enc"]

    sets = []
    for name, source in entries:
        if not isinstance(source, (str, os.PathLike)):
            items = [[np.asarray(t, dtype=np.int64)] for t in source]
            sets.append(EvalSet(name or f"set{len(sets)}", "<tokens>", "tokens", items))
        elif _is_task_path(Path(source)):
            sets.extend(_load_tasks(Path(source), name, encoder))
        else:
            sets.append(_load_shards(str(source), name))
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two eval sets are named {dup[0]}; name them apart with NAME=PATH")
    return sets, cache.get("info")


# ----------------------------------------------------------------------------- the evaluation index


@dataclass
class EvalIndex:
    n: int
    sets: list  # EvalSet
    item_start: np.ndarray  # first global item of each set, and the total at the end
    token_item: np.ndarray  # the item of each evaluation token (all fields concatenated)
    starts: np.ndarray  # token position of each n-gram occurrence
    occ_item: np.ndarray  # its item
    inverse: np.ndarray  # its key (distinct n-gram) in matcher.keys
    matcher: Matcher


def _spans(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(o, o + c) for each (offset, count)."""
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    return np.repeat(offsets - first, counts) + np.arange(total, dtype=np.int64)


def build_index(sets: list[EvalSet], n: int, exact: bool) -> EvalIndex:
    fields, field_item, item_start, g = [], [], [0], 0
    for s in sets:
        for item in s.items:
            fields.extend(np.asarray(f, dtype=np.int64).ravel() for f in item)
            field_item.extend([g] * len(item))
            g += 1
        item_start.append(g)
    lengths = np.array([f.size for f in fields], dtype=np.int64)
    tokens = np.concatenate(fields) if fields else np.zeros(0, np.int64)
    field_item = np.array(field_item, dtype=np.int64)
    counts = np.maximum(lengths - n + 1, 0)
    starts = _spans(np.cumsum(lengths) - lengths, counts)
    if exact:
        rows = np.lib.stride_tricks.sliding_window_view(tokens, n)[starts] if starts.size else np.zeros((0, n), np.int64)
        keys, inverse = np.unique(rows, axis=0, return_inverse=True)
    else:
        keys, inverse = np.unique(ngram_hashes(tokens, n)[starts], return_inverse=True)
    return EvalIndex(n, sets, np.array(item_start, dtype=np.int64), np.repeat(field_item, lengths), starts,
                     np.repeat(field_item, counts), inverse.ravel().astype(np.int64), Matcher(n, keys, exact))


# ----------------------------------------------------------------------------- scanning the training shards


def _ranges(num_tokens: int, budget: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges of n-gram start positions to scan in a shard: all of it, or about
    `budget` tokens as blocks spread evenly over the shard."""
    if budget is None or budget >= num_tokens:
        return [(a, min(a + CHUNK_TOKENS, num_tokens)) for a in range(0, num_tokens, CHUNK_TOKENS)]
    if budget <= 0:
        return []
    size = min(BLOCK_TOKENS, budget)
    firsts = np.unique(np.linspace(0, num_tokens - size, max(1, budget // size)).astype(np.int64))
    return [(int(a), int(a) + size) for a in firsts]


def plan_scan(train: dict, max_tokens: int | None):
    """Worker tasks (source index, .bin path, dtype, start, stop, shard tokens) and per-source
    stats; `max_tokens` caps each source, shared among its shards by size."""
    tasks, stats = [], {}
    for si, (name, path) in enumerate(train.items()):
        shards = [IndexedDataset(p) for p in list_shard_prefixes(path)]
        total = sum(int(ds.num_tokens) for ds in shards)
        scanned = 0
        for ds in shards:
            budget = None if max_tokens is None or total <= max_tokens else max_tokens * int(ds.num_tokens) // total
            for a, b in _ranges(int(ds.num_tokens), budget):
                tasks.append((si, bin_path(ds.prefix), ds.dtype.str, a, b, int(ds.num_tokens)))
                scanned += b - a
        stats[name] = {"path": str(path), "shards": len(shards), "tokens": total, "scanned_tokens": scanned}
    return tasks, stats


def scan_range(matcher: Matcher, task) -> tuple[int, np.ndarray, int]:
    """(source, ids of the keys found, n-grams scanned) for one task, read block by block with
    positioned reads (not through a memory map, whose pages would stay in the resident set)."""
    source, path, dtype, start, stop, total = task
    n, itemsize = matcher.n, np.dtype(dtype).itemsize
    found, windows = [np.zeros(0, np.int64)], 0
    for a in range(start, stop, BLOCK_TOKENS):
        count = min(min(a + BLOCK_TOKENS, stop) + n - 1, total) - a
        block = np.fromfile(path, dtype=dtype, count=count, offset=a * itemsize)
        windows += max(block.size - n + 1, 0)
        found.append(matcher.hits(block))
    return source, np.unique(np.concatenate(found)), windows


_WORKER: Matcher | None = None


def _init_worker(keys_file: str, n: int, exact: bool) -> None:
    # Ctrl-C goes to the whole process group; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER
    _WORKER = Matcher(n, np.load(keys_file), exact)


def _worker_scan(task):
    return scan_range(_WORKER, task)


def _run_pool(matcher: Matcher, tasks: list, workers: int):
    # spawn, not fork: the caller (the trainer) may run torch or tokenizer threads whose locks a
    # forked child would inherit. The keys go through a private file, not the initializer's
    # arguments, for the reason megacpt/data/workers.py gives (a child dying at start-up would
    # leave the parent blocked writing a large payload into the pipe).
    fd, keys_file = tempfile.mkstemp(prefix="megacpt-contamination-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, matcher.keys)
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(keys_file, matcher.n, matcher.exact))
    finished = False
    try:
        yield from ex.map(_worker_scan, tasks)
        finished = True
    finally:
        close_pool(ex, finished)
        os.remove(keys_file)


def scan(matcher: Matcher, tasks: list, num_sources: int, workers: int = 1):
    """Per source, a bool per key (found in that source's tokens); and the n-grams scanned."""
    hits = [np.zeros(matcher.num_keys, dtype=bool) for _ in range(num_sources)]
    if workers > 1 and len(tasks) > 1:
        if getattr(mp.current_process(), "_inheriting", False):
            raise UserError("contamination with workers > 1 must run under `if __name__ == '__main__':`")
        results = _run_pool(matcher, tasks, min(workers, len(tasks)))
    else:
        results = (scan_range(matcher, t) for t in tasks)
    windows = 0
    for source, ids, w in results:
        hits[source][ids] = True
        windows += w
    return hits, windows


# ----------------------------------------------------------------------------- the report


def _per_item(index: EvalIndex, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(contaminated?, covered tokens) per item, for a bool per key."""
    n_items, n_tokens = int(index.item_start[-1]), index.token_item.size
    occ = hit[index.inverse]
    flagged = np.zeros(n_items, dtype=bool)
    flagged[index.occ_item[occ]] = True
    s = index.starts[occ]
    # +1 where a matched n-gram starts, -1 where it ends: a token is covered where the sum is > 0.
    depth = np.cumsum(np.bincount(s, minlength=n_tokens + 1) - np.bincount(s + index.n, minlength=n_tokens + 1))
    covered = np.bincount(index.token_item[depth[:n_tokens] > 0], minlength=n_items)
    return flagged, covered


def _entry(flagged: np.ndarray, covered: np.ndarray, checked: int, tokens: int) -> dict:
    ids = np.flatnonzero(flagged)
    c = int(covered.sum())
    return {
        "items": int(ids.size),
        "item_fraction": ids.size / checked if checked else None,
        "tokens": c,
        "token_fraction": c / tokens if tokens else None,
        "contaminated_ids": ids.tolist(),
    }


def _set_report(index: EvalIndex, i: int, per_item: dict, any_item, scanned: int, exact: bool) -> dict:
    s, lo, hi = index.sets[i], int(index.item_start[i]), int(index.item_start[i + 1])
    tokens = int(np.count_nonzero((index.token_item >= lo) & (index.token_item < hi)))
    a, b = np.searchsorted(index.occ_item, [lo, hi])  # occurrences are in item order
    checked = int(np.unique(index.occ_item[a:b]).size)
    ngrams = int(np.unique(index.inverse[a:b]).size)
    return {
        "path": s.path,
        "kind": s.kind,
        "items": hi - lo,
        "checked_items": checked,
        "short_items": hi - lo - checked,
        "tokens": tokens,
        "ngrams": ngrams,
        "expected_false_items": 0.0 if exact else scanned * ngrams / 2.0**HASH_BITS,
        "sources": {name: _entry(f[lo:hi], c[lo:hi], checked, tokens) for name, (f, c) in per_item.items()},
        "any": _entry(any_item[0][lo:hi], any_item[1][lo:hi], checked, tokens),
    }


def build_report(index: EvalIndex, hits: dict, train_stats: dict, scanned: int, exact: bool) -> dict:
    """The full report (every contaminated id; report_json keeps the first LISTED_IDS)."""
    m = index.matcher.num_keys
    rate = 0.0 if exact else m / 2.0**HASH_BITS
    per_item = {name: _per_item(index, h) for name, h in hits.items()}
    any_hit = np.zeros(m, dtype=bool)
    for h in hits.values():
        any_hit |= h
    any_item = _per_item(index, any_hit)
    return {
        "ngram": index.n,
        "mode": "exact" if exact else "hashed",
        "hash_bits": None if exact else HASH_BITS,
        "false_positive_rate": rate,
        "eval_ngrams": m,
        "scanned_ngrams": scanned,
        "expected_false_matches": scanned * rate,
        "train": train_stats,
        "eval": {s.name: _set_report(index, i, per_item, any_item, scanned, exact) for i, s in enumerate(index.sets)},
    }


def report_json(report: dict) -> dict:
    """The report as written by --json: each contaminated_ids list cut to its first LISTED_IDS."""
    out = json.loads(json.dumps(report))
    for s in out["eval"].values():
        for e in [*s["sources"].values(), s["any"]]:
            e["contaminated_ids"] = e["contaminated_ids"][:LISTED_IDS]
    return out


def _check_vocabularies(train: dict, sets: list[EvalSet], info: TokenizerInfo | None) -> None:
    """Refuse inputs whose sidecars (or the tokenizer) name different vocabularies: their token
    ids would never match, and the report would say "clean" for the wrong reason."""
    seen: dict[str, str] = {}
    if info is not None:
        seen[info.vocab_hash] = f"tokenizer {info.name}"
    for path in [*train.values(), *(s.path for s in sets if s.kind == "shards")]:
        vocab = ((read_sidecar(path) or {}).get("tokenizer") or {}).get("vocab_hash")
        if vocab:
            seen.setdefault(vocab, str(path))
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        raise DataError(f"{a} and {b} have different vocabularies (vocab_hash); their token n-grams cannot "
                        f"match: use shards and a tokenizer of the same vocabulary")


def check(train: dict, evals, *, ngram: int = 13, exact: bool = False, workers: int = 1,
          tokenizer: str | None = None, max_train_tokens: int | None = None) -> dict:
    """Contamination of each eval set by each training source (see the module docstring).

    train: {source name: shard prefix or directory of shards}. evals: {name: source} or a list of
    (name or None, source); a source is a task YAML/dir (needs `tokenizer`), a shard prefix/dir,
    or a list of 1-D token arrays. max_train_tokens: at most this many tokens per source, in
    blocks spread evenly over its shards (None: all of them).
    """
    if ngram < 1:
        raise UserError(f"--ngram {ngram}: the n-gram length must be at least 1 (13 is the usual choice)")
    if workers < 1:
        raise UserError(f"--workers {workers}: pass 1 or more")
    if max_train_tokens is not None and max_train_tokens < 1:
        raise UserError(f"--max-train-tokens {max_train_tokens}: pass a positive number of tokens")
    if not train:
        raise UserError("no training source given: pass --train PREFIX")
    tasks, train_stats = plan_scan(train, max_train_tokens)
    sets, info = load_eval_sets(list(evals.items()) if isinstance(evals, dict) else list(evals), tokenizer)
    _check_vocabularies(train, sets, info)
    index = build_index(sets, ngram, exact)
    hits, scanned = scan(index.matcher, tasks, len(train), workers)
    return build_report(index, dict(zip(train, hits)), train_stats, scanned, exact)


def overlap_warnings(train_prefixes: dict, eval_sets: dict, ngram: int = 13, threshold: float = 0.01,
                     max_train_tokens: int | None = 20_000_000, tokenizer: str | None = None,
                     workers: int = 1) -> list[str]:
    """One line per eval set whose fraction of (checked) items sharing an n-gram with the
    training mixture (all sources together) exceeds `threshold`; [] when none does.

    For the trainer's start-up: bounded in time because at most `max_train_tokens` tokens of each
    source are scanned (blocks spread evenly over its shards; None scans everything). A sampled
    scan finds a subset of the overlap, so the fraction is a lower bound; each warning says how
    much was scanned. Bad input raises UserError like `check`.
    """
    report = check(train_prefixes, eval_sets, ngram=ngram, workers=workers, tokenizer=tokenizer,
                   max_train_tokens=max_train_tokens)
    scanned = sum(s["scanned_tokens"] for s in report["train"].values())
    total = sum(s["tokens"] for s in report["train"].values())
    out = []
    for name, s in report["eval"].items():
        frac = s["any"]["item_fraction"]
        if frac is None or frac <= threshold:
            continue
        per_source = ", ".join(f"{src} {e['item_fraction']:.1%}" for src, e in s["sources"].items())
        out.append(f"eval set {name}: {s['any']['items']} of {s['checked_items']} items ({frac:.1%}) share a "
                   f"{ngram}-gram with the training data ({per_source}; scanned {scanned:,} of {total:,} "
                   f"training tokens)")
    return out


# ----------------------------------------------------------------------------- the command


def _split_name(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain path (or an existing path containing '=') -> (None, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or "/" in name or os.path.exists(spec):
        return None, spec
    return name, path


def _train_sources(specs: list[str]) -> dict:
    train = {}
    for spec in specs:
        name, path = _split_name(spec)
        name = name or Path(path.rstrip("/")).name
        if name in train:
            raise UserError(f"two --train sources are named {name}; name them apart with NAME=PREFIX")
        train[name] = path
    return train


def format_table(report: dict) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    lines = [f"{report['ngram']}-grams, {report['mode']} mode; scanned {report['scanned_ngrams']:,} training "
             f"n-grams; false-positive rate per training n-gram {report['false_positive_rate']:.3g}",
             f"{'eval set':<24} {'items':>7} {'checked':>7}  {'source':<16} {'contam.':>7} {'items%':>7} {'tokens%':>7}"]
    for name, s in report["eval"].items():
        rows = [*s["sources"].items(), ("any", s["any"])]
        for k, (src, e) in enumerate(rows):
            head = f"{name:<24} {s['items']:>7} {s['checked_items']:>7}" if k == 0 else " " * 40
            lines.append(f"{head}  {src:<16} {e['items']:>7} {pct(e['item_fraction']):>7} {pct(e['token_fraction']):>7}")
    return "\n".join(lines)


def main_args(args) -> int:
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: its directory does not exist; create it first")
    report = check(_train_sources(args.train), [_split_name(s) for s in args.eval], ngram=args.ngram,
                   exact=args.exact, workers=args.workers, tokenizer=args.tokenizer,
                   max_train_tokens=args.max_train_tokens)
    print(format_table(report))
    if args.json:
        atomic.write_json(args.json, report_json(report))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
