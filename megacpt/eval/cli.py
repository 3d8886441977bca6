"""`megacpt eval`: held-out loss/perplexity of an HF dir, run or checkpoint on named shard sets."""

from __future__ import annotations

import json


def evaluate_model(model, windows, batch_size: int = 4) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            t = torch.from_numpy(windows[i : i + batch_size])
            total += float(model(t[:, :-1], labels=t[:, 1:]))
            count += t[:, 1:].numel()
    return total, count


def run_eval(model_path, data: list[str], seq_len: int | None, max_tokens: int | None, batch_size: int = 4) -> dict:
    import torch

    from megacpt.errors import UserError
    from megacpt.eval.perplexity import eval_windows, summarize
    from megacpt.export import load_model_source
    from megacpt.models.hf import load_full_state
    from megacpt.models.llama import Transformer

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
    with torch.device("meta"):
        model = Transformer(args)
    load_full_state(model, weights)
    model.eval()
    return {name: summarize(*evaluate_model(model, w, batch_size)) for name, w in windows.items()}


def _run(args) -> int:
    results = run_eval(args.model, args.data, args.seq_len, args.max_tokens, args.batch_size)
    for name, r in results.items():
        print(f"{name:<20} loss={r['loss']:.4f} ppl={r['ppl']:.3f} tokens={r['tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def register(sub) -> None:
    from megacpt.cli import add_common

    p = sub.add_parser("eval", help="perplexity on held-out token shards",
                       description="Reads each dataset as consecutive non-overlapping windows of seq_len+1 tokens "
                                   "(the same windows as validation during training).")
    p.add_argument("--model", required=True, metavar="HF_DIR_OR_RUN_OR_CHECKPOINT")
    p.add_argument("--data", required=True, nargs="+", metavar="[NAME=]PATH")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, metavar="OUT.json")
    add_common(p)
    p.set_defaults(func=_run)
