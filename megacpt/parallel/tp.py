"""Megatron-style tensor parallelism, swapped into the plain Transformer after construction.

`apply_tp(model, topology)` replaces, in every layer,
  q/k/v_proj, gate/up_proj  → ColumnParallelLinear (output features split: attention by heads)
  o_proj, down_proj         → RowParallelLinear (input features split, output all-reduced)
and embed_tokens / lm_head → VocabParallelEmbedding / VocabParallelLMHead (vocabulary rows
split). Norms stay whole (replicated) on every tensor-parallel rank. Per-head q/k norms (Qwen3,
Gemma 3) are replicated too, but a rank normalises only its own heads, so their weight gradients
are summed over the tensor group (HeadParallelRMSNorm). OLMo 2's full-width q/k norm is refused
(layouts.family_problems: its statistic spans every head).

Communication per layer (Megatron's): forward, one all-reduce after o_proj and one after
down_proj; backward, one all-reduce of the input gradient of the attention block and one of the
MLP block. The latter two are the "copy to tensor-parallel region" (identity forward, all-reduce
backward) applied once to the block's input by a forward pre-hook on `self_attn` / `mlp`, so
q, k and v (and gate, up) share it; the column layers themselves do no communication. The
vocab-parallel head's loss (megacpt.kernels.vocab_parallel_linear_cross_entropy) all-reduces its
own input gradient, so nothing wraps its input.

Because every rank of a tensor group enters each norm with the same activations and the same
(all-reduced) output gradient, the replicated parameters (norms) get identical, complete
gradients on every tp rank; nothing needs reducing (q/k norms aside, see above). The one
exception is replicated KV heads:
when num_kv_heads < tp, each KV head is kept by tp / num_kv_heads ranks, each of which sees the
gradient from its own query heads only, so the k/v weight (and bias) gradients are all-reduced
over those ranks (the "KV replica group") in backward.

Each split parameter records how its slice maps to the full Hugging Face tensor (`Shard`:
dimension and [start, stop)), so `load_tp_weights` reads only those rows or columns of the files
and `gather_tp_state` reassembles full tensors for export. Split parameters carry
`tensor_model_parallel = True` (DeepSpeed counts their gradient norm on every tp rank; the rest
on tp rank 0 only); of a replicated KV head only the first rank of its replica group is marked.

`apply_tp` works on a meta-device model (nothing is allocated: the new parameters are meta too)
or on a materialised one (the new parameters are copies of the slices).
Sequence parallelism (optional, `apply_tp(..., sequence_parallel=True)`) is described at apply_tp.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megacpt.errors import ConfigError, UserError
from megacpt.kernels import linear_cross_entropy, vocab_parallel_linear_cross_entropy
from megacpt.labels import IGNORE
from megacpt.models.hf import as_weights, check_weights
from megacpt.models.llama import soft_cap
from megacpt.parallel.layouts import family_problems, tp_problems

__all__ = [
    "Shard", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelLMHead",
    "apply_tp", "tp_shards", "tp_grad_norm", "tp_grad_sq", "load_tp_weights", "init_tp_weights", "gather_tp_state",
    "iter_tp_state", "HeadParallelRMSNorm", "SequenceParallelRMSNorm", "copy_to_tp_region",
    "reduce_from_tp_region", "gather_from_tp_region",
]


# ---- communication as autograd functions -----------------------------------------------------

def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over `group` in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce (sum) over `group` forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dim forward (rank order); own slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=-1)[r].contiguous(), None


class _ScatterSeq(torch.autograd.Function):
    """Sequence parallel: reduce-scatter along the sequence (dim 1) forward — each rank keeps the
    sum over ranks of its own block of positions; all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        parts = [p.contiguous() for p in x.chunk(n, dim=1)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        parts = [torch.empty_like(grad, memory_format=torch.contiguous_format) for _ in range(n)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=1), None


class _GatherSeq(torch.autograd.Function):
    """Sequence parallel: all-gather along the sequence forward; backward either reduce-scatters
    the gradient (consumers whose input gradients are partial per rank: column-parallel layers)
    or keeps this rank's block (consumers that already all-reduce it: the vocab-parallel head)."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        n = dist.get_world_size(group)
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _ScatterSeq.forward(ctx, grad, ctx.group), None, None
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=1)[r].contiguous(), None, None


def scatter_to_sequence_region(x, group):
    return x if _size(group) == 1 else _ScatterSeq.apply(x, group)


def gather_from_sequence_region(x, group, reduce_grad: bool = True):
    return x if _size(group) == 1 else _GatherSeq.apply(x, group, reduce_grad)


def copy_to_tp_region(x, group):
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x, group):
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tp_region(x, group):
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group)


# ---- layers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """This rank's slice of a full tensor: indices [start, stop) of dimension `dim`."""

    dim: int
    start: int
    stop: int
    full_shape: tuple
    # Count this copy in a global gradient norm (False on all but one rank of a replica group).
    counted: bool = True

    def index(self) -> tuple:
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)

    @property
    def shape(self) -> tuple:
        s = list(self.full_shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)


