"""`megacpt eval`: held-out loss/perplexity of an HF dir, run or checkpoint on named shard sets,
and lm-evaluation-harness tasks on the same model (`--tasks`), in one JSON."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from megacpt import atomic
from megacpt.errors import UserError
from megacpt.eval.by_position import check_width, document_windows, evaluate_by_position, print_table
from megacpt.eval.perplexity import eval_windows, summarize
from megacpt.eval.tasks import TaskSpec, check_lengths, eos_ids, evaluate_tasks, hf_tokenizer, load_tasks
from megacpt.eval.tasks import summarize as summarize_tasks
from megacpt.export import load_model_source
from megacpt.train.parallelize import BuildSpec, build_model


def evaluate_model(model, windows, batch_size: int = 4) -> tuple[float, int]:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            t = torch.from_numpy(windows[i : i + batch_size]).to(device)
            total += float(model(t[:, :-1], labels=t[:, 1:]))
            count += t[:, 1:].numel()
    return total, count


def data_sets(data: list[str]) -> dict[str, str]:
    sets = {}
    for item in data or []:
        name, _, path = item.partition("=") if "=" in item else ("", "", item)
        sets[name or path] = path
    if "tasks" in sets:
        raise UserError("a data set may not be named 'tasks' (the JSON keeps task results under that key); "
                        "rename it, e.g. --data tasks_text=PATH")
    return sets


def load_windows(sets: dict, args, seq_len: int, max_tokens: int | None, by_position: bool = False) -> dict:
    """Per data set: an (n, seq_len+1) array of consecutive windows, or with by_position a list of
    one window per document (megacpt.eval.by_position)."""
    windows = {}
    for name, path in sets.items():
        w = document_windows(path, seq_len, max_tokens) if by_position else eval_windows(path, seq_len, max_tokens)
        top = int(w.max()) if isinstance(w, np.ndarray) else max(int(x.max()) for x in w)
        if top >= args.vocab_size:
            raise UserError(f"{path}: token id {top} ≥ model vocab {args.vocab_size}; "
                            f"the data was tokenized for another model")
        windows[name] = w
    return windows


def evaluate_sets(model, windows: dict, a, seq_len: int) -> dict:
    width = getattr(a, "by_position", None)
    if width:
        return {name: evaluate_by_position(model, w, seq_len, width, a.batch_size) for name, w in windows.items()}
    return {name: summarize(*evaluate_model(model, w, a.batch_size)) for name, w in windows.items()}


def language_model_view(args, weights, model: str):
    """A sequence classifier (task: classify) is evaluated as the language model its backbone still
    is: the same blocks with the LM head (the tied embedding, or the untied head the run kept
    frozen), the score head dropped — the original-domain perplexity change is its forgetting."""
    if not args.num_labels:
        return args
    if not args.tie_word_embeddings and "lm_head.weight" not in set(weights.keys()):
        raise UserError(f"{model} is a sequence classifier without an LM head (untied embeddings, exported without "
                        f"it); evaluate the classify run or its checkpoint instead, which keep the head")
    print(f"note: {model} is a sequence classifier: evaluating its backbone with the "
          f"{'tied embedding' if args.tie_word_embeddings else 'frozen LM head'} as a language model",
          file=sys.stderr)
    return dataclasses.replace(args, num_labels=0)


def run_all(a) -> dict:
    """`megacpt eval`'s results: {data set: {loss, ppl, tokens}, ..., "tasks": {task: {metric: v, "n": n}}}."""
    sets = data_sets(a.data)
    check_width(getattr(a, "by_position", None))
    if getattr(a, "by_position", None) and not sets:
        raise UserError("--by-position needs held-out token shards: pass --data NAME=PATH")
    spec = TaskSpec(tuple(n for n in (a.tasks or "").split(",") if n), a.include_path, a.num_fewshot, a.limit)
    if not sets and not spec.names:
        raise UserError("nothing to evaluate: pass --data NAME=PATH and/or --tasks NAME[,NAME...]")
    tasks = load_tasks(spec) if spec.names else []  # task errors before the model is built
    args, hf_cfg, weights, source_dir = load_model_source(a.model)
    args = language_model_view(args, weights, a.model)
    if spec.names:
        check_lengths(tasks, args.max_position_embeddings)
    tokenizer = hf_tokenizer(a.model, source_dir, a.tokenizer) if spec.names else None
    seq_len = a.seq_len or min(args.max_position_embeddings, 2048)
    windows = load_windows(sets, args, seq_len, a.max_tokens, bool(getattr(a, "by_position", None)))
    model = build_model(BuildSpec(args, dtype=torch.float32), weights=weights)  # one process, fp32
    model.eval()
    results = evaluate_sets(model, windows, a, seq_len)
    if spec.names:
        from megacpt.eval.harness import MegacptLM  # wraps lm-eval (optional, imported only for --tasks)

        lm = MegacptLM(model, tokenizer, args.max_position_embeddings, batch_size=a.batch_size,
                       eos_ids=eos_ids(hf_cfg, source_dir))
        results["tasks"] = summarize_tasks(evaluate_tasks(lm, spec, tasks))
    return results


def main_args(a) -> int:
    results = run_all(a)
    for name, r in results.items():
        if name != "tasks":
            print(f"{name:<20} loss={r['loss']:.4f} ppl={r['ppl']:.3f} tokens={r['tokens']}")
            if "by_position" in r:
                print_table(name, r)
    for name, r in results.get("tasks", {}).items():
        print(f"{name:<20} " + " ".join(f"{k}={v:.4f}" if k != "n" else f"n={v}" for k, v in r.items()))
    if a.json:
        atomic.write_json(a.json, results)
    return 0
