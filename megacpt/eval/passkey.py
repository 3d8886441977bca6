"""`megacpt make-task --kind passkey`: a passkey-retrieval probe of long-context recall.

For each cell (length L, depth d) N items: filler text from the held-out documents (whitespace
normalised to single spaces, consecutive documents from a random start, wrapping around) cut at a
word boundary so that the whole context is about L tokens, with KEY_SENTENCE inserted at relative
depth d of the filler (0 = before it, 1 = after it, at the nearest word boundary), then QUESTION.
The target is " NNNNN", a random 5-digit key. Each cell is one lm-eval task (loglikelihood; acc =
the key is the model's greedy continuation) named NAME_L{L}_D{round(100·d)}; a group NAME lists
them and averages acc over all items. Same inputs and seed, same bytes; a cell's items depend only
on (seed, L, d), not on the other cells asked for.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from megacpt import atomic
from megacpt.errors import DataError, UserError

KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyOptions:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    n: int
    seed: int


def parse_cells(lengths: str | None, depths: str | None, n: int | None, seed: int) -> PasskeyOptions:
    try:
        ls = tuple(int(x) for x in (lengths or "").split(",") if x.strip())
        ds = tuple(float(x) for x in (depths or "").split(",") if x.strip())
    except ValueError:
        raise UserError(f"--lengths {lengths!r} / --depths {depths!r}: pass comma-separated numbers, "
                        f"e.g. --lengths 256,512 --depths 0,0.5,1") from None
    if not ls or min(ls) < 64:
        raise UserError(f"--lengths {lengths!r}: pass token lengths of at least 64, e.g. --lengths 256,512")
    if not ds or min(ds) < 0 or max(ds) > 1:
        raise UserError(f"--depths {depths!r}: pass relative depths between 0 and 1, e.g. --depths 0,0.5,1")
    if len({round(d * 100) for d in ds}) != len(ds) or len(set(ls)) != len(ls):
        raise UserError("--lengths/--depths repeat a cell (depths are named by whole percents); drop the repeat")
    return PasskeyOptions(ls, ds, n or 10, seed)


def cell_name(name: str, length: int, depth: float) -> str:
    return f"{name}_L{length}_D{round(depth * 100)}"


def _fit_words(words: list[str], budget: int, count) -> int:
    """The most words whose joined text has at most `budget` tokens (a word is ≥ 1 token)."""
    lo, hi = 0, min(len(words), budget)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def make_item(words: list[str], length: int, depth: float, rng: random.Random, count) -> dict:
    key = f"{rng.randint(10000, 99999)}"
    sentence = KEY_SENTENCE.format(key=key)
    start = rng.randrange(len(words))
    stream = words[start:] + words[:start]
    # The key sentence and question are counted apart; joining them adds a token or two at most.
    budget = length - count(" " + sentence) - count(" " + QUESTION)
    k = _fit_words(stream, budget, count)
    cut = round(depth * k)
    filler = stream[:k]
    context = " ".join(filler[:cut] + [sentence] + filler[cut:]) + " " + QUESTION
    return {"context": context, "target": " " + key, "length": length, "depth": depth,
            "tokens": count(context)}


def make_cells(docs: list[str], opts: PasskeyOptions, count) -> dict[tuple[int, float], list[dict]]:
    words = [w for d in docs for w in d.split()]
    if not words:
        raise DataError("no filler text in the --from inputs; pass held-out text or token shards")
    total = count(" ".join(words[: max(opts.lengths) * 2]))
    if total < max(opts.lengths):
        raise DataError(f"the --from inputs hold about {total} tokens, fewer than the longest cell "
                        f"({max(opts.lengths)}); add text or lower --lengths")
    cells = {}
    for length in opts.lengths:
        for depth in opts.depths:
            # One generator per cell: its items do not change when other cells are added or removed.
            rng = random.Random(f"passkey:{opts.seed}:{length}:{round(depth * 100)}")
            cells[(length, depth)] = [make_item(words, length, depth, rng, count) for _ in range(opts.n)]
    return cells


def _cell_config(task: str, jsonl: Path, meta: dict) -> dict:
    return {
        "task": task,
        "dataset_path": "json",
        # Absolute: datasets.load_dataset resolves a relative data_files path from the cwd.
        "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "target",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, **meta},
    }


def _group_config(name: str, tasks: list[str], opts: PasskeyOptions) -> dict:
    return {
        "group": name,
        "task": tasks,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0, "kind": "passkey", "seed": opts.seed, "lengths": list(opts.lengths),
                     "depths": list(opts.depths)},
    }


def _dump(cfg: dict, head: str) -> str:
    return head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=4096)


def write_passkey(out: Path, name: str, cells: dict, opts: PasskeyOptions, meta: dict) -> Path:
    """Every cell's JSONL, then every cell's YAML, then the group YAML last: lm-eval sees the
    group only once all its tasks are complete."""
    out.mkdir(parents=True, exist_ok=True)
    head = f"# lm-evaluation-harness task written by `megacpt make-task --kind passkey` (seed {opts.seed}).\n"
    tasks, files = [], []
    for (length, depth), items in cells.items():
        task = cell_name(name, length, depth)
        jsonl = out / f"{task}.jsonl"
        data = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        cell_meta = {**meta, "length": length, "depth": depth, "items": len(items), "data_file": jsonl.name}
        tasks.append(task)
        files += [(jsonl, data), (out / f"{task}.yaml", _dump(_cell_config(task, jsonl, cell_meta), head))]
    files.sort(key=lambda f: f[0].suffix != ".jsonl")  # stable: all data before any task YAML
    for path, content in files:
        atomic.write_text(path, content)
    group = out / f"{name}.yaml"
    atomic.write_text(group, _dump(_group_config(name, tasks, opts), head))
    return group


def main_passkey(args, opts: PasskeyOptions, name: str, out: Path, docs: list[str], count) -> int:
    cells = make_cells(docs, opts, count)
    meta = {"kind": "passkey", "seed": opts.seed, "sources": [str(p) for p in args.inputs],
            "tokenizer": str(args.tokenizer)}
    group = write_passkey(out, name, cells, opts, meta)
    print(f"{group}: passkey group {name}, {len(cells)} cells × {opts.n} items "
          f"(lengths {','.join(map(str, opts.lengths))}; depths {','.join(map(str, opts.depths))}) "
          f"from {len(docs)} documents")
    return 0
