"""One Triton pass over a chunk of logits: the softmax statistics and the logit gradient.

Used by the chunked torch backend (torch_lce.py) where the logits come from a cuBLAS GEMM (CUDA
tensors with triton installed, impl="auto"; or impl="chunked-triton", also on CPU tensors under
TRITON_INTERPRET=1). Imported lazily: importing triton costs seconds.

The eager chunk loop spends ~7 pointwise passes over each fp32 logits chunk (max, target gather,
subtract, exp, sum, divide, one-hot, scale, cast). Here one program owns a block of rows and
streams each row twice in BLOCK_V tiles:
  1. online max and sum of exp, the target logit and (label smoothing) the logit sum;
  2. dL/dz = p (1 + 2 z_loss lse) - (1 - eps) [j = t] - eps / V, times d(softcap)/dz and the row
     scale, written once in the dtype of the gradient products (bf16 for bf16 inputs, as eager
     autograd rounds them; fp32 in place over the logits for fp32 inputs).
Softcap (s = c tanh(z / c)) is applied inside the pass, so the chunk holds only the raw logits.
The pass can also take given statistics (the recompute backward) or skip step 2 (no gradient).
p is exp((s - max) - log(sumexp)), never exp(s - lse): 1 - p stays accurate for confident
targets (see torch_lce.py); p - 1 is formed in fp32 before the cast.

Bytes per logit: 4 + 4 read, 2 (bf16) or 4 written, against ~50 for the eager passes.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .capabilities import CAPS
from .per_token import LossSpec
from .triton_lce import capped, dlogits, online_stats

__all__ = ["softmax_pass", "check_device", "KERNELS", "GPU_BLOCKS", "INTERP_BLOCKS"]


@triton.jit
def _row_stats(z_rows, rows, row_mask, tgt, V, softcap, HAS_SOFTCAP: tl.constexpr,
               NEED_SUM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 over a block of rows: (max, sumexp, target logit, logit sum) of the capped logits."""
    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sumexp = tl.zeros((BLOCK_N,), tl.float32)
    tgt_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        # Rows past the end load 0 (finite statistics, never stored); columns past V are -inf below.
        z = tl.load(z_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        s, _ = capped(z.to(tl.float32), softcap, HAS_SOFTCAP)
        row_max, sumexp, tgt_logit, logit_sum = online_stats(s, cols, col_mask, tgt, row_max, sumexp, tgt_logit,
                                                             logit_sum, NEED_SUM)
    return row_max, sumexp, tgt_logit, logit_sum


@triton.jit
def _softmax_pass_kernel(z_ptr, tgt_ptr, scale_ptr, stats_ptr, dz_ptr,
                         n_rows, V, stride_z, stride_dz, stride_stats, softcap, z_coef2, tgt_coef, smooth,
                         GIVEN_STATS: tl.constexpr, WRITE_DZ: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program = BLOCK_N rows. stats planes (stride_stats apart): max, sumexp, target logit, logit
    sum -- written, or (GIVEN_STATS) max and log(sumexp) read from planes 0 and 1."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    z_rows = z_ptr + rows[:, None] * stride_z
    if GIVEN_STATS:
        row_max = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
        log_se = tl.load(stats_ptr + stride_stats + rows, mask=row_mask, other=0.0)
    else:
        row_max, sumexp, tgt_logit, logit_sum = _row_stats(z_rows, rows, row_mask, tgt, V, softcap,
                                                           HAS_SOFTCAP, NEED_SUM, BLOCK_N, BLOCK_V)
        tl.store(stats_ptr + rows, row_max, mask=row_mask)
        tl.store(stats_ptr + stride_stats + rows, sumexp, mask=row_mask)
        tl.store(stats_ptr + 2 * stride_stats + rows, tgt_logit, mask=row_mask)
        if NEED_SUM:
            tl.store(stats_ptr + 3 * stride_stats + rows, logit_sum, mask=row_mask)
        log_se = tl.log(sumexp)
    if WRITE_DZ:
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        else:
            row_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
        z_factor = 1.0 + z_coef2 * (row_max + log_se)
        dz_rows = dz_ptr + rows[:, None] * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            # With dz_ptr == z_ptr (fp32) every element is read before the same program writes it.
            z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0)
            g = dlogits(z.to(tl.float32), cols, cols < V, tgt, row_max, log_se, z_factor, row_scale, softcap,
                        tgt_coef, smooth, HAS_SOFTCAP)
            tl.store(dz_rows + cols[None, :], g.to(dz_ptr.dtype.element_ty), mask=mask)


KERNELS = {"softmax_pass": _softmax_pass_kernel}

# GPU tile: 2 rows x 2,048 columns (16 fp32 values per thread at 8 warps), so a 1,040-row chunk
# makes 520 programs (~4 per H100 SM). Not tuned on hardware (no GPU lent when this was written);
# the AOT test checks the sm_90 build spills no registers. The interpreter uses small tiles so that
# tests cross several row blocks and column tiles, ragged ones included.
GPU_BLOCKS = dict(BLOCK_N=2, BLOCK_V=2048, num_warps=8)
INTERP_BLOCKS = dict(BLOCK_N=4, BLOCK_V=16)

if (type(_softmax_pass_kernel).__name__ == "InterpretedFunction") != CAPS.triton_interpret:
    raise ImportError(f"TRITON_INTERPRET changed after megacpt.kernels was imported (it was "
                      f"{'1' if CAPS.triton_interpret else 'unset'}); set it before that import")


def _check(z: torch.Tensor, tgt: torch.Tensor, dz: Optional[torch.Tensor]) -> None:
    if z.dim() != 2 or z.stride(1) != 1 or z.dtype != torch.float32:
        raise ValueError("softmax_pass needs 2-D fp32 logits with a contiguous last dimension")
    if tgt.shape != (z.shape[0],) or tgt.stride(0) != 1 or tgt.dtype != torch.int64:
        raise ValueError("softmax_pass needs contiguous int64 targets, one per logit row")
    if dz is not None and (dz.shape != z.shape or dz.stride(1) != 1):
        raise ValueError("softmax_pass writes dz of the logits' shape with a contiguous last dimension")
    check_device(z)


def check_device(t: torch.Tensor) -> None:
    """ValueError unless the pass can run on t's device (called before any chunk's GEMM)."""
    if t.device.type != "cuda" and not CAPS.triton_interpret:
        raise ValueError("impl='chunked-triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "megacpt.kernels is imported (CPU interpreter)")


def softmax_pass(z: torch.Tensor, tgt: torch.Tensor, spec: LossSpec, stats: torch.Tensor, *,
                 given_stats: bool = False, dz: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None) -> None:
    """z (c, V) fp32 raw logits of this weight's rows; tgt (c,) int64: the target's row of this
    weight, -1 where it is not one; stats (>= 2 or 4, c) fp32 planes (a view with unit stride
    along c). Writes max, sumexp, target logit and logit sum (label smoothing) into stats, or with
    given_stats reads max and log(sumexp) from its planes 0 and 1. With dz, also writes there
    d(sum_i scale_i * loss_i)/dz (scale None: 1) cast to dz's dtype; dz may be z itself (fp32)."""
    _check(z, tgt, dz)
    if stats.stride(-1) != 1:
        raise ValueError("softmax_pass needs stats planes with unit stride along the rows")
    c, v = z.shape
    if c == 0:
        return
    blocks = INTERP_BLOCKS if CAPS.triton_interpret else GPU_BLOCKS
    eps = spec.label_smoothing
    out = dz if dz is not None else z  # never written without WRITE_DZ
    _softmax_pass_kernel[(triton.cdiv(c, blocks["BLOCK_N"]),)](
        z, tgt, scale if scale is not None else stats, stats, out,
        c, v, z.stride(0), out.stride(0), stats.stride(0), float(spec.softcap or 1.0),
        2.0 * spec.z_loss, 1.0 - eps, eps / spec.vocab_total,
        GIVEN_STATS=given_stats, WRITE_DZ=dz is not None, HAS_SCALE=scale is not None,
        HAS_SOFTCAP=spec.softcap is not None, NEED_SUM=spec.need_sum and not given_stats, **blocks)