def _new_param(full: nn.Parameter, shard: Shard | None) -> nn.Parameter:
    """A parameter for `shard` of `full`: meta if `full` is meta, else a copy of the slice."""
    if full.is_meta:
        shape = shard.shape if shard is not None else tuple(full.shape)
        return nn.Parameter(torch.empty(shape, dtype=full.dtype, device="meta"), requires_grad=full.requires_grad)
    data = full.detach()
    if shard is not None:
        data = data[shard.index()]
    return nn.Parameter(data.clone(), requires_grad=full.requires_grad)


class _TPModule(nn.Module):
    """Common bookkeeping: `tp_shards` maps a local parameter name to its Shard."""

    tp_shards: dict

    def _mark(self):
        for name, shard in self.tp_shards.items():
            p = getattr(self, name, None)
            if p is not None:
                p.tensor_model_parallel = shard.counted


class ColumnParallelLinear(_TPModule):
    """y_local = x W_shardᵀ (+ b_shard): rows [start, stop) of W (output features).

    The input must already be in the tensor-parallel region (wrapped by copy_to_tp_region, here
    done once per block by apply_tp's pre-hook) unless `copy_input=True`.
    `replica_group`: ranks holding the same slice (replicated KV heads); their weight gradients
    are summed over it in backward.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, shard: Shard, group, *,
                 copy_input: bool = False, replica_group=None):
        super().__init__()
        self.weight = _new_param(weight, shard)
        b_shard = Shard(0, shard.start, shard.stop, (shard.full_shape[0],), shard.counted)
        self.bias = _new_param(bias, b_shard) if bias is not None else None
        self.tp_shards = {"weight": shard}
        if bias is not None:
            self.tp_shards["bias"] = b_shard
        self.group, self.copy_input, self.replica_group = group, copy_input, replica_group
        self._mark()

    def forward(self, x):
        if self.copy_input:
            x = copy_to_tp_region(x, self.group)
        w, b = self.weight, self.bias
        if _size(self.replica_group) > 1:
            w = copy_to_tp_region(w, self.replica_group)
            b = copy_to_tp_region(b, self.replica_group) if b is not None else None
        return F.linear(x, w, b)

    def extra_repr(self):
        s = self.tp_shards["weight"]
        return f"in={s.shape[1]}, out={s.shape[0]} (rows {s.start}:{s.stop} of {s.full_shape[0]})"


class RowParallelLinear(_TPModule):
    """y = all_reduce(x_local W_shardᵀ) (+ b): columns [start, stop) of W (input features)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, shard: Shard, group,
                 sequence_parallel: bool = False):
        super().__init__()
        self.weight = _new_param(weight, shard)
        self.bias = _new_param(bias, None) if bias is not None else None  # replicated, added once
        self.tp_shards = {"weight": shard}
        self.group, self.sequence_parallel = group, sequence_parallel
        self._mark()

    def forward(self, x):
        y = F.linear(x, self.weight)
        # Sequence parallel: the sum leaves each rank with its block of positions only.
        y = scatter_to_sequence_region(y, self.group) if self.sequence_parallel else reduce_from_tp_region(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        s = self.tp_shards["weight"]
        return f"in={s.shape[1]}, out={s.shape[0]} (cols {s.start}:{s.stop} of {s.full_shape[1]})"


class VocabParallelEmbedding(_TPModule):
    """Rows [start, stop) of the embedding; other ids give zeros here, and the all-reduce sums
    the one rank's row that holds each id."""

    def __init__(self, weight: nn.Parameter, shard: Shard, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = _new_param(weight, shard)
        self.tp_shards = {"weight": shard}
        self.vocab_start, self.vocab_end = shard.start, shard.stop
        self.group, self.sequence_parallel = group, sequence_parallel
        self._mark()

    def forward(self, ids):
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        out = F.embedding(local, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return scatter_to_sequence_region(out, self.group)
        return reduce_from_tp_region(out, self.group)

    def extra_repr(self):
        return f"rows {self.vocab_start}:{self.vocab_end} of {self.tp_shards['weight'].full_shape[0]}"


class VocabParallelLMHead(_TPModule):
    """Output head over vocabulary rows [start, stop).

    forward(h, targets) → summed token loss (fp32 scalar, equal on every tp rank) via the
    vocab-parallel fused linear cross-entropy (no logits materialised, not even local ones);
    forward(h) → full logits (…, V), all-gathered over the vocabulary.
    """

    def __init__(self, weight: nn.Parameter, shard: Shard, group, softcap: float | None = None):
        super().__init__()
        self.weight = _new_param(weight, shard)
        self.tp_shards = {"weight": shard}
        self.vocab_start, self.vocab_size = shard.start, shard.full_shape[0]
        self.group = group
        self.softcap = softcap  # final-logit soft-cap (Gemma 2), as in the plain LMHead
        self._mark()

    def forward(self, h, targets=None, reduction: str = "sum"):
        if targets is None:
            local = F.linear(copy_to_tp_region(h, self.group), self.weight)
            logits = gather_from_tp_region(local, self.group)
            return logits if self.softcap is None else soft_cap(logits, self.softcap)

        if _size(self.group) == 1:
            return linear_cross_entropy(h, self.weight, targets, ignore_index=IGNORE, reduction=reduction,
                                        softcap=self.softcap)
        return vocab_parallel_linear_cross_entropy(
            h, self.weight, targets, self.group, vocab_start=self.vocab_start, vocab_size=self.vocab_size,
            ignore_index=IGNORE, reduction=reduction, softcap=self.softcap)

    def extra_repr(self):
        s = self.tp_shards["weight"]
        return f"rows {s.start}:{s.stop} of {s.full_shape[0]}"


class _CopyInputHook:
    """Forward pre-hook: the block's input enters the tensor-parallel region (one backward
    all-reduce shared by the block's column-parallel layers). Sequence parallel: the input is
    this rank's block of positions; it is all-gathered (reduce-scattered backward) instead."""

    def __init__(self, group, sequence_parallel: bool = False, reduce_grad: bool = True):
        self.group, self.sequence_parallel, self.reduce_grad = group, sequence_parallel, reduce_grad

    def __call__(self, module, args):
        if self.sequence_parallel:
            return (gather_from_sequence_region(args[0], self.group, self.reduce_grad), *args[1:])
        return (copy_to_tp_region(args[0], self.group), *args[1:])


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm over this rank's block of positions: the weight is replicated, but each rank's
    gradient covers its own positions only, so it is summed over the tensor group in backward."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        self.weight = norm.weight
        self.eps, self.group = norm.eps, group
        self.norm_fn = norm.norm_fn
        # The form decides the identity init (init_tp_weights): ones, or zeros for 1 + w.
        self.form = getattr(norm, "form", "weight")

    def forward(self, x):
        # RMSNorm.forward's arithmetic (same function, same numerics), with the weight wrapped.
        return self.norm_fn(x, copy_to_tp_region(self.weight, self.group), self.eps)


class HeadParallelRMSNorm(SequenceParallelRMSNorm):
    """Per-head q/k RMSNorm (Qwen3, Gemma 3) of a rank that holds some of the heads: the (d,)
    weight is shared by all heads and replicated, but each rank's gradient covers its own heads
    only, so it is summed over the tensor group in backward (the same arithmetic as the sequence
    parallel norm, for a different reason). With replicated KV heads the sum is still complete:
    each rank's k_norm gradient comes from its own query heads, and every query head is on
    exactly one rank."""


# ---- applying and loading ---------------------------------------------------------------------

def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    step = n // parts
    return i * step, (i + 1) * step


def _wrap_norms(layer: nn.Module, args, group, sequence_parallel: bool) -> None:
    """The norms of one decoder layer whose weight gradients are partial per rank."""
    if args.qk_norm == "head":
        a = layer.self_attn
        a.q_norm, a.k_norm = HeadParallelRMSNorm(a.q_norm, group), HeadParallelRMSNorm(a.k_norm, group)
    if sequence_parallel:
        # Every norm of the block's placement (pre, post or sandwich) runs on the residual
        # stream, which sequence parallelism splits by position.
        for name in layer.norm_names:
            if name is not None:
                setattr(layer, name, SequenceParallelRMSNorm(getattr(layer, name), group))


def apply_tp(model: nn.Module, topology, sequence_parallel: bool = False) -> nn.Module:
    """Swap the tensor-parallel layers into `model` (a megacpt Transformer) in place; returns it.

    Collective: every rank of the world calls it once, in the same order relative to other group
    creation (replicated KV heads create their sub-groups here). With tp = 1 it changes nothing.

    sequence_parallel: between the tensor-parallel regions (norms, residual stream) each rank
    keeps only its block of seq_len / tp positions; the all-reduces after o_proj / down_proj and
    the embedding become reduce-scatters, the block inputs are all-gathered, norm weight
    gradients are summed over the group, and the head gathers the final hidden state. Same
    bytes moved, activations between the regions 1/tp the size. seq_len must divide by tp.
    """
    tp, r, group = topology.tp_size, topology.tp_rank, topology.tp_group
    if tp == 1:
        return model
    if getattr(model, "tp_topology", None) is not None:
        raise RuntimeError("apply_tp was already applied to this model")

    args = model.args
    problems = tp_problems(args, tp) + family_problems(args, tp, 1)
    if problems:
        raise ConfigError(f"cannot split the model over tp={tp}: {'; '.join(problems)}")
    d, nh, nkv = args.head_dim, args.num_heads, args.num_kv_heads
    # KV heads: split when nkv % tp == 0, else each group of tp/nkv ranks shares one head.
    if nkv % tp == 0:
        kv0, kv1 = _split(nkv, tp, r)
        kv_counted, kv_group = True, None
    else:
        rep = tp // nkv
        kv0 = r // rep
        kv1 = kv0 + 1
        kv_counted = r % rep == 0
        kv_group = topology.tp_subgroup(rep)  # collective; all ranks reach it (same args)
    q0, q1 = _split(nh, tp, r)
    i0, i1 = _split(args.intermediate_size, tp, r)
    v0, v1 = _split(args.vocab_size, tp, r)
    h = args.hidden_size

    def col(lin, start, stop, counted=True, replica_group=None):
        shard = Shard(0, start, stop, (lin.out_features, lin.in_features), counted)
        return ColumnParallelLinear(lin.weight, lin.bias, shard, group, replica_group=replica_group)

    def row(lin, start, stop):
        return RowParallelLinear(lin.weight, lin.bias, Shard(1, start, stop, (lin.out_features, lin.in_features)),
                                 group, sequence_parallel)

    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        a.q_proj = col(a.q_proj, q0 * d, q1 * d)
        a.k_proj = col(a.k_proj, kv0 * d, kv1 * d, kv_counted, kv_group)
        a.v_proj = col(a.v_proj, kv0 * d, kv1 * d, kv_counted, kv_group)
        a.o_proj = row(a.o_proj, q0 * d, q1 * d)
        m.gate_proj = col(m.gate_proj, i0, i1)
        m.up_proj = col(m.up_proj, i0, i1)
        m.down_proj = row(m.down_proj, i0, i1)
        a.register_forward_pre_hook(_CopyInputHook(group, sequence_parallel))
        m.register_forward_pre_hook(_CopyInputHook(group, sequence_parallel))
        _wrap_norms(layer, args, group, sequence_parallel)
    vocab_shard = Shard(0, v0, v1, (args.vocab_size, h))
    # A pipeline stage may lack the embedding or the head (None or absent): split what is there.
    if getattr(model, "embed_tokens", None) is not None:
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight, vocab_shard, group, sequence_parallel)
    if getattr(model, "lm_head", None) is not None:
        model.lm_head = VocabParallelLMHead(model.lm_head.weight, vocab_shard, group,
                                            getattr(model.lm_head, "softcap", None))
        if args.tie_word_embeddings and getattr(model, "embed_tokens", None) is not None:
            model.lm_head.weight = model.embed_tokens.weight
        if sequence_parallel:
            # The vocab-parallel loss (and the logits path) all-reduce the head's input gradient
            # themselves: gathering positions back keeps just this rank's block in backward.
            model.lm_head.register_forward_pre_hook(_CopyInputHook(group, True, reduce_grad=False))
    if sequence_parallel and getattr(model, "norm", None) is not None:
        model.norm = SequenceParallelRMSNorm(model.norm, group)
    model.sequence_parallel = sequence_parallel
    model.tp_topology = topology
    return model


def tp_shards(model: nn.Module) -> dict[str, Shard]:
    """Full parameter name → Shard for every split parameter (absent: replicated whole)."""
    out = {}
    for mname, mod in model.named_modules():
        for pname, shard in getattr(mod, "tp_shards", {}).items():
            out[f"{mname}.{pname}" if mname else pname] = shard
    return out


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(param) → every (module, attribute) holding it (tied parameters have two)."""
    out: dict[int, list] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners = out.setdefault(id(p), [])
            if not any(o is mod and n == pname for o, n in owners):
                owners.append((mod, pname))
    return out


@torch.no_grad()
def load_tp_weights(model: nn.Module, weights, device=None, dtype=None) -> None:
    """Load this rank's slice of every parameter from `weights` (an HF dir or a WeightSource),
    reading only the rows/columns it keeps. Meta parameters are replaced by real ones (on
    `device`, default CPU; in `dtype`, default the parameter's); real ones are copied into.
    Tied parameters stay one shared parameter."""
    weights = as_weights(weights)
    where = getattr(weights, "dir", "checkpoint")
    check_weights(weights, model, where)
    shards = tp_shards(model)
    owners = _owners(model)
    for name, p in list(model.named_parameters()):
        shard = shards.get(name)
        full = tuple(weights.shape(name))
        expect = shard.full_shape if shard is not None else tuple(p.shape)
        if full != tuple(expect):
            raise UserError(f"{where}: {name} has shape {full}, config implies {tuple(expect)}")
        t = weights.get(name, shard.index()) if shard is not None else weights.get(name)
        if tuple(t.shape) != tuple(p.shape):
            raise RuntimeError(f"{name}: read {tuple(t.shape)} for a local shape {tuple(p.shape)}")
        _assign(p, t, owners, device, dtype)


@torch.no_grad()
def init_tp_weights(model: nn.Module, seed: int, std: float = 0.02, device=None, dtype=None) -> None:
    """Random initialisation that does not depend on the layout: each parameter's full tensor is
    drawn from its own generator (seeded by `seed` and its name), then this rank keeps its slice.
    Norm weights are ones (zeros in the 1 + w form), biases zeros, matrices normal(0, std). So
    replicated parameters (norms, shared KV heads) are identical on every rank, and any tp gives
    the same model as tp = 1. Each rank draws one full tensor at a time (fine for random-init
    runs, which are small).
    Meta parameters are replaced as in load_tp_weights."""
    shards = tp_shards(model)
    owners = _owners(model)
    # Norms in the (1 + w) form (Gemma) are the identity at w = 0.
    zero_norms = {f"{n}.weight" for n, mod in model.named_modules() if getattr(mod, "form", None) == "one_plus_weight"}
    for name, p in list(model.named_parameters()):
        shard = shards.get(name)
        full_shape = shard.full_shape if shard is not None else tuple(p.shape)
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        if name in zero_norms:
            full = torch.zeros(full_shape)
        elif name.endswith("norm.weight"):
            full = torch.ones(full_shape)
        elif name.endswith(".bias"):
            full = torch.zeros(full_shape)
        else:
            full = torch.empty(full_shape).normal_(0.0, std, generator=g)
        t = full[shard.index()] if shard is not None else full
        _assign(p, t, owners, device, dtype)


def _assign(p, t, owners, device, dtype) -> None:
    """Put tensor `t` into parameter `p`: replace a meta parameter everywhere it is held (keeping
    ties and the tensor_model_parallel flag), or copy into a real one."""
    if p.is_meta:
        new = nn.Parameter(t.to(device=device or "cpu", dtype=dtype or p.dtype).contiguous(),
                           requires_grad=p.requires_grad)
        if hasattr(p, "tensor_model_parallel"):
            new.tensor_model_parallel = p.tensor_model_parallel
        for mod, attr in owners[id(p)]:
            setattr(mod, attr, new)
    else:
        p.copy_(t)


def _gathered(p):
    """Context that makes a ZeRO-3 partitioned parameter whole (no-op otherwise)."""
    if hasattr(p, "ds_id"):
        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def iter_tp_state(model: nn.Module, topology, grads: bool = False):
    """Yield (name, full tensor) on tp rank 0, (name, None) elsewhere, one parameter at a time.

    Collective over the tensor group (and, for ZeRO-3 parameters, the data-parallel group): every
    rank must iterate to the end. A tied head is not repeated (named_parameters de-duplicates).
    grads=True gathers `p.grad` instead (plain or ZeRO-0 models; zeros where a grad is None).
    """
    shards = tp_shards(model)
    group, tp = topology.tp_group, topology.tp_size
    layouts = [shards] if tp == 1 else [None] * tp
    if tp > 1:
        dist.all_gather_object(layouts, shards, group=group)
    lead = topology.tp_rank == 0
    for name, p in model.named_parameters():
        shard = shards.get(name)
        parts = None
        with _gathered(p):
            # Collectives on the parameter's own device (NCCL needs CUDA tensors); results to CPU.
            local = p.grad if grads and p.grad is not None else (torch.zeros_like(p) if grads else p)
            local = local.detach().contiguous()
            if shard is None or tp == 1:
                out = local.cpu().clone() if lead else None
            else:
                parts = [torch.empty_like(local) for _ in range(tp)] if lead else None
                dist.gather(local, parts, dst=topology.tp_ranks[0], group=group)
                out = None
        if parts is not None:
            out = torch.empty(shard.full_shape, dtype=local.dtype)
            for part, lay in zip(parts, layouts):
                out[lay[name].index()] = part.cpu()
        yield name, out


def gather_tp_state(model: nn.Module, topology, grads: bool = False) -> dict:
    """Full tensors by megacpt name on tp rank 0 ({} on the other tp ranks)."""
    return {n: t for n, t in iter_tp_state(model, topology, grads) if t is not None}


@torch.no_grad()
def tp_grad_sq(model: nn.Module, topology) -> torch.Tensor:
    """This rank's part of the squared global gradient norm (float64, on the grads' device, no
    collective): split parameters (`tensor_model_parallel`) on every rank, the replicated ones on
    tp rank 0 only, so the sum over the model-parallel (tp × pp) group is the whole model's."""
    grads = [p.grad for p in model.parameters()
             if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or topology.tp_rank == 0)]
    device = next((p.grad.device for p in model.parameters() if p.grad is not None), torch.device("cpu"))
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # One multi-tensor kernel for all the norms (accumulated in float64) instead of a pass per tensor.
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()


@torch.no_grad()
def tp_grad_norm(model: nn.Module, topology) -> torch.Tensor:
    """Global L2 norm of the gradients of a model split by apply_tp (and/or pipeline stages),
    counting each replicated parameter once (`tp_grad_sq`), summed over the model-parallel
    (tp × pp) group. The same rule as DeepSpeed's clipping with an mpu; for plain (ZeRO-0) grads
    after the dp average."""
    sq = tp_grad_sq(model, topology)  # on the grads' device (NCCL needs CUDA)
    if topology.mp_group is not None and _size(topology.mp_group) > 1:
        dist.all_reduce(sq, group=topology.mp_group)
    return sq.sqrt()
