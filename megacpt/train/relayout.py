"""Resuming a run in another parallel layout (tp, pp, world size): everything a resume restores,
with the model weights and Adam moments re-sliced for the new layout.

DeepSpeed's universal checkpoints reshard the data-parallel dimension only (and tensor
parallelism only for Megatron's own layer names), so for tp/pp changes we read the old
checkpoint into layout-free full tensors ourselves:
  - per model-parallel rank m (DeepSpeed's mp_rank_XX: pp_rank·tp + tp_rank), the fp32 master
    weight, exp_avg and exp_avg_sq of each of its parameters: from the ZeRO-1/2 optimizer files
    (flat fp32 partitions, one per dp rank, cut by the `param_slice_mappings` DeepSpeed stores) or,
    without ZeRO, from the torch optimizer state (matched to names by the order the trainer hands
    parameters to the optimizer) and the module / pipeline layer files;
  - tensor-parallel slices put together with the slices apply_tp assigns (as export does).
The new layout is then built from those weights (like init_from) and each rank writes its own
slices of the moments into its optimizer (DeepSpeed's safe_set_full_optimizer_state under ZeRO,
the torch optimizer state without). Adam's step count, the schedule, the data position, tokens
per source and skipped batches come from megacpt_state.json as in every resume. ZeRO-3 sources
are not read here (their state is partitioned per parameter differently); the dp-only change
of a non-TP/PP run keeps going through DeepSpeed's universal checkpoint.
Every rank reads the whole old state (memory: the full model with its two moments, on CPU).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from deepspeed.utils import safe_set_full_optimizer_state
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from megacpt.errors import ConfigError
from megacpt.parallel.pp import item_bounds, megacpt_name, stage_bounds
from megacpt.parallel.shapes import tp_shards_for
from megacpt.parallel.tp import tp_shards
from megacpt.safe_load import check_torch_file, safe_load

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_OPTIM = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")


def read_layout_free(ckpt_dir, args, old_parallel: dict) -> tuple[dict, int]:
    """{megacpt name: {"fp32", "exp_avg", "exp_avg_sq": full tensor}} and Adam's step count."""
    ckpt_dir = Path(ckpt_dir)
    for f in ckpt_dir.glob("*.pt"):
        check_torch_file(f)
    tp, pp = int(old_parallel.get("tp", 1)), int(old_parallel.get("pp", 1))
    if int(old_parallel.get("zero_stage", 0)) >= 3:
        raise ConfigError("resuming a ZeRO-3 checkpoint in another tp/pp layout is not supported; resume it in its "
                          "own layout, or start a new run_dir with model.init_from pointing at it")
    per_tp: list[dict] = [{} for _ in range(tp)]
    step = None
    for m in range(tp * pp):
        local, s = _mp_rank_state(ckpt_dir, m, tp, pp, args, old_parallel.get("pp_balance", "parameters"))
        step = s if step is None else step
        for name, st in local.items():
            per_tp[m % tp][megacpt_name(name) if pp > 1 else name] = st
    full = _merge(per_tp, args, tp)
    if args.tie_word_embeddings:
        full.pop("lm_head.weight", None)  # the pipeline's copy: identical to the embedding
    return full, int(step or 0)


def _mp_rank_state(ckpt_dir: Path, m: int, tp: int, pp: int, args, balance: str) -> tuple[dict, int]:
    optim = sorted((int(g.group(1)), f) for f in ckpt_dir.glob("*_optim_states.pt")
                   if (g := _OPTIM.match(f.name)) and int(g.group(2)) == m)
    model_states = safe_load(ckpt_dir / f"mp_rank_{m:02d}_model_states.pt")
    if optim:
        return _from_zero(model_states, [safe_load(f)["optimizer_state_dict"] for _, f in optim])
    return _from_torch_optimizer(ckpt_dir, model_states, m, tp, pp, args, balance)


