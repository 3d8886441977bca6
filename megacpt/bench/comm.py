"""Bytes communicated per optimizer step: an estimate from the ZeRO stage, the parallel layout and
the parameter sizes, never a measurement (`megacpt bench train` reports it next to its timings)."""

from __future__ import annotations

from dataclasses import dataclass

from megacpt.models.llama import ModelArgs
from megacpt.parallel.pp import stage_bounds
from megacpt.parallel.shapes import local_numels


def comm_estimate(stage: int, world: int, numels: list[int], bytes_per_elem: int, grad_accum: int,
                  persistence_threshold: int = 100_000, max_reuse_distance: int = 1_000_000_000) -> dict:
    """Estimated bytes each rank sends (≈ receives) per optimizer step, ring collectives.

    A ring all-gather or reduce-scatter of a tensor of B bytes moves B·(W-1)/W per rank; an
    all-reduce moves twice that. With P = total parameter elements, b = bytes per element (the
    model dtype, which DeepSpeed also communicates gradients in), g = micro-batches per step:
      stage 0 (DDP-like)  all-reduce of gradients once per step:            2·P·b·(W-1)/W
      stage 1             gradient all-reduce + all-gather of the updated
                          parameter partitions:                              3·P·b·(W-1)/W
      stage 2             reduce-scatter of gradients every micro-batch +
                          all-gather of updated parameters once:             (g+1)·P·b·(W-1)/W
      stage 3             per micro-batch: all-gather of the partitioned parameters (Pp) for the
                          forward, reduce-scatter of their gradients, and a second all-gather
                          for the backward of the fraction r that DeepSpeed released in between:
                          (2 + r)·g·Pp·b·(W-1)/W. DeepSpeed keeps a gathered parameter when its
                          next use is within stage3_max_reuse_distance elements (R, default 1e9);
                          a layer at depth x of the stack is next used ≈ 2·Pp·(1-x) elements later,
                          so r ≈ max(0, 1 - R/(2·Pp)) (0 for models below ~500M parameters at the
                          default). Parameters below stage3_param_persistence_threshold elements
                          (Pk, whole on every rank) only all-reduce their gradients: + 2·g·Pk·b·(W-1)/W
    Prefetch and bucketing change when bytes move, not how many; small collectives (the loss,
    token counts, the gradient norm) and the first step (whose trace is incomplete, so everything
    is re-gathered) are left out.
    """
    W, b, g = world, bytes_per_elem, grad_accum
    P = sum(numels)
    if W <= 1:
        return {"bytes_per_step": 0, "formula": "one rank: no communication", "estimate": True}
    f = (W - 1) / W
    if stage == 3:
        Pk = sum(n for n in numels if n < persistence_threshold)
        Pp = P - Pk
        r = max(0.0, 1.0 - max_reuse_distance / (2 * Pp)) if Pp else 0.0
        total = (2 + r) * g * Pp * b * f + 2 * g * Pk * b * f
        formula = (f"ZeRO-3: ((2 + r)·g·Pp + 2·g·Pk)·b·(W-1)/W with r={r:.2f} re-gathered for backward "
                   f"(stage3_max_reuse_distance {max_reuse_distance}), g={g}, Pp={Pp} partitioned, Pk={Pk} "
                   f"persistent (< {persistence_threshold} elements), b={b}, W={W}")
    elif stage == 2:
        total = (g + 1) * P * b * f
        formula = f"ZeRO-2: (g+1)·P·b·(W-1)/W with g={g}, P={P}, b={b}, W={W}"
    elif stage == 1:
        total = 3 * P * b * f
        formula = f"ZeRO-1: 3·P·b·(W-1)/W with P={P}, b={b}, W={W}"
    else:
        total = 2 * P * b * f
        formula = f"no ZeRO: 2·P·b·(W-1)/W with P={P}, b={b}, W={W}"
    return {"bytes_per_step": int(round(total)), "formula": formula, "estimate": True}


