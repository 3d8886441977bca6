"""Which (tp, pp, cp, zero_stage) layouts a model and world size allow, checked at config time.

Rules (each rejection names the rule and lists the (tp, pp) pairs, or the cp values, that would work):
- tp × pp × cp divides the world size (dp = world / (tp × pp × cp));
- tensor parallel splits query heads, the MLP's intermediate size and the vocabulary evenly, so
  num_heads, intermediate_size and vocab_size are multiples of tp;
- KV heads are split when num_kv_heads is a multiple of tp, and replicated (each rank keeps the
  KV head its query heads use) when tp is a multiple of num_kv_heads; anything else is rejected;
- pipeline stages hold at least one layer each: pp ≤ num_layers;
- DeepSpeed's pipeline engine supports only ZeRO-0/1: pp > 1 needs zero_stage ≤ 1;
- OLMo 2's full-width q/k norm cannot be split by tensor parallelism (family_problems);
- context parallelism (Ulysses, parallel/cp.py) splits each rank's num_heads / tp query heads
  over cp, and its KV heads likewise or, when there are fewer than cp, replicates them up to cp
  (cp a multiple of them); it does not run with pipeline parallelism (cp_problems).
"""

from __future__ import annotations

from megacpt.errors import ConfigError
from megacpt.models.llama import ModelArgs

__all__ = ["validate_layout", "valid_layouts", "tp_problems", "family_problems", "cp_problems"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_problems(args: ModelArgs, tp: int) -> list[str]:
    """Why the model cannot be split over `tp` tensor-parallel ranks (empty when it can)."""
    out = []
    if args.num_heads % tp:
        out.append(f"num_heads {args.num_heads} is not divisible by tp={tp}")
    kv = args.num_kv_heads
    if kv % tp and tp % kv:
        out.append(f"num_kv_heads {kv} neither divisible by tp={tp} (split) nor dividing it (replicated)")
    if args.intermediate_size % tp:
        out.append(f"intermediate_size {args.intermediate_size} is not divisible by tp={tp}")
    if args.vocab_size % tp:
        out.append(f"vocab_size {args.vocab_size} is not divisible by tp={tp}")
    return out


def family_problems(args: ModelArgs, tp: int, pp: int) -> list[str]:
    """Model-family switches a layout cannot split (issue 19). Everything else the families set
    (norm placements and forms, per-head q/k norms, embedding scale, soft-caps, per-layer RoPE,
    partial rotary, longrope) works under tensor, sequence and pipeline parallelism."""
    if args.qk_norm == "full" and tp > 1:
        return [f"tensor parallelism cannot split this model's full-width q/k norm (qk_norm='full', OLMo 2): "
                f"its RMS statistic spans all heads, which tp={tp} spreads over ranks; use tp=1 (pipeline "
                f"parallelism and ZeRO-3 still split the model over the ranks)"]
    return []


def pp_problems(args: ModelArgs, pp: int, zero_stage: int) -> list[str]:
    out = []
    if pp > args.num_layers:
        out.append(f"pp={pp} pipeline stages but only {args.num_layers} layers")
    if pp > 1 and zero_stage > 1:
        out.append(f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only, not zero_stage={zero_stage}")
    return out


def cp_problems(args: ModelArgs, tp: int, pp: int, cp: int) -> list[str]:
    """Why sequences cannot be split over `cp` context-parallel ranks in this layout (empty when
    they can). Each rank holds num_heads / tp query heads after tensor parallelism."""
    if cp == 1:
        return []
    out = []
    if pp > 1:
        out.append(f"context parallelism (cp={cp}) does not run with pipeline parallelism (pp={pp})")
    heads = args.num_heads // tp
    if heads % cp:
        out.append(f"{heads} query heads per rank (num_heads {args.num_heads} / tp={tp}) are not divisible by "
                   f"cp={cp} (Ulysses splits heads)")
    nkv = args.num_kv_heads
    kv = nkv // tp if nkv % tp == 0 else 1  # tp > nkv replicates: one KV head per rank
    if kv % cp and cp % kv:
        out.append(f"{kv} KV heads per rank are neither divisible by cp={cp} nor a divisor of it (replicated)")
    return out


def valid_cps(args: ModelArgs, world_size: int, tp: int, pp: int) -> list[int]:
    """Every cp that fits next to (tp, pp) on world_size ranks."""
    if world_size % (tp * pp):
        return []
    return [cp for cp in _divisors(world_size // (tp * pp)) if not cp_problems(args, tp, pp, cp)]


def valid_layouts(args: ModelArgs, world_size: int, zero_stage: int) -> list[tuple[int, int]]:
    """Every (tp, pp) with tp × pp dividing world_size that the model and ZeRO stage allow."""
    return [(tp, pp) for tp in _divisors(world_size) for pp in _divisors(world_size // tp)
            if not tp_problems(args, tp) and not pp_problems(args, pp, zero_stage)
            and not family_problems(args, tp, pp)]


def _format_pairs(pairs, world_size) -> str:
    if not pairs:
        return "none"
    return ", ".join(f"tp={tp} pp={pp} (dp={world_size // (tp * pp)})" for tp, pp in pairs)


def validate_layout(args: ModelArgs, world_size: int, tp: int, pp: int, zero_stage: int, cp: int = 1) -> None:
    """Raise ConfigError when (tp, pp, cp, zero_stage) does not fit this model on `world_size` ranks."""
    for name, v in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp), ("world size", world_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    problems = []
    if world_size % (tp * pp):
        problems.append(f"tp × pp = {tp}×{pp} = {tp * pp} does not divide the world size {world_size}")
    problems += tp_problems(args, tp) + pp_problems(args, pp, zero_stage) + family_problems(args, tp, pp)
    if not problems and cp > 1:
        _validate_cp(args, world_size, tp, pp, cp)
    if not problems:
        return
    ok = valid_layouts(args, world_size, zero_stage)
    hint = f"layouts that work for this model on {world_size} ranks with zero_stage={zero_stage}: " \
           f"{_format_pairs(ok, world_size)}"
    if pp > 1 and zero_stage > 1:
        lower = [p for p in valid_layouts(args, world_size, 1) if p[1] > 1]
        if lower:
            hint += f"; with zero_stage 0 or 1 also: {_format_pairs(lower, world_size)}"
    raise ConfigError(f"parallel layout tp={tp} pp={pp} zero_stage={zero_stage} is not possible: "
                      f"{'; '.join(problems)}. {hint}")


def _validate_cp(args: ModelArgs, world_size: int, tp: int, pp: int, cp: int) -> None:
    """The cp checks, once (tp, pp) fit: their message lists the cp values that would."""
    problems = cp_problems(args, tp, pp, cp)
    if world_size % (tp * pp * cp):
        problems.insert(0, f"tp × pp × cp = {tp}×{pp}×{cp} = {tp * pp * cp} does not divide the world size "
                           f"{world_size}")
    if not problems:
        return
    ok = ", ".join(str(c) for c in valid_cps(args, world_size, tp, pp))
    raise ConfigError(f"parallel.cp={cp} is not possible with tp={tp} pp={pp} on {world_size} ranks: "
                      f"{'; '.join(problems)}. cp values that work there: {ok}")
