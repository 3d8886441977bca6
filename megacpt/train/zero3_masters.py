"""ZeRO-3 in fp32: one copy of the weights instead of two (issue 23).

DeepSpeed's stage-3 optimizer means to use the parameter partitions themselves as the fp32 master
weights when they already are in the master dtype on the optimizer's device (0.19.8,
deepspeed/runtime/zero/stage3.py, `_create_fp32_partitions`):

    elif self.fp16_partitioned_groups_flat[i].dtype == self.master_weights_and_grads_dtype and \\
            self.fp16_partitioned_groups_flat[i].device == self.device:
        self.fp32_partitioned_groups_flat.append(self.fp16_partitioned_groups_flat[i])

but `self.device` is a string ('cpu', 'cuda:0') and a torch.device never equals a string, so it
takes the `else` branch and clones every partition: 20 bytes per parameter where 16 suffice
(4 parameter/master + 4 gradient + 8 Adam moments).

`share_fp32_masters` makes that decision again after the engine is built, with the devices
compared as devices. Each master flat tensor keeps its identity — the inner optimizer's state is
keyed by it, DeepSpeed puts it in the param groups for each sub-group's step and for checkpoints,
gives it `ds_id` and hangs the gradient partition on its `.grad` — and takes the parameter
partition's storage (`.data =`, as DeepSpeed's own `offload_states` moves masters), so the clone
is freed and the optimizer's in-place update is the parameter update. DeepSpeed's copy
master → parameters after each step (`_reassign_or_swap_out_partitioned_parameters`) then copies
a tensor onto itself, which torch's `copy_` skips (same storage, offset, sizes, strides and
dtype): the aliasing DeepSpeed's comment there describes for autocast. Checkpoint loads (its own
and universal ones) write the masters and then copy them to the parameters: the same memory.

Only where DeepSpeed would have aliased: no optimizer offload, no NVMe swapping, and per sub-group
the partition in memory, same dtype, device and length, separate storage and equal values. A
DeepSpeed release that fixes the comparison leaves nothing to find; tests/test_zero3_masters.py
then fails and says to delete this module.
"""

from __future__ import annotations

import torch


def _separate_copies(opt) -> list[int]:
    """Sub-groups whose fp32 master is a separate copy of the parameter partition, where
    DeepSpeed's own rule (devices compared correctly) says it should be that partition."""
    masters = getattr(opt, "fp32_partitioned_groups_flat", None)
    params = getattr(opt, "fp16_partitioned_groups_flat", None)
    if not masters or params is None or len(masters) != len(params):
        return []
    if getattr(opt, "offload_optimizer", True) or getattr(opt, "swap_optimizer", True):
        return []
    found = []
    for i, (master, lp) in enumerate(zip(masters, params)):
        if lp is None or master is lp or master.dtype != lp.dtype or master.device != lp.device:
            continue
        if master.numel() != lp.numel() or not master.numel():
            continue
        if master.untyped_storage().data_ptr() == lp.untyped_storage().data_ptr():
            continue
        if torch.equal(master, lp):
            found.append(i)
    return found


@torch.no_grad()
def share_fp32_masters(engine) -> int:
    """Point each redundant fp32 master partition of a ZeRO-3 engine at the parameter partition
    (see the module docstring). Returns the bytes freed on this rank (0: nothing to do)."""
    if engine.zero_optimization_stage() != 3:
        return 0
    opt = engine.optimizer
    freed = 0
    for i in _separate_copies(opt):
        master = opt.fp32_partitioned_groups_flat[i]
        freed += master.numel() * master.element_size()
        master.data = opt.fp16_partitioned_groups_flat[i]
    return freed
