"""Held-out metrics for `task: sft`: the loss on response tokens, and exact match, token F1 and
BLEU of greedy generations against the reference responses.

Exact match and token F1 follow SQuAD's evaluation: both strings are lower-cased, stripped of
punctuation and of the articles a/an/the, and split on whitespace; F1 is over the multiset of
tokens. BLEU is sacrebleu's corpus BLEU (default 13a tokenisation), 0–100.

Under ZeRO-3 every forward call is collective, so every data-parallel rank makes the same number
of calls: the loss pads with fully ignored rows, generation pads with dummy prompts and stops only
when every rank's generations have stopped.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from megacpt.labels import IGNORE

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu  # optional: only SFT evaluations with BLEU need it

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def generation_metrics(predictions: list[str], references: list[str], with_bleu: bool = True) -> dict:
    n = len(references)
    out = {"exact_match": sum(map(exact_match, predictions, references)) / n,
           "token_f1": sum(map(token_f1, predictions, references)) / n}
    if with_bleu:
        out["bleu"] = bleu(predictions, references)
    return out


def loss_sums(engine, rows: list[dict], mb: int, dp_rank: int, dp_size: int, device, dp_group=None) -> tuple[float, int]:
    """Sum of response-token losses and their count over packed rows, split over data-parallel ranks."""
    mine = rows[dp_rank::dp_size]
    calls = -(-(-(-len(rows) // dp_size)) // mb)
    total = torch.zeros(2, dtype=torch.float64)
    for c in range(calls):
        chunk = mine[c * mb: (c + 1) * mb]
        pad = not chunk
        chunk = chunk or rows[:1]
        t = {k: torch.from_numpy(np.stack([r[k] for r in chunk])) for k in ("input_ids", "labels", "segments")}
        if pad:
            t["labels"].fill_(IGNORE)
        with torch.no_grad():
            out = engine(t["input_ids"].to(device), labels=t["labels"].to(device), segment_ids=t["segments"].to(device))
        total[0] += out.double().cpu()
        total[1] += float((t["labels"] != IGNORE).sum())
    dist.all_reduce(total, group=dp_group)
    return float(total[0]), int(total[1])


def greedy_generate(forward, prompts: list[list[int]], max_new_tokens: int, stop_ids, device,
                    all_done=None) -> list[list[int]]:
    """Greedy continuations of `prompts` (generated together), stop tokens excluded.

    Prompts are left-padded; the padding is a segment of its own, so document masking keeps it
    out of attention and positions start at 0 at each prompt's first token, as when run alone.
    `all_done(flag) -> bool` lets ranks agree on when to stop (default: this rank alone).
    """
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    seg = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.int64)
        seg[i, width - len(p):] = 1
    stops = torch.tensor(sorted(stop_ids), dtype=torch.int64)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = forward(ids.to(device), segment_ids=seg.to(device))
        nxt = logits[:, -1].float().argmax(-1).cpu()
        new.append(torch.where(done, stops[0], nxt))
        done |= torch.isin(nxt, stops)
        ids = torch.cat([ids, new[-1][:, None]], dim=1)
        seg = torch.cat([seg, torch.ones(len(prompts), 1, dtype=torch.int64)], dim=1)
        finished = bool(done.all())
        if (all_done(finished) if all_done else finished):
            break
    out = []
    gen = torch.stack(new, dim=1) if new else torch.zeros(len(prompts), 0, dtype=torch.int64)
    for row in gen.tolist():
        cut = next((j for j, t in enumerate(row) if t in set(stops.tolist())), len(row))
        out.append(row[:cut])
    return out


def evaluate(engine, evalset, tk, sft_cfg, mb: int, topo, device) -> dict:
    """{loss, ppl, tokens, [exact_match, token_f1, bleu]} of one held-out set; equal on every rank.
    `topo`: the run's Topology (its data-parallel rank, size and group)."""
    dp_rank, dp_size, dp_group = topo.dp_rank, topo.dp_size, topo.dp_group
    was_training = engine.training
    engine.eval()
    loss_sum, count = loss_sums(engine, evalset.rows, mb, dp_rank, dp_size, device, dp_group)
    loss = loss_sum / max(count, 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 700)), "tokens": count}
    n = len(evalset.prompts)
    if n:
        def all_done(flag: bool) -> bool:
            t = torch.tensor([float(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MIN)  # the whole world: tp ranks share the forward too
            return bool(t.item())

        mine = list(range(dp_rank, n, dp_size))
        per_rank = -(-n // dp_size)
        bs = sft_cfg.eval_batch_size
        gens = []
        for c in range(0, per_rank, bs):
            idx = mine[c: c + bs]
            prompts = [evalset.prompts[i] for i in idx] or [[tk.eos_id]]  # a rank out of prompts still calls
            res = greedy_generate(engine, prompts, sft_cfg.max_new_tokens, tk.stop_ids, device, all_done)
            gens.extend(zip(idx, res))
        every = [None] * dist.get_world_size(group=dp_group)
        dist.all_gather_object(every, gens, group=dp_group)
        texts = [""] * n
        for part in every:
            for i, g in part:
                texts[i] = tk.decode(g).strip()
        out.update(generation_metrics(texts, [r.strip() for r in evalset.references], sft_cfg.bleu))
    if was_training:
        engine.train()
    return out
