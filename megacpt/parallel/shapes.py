"""Parameter shapes and tensor-parallel slices computed from ModelArgs alone.

`tp_shards_for(args, tp, tp_rank)` is the `{name: Shard}` that `tp_shards(apply_tp(model, topo))`
gives on tensor-parallel rank `tp_rank`, without building a model or process groups: code that
only needs to know which rows or columns a rank holds (consolidating checkpoints, byte counts)
reads it here. The rules are apply_tp's (megacpt/parallel/tp.py), and tests/test_shapes.py holds
the two equal:
  q_proj / o_proj       query heads split evenly: rows (q) / columns (o) [r·nh/tp·d, (r+1)·nh/tp·d)
  k_proj / v_proj       KV heads split evenly when num_kv_heads % tp == 0; otherwise each run of
                        tp/num_kv_heads consecutive ranks keeps one whole KV head, and only the
                        first rank of the run counts it in a gradient norm (Shard.counted)
  gate/up / down_proj   intermediate features split evenly: rows / columns
  q/k/v biases          the rows of their weight
  embed_tokens, lm_head vocabulary rows split evenly (no padding: vocab_size % tp must be 0); a
                        tied head is listed under its own name too, with the embedding's slice
  norms                 whole on every rank (absent from the dict): the block's norms of its
                        placement, the final norm, and per-head q/k norms (Qwen3, Gemma 3);
                        a full-width q/k norm (OLMo 2) is refused for tp > 1
  LoRA factors          (`factor_shards`) of a column-parallel linear: B's rows as the weight's,
                        A whole; of a row-parallel one: A's columns as the weight's, B whole
"""

from __future__ import annotations

import math

from megacpt.errors import ConfigError
from megacpt.models.llama import NORM_PLACEMENTS, ModelArgs
from megacpt.parallel.layouts import family_problems, tp_problems
from megacpt.parallel.tp import Shard

__all__ = ["param_shapes", "tp_shards_for", "local_shapes", "local_numels", "factor_shards", "adapter_shards"]


