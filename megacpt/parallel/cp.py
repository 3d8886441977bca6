"""Context parallelism, DeepSpeed-Ulysses style: each training sequence is split over the `cp`
ranks of a context-parallel group, a contiguous block of seq_len / cp positions per rank, for the
whole model; only attention sees whole sequences.

Inside attention (after the projections, q/k norms and RoPE, which are per position) one
all-to-all turns (b, heads, s/cp, d) into (b, heads/cp, s, d): each rank then holds every
position of heads/cp of the heads and runs the model's own attention (SDPA with the causal,
sliding-window and document masks, or the soft-capped path) unchanged; a second all-to-all turns
the output back into this rank's positions of all heads before o_proj. The backward of an
all-to-all is the inverse all-to-all. Why Ulysses and not ring attention: docs/CONTEXT_PARALLEL.md.

Ulysses splits heads, so the rank's (tensor-parallel local) query heads must divide by cp. KV
heads too, or, with fewer KV heads than cp ranks (Gemma 3 270M has one), each KV head is repeated
up to cp heads first so every rank gets the one its query heads use (DeepSpeed ALST does the
same); the repeat's backward sums the copies' gradients. Checked at config time by
parallel/layouts.py (cp_problems).

The model stays plain: `Transformer.forward(..., cp=UlyssesAttention(...))` takes this rank's
block of input_ids/labels and the whole sequence's position and segment ids, and calls
`cp.attention` where it would call SDPA. Without `cp` (evaluation) it runs whole sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacpt.models.llama import sdpa_attention

__all__ = ["UlyssesAttention", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """Split `x` along `scatter_dim` into n blocks, send block j to rank j of `group`, and
    concatenate what arrives along `gather_dim` in rank order. Backward: the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _exchange(x, group, scatter_dim: int, gather_dim: int):
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim))  # (n, ...): block j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


# A graph break for torch.compile: the collective stays eager.
@torch.compiler.disable
def all_to_all(x, group, scatter_dim: int, gather_dim: int):
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class UlyssesAttention:
    """The `cp` object the model's forward takes: this rank's place in its context-parallel group
    and the attention over the group's whole sequence."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of positions (dim 1) of a (b, s, ...) tensor."""
        s = t.shape[1]
        if s % self.size:
            raise ValueError(f"sequence length {s} is not divisible by cp={self.size}")
        n = s // self.size
        return t[:, self.rank * n:(self.rank + 1) * n]

    def attention(self, q, k, v, mask, scale: float | None = None, softcap: float | None = None):
        """q (b, nh, s/cp, d), k/v (b, nkv, s/cp, d) of this rank's positions → (b, nh, s/cp, d),
        attention over the whole sequence; `mask` is the whole sequence's (or None: causal)."""
        nh, nkv = q.shape[1], k.shape[1]
        if nh % self.size or (nkv % self.size and self.size % nkv):
            raise ValueError(f"{nh} query / {nkv} KV heads cannot be split over cp={self.size}")
        if nkv % self.size:
            # One KV head per rank after the exchange: the one this rank's query heads use.
            k = k.repeat_interleave(self.size // nkv, dim=1)
            v = v.repeat_interleave(self.size // nkv, dim=1)
        q, k, v = (all_to_all(t, self.group, 1, 2) for t in (q, k, v))  # (b, heads/cp, s, d)
        out = sdpa_attention(q, k, v, mask, scale, softcap)
        return all_to_all(out, self.group, 2, 1)  # (b, nh, s/cp, d)

    def __repr__(self) -> str:
        return f"UlyssesAttention(rank={self.rank}/{self.size})"
