"""Triton backend of the fused linear + cross-entropy (imported lazily by linear_cross_entropy.py).

Nothing of size N x V ever reaches global memory:
  * _lce_fwd_kernel: one program per (block of tokens, slice of the vocabulary) streams the
    weight in (BLOCK_V x BLOCK_H) tiles, forms a (BLOCK_N x BLOCK_V) logit tile with tl.dot and
    folds it into an online softmax (running max and sum-exp), also picking the target logit and,
    for label smoothing, the logit sum. Output: 4 floats per token and slice, merged in torch.
  * backward recomputes the logit tiles from the saved per-token softmax statistics, in two
    kernels so that every output element has exactly one writer and a fixed summation order
    (deterministic, no atomics):
      _lce_bwd_dx_kernel: one program per (token block, vocabulary slice) loops over its slice;
        dX rows are accumulated in an fp32 buffer of that slice that only this program touches;
        the (<= 4) slices are summed afterwards.
      _lce_bwd_dw_kernel: one program per vocabulary block loops over N; likewise for dW rows.
    Blocks of ignored tokens (row scale 0) are skipped in both.
    Cost: forward 2NHV FLOPs, backward 8NHV (two recomputes + two gradient products).
CI has no GPU: there correctness is checked under the interpreter and the kernels are compiled
ahead of time for sm_90 (tests/test_kernels.py). On an H100 the GPU tests pass, but the backward's
read-modify-write of fp32 dX/dW tiles per vocabulary tile makes it ~8x slower than the chunked
cuBLAS path, which is therefore what impl="auto" uses (bench/README.md).

Offsets are int64 (row * stride overflows int32 once N*H or V*H passes 2^31).
Under TRITON_INTERPRET=1 (CPU tensors) bf16/fp16 tiles are upcast to fp32 before tl.dot, which the
interpreter otherwise gets wrong, and tanh is built from sigmoid (no libdevice there). Whether the
kernels run interpreted is capabilities.CAPS.triton_interpret, read when megacpt.kernels was
imported; this module refuses to load if triton.jit decided otherwise (the variable changed since).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .capabilities import CAPS
from .per_token import LossSpec

__all__ = ["TritonBackend", "lce_stats", "lce_grads", "KERNELS", "interpreting"]


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under the interpreter; this form is exact enough in fp32.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_N x BLOCK_V) tile of hidden[rows] @ weight[cols].T; rows/cols are int64."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_rows = w_ptr + cols[:, None] * stride_w
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        a = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _accumulate_product(out_ptr, stride_out, out_rows, out_row_mask, a, b_ptr, stride_b, b_rows, b_row_mask, H,
                        BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[out_rows, :H] += a @ b[b_rows, :H], BLOCK_H columns at a time (dX += dZ W, dW += dZ^T h);
    rows are int64."""
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + ks[None, :], mask=b_row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        out = out_ptr + out_rows[:, None] * stride_out + ks[None, :]
        out_mask = out_row_mask[:, None] & k_mask[None, :]
        acc = tl.load(out, mask=out_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        tl.store(out, acc, mask=out_mask)


@triton.jit
def capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(s, tanh(z / softcap)): the soft-capped logits and the tanh their gradient needs; (z, z)
    without softcap (the second value is then unused)."""
    if HAS_SOFTCAP:
        th = _tanh(z / softcap)
        return th * softcap, th
    return z, z


@triton.jit
def dlogits(z, cols, col_mask, local_tgt, row_max, log_se, z_factor, row_scale, softcap, tgt_coef,
            smooth, HAS_SOFTCAP: tl.constexpr):
    """d(sum_i row_scale_i * loss_i)/dz for a tile of raw logits z (fp32); 0 outside col_mask."""
    s, th = capped(z, softcap, HAS_SOFTCAP)
    # (s - max) - log(sumexp), not s - lse: keeps 1 - p accurate when p -> 1.
    p = tl.exp((s - row_max[:, None]) - log_se[:, None])
    # p - 1 is formed in fp32, before any cast to the tile dtype, so confident targets keep it.
    g = p * z_factor[:, None] - smooth
    g = tl.where(cols[None, :] == local_tgt[:, None], g - tgt_coef, g)
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    g = g * row_scale[:, None]
    return tl.where(col_mask[None, :], g, 0.0)


@triton.jit
def online_stats(s, cols, col_mask, tgt, row_max, sumexp, tgt_logit, logit_sum, NEED_SUM: tl.constexpr):
    """One logit tile folded into the running row statistics (online softmax): max, sum of exp
    relative to it, the target's logit and (label smoothing) the logits' sum."""
    tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
    if NEED_SUM:
        logit_sum += tl.sum(tl.where(col_mask[None, :], s, 0.0), axis=1)
    s = tl.where(col_mask[None, :], s, float("-inf"))
    # Every tile has >= 1 valid column, so new_max is finite and exp(-inf - finite) = 0.
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    sumexp = sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
    return new_max, sumexp, tgt_logit, logit_sum


@triton.jit
def _lce_fwd_kernel(h_ptr, w_ptr, tgt_ptr, out_ptr,
                    N, V, H, stride_h, stride_w, vocab_start, softcap, v_per_split,
                    HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (token block, vocabulary split) -> partial statistics out[0..3, split, rows]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    local_tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
    v_lo = split.to(tl.int64) * v_per_split  # v_per_split is a multiple of BLOCK_V: splits share no tile
    v_hi = tl.minimum(v_lo + v_per_split, V)

    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sumexp = tl.zeros((BLOCK_N,), tl.float32)
    tgt_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        s = _logit_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        row_max, sumexp, tgt_logit, logit_sum = online_stats(s, cols, col_mask, local_tgt, row_max, sumexp,
                                                             tgt_logit, logit_sum, NEED_SUM)
    out = out_ptr + split.to(tl.int64) * N + rows
    plane = n_splits.to(tl.int64) * N
    tl.store(out, row_max, mask=row_mask)
    tl.store(out + plane, sumexp, mask=row_mask)
    tl.store(out + 2 * plane, tgt_logit, mask=row_mask)
    if NEED_SUM:
        tl.store(out + 3 * plane, logit_sum, mask=row_mask)


@triton.jit
def _lce_bwd_dx_kernel(h_ptr, w_ptr, tgt_ptr, max_ptr, logse_ptr, scale_ptr, dx_ptr,
                       N, V, H, stride_h, stride_w, stride_dx, vocab_start, softcap,
                       z_coef2, tgt_coef, smooth, v_per_split, stride_split,
                       HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (token block, vocabulary split) -> partial dX in dx[split, rows, :]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    v_lo = split.to(tl.int64) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    dx_ptr += split.to(tl.int64) * stride_split
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    # A block of ignored (e.g. padding) tokens has a zero gradient: dx stays as initialised.
    if tl.max(tl.abs(row_scale), axis=0) != 0.0:
        local_tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        row_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
        log_se = tl.load(logse_ptr + rows, mask=row_mask, other=0.0)
        z_factor = 1.0 + z_coef2 * (row_max + log_se)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < V
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
            dz = dlogits(z, cols, col_mask, local_tgt, row_max, log_se, z_factor, row_scale, softcap,
                         tgt_coef, smooth, HAS_SOFTCAP)
            if not UPCAST:
                dz = dz.to(w_ptr.dtype.element_ty)
            # The previous V step stored these dx tiles, possibly from other threads of this
            # program (the store layout may differ from the load's): order them explicitly.
            tl.debug_barrier()
            _accumulate_product(dx_ptr, stride_dx, rows, row_mask, dz, w_ptr, stride_w, cols, col_mask, H,
                                BLOCK_H, UPCAST, DOT_PRECISION)


@triton.jit
def _lce_bwd_dw_kernel(h_ptr, w_ptr, tgt_ptr, max_ptr, logse_ptr, scale_ptr, dw_ptr,
                       N, V, H, stride_h, stride_w, stride_dw, vocab_start, softcap,
                       z_coef2, tgt_coef, smooth,
                       HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_mask = rows < N
        row_scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        if tl.max(tl.abs(row_scale), axis=0) != 0.0:
            local_tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
            row_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
            log_se = tl.load(logse_ptr + rows, mask=row_mask, other=0.0)
            z_factor = 1.0 + z_coef2 * (row_max + log_se)
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
            dz = dlogits(z, cols, col_mask, local_tgt, row_max, log_se, z_factor, row_scale, softcap,
                         tgt_coef, smooth, HAS_SOFTCAP)
            dz_t = tl.trans(dz)
            if not UPCAST:
                dz_t = dz_t.to(h_ptr.dtype.element_ty)
            tl.debug_barrier()  # see _lce_bwd_dx_kernel
            _accumulate_product(dw_ptr, stride_dw, cols, col_mask, dz_t, h_ptr, stride_h, rows, row_mask, H,
                                BLOCK_H, UPCAST, DOT_PRECISION)


KERNELS = {"fwd": _lce_fwd_kernel, "bwd_dx": _lce_bwd_dx_kernel, "bwd_dw": _lce_bwd_dw_kernel}

# Tile sizes. GPU values are not tuned on hardware (no autotune either: it breaks the
# interpreter); they are the largest tiles for which the sm_90 build of all three kernels needs
# no register spills (checked with cuobjdump -res-usage: BLOCK_H=64 spilled in both backward
# kernels). The interpreter uses small tiles so that tests exercise several blocks in every loop.
GPU_BLOCKS = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3)
INTERP_BLOCKS = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
# The forward and dX kernels parallelise over token blocks; with few tokens (N=4096 -> 64 blocks)
# that leaves SMs idle, so the vocabulary is also split and the partial results are combined
# afterwards (deterministically). Aim for this many programs per SM; dX partials cost
# splits x N x H fp32, hence the separate, lower cap. The interpreter always uses 2 splits so
# that the combine paths are tested.
PROGRAMS_PER_SM = 2
MAX_SPLITS_FWD = 32
MAX_SPLITS_DX = 4
INTERP_SPLITS = 2


def interpreting() -> bool:
    """True when the kernels run in triton's CPU interpreter (TRITON_INTERPRET=1, see CAPS)."""
    return CAPS.triton_interpret


if (type(_lce_fwd_kernel).__name__ == "InterpretedFunction") != CAPS.triton_interpret:
    raise ImportError(f"TRITON_INTERPRET changed after megacpt.kernels was imported (it was "
                      f"{'1' if CAPS.triton_interpret else 'unset'}); set it before that import")


def _launch_opts(dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(INTERP_BLOCKS, UPCAST=True, DOT_PRECISION="ieee")
    # fp32 inputs: follow torch's matmul setting (TF32 only when the user allowed it).
    precision = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return dict(GPU_BLOCKS, UPCAST=False, DOT_PRECISION=precision)


def _vocab_splits(n_blocks: int, v: int, block_v: int, cap: int, device: torch.device):
    """(number of splits, columns per split -- a multiple of block_v)."""
    v_blocks = triton.cdiv(v, block_v)
    if interpreting():
        want = INTERP_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(PROGRAMS_PER_SM * sms, max(n_blocks, 1))
    per_split = triton.cdiv(v_blocks, max(1, min(want, cap, v_blocks))) * block_v
    return triton.cdiv(v, per_split), per_split


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Shape/dtype/layout checks before any launch (the kernels would read garbage otherwise)."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("triton linear_cross_entropy expects hidden (N, H), weight (V, H), targets (N,)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden H={hidden.shape[1]} does not match weight H={weight.shape[1]}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries for {hidden.shape[0]} tokens")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16) or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden/weight must share fp32, bf16 or fp16, got {hidden.dtype}/{weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("triton linear_cross_entropy needs hidden and weight with a contiguous last "
                         "dimension (stride 1); call .contiguous() first")
    if targets.stride(0) != 1:
        raise ValueError("targets must be contiguous")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError("hidden, weight and targets must be on one device")
    if hidden.device.type != "cuda" and not interpreting():
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "megacpt.kernels is imported (CPU interpreter)")


