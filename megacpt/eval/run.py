"""`megacpt eval`: held-out loss/perplexity of an HF dir, run or checkpoint on named shard sets."""

from __future__ import annotations

import json

import torch

from megacpt.errors import UserError
from megacpt.eval.perplexity import eval_windows, summarize
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


def run_eval(model_path, data: list[str], seq_len: int | None, max_tokens: int | None, batch_size: int = 4) -> dict:
    args, _, weights, _ = load_model_source(model_path)
    seq_len = seq_len or min(args.max_position_embeddings, 2048)
    sets = {}
    for item in data:
        name, _, path = item.partition("=") if "=" in item else ("", "", item)
        sets[name or path] = path
    windows = {}
    for name, path in sets.items():
        w = eval_windows(path, seq_len, max_tokens)
        if w.max() >= args.vocab_size:
            raise UserError(f"{path}: token id {int(w.max())} ≥ model vocab {args.vocab_size}; "
                            f"the data was tokenized for another model")
        windows[name] = w
    model = build_model(BuildSpec(args, dtype=torch.float32), weights=weights)  # one process, fp32
    model.eval()
    return {name: summarize(*evaluate_model(model, w, batch_size)) for name, w in windows.items()}


def main_args(args) -> int:
    results = run_eval(args.model, args.data, args.seq_len, args.max_tokens, args.batch_size)
    for name, r in results.items():
        print(f"{name:<20} loss={r['loss']:.4f} ppl={r['ppl']:.3f} tokens={r['tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
