"""Causal attention for CPU training: torch's flash forward, a blocked backward on oneDNN matmuls.

Why: on CPU, torch's flash-attention backward is several times slower than its forward (for
SmolLM2-135M's shape, 9 heads x 512 x 64 in bf16, ~15 ms against ~2.6 ms per layer on one core:
~0.45 s of a ~3.8 s ZeRO-3 step), while the same backward written as five batched matmuls per
block of queries plus one fused pointwise pass runs the matmuls through oneDNN (AMX for bf16).

Forward: `aten._scaled_dot_product_flash_attention_for_cpu`, which also returns the row
log-sum-exp. Backward, for each block of query rows (all heads at once, key/value heads shared by
their query group as in GQA):

    S  = Q_b K^T                (fp32: bf16 products, fp32 accumulation and output)
    P  = exp(S * scale - lse)   (0 where masked)
    dP = dO_b V^T
    dS = P * (dP - rowsum(dO_b * O_b))
    dQ_b = dS K * scale,  dK += dS^T Q_b * scale,  dV += P^T dO_b   (dK, dV summed in fp32)

Keys past the block's last row are never visible to a causal model, so each block only touches
keys [0, end): with two blocks the matmuls and the pointwise pass skip a quarter of the square,
with many about half.
The pointwise pass (P and dS) is one torch.compile'd function when `compiled=True`.

Only for causal attention (every mask is causal, optionally narrowed by sliding windows or
document boundaries) of (b, h, s, d) queries and (b, kv, s, d) keys/values with h % kv == 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .linear_cross_entropy import _cpu_bf16_products

# Query rows per block: at SmolLM2's shape (512 tokens) 256 trained faster than 128 (smaller,
# slower matmuls) and 512 (no causal trim) in an interleaved one-core comparison.
BLOCK_ROWS = 256


def _pointwise(s: Tensor, dp: Tensor, lse: Tensor, delta: Tensor, scale: float, first_row: int):
    """P and scale * dS of one block of query rows under the causal mask. s (fp32), dp: (b, kv, g,
    r, n); lse, delta: (b, kv, g, r, 1) fp32; first_row: the block's first query position. Returns
    both in dp's dtype (the next matmuls' operand dtype). The mask is computed from indices, not read
    from a tensor: a mask operand makes inductor split the loop in two passes over the block."""
    rows = torch.arange(s.shape[-2], device=s.device)[:, None] + first_row
    cols = torch.arange(s.shape[-1], device=s.device)[None, :]
    p = torch.where(cols <= rows, torch.exp(s * scale - lse), 0.0)
    # The softmax scale is folded in here (fp32), so dQ and dK need no second rounding for it.
    ds = p * (dp.float() - delta) * scale
    return p.to(dp.dtype), ds.to(dp.dtype)


_compiled_pointwise = None


def _pointwise_fn(compiled: bool):
    global _compiled_pointwise
    if not compiled:
        return _pointwise
    if _compiled_pointwise is None:
        # dynamic: each block of a causal sequence has a different number of keys.
        _compiled_pointwise = torch.compile(_pointwise, dynamic=True)
    return _compiled_pointwise


def _grouped(x: Tensor, kv: int, start: int, end: int) -> Tensor:
    """(b, h, s, d)[:, :, start:end] as (b, kv, g * rows, d), query heads grouped by their kv head."""
    b, h, _, d = x.shape
    return x[:, :, start:end].reshape(b, kv, (h // kv) * (end - start), d)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, compiled):
        if mask is None:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        else:
            additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=additive, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.compiled = scale, compiled
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, mask, ctx.scale, ctx.compiled)
        return dq, dk, dv, None, None, None


def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                       mask: Optional[Tensor], scale: float, compiled: bool = False,
                       block_rows: Optional[int] = None):
    """dQ, dK, dV of causal attention (see the module docstring), blocked over query rows.

    lse: (b, h, s) fp32 natural-log row sums of exp(scale * S) from the forward;
    mask: None (causal) or bool (b | 1, 1, s, s), True = attend, already causal.
    """
    b, h, s, d = q.shape
    kv = k.shape[1]
    g = h // kv
    dt = q.dtype
    block_rows = block_rows or BLOCK_ROWS
    fn = _pointwise_fn(compiled)
    grad_out = grad_out.contiguous()
    kf = k.float()
    dq = torch.empty_like(q)
    dk = torch.zeros((b, kv, s, d), dtype=torch.float32)
    dv = torch.zeros((b, kv, s, d), dtype=torch.float32)
    # delta = rowsum(dO * O), the softmax backward's correction, for all rows at once.
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    for start in range(0, s, block_rows):
        end = min(start + block_rows, s)
        r = end - start
        qb = _grouped(q, kv, start, end)
        dob = _grouped(grad_out, kv, start, end)
        # Scores from fp32 operands (exact widenings), as flash attention keeps them: a bf16 result
        # would round them before the exponential. bf16 q, k on CPUs with bf16 units: the loss
        # kernel's context has oneDNN multiply them as bf16 (exact products, fp32 accumulation).
        with _cpu_bf16_products(q, k):
            sc = torch.matmul(qb.float(), kf[:, :, :end].transpose(-1, -2))
        dp = torch.matmul(dob, v[:, :, :end].transpose(-1, -2))
        shape5 = (b, kv, g, r, end)
        p, ds = fn(sc.view(shape5), dp.view(shape5), lse[:, :, start:end].reshape(b, kv, g, r, 1),
                   delta[:, :, start:end].reshape(b, kv, g, r, 1), scale, start)
        if mask is not None:
            # Narrower than causal (windows, documents): zero what the mask also hides.
            hidden = ~mask[:, :, start:end, :end].unsqueeze(1)  # (b|1, 1, 1, r, end)
            p.masked_fill_(hidden, 0)
            ds.masked_fill_(hidden, 0)
        p, ds = p.view(b, kv, g * r, end), ds.view(b, kv, g * r, end)
        dq[:, :, start:end] = torch.matmul(ds, k[:, :, :end]).view(b, h, r, d)
        dk[:, :, :end] += torch.matmul(ds.transpose(-1, -2), qb)
        dv[:, :, :end] += torch.matmul(p.transpose(-1, -2), dob)
    return dq, dk.to(dt), dv.to(dt)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                     scale: Optional[float] = None, compiled: bool = False) -> Tensor:
    """Causal attention of (b, h, s, d) q and (b, kv, s, d) k, v on CPU; see the module docstring.

    mask: None for plain causal attention, else bool (b | 1, 1, s, s), True = attend, which must
    itself be causal (a key after its query is never attended).
    """
    if q.device.type != "cpu":
        raise ValueError("causal_attention is the CPU path; on GPUs use scaled_dot_product_attention")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"causal_attention takes fp32, bf16 or fp16, not {q.dtype}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not split into groups over {k.shape[1]} key/value heads")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _CausalAttention.apply(q, k, v, mask, scale, compiled)
