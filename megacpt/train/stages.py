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

import fnmatch
import re

import torch

from megacpt.errors import ConfigError
from megacpt.models.hf import hf_name
from megacpt.train.engine import param_groups as default_groups

EMBEDDING = "embedding"
BODY = "body"
_LAYER_RANGE = re.compile(r"^(?:model\.)?layers\.(\d+)-(\d+)$")


def frozen_names(names: list[str], patterns: list[str], num_layers: int) -> set[str]:
    """The parameters (megacpt names) that `train.freeze` patterns name; a pattern that names
    nothing is an error, so a typo cannot silently train everything."""
    out: set[str] = set()
    for pat in patterns:
        m = _LAYER_RANGE.match(pat)
        if pat == "backbone":  # task: classify: everything but the head, a linear probe
            hit = {n for n in names if not n.startswith("score.")}
        elif m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if not 0 <= lo <= hi < num_layers:
                raise ConfigError(f"train.freeze: layer range {pat!r} is outside the model's layers 0-{num_layers - 1}")
            hit = {n for n in names if n.startswith("layers.") and lo <= int(n.split(".")[1]) <= hi}
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(hf_name(n), pat) or fnmatch.fnmatchcase(n, pat)}
        if not hit:
            raise ConfigError(f"train.freeze: {pat!r} matches no parameter; names look like "
                              f"{hf_name(names[min(1, len(names) - 1)])} (HF) or layers.0-3 (a layer range)")
        out |= hit
    return out


def freeze(model, patterns: list[str]) -> int:
    """Turn off requires_grad of the named parameters before DeepSpeed is initialised: they get no
    gradient, no optimizer state and (under ZeRO-3) stay partitioned. Returns their element count."""
    if not patterns:
        return 0
    params = dict(model.named_parameters())
    tied = {"lm_head.weight": "embed_tokens.weight"} if "lm_head.weight" not in params else {}
    names = list(params) + list(tied)
    n = 0
    for name in sorted(frozen_names(names, patterns, model.args.num_layers)):
        p = params[tied.get(name, name)]
        if p.requires_grad:
            p.requires_grad_(False)
            n += int(getattr(p, "ds_numel", p.numel()))
    return n


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embedding, i + 1 for block i, num_layers + 1 for the final norm and the head."""
    if name.startswith("embed_tokens."):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


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


def param_groups(model, weight_decay: float, split_embeddings: bool,
                 layer_lr_decay: float | None = None) -> tuple[list[dict], list[tuple[str, float]]]:
    """AdamW groups and, in the same order, each one's (kind, LR scale): kind EMBEDDING or BODY,
    the scale d^(L + 1 - layer id) under layer-wise decay (else 1)."""
    if not split_embeddings and layer_lr_decay is None:
        groups = default_groups(model, weight_decay)
        return groups, [(BODY, 1.0)] * len(groups)
    emb = {id(p) for p in embedding_params(model)} if split_embeddings else set()
    head = model.lm_head.weight
    L = model.args.num_layers
    buckets: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params keep their shape here
        if id(p) in emb:
            key = (EMBEDDING, 1.0, True)
        else:
            # A tied embedding is the head too: it keeps the head's full LR.
            depth = L + 1 - (L + 1 if p is head else layer_id(name, L))
            scale = 1.0 if layer_lr_decay is None else layer_lr_decay ** depth
            key = (BODY, scale, len(shape) >= 2)
        buckets.setdefault(key, []).append(p)
    # Embedding first, then by depth (top first), decayed matrices before vectors.
    order = sorted(buckets, key=lambda k: (k[0] != EMBEDDING, -k[1], not k[2]))
    groups = [{"params": buckets[k], "weight_decay": weight_decay if k[2] else 0.0} for k in order]
    return groups, [(k[0], k[1]) for k in order]


class Stages:
    """Sets each group's LR for a step and, in embeddings-only phases, zeroes the others' gradients."""

    def __init__(self, model, kinds: list[tuple[str, float]], lr: float, embedding_lr: float | None):
        self.kinds = kinds
        self.ratio = 1.0 if embedding_lr is None else embedding_lr / lr
        self.frozen = False
        self._handles = []
        self.has_embedding_group = any(kind == EMBEDDING for kind, _ in kinds)
        if self.has_embedding_group:
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
        for g, (kind, scale) in zip(optimizer.param_groups, self.kinds):
            g["lr"] = emb_lr if kind == EMBEDDING else (0.0 if self.frozen else lr * scale)
        if not self.has_embedding_group:
            return {}
        return {"lr_embedding": emb_lr, "trainable": trainable}