def lce_stats(hidden, weight, targets, spec: LossSpec):
    """Per-token (max, sumexp, target logit, logit sum | None) over this weight's rows."""
    _check(hidden, weight, targets)
    vocab_start, softcap, need_sum = spec.vocab_start, spec.softcap, spec.need_sum
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return empty, empty, empty, (empty if need_sum else None)
    opts = _launch_opts(hidden.dtype)
    n_blocks = triton.cdiv(n, opts["BLOCK_N"])
    splits, per_split = _vocab_splits(n_blocks, v, opts["BLOCK_V"], MAX_SPLITS_FWD, hidden.device)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    _lce_fwd_kernel[(n_blocks, splits)](hidden, weight, targets, part, n, v, h, hidden.stride(0),
                                        weight.stride(0), vocab_start, float(softcap or 1.0), per_split,
                                        HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum, **opts)
    if splits == 1:
        return part[0, 0], part[1, 0], part[2, 0], (part[3, 0] if need_sum else None)
    # Merge the per-split online-softmax states (N-sized torch ops, fixed order).
    row_max = part[0].amax(0)
    sumexp = (part[1] * torch.exp(part[0] - row_max)).sum(0)
    return row_max, sumexp, part[2].sum(0), (part[3].sum(0) if need_sum else None)


