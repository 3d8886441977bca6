"""Torch backend of the fused linear + cross-entropy: the logits in chunks of tokens, never all N x V.

Tokens are processed in chunks whose logits fit a fixed budget (`CHUNK_ELEMS`), so the workspace
does not grow with N. For reduction "mean"/"sum" the gradients are computed during the forward
pass (`PrecomputedLCE`: one pass over the weight instead of two) and only scaled by grad_output in
backward. For reduction "none" the per-token upstream gradients are only known in backward, so dW
cannot be precomputed: `TorchBackend.grads` recomputes the chunk logits from the saved per-token
logsumexp (linear_cross_entropy.py's `RecomputeLCE`, shared with the Triton backend).

The logsumexp reaches the gradients as max + log(sumexp) unsummed: p = exp((s - max) - log(sumexp))
keeps 1 - p accurate for confident targets, where rounding lse to fp32 first costs ~1e-6.
The maths of the per-token loss and its gradient is in per_token.py.

Two forms of a chunk's pointwise work on its fp32 logits (`TorchBackend.fused_pass`):
  * eager torch ops (the CPU path, and impl="torch" everywhere): ~7 passes over the chunk;
  * the Triton pass (triton_pass.py; impl="auto" on CUDA with triton, impl="chunked-triton"):
    one kernel writes the statistics and the dlogits, in the weight's dtype (bf16 dlogits for bf16
    inputs, as eager autograd rounds them). Where every row's dlogits fit in the bytes of the fp32
    dW buffer (N V size(dtype) <= V H 4) they are kept -- an N x V tensor by design, bounded by
    that buffer -- and dW is one GEMM over them; otherwise dW is summed per chunk as below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .capabilities import CAPS
from .per_token import LossSpec, finish, reduce_loss

__all__ = ["CHUNK_ELEMS", "CHUNK_ELEMS_CUDA", "chunk_rows", "torch_stats", "torch_grads", "torch_fused",
           "TorchBackend", "PrecomputedLCE"]

# Logit elements per chunk. The chunk workspace is one fp32 buffer of this size (logits ->
# probabilities -> dlogits, in place), two with softcap (the tanh values), plus a transient one on
# CUDA without mm(out_dtype=...): 2^23 elements = 32 MiB, independent of N. (bf16/fp16 on CPU add
# a fixed fp32 copy of the weight, see _matmul_weight.)
CHUNK_ELEMS = int(os.environ.get("MEGACPT_LCE_CHUNK_ELEMS", str(1 << 23)))
# On CUDA every chunk re-reads the whole weight in three matmuls; 2^23 logits are only 64 rows at
# V=128k, which makes the head memory-bound. 2^27 (512 MiB of fp32 logits) gives 1,040 rows: on an
# H100, N=4096, H=2048, V=128256: 23.6 ms fwd+bwd vs 29.2 ms at 2^26, 38.4 at 2^25 (bench/profile_gpu.py).
CHUNK_ELEMS_CUDA = int(os.environ.get("MEGACPT_LCE_CHUNK_ELEMS_CUDA", str(1 << 27)))
# MEGACPT_LCE_TRITON_PASS=0 keeps impl="auto" on the eager pointwise ops on CUDA too (the Triton
# pass was written and tested without a GPU; this is the way back without a code change).
TRITON_PASS_ON_CUDA = os.environ.get("MEGACPT_LCE_TRITON_PASS", "1") != "0"


def chunk_rows(n: int, v: int, chunk_elems: Optional[int] = None, cuda: bool = False) -> int:
    if n <= 0:
        return 1  # no rows: no chunk runs, but range(0, 0, c) needs c > 0
    budget = (CHUNK_ELEMS_CUDA if cuda else CHUNK_ELEMS) if chunk_elems is None else chunk_elems
    c = max(1, budget // max(v, 1))
    if c >= 16:
        c -= c % 8  # friendlier matmul shapes
    c = max(1, min(c, n))
    # Equal chunks rather than full ones plus a sliver: every chunk's matmuls stream the whole
    # weight, so a 2-row last chunk (512 rows at 170 per chunk) costs nearly as much as a full
    # one. Never above the budget.
    k = -(-n // c)
    return -(-n // k)


def _matmul_weight(weight: Tensor) -> Tensor:
    """The weight operand of the chunk matmuls.

    bf16/fp16 on CPU: an fp32 copy, made once per call (a fixed V x H workspace, the size of the
    fp32 dW buffer). CPUs without bf16 units run bf16 matmuls ~30x slower than fp32, and bf16
    logits lose ~3 significant digits (confident targets' p - 1 and loss with them). Elsewhere the
    weight itself (on CUDA the logits come out in fp32 via mm's out_dtype, see _chunk_logits).
    """
    if weight.device.type == "cpu" and weight.dtype != torch.float32:
        return weight.float()
    return weight


@dataclass
class _Pass:
    """What every chunk of one call shares."""

    hidden: Tensor
    w_mm: Tensor  # see _matmul_weight
    local: Tensor  # the targets as rows of this weight (0 where a target is not one of them)
    in_shard: Tensor  # whether each target is a row of this weight
    spec: LossSpec
    rows: int  # tokens per chunk
    dx: Optional[Tensor] = None
    dw: Optional[Tensor] = None

    # The Triton pass (triton_pass.py) instead of the eager pointwise ops, and what it needs:
    fused: Any = None  # the triton_pass module, or None (the eager chunk loop)
    weight: Optional[Tensor] = None  # the operand of the gradient products (w_mm is the logits')
    tgt: Optional[Tensor] = None  # the target's row of this weight, -1 where it is not one
    keep: Optional[Tensor] = None  # every row's dlogits, for dW as one GEMM (see add_fused_buffers)

    @classmethod
    def start(cls, hidden: Tensor, weight: Tensor, targets: Tensor, spec: LossSpec,
              backend: Optional["TorchBackend"]) -> "_Pass":
        backend = backend or TorchBackend()
        n, v = hidden.shape[0], weight.shape[0]
        local = targets.long() - spec.vocab_start
        in_shard = (local >= 0) & (local < v)
        run = cls(hidden, _matmul_weight(weight), torch.where(in_shard, local, 0), in_shard, spec,
                  chunk_rows(n, v, backend.chunk_elems, hidden.is_cuda))
        if backend.uses_fused_pass(hidden):
            # Lazy: importing triton costs seconds, and CPU runs never take this path.
            from . import triton_pass

            triton_pass.check_device(hidden)
            run.fused, run.weight, run.tgt = triton_pass, weight, torch.where(in_shard, local, -1)
        return run

    def spans(self):
        n = self.hidden.shape[0]
        return ((i, min(i + self.rows, n)) for i in range(0, n, self.rows))

    def add_grad_buffers(self) -> None:
        """dX and dW (fp32). Every chunk writes its own rows of dX, so dX starts uninitialised (any
        row count > 0). dW is a sum over chunks: where fp32 products sum it the first chunk writes
        it (no 100+ MB zero fill per call on a large vocabulary), otherwise (bf16/fp16 on CUDA) it
        starts at zero."""
        n = self.hidden.shape[0]
        if self.spec.need_dx:
            self.dx = (torch.empty if n else torch.zeros)(self.hidden.shape, dtype=torch.float32,
                                                          device=self.hidden.device)
        if self.spec.need_dw:
            first_writes = n > 0 and self.w_mm.dtype == torch.float32
            self.dw = (torch.empty if first_writes else torch.zeros)(self.w_mm.shape, dtype=torch.float32,
                                                                     device=self.w_mm.device)

    def add_fused_buffers(self) -> None:
        """The Triton pass's gradient buffers. dlogits come in the weight's dtype (bf16 for bf16
        inputs, as eager autograd rounds them). dW: when every row's dlogits fit in the bytes of the
        fp32 dW buffer (N V size(dtype) <= V H 4), they are kept and dW is one GEMM over them at the
        end -- no fp32 V x H buffer zero-filled and re-read per chunk; otherwise the per-chunk sum
        of add_grad_buffers. dX (fp32, N x H) is written chunk by chunk, as there."""
        n, h = self.hidden.shape
        v, dtype = self.weight.shape[0], self.weight.dtype
        if self.spec.need_dx:
            self.dx = (torch.empty if n else torch.zeros)((n, h), dtype=torch.float32,
                                                          device=self.hidden.device)
        if not self.spec.need_dw:
            return
        if n * v * self.weight.element_size() <= v * h * 4:
            self.keep = torch.empty((n, v), dtype=dtype, device=self.weight.device)
        else:
            first_writes = n > 0 and dtype == torch.float32
            self.dw = (torch.empty if first_writes else torch.zeros)((v, h), dtype=torch.float32,
                                                                     device=self.weight.device)


def _chunk_logits(h: Tensor, w_mm: Tensor, softcap: Optional[float]):
    """fp32 (capped) logits of a chunk, and tanh(z / softcap) for the gradient (or None)."""
    if w_mm.dtype == torch.float32:
        z = torch.mm(h.float(), w_mm.t())
    elif w_mm.is_cuda and CAPS.mm_out_dtype:  # fp32 logits without an fp32 weight copy
        z = torch.mm(h, w_mm.t(), out_dtype=torch.float32)
    else:
        z = torch.mm(h, w_mm.t()).float()
    if softcap is None:
        return z, None
    th = z.div_(softcap).tanh_()
    return th * softcap, th


def _probs_to_dlogits(p: Tensor, th: Optional[Tensor], run: _Pass, i: int, j: int, lse: Tensor,
                      scale: Optional[Tensor]) -> Tensor:
    """In place: softmax probabilities of rows [i, j) -> d(sum_i scale_i * loss_i)/dz."""
    spec, eps = run.spec, run.spec.label_smoothing
    if spec.z_loss:
        p.mul_((1.0 + 2.0 * spec.z_loss * lse).unsqueeze(1))
    # p - 1 is formed in fp32 (p ~ 1 for confident targets would cancel to 0 in bf16).
    p.scatter_add_(1, run.local[i:j].unsqueeze(1), (run.in_shard[i:j].float() * -(1.0 - eps)).unsqueeze(1))
    if eps:
        p.sub_(eps / spec.vocab_total)
    if th is not None:
        p.mul_(th.mul_(th).neg_().add_(1.0))  # d(c*tanh(z/c))/dz = 1 - tanh^2
    return p if scale is None else p.mul_(scale.unsqueeze(1))


def _accumulate_grads(run: _Pass, dz: Tensor, i: int, j: int) -> None:
    h, w_mm, dx, dw = run.hidden[i:j], run.w_mm, run.dx, run.dw
    # bf16/fp16 weights (CUDA tensor cores): dlogits rounded like eager autograd rounds them,
    # products accumulated in fp32.
    dz_lp = None
    if dx is not None:
        if w_mm.dtype == torch.float32:
            torch.mm(dz, w_mm, out=dx[i:j])
        else:
            dz_lp = dz.to(w_mm.dtype)
            dx[i:j] = torch.mm(dz_lp, w_mm)
    if dw is None:
        return
    if w_mm.dtype == torch.float32:
        # No V x H temporary: the product is written or added straight into dW.
        if i == 0:  # the first chunk initialises dW (see _Pass.add_grad_buffers)
            torch.mm(dz.t(), h.float(), out=dw)
        else:
            dw.addmm_(dz.t(), h.float())
        return
    # The cross-chunk sum kept in fp32. (addmm's out_dtype cannot add into it: its CUDA kernel
    # wants the accumulator in the operands' dtype.)
    dz_lp = dz.to(w_mm.dtype) if dz_lp is None else dz_lp
    dw.add_(torch.mm(dz_lp.t(), h).float())


# The per-chunk work lives in functions of its own so that a chunk's buffers are freed when the
# function returns -- before the next chunk allocates its logits (a loop body would keep the
# previous chunk's buffer alive while the next one is created: twice the workspace).
def _stats_chunk(run: _Pass, i: int, j: int):
    s, _ = _chunk_logits(run.hidden[i:j], run.w_mm, run.spec.softcap)
    m = s.amax(1)
    t = torch.where(run.in_shard[i:j], s.gather(1, run.local[i:j].unsqueeze(1)).squeeze(1), 0.0)
    total = s.sum(1) if run.spec.need_sum else None
    se = s.sub_(m.unsqueeze(1)).exp_().sum(1)
    return m, se, t, total


def _grads_chunk(run: _Pass, i: int, j: int, row_max: Tensor, log_sumexp: Tensor, lse: Tensor,
                 scale: Tensor) -> None:
    s, th = _chunk_logits(run.hidden[i:j], run.w_mm, run.spec.softcap)
    p = s.sub_(row_max[i:j].unsqueeze(1)).sub_(log_sumexp[i:j].unsqueeze(1)).exp_()
    dz = _probs_to_dlogits(p, th, run, i, j, lse[i:j], scale[i:j])
    del th, s, p
    _accumulate_grads(run, dz, i, j)


def _fused_chunk(run: _Pass, i: int, j: int, scale: Optional[Tensor]):
    s, th = _chunk_logits(run.hidden[i:j], run.w_mm, run.spec.softcap)
    t = torch.where(run.in_shard[i:j], s.gather(1, run.local[i:j].unsqueeze(1)).squeeze(1), 0.0)
    m = s.amax(1)
    total = s.sum(1) if run.spec.need_sum else None
    e = s.sub_(m.unsqueeze(1)).exp_()
    se = e.sum(1)
    if run.dx is not None or run.dw is not None:
        p = e.div_(se.unsqueeze(1))
        dz = _probs_to_dlogits(p, th, run, i, j, m + se.log(), None if scale is None else scale[i:j])
        del th, s, e, p
        _accumulate_grads(run, dz, i, j)
    return m, se, t, total


# The chunk functions of the Triton pass: one kernel over the chunk's fp32 logits replaces the
# eager pointwise ops above; the GEMMs stay torch's (cuBLAS on CUDA).
def _pass_dlogits_out(run: _Pass, z: Tensor, i: int, j: int) -> Tensor:
    """Where the pass writes a chunk's dlogits: the kept rows, else the logits themselves (fp32,
    in place), else a chunk of the weight's dtype."""
    if run.keep is not None:
        return run.keep[i:j]
    if z.dtype == run.weight.dtype:
        return z
    return torch.empty(z.shape, dtype=run.weight.dtype, device=z.device)


def _pass_products(run: _Pass, dz: Tensor, i: int, j: int) -> None:
    """dX rows of the chunk; dW summed over chunks unless the dlogits are kept for one GEMM."""
    h, w = run.hidden[i:j], run.weight
    if run.dx is not None:
        if dz.dtype == torch.float32:
            torch.mm(dz, w, out=run.dx[i:j])
        else:
            run.dx[i:j] = torch.mm(dz, w)
    if run.dw is None:
        return
    if dz.dtype == torch.float32:
        if i == 0:  # the first chunk initialises dW (see add_fused_buffers)
            torch.mm(dz.t(), h, out=run.dw)
        else:
            run.dw.addmm_(dz.t(), h)
    else:
        run.dw.add_(torch.mm(dz.t(), h).float())


def _pass_chunk(run: _Pass, i: int, j: int, stats: Tensor, scale: Optional[Tensor], given: bool = False,
                grads: bool = True) -> None:
    """Rows [i, j) through the Triton pass: statistics into (or, given, from) stats[:, i:j], and
    with grads the dlogits (times scale) and their products."""
    z, _ = _chunk_logits(run.hidden[i:j], run.w_mm, None)  # raw logits: the pass applies softcap
    grads = grads and (run.dx is not None or run.dw is not None or run.keep is not None)
    dz = _pass_dlogits_out(run, z, i, j) if grads else None
    run.fused.softmax_pass(z, run.tgt[i:j], run.spec, stats[:, i:j], given_stats=given, dz=dz,
                           scale=None if scale is None else scale[i:j])
    del z
    if dz is not None:
        _pass_products(run, dz, i, j)


def _store(out: Tensor, i: int, j: int, parts) -> None:
    for k, x in enumerate(parts):
        if x is not None:
            out[k, i:j] = x


@torch.no_grad()
def torch_stats(hidden: Tensor, weight: Tensor, targets: Tensor, spec: LossSpec,
                backend: Optional["TorchBackend"] = None):
    """Per-token (max, sumexp, target logit, logit sum | None) over this weight's rows only; the
    target logit is 0 where the target is not one of them."""
    out = torch.empty((4, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
    run = _Pass.start(hidden, weight, targets, spec, backend)
    for i, j in run.spans():
        if run.fused is not None:
            _pass_chunk(run, i, j, out, None, grads=False)
        else:
            _store(out, i, j, _stats_chunk(run, i, j))
    return out[0], out[1], out[2], (out[3] if spec.need_sum else None)


@torch.no_grad()
def torch_grads(hidden: Tensor, weight: Tensor, targets: Tensor, row_max: Tensor, log_sumexp: Tensor,
                row_scale: Tensor, spec: LossSpec, backend: Optional["TorchBackend"] = None):
    """Gradients of sum_i row_scale[i] * loss_i w.r.t. hidden and weight (None where not needed),
    given the global softmax statistics: fp32, except a dW made as one GEMM over kept dlogits by
    the Triton pass (the weight's dtype)."""
    run = _Pass.start(hidden, weight, targets, spec, backend)
    if run.fused is not None:
        run.add_fused_buffers()
        given = torch.stack([row_max.float(), log_sumexp.float()])
        scale = row_scale.float().contiguous()
        for i, j in run.spans():
            _pass_chunk(run, i, j, given, scale, given=True)
        # dW as one GEMM over the kept dlogits (the weight's dtype, fp32 accumulation); they carry
        # the row scales already.
        return run.dx, (torch.mm(run.keep.t(), hidden) if run.keep is not None else run.dw)
    run.add_grad_buffers()
    lse = row_max + log_sumexp if spec.z_loss else row_max  # only z-loss needs lse itself
    for i, j in run.spans():
        _grads_chunk(run, i, j, row_max, log_sumexp, lse, row_scale)
    return run.dx, run.dw


@torch.no_grad()
def torch_fused(hidden: Tensor, weight: Tensor, targets: Tensor, spec: LossSpec,
                backend: Optional["TorchBackend"] = None):
    """One pass: the softmax statistics (as torch_stats) and the gradients of the *sum* of
    per-token losses, (stats, dX | None, dW | None, kept dlogits | None). dX and dW are fp32;
    with kept dlogits (the Triton pass, see _Pass.add_fused_buffers) dW is None and is
    keptᵀ @ hidden, left to the caller (PrecomputedLCE: in backward, where its scale is known)."""
    out = torch.empty((4, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
    run = _Pass.start(hidden, weight, targets, spec, backend)
    valid = targets != spec.ignore_index
    # On CPU (no device sync to avoid) skip scaling the dlogits by a row mask that is all ones.
    scale = None if hidden.device.type == "cpu" and bool(valid.all()) else valid.float()
    if run.fused is not None:
        run.add_fused_buffers()
        for i, j in run.spans():
            _pass_chunk(run, i, j, out, scale)
    else:
        run.add_grad_buffers()
        for i, j in run.spans():
            _store(out, i, j, _fused_chunk(run, i, j, scale))
    return (out[0], out[1], out[2], (out[3] if spec.need_sum else None)), run.dx, run.dw, run.keep


class TorchBackend:
    """Chunked torch implementation of the stats/grads primitives (any device).

    fused_pass: None (impl="auto") runs each chunk's pointwise work as one Triton pass where that
    pays -- CUDA tensors with triton installed (and not interpreted), unless
    MEGACPT_LCE_TRITON_PASS=0; True (impl="chunked-triton") always (CUDA, or CPU tensors under
    TRITON_INTERPRET=1); False (impl="torch") never."""

    name = "torch"

    def __init__(self, chunk_elems: Optional[int] = None, fused_pass: Optional[bool] = None):
        self.chunk_elems, self.fused_pass = chunk_elems, fused_pass

    def uses_fused_pass(self, hidden: Tensor) -> bool:
        if self.fused_pass is None:
            return hidden.is_cuda and CAPS.triton and not CAPS.triton_interpret and TRITON_PASS_ON_CUDA
        return self.fused_pass

    def stats(self, hidden, weight, targets, spec: LossSpec):
        return torch_stats(hidden, weight, targets, spec, self)

    def grads(self, hidden, weight, targets, row_max, log_sumexp, row_scale, spec: LossSpec):
        return torch_grads(hidden, weight, targets, row_max, log_sumexp, row_scale, spec, self)


class PrecomputedLCE(torch.autograd.Function):
    """Reduction mean/sum: gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, spec: LossSpec, reduction: str, backend: TorchBackend):
        stats, dx, dw, keep = torch_fused(hidden, weight, targets, spec, backend)
        loss, z, valid, _ = finish(stats, targets, spec)
        n_valid = valid.sum()
        ctx.reduction = reduction
        ctx.n_valid = n_valid
        ctx.dx, ctx.dw, ctx.keep = dx, dw, keep
        if keep is not None:
            ctx.save_for_backward(hidden)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        z_out = reduce_loss(z, reduction, n_valid)
        ctx.mark_non_differentiable(z_out)
        return reduce_loss(loss, reduction, n_valid), z_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        if (ctx.dx is None and ctx.dw is None and ctx.keep is None
                and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])):
            raise RuntimeError("linear_cross_entropy: backward through the same graph twice is not "
                               "supported (its gradient buffers are scaled in place and freed)")
        scale = grad_loss.float()
        if ctx.reduction == "mean":
            scale = scale / ctx.n_valid.clamp(min=1)
        # In place: the buffers are ours and used once; avoids a second V x H fp32 copy.
        dx = ctx.dx.mul_(scale).to(ctx.dtypes[0]) if ctx.dx is not None else None
        dw = ctx.dw.mul_(scale).to(ctx.dtypes[1]) if ctx.dw is not None else None
        if ctx.keep is not None:
            (hidden,) = ctx.saved_tensors
            # The scale goes on the N x H operand, in fp32 before its one rounding: scaling the
            # V x H product would cost a pass over it, and a bf16 product times an fp32 device
            # scalar rounds the scalar to bf16 first (a bias of up to 2^-9 on every element).
            dw = torch.mm(ctx.keep.t(), (hidden.float() * scale).to(hidden.dtype))
        ctx.dx = ctx.dw = ctx.keep = None
        return dx, dw, None, None, None, None