@dataclass(frozen=True)
class CommSetup:
    """What the bytes per step depend on besides the model: the layout (dp × tp × pp ranks, ZeRO
    stage and DeepSpeed's ZeRO-3 knobs), the batch geometry and the model dtype's size."""

    zero_stage: int
    dp: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    bytes_per_elem: int
    tp: int = 1
    pp: int = 1
    persistence_threshold: int = 100_000
    max_reuse_distance: int = 1_000_000_000
    balance: str = "parameters"  # how pipeline stages are cut (megacpt.parallel.pp.stage_bounds)


def _bounds(margs: ModelArgs, pp: int, balance: str) -> list[int]:
    """Decoder-layer boundaries of the pipeline stages (one stage: all layers)."""
    return stage_bounds(margs, pp, balance) if pp > 1 else [0, margs.num_layers]


def param_numels(margs: ModelArgs) -> list[int]:
    """Element count of every parameter of the whole model (a tied head counted once)."""
    return list(local_numels(margs, 1, 0).values())


def stage_numels(margs: ModelArgs, tp: int, pp: int, balance: str = "parameters") -> list[list[int]]:
    """Element counts of the parameters one rank of each pipeline stage holds (tp rank 0's
    slices; a tied embedding's head copy included on the last stage), as the trainer builds them."""
    local = local_numels(margs, tp, 0)
    emb = local["embed_tokens.weight"]
    bounds = _bounds(margs, pp, balance)
    out = []
    for s in range(pp):
        layers = tuple(f"layers.{i}." for i in range(bounds[s], bounds[s + 1]))
        n = [numel for name, numel in local.items() if name.startswith(layers)]
        if s == 0:
            n.append(emb)
        if s == pp - 1:
            n.append(local["norm.weight"])
            if pp > 1 or not margs.tie_word_embeddings:
                n.append(emb)  # the head (a tied one is a copy on its own stage)
        out.append(n)
    return out


def comm_estimate_run(margs: ModelArgs, setup: CommSetup) -> dict:
    """The estimate `megacpt bench train` reports: comm_estimate() over the data-parallel ranks
    for a plain ZeRO layout, comm_estimate_layout() when tp or pp is above 1."""
    if setup.tp > 1 or setup.pp > 1:
        return comm_estimate_layout(margs, setup)
    return comm_estimate(setup.zero_stage, setup.dp, param_numels(margs), setup.bytes_per_elem, setup.grad_accum,
                         setup.persistence_threshold, setup.max_reuse_distance)


def comm_estimate_layout(margs: ModelArgs, setup: CommSetup) -> dict:
    """Estimated bytes one rank sends per optimizer step, per process group, for dp × tp × pp.

    dp group: comm_estimate()'s ZeRO formula over W = dp on the parameters this rank holds
      (its stage, 1/tp of the split tensors).
    tp group (Megatron tensor parallelism, ring all-reduce of B bytes = 2·B·(tp-1)/tp per rank),
      per micro-batch with A = micro_batch·seq_len·hidden activation elements:
      4 all-reduces of A per decoder layer (forward after o_proj and down_proj, backward at the
      attention and MLP inputs) + 1 for the embedding output (first stage) + 1 for the head's
      input gradient (last stage), in the model dtype; the vocab-parallel loss adds 3 fp32 values
      per token (max, sum-exp, target logit) on the last stage; replicated KV heads (num_kv_heads
      < tp) all-reduce their k/v weight gradients over tp/num_kv_heads ranks every micro-batch.
    pp group (point-to-point, DeepSpeed's pipeline engine), per micro-batch: a stage that is not
      the last sends its output activations (A in the model dtype + position and segment ids,
      2·micro_batch·seq_len int64), one that is not the first sends the gradient of its input
      (A); with tied embeddings the first and last stage all-reduce the embedding gradient
      (2 ranks: V/tp·hidden elements) once per step.
    Reported per group as the busiest stage's figure; `bytes_per_step` is the busiest stage's
    total over all groups. Small collectives (loss, token count, norms) are left out.
    """
    c = setup
    numels = stage_numels(margs, c.tp, c.pp, c.balance)
    bounds = _bounds(margs, c.pp, c.balance)
    per_stage = []
    for s in range(c.pp):
        dp_c = comm_estimate(c.zero_stage, c.dp, numels[s], c.bytes_per_elem, c.grad_accum, c.persistence_threshold,
                             c.max_reuse_distance)
        per_stage.append({"dp": dp_c["bytes_per_step"], "tp": int(round(_tp_bytes(margs, c, bounds, s))),
                          "pp": int(round(_pp_bytes(margs, c, s))), "dp_formula": dp_c["formula"]})
    return {"bytes_per_step": int(max(r["dp"] + r["tp"] + r["pp"] for r in per_stage)),
            "formula": "busiest rank, sum over its groups (see per_group)",
            "per_group": _per_group(margs, c, bounds, per_stage),
            "per_stage": [{k: r[k] for k in ("dp", "tp", "pp")} for r in per_stage], "estimate": True}