def lce_grads(hidden, weight, targets, row_max, log_sumexp, row_scale, spec: LossSpec):
    """fp32 gradients of sum_i row_scale[i] * loss_i w.r.t. hidden and weight (None if not needed)."""
    _check(hidden, weight, targets)
    n, h = hidden.shape
    v = weight.shape[0]
    softcap, eps = spec.softcap, spec.label_smoothing
    row_max = row_max.float().contiguous()
    log_sumexp = log_sumexp.float().contiguous()
    row_scale = row_scale.float().contiguous()
    opts = _launch_opts(hidden.dtype)
    common = (n, v, h, hidden.stride(0), weight.stride(0))
    scalars = (spec.vocab_start, float(softcap or 1.0), 2.0 * spec.z_loss, 1.0 - eps, eps / spec.vocab_total)
    dx = dw = None
    if spec.need_dx:
        n_blocks = triton.cdiv(n, opts["BLOCK_N"])
        splits, per_split = _vocab_splits(n_blocks, v, opts["BLOCK_V"], MAX_SPLITS_DX, hidden.device)
        part = torch.zeros((splits, n, h), dtype=torch.float32, device=hidden.device)
        if n:
            _lce_bwd_dx_kernel[(n_blocks, splits)](
                hidden, weight, targets, row_max, log_sumexp, row_scale, part, *common, part.stride(1),
                *scalars, per_split, part.stride(0), HAS_SOFTCAP=softcap is not None, **opts)
        dx = part[0] if splits == 1 else part.sum(0)
    if spec.need_dw:
        dw = torch.zeros((v, h), dtype=torch.float32, device=weight.device)
        if n:
            _lce_bwd_dw_kernel[(triton.cdiv(v, opts["BLOCK_V"]),)](
                hidden, weight, targets, row_max, log_sumexp, row_scale, dw, *common, dw.stride(0),
                *scalars, HAS_SOFTCAP=softcap is not None, **opts)
    return dx, dw


class TritonBackend:
    """The stats/grads primitives of linear_cross_entropy.py on the Triton kernels."""

    name = "triton"

    def stats(self, hidden, weight, targets, spec: LossSpec):
        return lce_stats(hidden, weight, targets, spec)

    def grads(self, hidden, weight, targets, row_max, log_sumexp, row_scale, spec: LossSpec):
        return lce_grads(hidden, weight, targets, row_max, log_sumexp, row_scale, spec)
