"""LoRA factors on tensor-parallel linears (megacpt/models/lora.py has the update itself).

Column-parallel linear (q/k/v, gate/up: this rank's output rows): B keeps the same rows, A is
whole on every rank. A's gradient, B_localᵀ·dy_local·xᵀ, covers this rank's rows only, so it is
summed over the tensor group in backward (as Megatron does for replicated parameters); x's
gradient through the update is partial the same way and joins the block input's all-reduce that
apply_tp already does. With replicated KV heads B's rows are shared by the head's replica group,
whose gradients are summed over it (as the weight's).

Row-parallel linear (o, down: this rank's input columns): A keeps the same columns, B is whole.
A_local·x_local is a partial sum: it is all-reduced (sequence parallel: reduce-scattered to this
rank's positions) before B, an r-wide tensor. B then sees the same input and output gradient on
every rank (its gradient is complete); with sequence parallelism only its own positions, so its
gradient is summed over the tensor group.

Split factors carry `tensor_model_parallel` and a `tp_shards` entry (parallel/shapes.py
factor_shards), so gradient norms, gathers and consolidation treat them as the weights.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megacpt.parallel.shapes import factor_shards
from megacpt.parallel.tp import (ColumnParallelLinear, RowParallelLinear, copy_to_tp_region, reduce_from_tp_region,
                                 scatter_to_sequence_region)


def split(module, a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B) of the full factors of `module` (named `name`); unsplit linears keep them."""
    weight = getattr(module, "tp_shards", {}).get("weight")
    if weight is None:
        return a, b
    shards = factor_shards(name, weight, a.shape[0])
    sa, sb = shards.get(f"{name}.lora_A.weight"), shards.get(f"{name}.lora_B.weight")
    return (a if sa is None else a[sa.index()]), (b if sb is None else b[sb.index()])


def wire(module, name: str, sequence_parallel: bool) -> None:
    """After models.lora.attach on a tensor-parallel linear: its factors' shards, gradient-norm
    marks and communication (see the module docstring)."""
    weight = module.tp_shards["weight"]
    r = module.lora_A.weight.shape[0]
    shards = {k.rsplit(".", 2)[-2]: s for k, s in factor_shards(name, weight, r).items()}  # "lora_A"/"lora_B"
    for factor, shard in shards.items():
        mod = getattr(module, factor)
        mod.tp_shards = {"weight": shard}
        mod.weight.tensor_model_parallel = shard.counted
    group = module.group
    if isinstance(module, ColumnParallelLinear):
        module.lora_A.wrap = partial(copy_to_tp_region, group=group)
        if module.replica_group is not None and dist.get_world_size(module.replica_group) > 1:
            module.lora_B.wrap = partial(copy_to_tp_region, group=module.replica_group)
        if module.copy_input:
            module.lora_input = partial(copy_to_tp_region, group=group)
    elif isinstance(module, RowParallelLinear):
        reduce = scatter_to_sequence_region if sequence_parallel else reduce_from_tp_region
        module.lora_mid = partial(reduce, group=group)
        if sequence_parallel:
            module.lora_B.wrap = partial(copy_to_tp_region, group=group)
    else:
        raise TypeError(f"{name}: {type(module).__name__} is not a tensor-parallel linear")
