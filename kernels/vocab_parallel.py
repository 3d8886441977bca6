"""Vocab-parallel linear + cross-entropy for a tensor-parallel output head.

Each rank of `group` holds the rows [vocab_start, vocab_start + V_local) of the head weight and
the same (replicated) hidden states and targets. Per token, only the softmax statistics cross
ranks -- the max (one all_reduce MAX) and sum-exp / target logit / logit sum (one all_reduce SUM of
a stacked (2 or 3, N) tensor) -- never logits. In backward, each rank computes the gradient of its
own weight shard locally (dW is not communicated) and the partial dX of its vocabulary slice;
the partial dXs are all-reduced (SUM) over the group, as for the input of Megatron's
column-parallel head. So do not wrap `hidden` in another copy-to-tensor-parallel-region op: that
would reduce dX twice.

The group is an explicit argument (no global parallel state). Every rank must call this with the
same N, reduction and requires_grad pattern (the collectives must match).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .linear_cross_entropy import RecomputeLCE, check_targets, forward_no_grad, get_backend, validate
from .per_token import LossSpec

__all__ = ["vocab_parallel_linear_cross_entropy"]


class _GlobalStats:
    """A backend whose stats are over the whole vocabulary: the shard's own, combined across the
    ranks of `group` (one all_reduce MAX, one SUM); its grads are the shard's own, with dX summed
    over the group. RecomputeLCE drives it like any backend."""

    def __init__(self, backend, group):
        self.backend, self.group = backend, group

    def stats(self, hidden, weight, targets, spec: LossSpec):
        row_max, sumexp, tgt_logit, logit_sum = self.backend.stats(hidden, weight, targets, spec)
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=self.group)
        parts = [sumexp * torch.exp(row_max - global_max), tgt_logit]  # tgt_logit is 0 off-shard
        if spec.need_sum:
            parts.append(logit_sum)
        packed = torch.stack(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return global_max, packed[0], packed[1], (packed[2] if spec.need_sum else None)

    def grads(self, hidden, weight, targets, row_max, log_se, scale, spec: LossSpec):
        """The shard's own dW; its partial dX (its vocabulary slice's share) summed over the group."""
        dx, dw = self.backend.grads(hidden, weight, targets, row_max, log_se, scale, spec)
        if dx is not None:
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=self.group)
        return dx, dw


def vocab_parallel_linear_cross_entropy(hidden: Tensor, weight_shard: Tensor, targets: Tensor, group=None,
                                        *, vocab_start: int, vocab_size: Optional[int] = None,
                                        ignore_index: int = -100, reduction: str = "mean",
                                        z_loss: float = 0.0, label_smoothing: float = 0.0,
                                        softcap: Optional[float] = None, return_z_loss: bool = False,
                                        impl: str = "auto"):
    """linear_cross_entropy over a vocabulary sharded across the ranks of `group`.

    hidden (..., H) and targets (...) (global vocabulary ids) are identical on every rank;
    weight_shard (V_local, H) holds global rows [vocab_start, vocab_start + V_local).
    vocab_size: the global V (default V_local * group size, i.e. equal shards) -- it scales the
    label-smoothing term and bounds the target range check.
    Returns the same value on every rank, like linear_cross_entropy (same options and semantics).
    group=None means the default process group (passed through to torch.distributed as is).
    """
    validate(hidden, weight_shard, targets, reduction, impl, z_loss, label_smoothing, softcap)
    world = dist.get_world_size(group)
    v_local = weight_shard.shape[0]
    vocab_size = v_local * world if vocab_size is None else int(vocab_size)
    if not (0 <= vocab_start and vocab_start + v_local <= vocab_size):
        raise ValueError(f"shard rows [{vocab_start}, {vocab_start + v_local}) do not fit in "
                         f"vocab_size {vocab_size}")
    lead_shape = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1)
    check_targets(targets1, vocab_size, ignore_index)
    shard = _GlobalStats(get_backend(impl), group)
    grad = torch.is_grad_enabled()
    spec = LossSpec(vocab_total=vocab_size, ignore_index=ignore_index, z_loss=float(z_loss),
                    label_smoothing=float(label_smoothing),
                    softcap=float(softcap) if softcap is not None else None, vocab_start=vocab_start,
                    need_dx=grad and hidden.requires_grad, need_dw=grad and weight_shard.requires_grad)
    if spec.need_dx or spec.need_dw:
        loss, z = RecomputeLCE.apply(hidden2, weight_shard, targets1, shard, spec, reduction)
    else:
        loss, z = forward_no_grad(shard, hidden2, weight_shard, targets1, spec, reduction)
    if reduction == "none":
        loss, z = loss.reshape(lead_shape), z.reshape(lead_shape)
    return (loss, z) if return_z_loss else loss