def _from_zero(model_states: dict, dp_files: list[dict]) -> tuple[dict, int]:
    """ZeRO-1/2: each dp rank's flat fp32 partition (and moments) per group, cut by name."""
    shapes = model_states["param_shapes"]
    pieces: dict = {}
    for sd in dp_files:
        base = sd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = {"fp32": sd["single_partition_of_fp32_groups"][g], "exp_avg": base[g]["exp_avg"],
                    "exp_avg_sq": base[g]["exp_avg_sq"]}
            for name, frag in mapping.items():
                for k in KEYS:
                    pieces.setdefault(name, {}).setdefault(k, []).append(flat[k].narrow(0, frag.start, frag.numel))
    out = {}
    for group in shapes:
        for name, shape in group.items():
            out[name] = {k: torch.cat(pieces[name][k]).reshape(tuple(shape)).clone() for k in KEYS}
    step = dp_files[0]["base_optimizer_state"]["state"][0]["step"]
    return out, int(step)


def _from_torch_optimizer(ckpt_dir, model_states, m, tp, pp, args, balance) -> tuple[dict, int]:
    """Without ZeRO: the torch optimizer's state by index; indices follow the order the trainer
    passes parameters (engine.param_groups: matrices, then vectors, each in module order)."""
    if pp > 1:
        ib = item_bounds(stage_bounds(args, pp, balance))
        pp_rank, tp_rank = divmod(m, tp)
        weights = {}
        for i in range(ib[pp_rank], ib[pp_rank + 1]):
            suffix = f"-model_{tp_rank:02d}" if tp > 1 else ""
            for k, v in safe_load(ckpt_dir / f"layer_{i:02d}{suffix}-model_states.pt").items():
                weights[f"{i}.{k}"] = v
    else:
        weights = dict(model_states["module"])
        if args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)  # one parameter with the embedding
    names = [n for n, t in weights.items() if t.dim() >= 2] + [n for n, t in weights.items() if t.dim() < 2]
    opt = model_states["optimizer"]
    order = [i for g in opt["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise RuntimeError(f"checkpoint rank {m}: {len(order)} optimizer entries for {len(names)} parameters")
    out, step = {}, 0
    for idx, name in zip(order, names):
        st = opt["state"].get(idx)
        w = weights[name].float()
        if st is None:  # never stepped
            out[name] = {"fp32": w, "exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}
            continue
        out[name] = {"fp32": w, "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
        step = int(st["step"])
    return out, step


def _merge(per_tp: list[dict], args, tp: int) -> dict:
    if tp == 1:
        return per_tp[0]

    layouts = [tp_shards_for(args, tp, t) for t in range(tp)]
    full = {}
    for name, first in per_tp[0].items():
        shard = layouts[0].get(name)
        if shard is None:
            full[name] = first
            continue
        full[name] = {}
        for k in KEYS:
            out = torch.empty(shard.full_shape, dtype=first[k].dtype)
            for t in range(tp):
                out[layouts[t][name].index()] = per_tp[t][name][k]
            full[name][k] = out
    return full


def apply_moments(engine, module, topology, full: dict, step: int, rename=None) -> None:
    """Write this rank's slices of the Adam moments (and the step count) into its optimizer."""
    shards = {(rename(n) if rename else n): s for n, s in tp_shards(module).items()}
    zero = engine.zero_optimization_stage()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if zero > 0:
        # Adam's state is created lazily at the first step; create it (zeros) for each flat fp32
        # partition and link the parameters' fragments to it, so each can be written by name.
        zopt = engine.optimizer
        for lp_group, flat in zip(zopt.bit16_groups, zopt.single_partition_of_fp32_groups):
            inner.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
            lazy_init_hp_params_optimizer_state(lp_group, flat, inner.state)
    for pname, p in module.named_parameters():
        name = rename(pname) if rename else pname
        src = full.get(name) or full.get("embed_tokens.weight" if name == "lm_head.weight" else name)
        if src is None:
            raise RuntimeError(f"no optimizer state for {name} in the checkpoint")
        sh = shards.get(name)
        for k in ("exp_avg", "exp_avg_sq"):
            v = src[k][sh.index()] if sh is not None else src[k]
            if zero > 0:
                safe_set_full_optimizer_state(p, v.to(p.device).contiguous(), k)
            else:
                inner.state.setdefault(p, {})[k] = v.to(device=p.device, dtype=torch.float32).clone()
        if zero == 0:
            inner.state[p]["step"] = torch.tensor(float(step))