def _kv_replicas(margs: ModelArgs, tp: int) -> int:
    """Ranks sharing one KV head (1 when the KV heads are split)."""
    return tp // margs.num_kv_heads if tp > 1 and margs.num_kv_heads < tp else 1


def _kv_numel(margs: ModelArgs) -> int:
    """Elements of one KV head's k (or v) weight and bias."""
    return margs.head_dim * (margs.hidden_size + (1 if margs.qkv_bias else 0))


def _tp_bytes(margs: ModelArgs, c: CommSetup, bounds: list[int], s: int) -> float:
    if c.tp == 1:
        return 0.0
    first, last = s == 0, s == c.pp - 1
    layers = bounds[s + 1] - bounds[s]
    A, b = c.micro_batch * c.seq_len * margs.hidden_size, c.bytes_per_elem
    ar = 2 * (c.tp - 1) / c.tp
    n_ar = 4 * layers + (1 if first else 0) + (1 if last else 0)
    out = c.grad_accum * (n_ar * A * b * ar + (3 * c.micro_batch * c.seq_len * 4 * ar if last else 0))
    rep = _kv_replicas(margs, c.tp)
    if rep > 1:
        out += c.grad_accum * layers * 2 * _kv_numel(margs) * b * 2 * (rep - 1) / rep
    return out


def _pp_bytes(margs: ModelArgs, c: CommSetup, s: int) -> float:
    if c.pp == 1:
        return 0.0
    first, last = s == 0, s == c.pp - 1
    A, b = c.micro_batch * c.seq_len * margs.hidden_size, c.bytes_per_elem
    out = c.grad_accum * ((0 if last else A * b + 2 * c.micro_batch * c.seq_len * 8) + (0 if first else A * b))
    if margs.tie_word_embeddings and (first or last):
        out += (margs.vocab_size // c.tp) * margs.hidden_size * b  # all-reduce over 2 ranks: 2·B·½
    return out


def _per_group(margs: ModelArgs, c: CommSetup, bounds: list[int], per_stage: list[dict]) -> dict:
    g, b = c.grad_accum, c.bytes_per_elem
    A = c.micro_batch * c.seq_len * margs.hidden_size
    rep = _kv_replicas(margs, c.tp)
    busiest = max(per_stage, key=lambda r: r["dp"] + r["tp"] + r["pp"])
    return {
        "dp": {"size": c.dp, "bytes_per_step": max(r["dp"] for r in per_stage),
               "formula": "ZeRO over the data-parallel group on this rank's parameters: " + busiest["dp_formula"]},
        "tp": {"size": c.tp, "bytes_per_step": max(r["tp"] for r in per_stage),
               "formula": (f"g·((4·L_stage + first + last)·A·b + last·3·mb·s·4)·2(tp-1)/tp"
                           f"{' + g·L_stage·2·Pkv·b·2(r-1)/r' if rep > 1 else ''} with g={g}, "
                           f"A=mb·s·h={A}, b={b}, tp={c.tp}"
                           + (f", Pkv={_kv_numel(margs)}, r={rep}" if rep > 1 else ""))},
        "pp": {"size": c.pp, "bytes_per_step": max(r["pp"] for r in per_stage),
               "formula": (f"g·((not last)·(A·b + 2·mb·s·8) + (not first)·A·b)"
                           f"{' + tied first/last: (V/tp)·h·b' if margs.tie_word_embeddings else ''} with g={g}, "
                           f"A={A}, b={b}, stages by layers {bounds}")},
    }
