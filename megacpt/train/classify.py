"""task: classify in the trainer: the labelled data, the head, and the held-out metrics.

The model is the family's decoder with `score` (hidden → labels, no bias) on the last real
token's final hidden state, exported as transformers' *ForSequenceClassification. A new head
on a causal LM starts as transformers initialises one (normal, std 0.02), from the run's seed.
Evaluation: per held-out set the mean cross-entropy, accuracy and macro-F1; with
`classify.gap_examples`, the same loss on a fixed sample of the training examples (in eval mode)
and each set's gap = its loss − that (the generalisation gap).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from megacpt.data import classify as data
from megacpt.errors import ConfigError
from megacpt.labels import IGNORE
from megacpt.models.hf import ExtraWeights, as_weights, classifier_config, hf_config_for
from megacpt.train.state import RunState

HEAD = "score.weight"


def prepare(rs: RunState) -> None:
    """Data, labels and the classifier's shape, config and starting weights (before ranks start)."""
    cfg, start = rs.cfg, rs.start
    labels, pad, rs.valid, cut = data.build(cfg, rs.phases, rs.args.vocab_size, start.source_dir)
    base = start.base_cfg
    if rs.args.num_labels:  # starting from a classifier: its head must mean the same labels
        old = [base.get("id2label", {}).get(str(i)) for i in range(rs.args.num_labels)]
        if old != labels:
            raise ConfigError(f"the model is a classifier for labels {old}, this run's are {labels}; set "
                              f"classify.labels to the model's, or start from its causal LM")
    rs.labels = labels
    rs.args = dataclasses.replace(rs.args, num_labels=len(labels))
    if rs.adapter is not None and "score" not in rs.adapter.modules_to_save:
        # The new head trains whole beside the adapter (PEFT's SEQ_CLS does the same).
        rs.adapter = dataclasses.replace(rs.adapter, modules_to_save=(*rs.adapter.modules_to_save, "score"))
    base = classifier_config(base, labels, pad)
    rs.hf_cfg = hf_config_for(rs.args, base)
    start.base_cfg = base
    if start.weights is not None:
        src = as_weights(start.weights)
        if HEAD not in src.keys():
            g = torch.Generator().manual_seed(cfg.seed)
            head = torch.empty(len(labels), rs.args.hidden_size).normal_(0.0, 0.02, generator=g)
            src = ExtraWeights(src, {HEAD: head})
        start.weights = src
    if cut:
        rs.say(f"note: {cut} examples are longer than data.seq_len = {cfg.data.seq_len} tokens and were cut")


def set_logits(engine, ls: data.LabelledSet, mb: int, topo, device) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every row and its loss, split over data-parallel ranks with equal forward calls
    (ZeRO-3 gathers collectively); gathered so every rank holds all of them, in row order."""
    n = len(ls.labels)
    per_rank = -(-n // topo.dp_size)
    mine = list(range(topo.dp_rank, n, topo.dp_size))
    out = torch.zeros(per_rank, engine.module.args.num_labels, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for c in range(-(-per_rank // mb)):
            idx = mine[c * mb : (c + 1) * mb] or [0]  # a rank out of rows repeats row 0, unused
            ids = torch.from_numpy(ls.ids[idx]).to(device)
            pool = torch.from_numpy(ls.lengths[idx] - 1).to(device)
            logits = engine(ids, pool_index=pool).double().cpu()
            k = len(mine[c * mb : (c + 1) * mb])
            out[c * mb : c * mb + k] = logits[:k]
    if was_training:
        engine.train()
    every = [torch.zeros_like(out) for _ in range(topo.dp_size)]
    dist.all_gather(every, out, group=topo.dp_group)
    logits = torch.empty(n, out.shape[1], dtype=torch.float64)
    for r in range(topo.dp_size):
        rows = list(range(r, n, topo.dp_size))
        logits[rows] = every[r][: len(rows)]
    gold = torch.from_numpy(ls.labels)
    losses = torch.nn.functional.cross_entropy(logits, gold, ignore_index=IGNORE, reduction="none")
    return logits.numpy(), losses.numpy()


def validation_record(rs: RunState) -> dict:
    topo, mb, device = rs.topo, rs.cfg.train.micro_batch_size, rs.engine.device
    out, train_loss = {}, None
    if "train" in rs.valid and "train" not in {v.name for v in rs.cfg.data.valid}:
        _, losses = set_logits(rs.engine, rs.valid["train"], mb, topo, device)
        train_loss = float(losses.mean())
        out["train_sample/loss"] = train_loss
    for v in rs.cfg.data.valid:
        ls = rs.valid[v.name]
        logits, losses = set_logits(rs.engine, ls, mb, topo, device)
        out[f"valid/{v.name}/loss"] = float(losses.mean())
        for k, val in data.predictions_metrics(logits.argmax(-1), ls.labels).items():
            out[f"valid/{v.name}/{k}"] = val
        if train_loss is not None:
            out[f"valid/{v.name}/gap"] = out[f"valid/{v.name}/loss"] - train_loss
    return out
