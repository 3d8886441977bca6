"""Which parameters learn, and at which LR: a separate embedding LR and embeddings-only stages.

The embeddings (embed_tokens, and lm_head when untied) get an AdamW group of their own when the
config asks for a separate LR or for an embeddings-only stage anywhere in the run. Otherwise the
groups stay as they were (decay / no decay), so existing checkpoints keep their layout.

An embeddings-only stage does not change `requires_grad`: DeepSpeed builds its ZeRO partitions
and gradient hooks once, at initialize, from the parameters that require grad, so toggling it at
a phase boundary would break ZeRO-2/3 and resume. Instead the other parameters' gradients are
replaced by zeros in a tensor hook (before DeepSpeed reduces them, so the global gradient norm and
its clipping see only the embeddings) and their groups get LR 0 (so decoupled weight decay does
not touch them either). AdamW then leaves them bit for bit: zero moments, zero update. Their Adam
step count still advances during the stage, so their first updates afterwards are bias-corrected
as at a later step (about 0.45× a fresh first step, approaching 1× over some tens of steps).
"""

from __future__ import annotations

import torch

from megacpt.train.engine import param_groups as default_groups

EMBEDDING = "embedding"
BODY = "body"


def needs_embedding_group(cfg) -> bool:
    return (cfg.optim.embedding_lr is not None or cfg.train.trainable == "embeddings"
            or any(p.trainable == "embeddings" for p in cfg.phases))


def embedding_params(model) -> list:
    """embed_tokens' weight and, when not tied to it, lm_head's (by identity, so TP's swapped-in
    vocab-parallel modules count too)."""
    out = [model.embed_tokens.weight]
    if model.lm_head.weight is not model.embed_tokens.weight:
        out.append(model.lm_head.weight)
    return out


def param_groups(model, weight_decay: float, split_embeddings: bool) -> tuple[list[dict], list[str]]:
    """AdamW groups and the kind of each (EMBEDDING or BODY), in the same order."""
    if not split_embeddings:
        groups = default_groups(model, weight_decay)
        return groups, [BODY] * len(groups)
    emb = {id(p) for p in embedding_params(model)}
    embeds, decay, no_decay = [], [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params keep their shape here
        (embeds if id(p) in emb else decay if len(shape) >= 2 else no_decay).append(p)
    groups = [(EMBEDDING, {"params": embeds, "weight_decay": weight_decay}),
              (BODY, {"params": decay, "weight_decay": weight_decay}),
              (BODY, {"params": no_decay, "weight_decay": 0.0})]
    groups = [(k, g) for k, g in groups if g["params"]]
    return [g for _, g in groups], [k for k, _ in groups]


class Stages:
    """Sets each group's LR for a step and, in embeddings-only phases, zeroes the others' gradients."""

    def __init__(self, model, kinds: list[str], lr: float, embedding_lr: float | None):
        self.kinds = kinds
        self.ratio = 1.0 if embedding_lr is None else embedding_lr / lr
        self.frozen = False
        self._handles = []
        if EMBEDDING in kinds:
            emb = {id(p) for p in embedding_params(model)}
            for p in model.parameters():
                if p.requires_grad and id(p) not in emb:
                    self._handles.append(p.register_hook(self._hook))

    def _hook(self, grad):
        # zeros, not grad * 0: a non-finite gradient must not leak NaN into frozen weights.
        return torch.zeros_like(grad) if self.frozen else grad

    def apply(self, optimizer, lr: float, trainable: str) -> dict:
        """Set the LRs of step with schedule LR `lr`; returns what to log."""
        self.frozen = trainable == "embeddings"
        emb_lr = lr * self.ratio
        for g, kind in zip(optimizer.param_groups, self.kinds):
            g["lr"] = emb_lr if kind == EMBEDDING else (0.0 if self.frozen else lr)
        if EMBEDDING not in self.kinds:
            return {}
        return {"lr_embedding": emb_lr, "trainable": trainable}