def param_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Full shape of every parameter of `Transformer(args)`, by name, in `named_parameters()`
    order (a tied head is the embedding's parameter, so it is not listed again)."""
    h, i, v, d = args.hidden_size, args.intermediate_size, args.vocab_size, args.head_dim
    q, kv = args.num_heads * d, args.num_kv_heads * d
    out = {"embed_tokens.weight": (v, h)}
    for n in range(args.num_layers):
        p = f"layers.{n}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if args.qkv_bias:
                out[f"{p}self_attn.{proj}.bias"] = (rows,)
        out[f"{p}self_attn.o_proj.weight"] = (h, q)
        if args.qk_norm is not None:
            per_head = args.qk_norm == "head"
            out[f"{p}self_attn.q_norm.weight"] = (d if per_head else q,)
            out[f"{p}self_attn.k_norm.weight"] = (d if per_head else kv,)
        out[f"{p}mlp.gate_proj.weight"] = (i, h)
        out[f"{p}mlp.up_proj.weight"] = (i, h)
        out[f"{p}mlp.down_proj.weight"] = (h, i)
        for norm in NORM_PLACEMENTS[args.norm_placement]:
            if norm is not None:
                out[f"{p}{norm}.weight"] = (h,)
    out["norm.weight"] = (h,)
    if not args.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    if args.num_labels:
        out["score.weight"] = (args.num_labels, h)  # a classifier's head: whole on every TP rank
    return out


def _even(n: int, tp: int, r: int) -> tuple[int, int]:
    step = n // tp
    return r * step, (r + 1) * step


def _kv_heads(args: ModelArgs, tp: int, r: int) -> tuple[int, int, bool]:
    """[first, last) KV head on rank r and whether this copy counts in a gradient norm."""
    nkv = args.num_kv_heads
    if nkv % tp == 0:
        return (*_even(nkv, tp, r), True)
    rep = tp // nkv  # ranks sharing one head
    return r // rep, r // rep + 1, r % rep == 0


def tp_shards_for(args: ModelArgs, tp: int, tp_rank: int) -> dict[str, Shard]:
    """Name → Shard of every split parameter on tensor-parallel rank `tp_rank` of `tp`, equal to
    `tp_shards` of a model after `apply_tp` (empty for tp = 1: nothing is split)."""
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} is not in [0, {tp})")
    if tp == 1:
        return {}
    problems = tp_problems(args, tp) + family_problems(args, tp, 1)
    if problems:
        raise ConfigError(f"cannot split the model over tp={tp}: {'; '.join(problems)}")
    h, i, v, d = args.hidden_size, args.intermediate_size, args.vocab_size, args.head_dim
    q, kv = args.num_heads * d, args.num_kv_heads * d
    q0, q1 = _even(args.num_heads, tp, tp_rank)
    kv0, kv1, kv_counted = _kv_heads(args, tp, tp_rank)
    i0, i1 = _even(i, tp, tp_rank)
    v0, v1 = _even(v, tp, tp_rank)
    vocab = Shard(0, v0, v1, (v, h))
    out = {"embed_tokens.weight": vocab}
    for n in range(args.num_layers):
        p = f"layers.{n}."
        for proj, rows, start, stop, counted in (("q_proj", q, q0 * d, q1 * d, True),
                                                 ("k_proj", kv, kv0 * d, kv1 * d, kv_counted),
                                                 ("v_proj", kv, kv0 * d, kv1 * d, kv_counted)):
            out[f"{p}self_attn.{proj}.weight"] = Shard(0, start, stop, (rows, h), counted)
            if args.qkv_bias:
                out[f"{p}self_attn.{proj}.bias"] = Shard(0, start, stop, (rows,), counted)
        out[f"{p}self_attn.o_proj.weight"] = Shard(1, q0 * d, q1 * d, (h, q))
        out[f"{p}mlp.gate_proj.weight"] = Shard(0, i0, i1, (i, h))
        out[f"{p}mlp.up_proj.weight"] = Shard(0, i0, i1, (i, h))
        out[f"{p}mlp.down_proj.weight"] = Shard(1, i0, i1, (h, i))
    out["lm_head.weight"] = vocab
    return out


def local_shapes(args: ModelArgs, tp: int, tp_rank: int) -> dict[str, tuple]:
    """Shape of every parameter on tensor-parallel rank `tp_rank`, in `named_parameters()` order
    of the split model (a tied head not listed again)."""
    shards = tp_shards_for(args, tp, tp_rank)
    return {name: shards[name].shape if name in shards else shape for name, shape in param_shapes(args).items()}


def local_numels(args: ModelArgs, tp: int, tp_rank: int) -> dict[str, int]:
    """Element count of every parameter on tensor-parallel rank `tp_rank` (see local_shapes)."""
    return {name: math.prod(shape) for name, shape in local_shapes(args, tp, tp_rank).items()}


def factor_shards(module: str, weight: Shard, r: int) -> dict[str, Shard]:
    """Name → Shard of the split LoRA factor of `module` whose weight is split as `weight`: a
    column-parallel linear (rows) splits B's rows the same way, a row-parallel one (columns) A's
    columns; the other factor is whole on every rank (absent)."""
    rows, cols = weight.full_shape
    if weight.dim == 0:
        return {f"{module}.lora_B.weight": Shard(0, weight.start, weight.stop, (rows, r), weight.counted)}
    return {f"{module}.lora_A.weight": Shard(1, weight.start, weight.stop, (r, cols), weight.counted)}


def adapter_shards(shards: dict[str, Shard], names, r: int) -> dict[str, Shard]:
    """`shards` (tp_shards_for's) plus the split factors among parameter `names` (those of a
    checkpoint: the adapted modules are the ones with a lora_A)."""
    out = dict(shards)
    for name in names:
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            weight = shards.get(f"{module}.weight")
            if weight is not None:
                out.update(factor_shards(module, weight, r))
    return out
