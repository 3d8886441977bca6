"""Fused linear + cross-entropy: loss = CE(hidden @ weight.T, targets) without the N x V logits.

Public entry points: `linear_cross_entropy` (function) and `LinearCrossEntropy` (nn.Module).

Two implementations share the per-token maths below:
  * torch (any device, the CPU path): tokens are processed in chunks whose logits fit a fixed
    budget (`CHUNK_ELEMS`), so the workspace does not grow with N. For reduction "mean"/"sum" the
    gradients are computed during the forward pass (one pass over the weight instead of two) and
    only scaled by grad_output in backward. For reduction "none" the per-token upstream gradients
    are only known in backward, so dW cannot be precomputed: backward recomputes the chunk logits
    from the saved per-token logsumexp.
  * triton (CUDA, or CPU tensors under TRITON_INTERPRET=1; only when asked for by impl="triton"):
    see triton_lce.py; always the
    recompute scheme (forward 2NHV FLOPs, backward 8NHV); its only workspace is up to 4 partial
    fp32 dX buffers (N x H) when the vocabulary is split across programs.

Both backends expose the same two primitives so that the autograd functions (and the
vocab-parallel variant in vocab_parallel.py) are backend-agnostic:
  stats(hidden, weight, targets, vocab_start, softcap, need_sum) -> (max, sumexp, tgt_logit, logit_sum)
      per-token, over this weight's rows only; tgt_logit is 0 where the target is not a row of it.
  grads(hidden, weight, targets, row_max, log_sumexp, row_scale, ...) -> (dX fp32 | None, dW | None)
      gradients of sum_i row_scale[i] * loss_i given the (global) softmax statistics (dW in
      fp32, or bf16 where the CPU bf16 path computes it in one chunk). The
      logsumexp is passed as max + log(sumexp) unsummed: p = exp((s - max) - log(sumexp)) keeps
      1 - p accurate for confident targets, where rounding lse to fp32 first costs ~1e-6.

Per-token loss, with s = softcap * tanh(z / softcap) (or s = z), eps = label_smoothing:
  loss_i = lse_i - (1 - eps) * s_{i,t} - eps / V * sum_j s_{i,j} + z_loss * lse_i^2
which is torch.nn.functional.cross_entropy's label-smoothing definition plus the z-loss term.
dloss_i/ds_ij = p_ij * (1 + 2 z_loss lse_i) - (1 - eps) [j = t_i] - eps / V.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "CHUNK_ELEMS"]

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Logit elements per chunk of the torch path. The chunk workspace is one fp32 buffer of this size
# (logits -> probabilities -> dlogits, in place), two with softcap (the tanh values), plus a
# transient one on CUDA without mm(out_dtype=...): 2^23 elements = 32 MiB, independent of N.
# (bf16/fp16 on CPUs without bf16 units add a fixed fp32 copy of the weight, see _matmul_weight;
# CPUs with them make no copy and size their chunks by the weight instead, see _chunk_rows.)
CHUNK_ELEMS = int(os.environ.get("MEGACPT_LCE_CHUNK_ELEMS", str(1 << 23)))
# On CUDA every chunk re-reads the whole weight in three matmuls; 2^23 logits are only 64 rows at
# V=128k, which makes the head memory-bound. 2^27 (512 MiB of fp32 logits) gives 1,040 rows: on an
# H100, N=4096, H=2048, V=128256: 23.6 ms fwd+bwd vs 29.2 ms at 2^26, 38.4 at 2^25 (bench/profile_gpu.py).
CHUNK_ELEMS_CUDA = int(os.environ.get("MEGACPT_LCE_CHUNK_ELEMS_CUDA", str(1 << 27)))

# Target range checking (see _maybe_check_targets): "always" | "first" | "never".
TARGET_CHECK = os.environ.get("MEGACPT_LCE_CHECK_TARGETS", "first")
_checked_once = False


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _validate(hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str, impl: str,
              z_loss: float, label_smoothing: float, softcap: Optional[float]) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor) or not isinstance(targets, Tensor):
        raise ValueError("hidden, weight and targets must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim ({tuple(hidden.shape)}) must equal weight's H "
                         f"({tuple(weight.shape)})")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one of {_FLOAT_DTYPES}, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (V = 0)")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def invalid_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    """Mask of targets that are neither ignore_index nor in [0, vocab_size) (device op, no sync)."""
    return (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))


def _maybe_check_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ValueError for out-of-range targets.

    The check needs the answer on the host. On CPU that is free, so it always runs. On CUDA it is
    a device->host sync that stalls the launch queue every step, so by default ("first") only the
    first call in the process pays it -- which catches the usual mistake (a tokenizer/model vocab
    mismatch) at step 1. Afterwards bad targets are still visible without a sync: their per-token
    loss is NaN (see _finish). MEGACPT_LCE_CHECK_TARGETS=always|never changes the policy.
    """
    global _checked_once
    if targets.numel() == 0:
        return
    if targets.device.type != "cpu":
        if TARGET_CHECK == "never" or (TARGET_CHECK == "first" and _checked_once):
            return
        _checked_once = True
    bad = invalid_targets(targets, vocab_size, ignore_index)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f"target {int(targets.reshape(-1)[idx])} at position {idx} is outside "
                         f"[0, {vocab_size}) and is not ignore_index ({ignore_index})")


# ----------------------------------------------------------------------------------------------
# per-token maths shared by every backend
# ----------------------------------------------------------------------------------------------
def _finish(row_max: Tensor, sumexp: Tensor, tgt_logit: Tensor, logit_sum: Optional[Tensor],
            targets: Tensor, *, ignore_index: int, vocab_total: int, z_loss: float,
            label_smoothing: float):
    """Per-token (loss, z term, valid mask, log(sumexp)) from the softmax statistics (N-sized ops)."""
    eps = label_smoothing
    valid = targets != ignore_index
    log_se = sumexp.log()
    lse = row_max + log_se
    # (max - target) + log(sumexp) rather than lse - target: for a confident target max == target
    # and the loss ~1e-4 would otherwise lose digits to the rounding of lse (~1e-6 * |max|).
    loss = (1.0 - eps) * (row_max - tgt_logit) + log_se
    if eps:
        loss = loss + eps * (row_max - logit_sum / vocab_total)
    z = z_loss * lse.square() if z_loss else torch.zeros_like(lse)
    loss = torch.where(valid, loss + z, 0.0)
    z = torch.where(valid, z, 0.0)
    # Out-of-range targets (unchecked on CUDA after the first call) poison the loss instead of
    # silently training on a wrong logit.
    loss = torch.where(invalid_targets(targets, vocab_total, ignore_index), float("nan"), loss)
    return loss, z, valid, log_se


def _reduce(per_token: Tensor, reduction: str, n_valid: Tensor) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "mean":
        # clamp keeps an all-ignored batch at 0 instead of 0/0; stays on device.
        total = total / n_valid.clamp(min=1)
    return total


def _row_scale(grad_out: Tensor, reduction: str, valid: Tensor, n_valid: Tensor) -> Tensor:
    """Per-token weight of d(loss)/d(per-token loss) for the backward pass (0 for ignored rows)."""
    g = grad_out.float()
    if reduction == "mean":
        g = g / n_valid.clamp(min=1)
    return (g * valid).expand(valid.shape).contiguous()


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------
def chunk_rows(n: int, v: int, chunk_elems: Optional[int] = None, cuda: bool = False) -> int:
    if n <= 0:
        return 1  # no rows: no chunk runs, but range(0, 0, c) needs c > 0
    budget = (CHUNK_ELEMS_CUDA if cuda else CHUNK_ELEMS) if chunk_elems is None else chunk_elems
    c = max(1, budget // max(v, 1))
    if c >= 16:
        c -= c % 8  # friendlier matmul shapes
    c = max(1, min(c, n))
    # Equal chunks rather than full ones plus a sliver: every chunk's matmuls stream the whole
    # weight (and on CPU with bf16 products convert it), so a 2-row last chunk (512 rows at
    # 170 per chunk) costs nearly as much as a full one. Never above the budget.
    k = -(-n // c)
    return -(-n // k)


def _chunk_rows(hidden: Tensor, weight: Tensor, chunk_elems: Optional[int]) -> int:
    n, v = hidden.shape[0], weight.shape[0]
    if chunk_elems is None and _cpu_bf16_path(hidden, weight):
        # This path makes no fp32 copy of the weight (4 bytes per weight element W; see
        # _matmul_weight) and, in one chunk, no fp32 dW (4 more; see _grad_buffers). Its chunk
        # workspace is 6 bytes per logit (fp32 logits and the bf16 dlogits), so fewer chunks --
        # fewer passes over the weight -- fit in what the other path spends: all rows in one
        # chunk while n * v <= W (6W + the 2W bf16 dW against 8W), else chunks of 2W/3 logits
        # next to the fp32 dW (4W + 4W). SmolLM2's head at N=512 (25M logits, 28M weight
        # elements) runs in one chunk.
        if n * v <= weight.numel():
            return max(n, 1)
        chunk_elems = max(CHUNK_ELEMS, 2 * weight.numel() // 3)
    return chunk_rows(n, v, chunk_elems, hidden.is_cuda)


def _local_targets(targets: Tensor, vocab_start: int, v_local: int):
    local = targets.long() - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    return torch.where(in_shard, local, 0), in_shard


def _matmul_weight(hidden: Tensor, weight: Tensor) -> Tensor:
    """The weight operand of the chunk matmuls.

    bf16 on CPUs with bf16 units: the weight itself; the logits widen it to fp32 one block of
    rows at a time (_cpu_bf16_logits), the dX/dW products take it as it is (_accumulate_grads).
    Other bf16/fp16 on CPU: an fp32 copy, made
    once per call (a fixed V x H workspace, the size of the fp32 dW buffer): CPUs without bf16
    units run bf16 matmuls ~30x slower than fp32, and bf16 logits lose ~3 significant digits
    (confident targets' p - 1 and loss with them). Elsewhere the weight itself (on CUDA the logits
    come out in fp32 via mm's out_dtype, see _chunk_logits).
    """
    if _cpu_bf16_path(hidden, weight):
        return weight
    if weight.device.type == "cpu" and weight.dtype != torch.float32:
        return weight.float()
    return weight


# "auto" | "on" | "off": bf16 products for bf16 operands on CPU (see _cpu_bf16_products).
CPU_BF16_PRODUCTS = os.environ.get("MEGACPT_LCE_CPU_BF16", "auto")
_cpu_has_bf16_units: Optional[bool] = None


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16), per /proc/cpuinfo."""
    global _cpu_has_bf16_units
    if _cpu_has_bf16_units is None:
        flags: set = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        _cpu_has_bf16_units = bool(flags & {"amx_bf16", "avx512_bf16"}) and torch.backends.mkldnn.is_available()
    return _cpu_has_bf16_units


def _cpu_bf16_path(hidden: Tensor, weight: Tensor) -> bool:
    """bf16 hidden and weight on a CPU with bf16 units (unless MEGACPT_LCE_CPU_BF16 says otherwise)."""
    return (hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and CPU_BF16_PRODUCTS != "off" and (CPU_BF16_PRODUCTS == "on" or cpu_has_bf16_units()))


def _cpu_bf16_products(hidden: Tensor, weight: Tensor):
    """Context for the chunk matmuls: on CPUs with bf16 units and bf16 hidden and weight, oneDNN
    runs the fp32 logit matmuls (of exact fp32 widenings of bf16 values, _cpu_bf16_logits) as
    bf16 products with fp32 accumulation -- AMX does ~330 GFLOP/s per core there against ~90-160
    for fp32 sgemm, and the logits come out exactly as accurate, since the operands are bf16
    values already. (The dX/dW products take bf16 operands directly, the dlogits rounded to bf16
    as eager bf16 autograd and our CUDA path round them.) Elsewhere (fp32/fp16 inputs, CPUs
    without bf16 units, CUDA) a no-op. MEGACPT_LCE_CPU_BF16=off disables it, =on forces it."""
    if not _cpu_bf16_path(hidden, weight):
        return contextlib.nullcontext()
    return _mkldnn_fp32_precision("bf16")


# Weight rows widened to fp32 per product on the CPU bf16 path: large enough for oneDNN's full
# speed, small enough (4.7 MB at H=576) that the widened block is still in cache when multiplied.
CPU_BF16_BLOCK = 4096


def _cpu_bf16_logits(h: Tensor, w: Tensor) -> Tensor:
    """fp32 logits h @ w.T of bf16 h and w, as bf16 products with fp32 accumulation and output.

    torch has no bf16 x bf16 -> fp32 matmul on CPU (mm's out_dtype is CUDA-only), and a bf16
    result would round the logits. So each block of weight rows is widened to fp32 (exact) and
    multiplied under _cpu_bf16_products: no fp32 copy of the whole weight (a 57 ms pass over
    113 MB for the SmolLM2 head on one core), and each widened block is still in cache when
    oneDNN reads it."""
    hf = h.float()
    z = torch.empty((h.shape[0], w.shape[0]), dtype=torch.float32)
    for s in range(0, w.shape[0], CPU_BF16_BLOCK):
        e = min(s + CPU_BF16_BLOCK, w.shape[0])
        torch.mm(hf, w[s:e].float().t(), out=z[:, s:e])
    return z


@contextlib.contextmanager
def _mkldnn_fp32_precision(value: str):
    m = torch.backends.mkldnn.matmul
    try:
        old = m.fp32_precision
        m.fp32_precision = value
    except (AttributeError, RuntimeError):
        # torch refuses the new precision API after a program set the legacy allow_tf32-style
        # flags; the fp32 products are correct, only slower.
        yield
        return
    try:
        yield
    finally:
        m.fp32_precision = old


_mm_out_dtype_ok: Optional[bool] = None  # does torch.mm(..., out_dtype=fp32) work here?


def _chunk_logits(h: Tensor, w_mm: Tensor, softcap: Optional[float]):
    """fp32 (capped) logits of a chunk, and tanh(z / softcap) for the gradient (or None)."""
    global _mm_out_dtype_ok
    if w_mm.dtype == torch.float32:
        z = torch.mm(h.float(), w_mm.t())
    elif w_mm.device.type == "cpu":  # a bf16 weight on CPU: only the bf16-products path keeps it
        z = _cpu_bf16_logits(h, w_mm)
    else:
        z = None
        if _mm_out_dtype_ok is not False:
            try:  # fp32 logits from bf16/fp16 operands without an fp32 weight copy (CUDA)
                z = torch.mm(h, w_mm.t(), out_dtype=torch.float32)
                _mm_out_dtype_ok = True
            except torch.OutOfMemoryError:
                raise  # not a missing feature: keep the fast path for the next call
            except (TypeError, RuntimeError, NotImplementedError):
                _mm_out_dtype_ok = False
        if z is None:
            z = torch.mm(h, w_mm.t()).float()
    if softcap is None:
        return z, None
    th = z.div_(softcap).tanh_()
    return th * softcap, th


def _probs_to_dlogits(p: Tensor, th: Optional[Tensor], local: Tensor, in_shard: Tensor, lse: Tensor,
                      row_scale: Tensor, z_loss: float, eps: float, vocab_total: int) -> Tensor:
    """In place: softmax probabilities -> d(sum_i row_scale_i * loss_i)/dz for one chunk."""
    if z_loss:
        p.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
    # p - 1 is formed in fp32 (p ~ 1 for confident targets would cancel to 0 in bf16).
    p.scatter_add_(1, local.unsqueeze(1), (in_shard.float() * -(1.0 - eps)).unsqueeze(1))
    if eps:
        p.sub_(eps / vocab_total)
    if th is not None:
        p.mul_(th.mul_(th).neg_().add_(1.0))  # d(c*tanh(z/c))/dz = 1 - tanh^2
    return p if row_scale is None else p.mul_(row_scale.unsqueeze(1))


def _dw_from_fp32_products(w_mm: Tensor) -> bool:
    """Whether dW is summed over chunks by fp32 matmuls writing into an fp32 buffer: an fp32
    weight, or the CPU bf16 path (the only one that keeps a bf16 weight on CPU, _matmul_weight),
    where _cpu_bf16_products makes oneDNN round the fp32 operands to bf16 itself."""
    return w_mm.dtype == torch.float32 or w_mm.device.type == "cpu"


def _grad_buffers(hidden: Tensor, w_mm: Tensor, need_dx: bool, need_dw: bool, one_chunk: bool):
    """dX and dW buffers. Every chunk writes its own rows of dX, so dX (fp32) starts
    uninitialised (any row count > 0). dW is a sum over chunks: where fp32 products sum it
    (_dw_from_fp32_products) the first chunk writes it (no 100+ MB zero fill per call on a large
    vocabulary), otherwise (bf16/fp16 on CUDA) it starts at zero. On the CPU bf16 path with a
    single chunk, dW is that chunk's bf16 product itself: no fp32 buffer and no pass to convert
    it (the product accumulates in fp32 inside oneDNN)."""
    n = hidden.shape[0]
    dx = dw = None
    if need_dx:
        dx = (torch.empty if n else torch.zeros)(hidden.shape, dtype=torch.float32, device=hidden.device)
    if need_dw:
        if n and one_chunk and w_mm.dtype != torch.float32 and w_mm.device.type == "cpu":
            dw = torch.empty(w_mm.shape, dtype=w_mm.dtype)
        else:
            first_writes = n > 0 and _dw_from_fp32_products(w_mm)
            dw = (torch.empty if first_writes else torch.zeros)(w_mm.shape, dtype=torch.float32,
                                                                device=w_mm.device)
    return dx, dw


def _accumulate_grads(dz: Tensor, h: Tensor, w_mm: Tensor, dx: Optional[Tensor],
                      dw: Optional[Tensor], i: int, j: int) -> None:
    # bf16/fp16 weights (tensor cores, AMX): dlogits rounded like eager autograd rounds them,
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
    if dw.dtype == torch.float32 and _dw_from_fp32_products(w_mm):
        # No V x H temporary: the product is written or added straight into dW.
        if i == 0:  # the first chunk initialises dW (see _grad_buffers)
            torch.mm(dz.t(), h.float(), out=dw)
        else:
            dw.addmm_(dz.t(), h.float())
        return
    dz_lp = dz.to(w_mm.dtype) if dz_lp is None else dz_lp
    if dw.dtype == w_mm.dtype:  # the only chunk on the CPU bf16 path (see _grad_buffers)
        torch.mm(dz_lp.t(), h, out=dw)
    elif not _addmm_fp32_into(dw, dz_lp.t(), h):  # CUDA: the cross-chunk sum kept in fp32
        dw.add_(torch.mm(dz_lp.t(), h).float())


_addmm_out_dtype_ok: Optional[bool] = None


def _addmm_fp32_into(acc: Tensor, a: Tensor, b: Tensor) -> bool:
    """acc += a @ b for low-precision a, b into an fp32 acc, with no temporary; False if unsupported."""
    global _addmm_out_dtype_ok
    if _addmm_out_dtype_ok is False or acc.device.type != "cuda":
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        _addmm_out_dtype_ok = True
        return True
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):
        _addmm_out_dtype_ok = False
        return False


# The per-chunk work lives in functions of its own so that a chunk's buffers are freed when the
# function returns -- before the next chunk allocates its logits (a loop body would keep the
# previous chunk's buffer alive while the next one is created: twice the workspace).
def _stats_chunk(h, w_mm, local, in_shard, softcap, need_sum):
    s, _ = _chunk_logits(h, w_mm, softcap)
    m = s.amax(1)
    t = torch.where(in_shard, s.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
    total = s.sum(1) if need_sum else None
    se = s.sub_(m.unsqueeze(1)).exp_().sum(1)
    return m, se, t, total


def _grads_chunk(h, w_mm, local, in_shard, row_max, log_sumexp, lse, row_scale, softcap, z_loss,
                 eps, vocab_total, dx, dw, i, j):
    s, th = _chunk_logits(h, w_mm, softcap)
    p = s.sub_(row_max.unsqueeze(1)).sub_(log_sumexp.unsqueeze(1)).exp_()
    dz = _probs_to_dlogits(p, th, local, in_shard, lse, row_scale, z_loss, eps, vocab_total)
    del th, s, p
    _accumulate_grads(dz, h, w_mm, dx, dw, i, j)


def _fused_chunk(h, w_mm, local, in_shard, valid, softcap, z_loss, eps, dx, dw, i, j, compiled=False):
    s, th = _chunk_logits(h, w_mm, softcap)
    t = torch.where(in_shard, s.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
    # dlogits in the weight's dtype where the products take them so (bf16 on CPU, one chunk).
    out_dtype = torch.float32 if w_mm.dtype == torch.float32 or (dw is not None and dw.dtype == torch.float32) \
        else w_mm.dtype
    if compiled and (dx is not None or dw is not None) and _compiled_pass_applies(s, softcap, z_loss, eps, out_dtype):
        # One compiled pass (max, sum of exp, dlogits) instead of ~7 eager ones over the logits.
        scale = valid if valid is not None else torch.ones(s.shape[0], dtype=torch.float32, device=s.device)
        m, se, dz = _compiled_softmax_grad()(s, local, in_shard, scale, out_dtype)
        del s
        _accumulate_grads(dz, h, w_mm, dx, dw, i, j)
        return m, se, t, None
    m = s.amax(1)
    total = s.sum(1) if eps else None
    e = s.sub_(m.unsqueeze(1)).exp_()
    se = e.sum(1)
    if dx is not None or dw is not None:
        p = e.div_(se.unsqueeze(1))
        dz = _probs_to_dlogits(p, th, local, in_shard, m + se.log(), valid, z_loss, eps,
                               w_mm.shape[0])
        del th, s, e, p
        _accumulate_grads(dz, h, w_mm, dx, dw, i, j)
    return m, se, t, total


def _softmax_grad(s: Tensor, local: Tensor, in_shard: Tensor, row_scale: Tensor, out_dtype: torch.dtype):
    """Row max, sum of exp(s - max) and the dlogits (softmax - onehot) * row_scale of fp32 logits s,
    in out_dtype. The target's p - 1 is formed in fp32 before any rounding (see _probs_to_dlogits)."""
    m = s.amax(1, keepdim=True)
    e = torch.exp(s - m)
    se = e.sum(1, keepdim=True)
    cols = torch.arange(s.shape[1], device=s.device)[None, :]
    is_target = (cols == local[:, None]) & in_shard[:, None]
    p = e / se
    dz = torch.where(is_target, p - 1.0, p) * row_scale[:, None]
    return m.squeeze(1), se.squeeze(1), dz.to(out_dtype)


_compiled_softmax_grad_fn = None


def _compiled_softmax_grad():
    global _compiled_softmax_grad_fn
    if _compiled_softmax_grad_fn is None:
        _compiled_softmax_grad_fn = torch.compile(_softmax_grad)
    return _compiled_softmax_grad_fn


def _compiled_pass_applies(s: Tensor, softcap, z_loss: float, eps: float, out_dtype: torch.dtype) -> bool:
    """The compiled pass covers the plain loss on CPU (where eager's passes over the fp32 logits
    cost more than the matmuls' share) with low-precision dlogits: its workspace is then the
    eager path's (fp32 logits + bf16 dlogits, see _chunk_rows); fp32 dlogits would double the
    eager in-place path's. Softcap, z-loss and label smoothing keep the eager path too."""
    return (s.device.type == "cpu" and out_dtype != torch.float32 and softcap is None and not z_loss
            and not eps)


@torch.no_grad()
def torch_stats(hidden: Tensor, weight: Tensor, targets: Tensor, *, vocab_start: int = 0,
                softcap: Optional[float] = None, need_sum: bool = False,
                chunk_elems: Optional[int] = None):
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty((4, n), dtype=torch.float32, device=hidden.device)
    local, in_shard = _local_targets(targets, vocab_start, v)
    w_mm = _matmul_weight(hidden, weight)
    c = _chunk_rows(hidden, weight, chunk_elems)
    with _cpu_bf16_products(hidden, weight):
        for i in range(0, n, c):
            j = min(i + c, n)
            for k, x in enumerate(_stats_chunk(hidden[i:j], w_mm, local[i:j], in_shard[i:j], softcap,
                                               need_sum)):
                if x is not None:
                    out[k, i:j] = x
    return out[0], out[1], out[2], (out[3] if need_sum else None)


@torch.no_grad()
def torch_grads(hidden: Tensor, weight: Tensor, targets: Tensor, row_max: Tensor, log_sumexp: Tensor,
                row_scale: Tensor, *, vocab_start: int = 0, softcap: Optional[float] = None,
                z_loss: float = 0.0, label_smoothing: float = 0.0, vocab_total: Optional[int] = None,
                need_dx: bool = True, need_dw: bool = True, chunk_elems: Optional[int] = None):
    n, v = hidden.shape[0], weight.shape[0]
    vocab_total = v if vocab_total is None else vocab_total
    w_mm = _matmul_weight(hidden, weight)
    c = _chunk_rows(hidden, weight, chunk_elems)
    dx, dw = _grad_buffers(hidden, w_mm, need_dx, need_dw, one_chunk=c >= n)
    local, in_shard = _local_targets(targets, vocab_start, v)
    lse = row_max + log_sumexp if z_loss else row_max  # only z-loss needs lse itself
    with _cpu_bf16_products(hidden, weight):
        for i in range(0, n, c):
            j = min(i + c, n)
            _grads_chunk(hidden[i:j], w_mm, local[i:j], in_shard[i:j], row_max[i:j], log_sumexp[i:j],
                         lse[i:j], row_scale[i:j], softcap, z_loss, label_smoothing, vocab_total, dx, dw, i, j)
    return dx, dw


@torch.no_grad()
def torch_fused(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int,
                softcap: Optional[float], z_loss: float, label_smoothing: float,
                need_dx: bool, need_dw: bool, chunk_elems: Optional[int] = None, compiled: bool = False):
    """One pass: softmax statistics and the gradients of the *sum* of per-token losses.
    compiled: on CPU, the pass from logits to dlogits is one torch.compile'd function."""
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty((4, n), dtype=torch.float32, device=hidden.device)
    w_mm = _matmul_weight(hidden, weight)
    c = _chunk_rows(hidden, weight, chunk_elems)
    dx, dw = _grad_buffers(hidden, w_mm, need_dx, need_dw, one_chunk=c >= n)
    local, in_shard = _local_targets(targets, 0, v)
    valid = (targets != ignore_index).float()
    # On CPU (no device sync to avoid) skip scaling the dlogits by a row mask that is all ones.
    row_scale = None if hidden.device.type == "cpu" and bool((targets != ignore_index).all()) else valid
    with _cpu_bf16_products(hidden, weight):
        for i in range(0, n, c):
            j = min(i + c, n)
            for k, x in enumerate(_fused_chunk(hidden[i:j], w_mm, local[i:j], in_shard[i:j],
                                               None if row_scale is None else row_scale[i:j],
                                               softcap, z_loss, label_smoothing, dx, dw, i, j, compiled)):
                if x is not None:
                    out[k, i:j] = x
    return out[0], out[1], out[2], (out[3] if label_smoothing else None), dx, dw


class TorchBackend:
    """Chunked torch implementation of the stats/grads primitives (any device)."""

    name = "torch"

    def __init__(self, chunk_elems: Optional[int] = None):
        self.chunk_elems = chunk_elems

    def stats(self, hidden, weight, targets, *, vocab_start=0, softcap=None, need_sum=False):
        return torch_stats(hidden, weight, targets, vocab_start=vocab_start, softcap=softcap,
                           need_sum=need_sum, chunk_elems=self.chunk_elems)

    def grads(self, hidden, weight, targets, row_max, log_sumexp, row_scale, **kw):
        return torch_grads(hidden, weight, targets, row_max, log_sumexp, row_scale,
                           chunk_elems=self.chunk_elems, **kw)


def get_backend(impl: str, device: torch.device, chunk_elems: Optional[int] = None):
    """Resolve impl ("auto" | "triton" | "torch") to a backend object; imports triton lazily."""
    if impl == "torch":
        return TorchBackend(chunk_elems)
    if impl == "auto":
        # Also on CUDA: chunks through cuBLAS measured 7.8x faster than our all-in-one Triton
        # kernels on an H100 (85.7 vs 670.6 ms, bench/README.md), whose backward re-reads and
        # re-writes fp32 dX/dW tiles for every vocabulary tile.
        return TorchBackend(chunk_elems)
    from . import triton_lce  # impl == "triton": let an ImportError surface

    return triton_lce.TritonBackend()


# ----------------------------------------------------------------------------------------------
# autograd functions
# ----------------------------------------------------------------------------------------------
class _PrecomputedLCE(torch.autograd.Function):
    """torch backend, reduction mean/sum: gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss, label_smoothing,
                softcap, need_dx, need_dw, chunk_elems, compiled):
        row_max, sumexp, tgt_logit, logit_sum, dx, dw = torch_fused(
            hidden, weight, targets, ignore_index=ignore_index, softcap=softcap, z_loss=z_loss,
            label_smoothing=label_smoothing, need_dx=need_dx, need_dw=need_dw,
            chunk_elems=chunk_elems, compiled=compiled)
        loss, z, valid, _ = _finish(row_max, sumexp, tgt_logit, logit_sum, targets,
                                    ignore_index=ignore_index, vocab_total=weight.shape[0],
                                    z_loss=z_loss, label_smoothing=label_smoothing)
        n_valid = valid.sum()
        ctx.reduction = reduction
        ctx.n_valid = n_valid
        ctx.dx, ctx.dw = dx, dw
        ctx.dtypes = (hidden.dtype, weight.dtype)
        z_out = _reduce(z, reduction, n_valid)
        ctx.mark_non_differentiable(z_out)
        return _reduce(loss, reduction, n_valid), z_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        if ctx.dx is None and ctx.dw is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            raise RuntimeError("linear_cross_entropy: backward through the same graph twice is not "
                               "supported (its gradient buffers are scaled in place and freed)")
        scale = grad_loss.float()
        if ctx.reduction == "mean":
            scale = scale / ctx.n_valid.clamp(min=1)
        # In place: the buffers are ours and used once; avoids a second V x H fp32 copy.
        dx = ctx.dx.mul_(scale).to(ctx.dtypes[0]) if ctx.dx is not None else None
        dw = ctx.dw.mul_(scale).to(ctx.dtypes[1]) if ctx.dw is not None else None
        ctx.dx = ctx.dw = None
        return dx, dw, None, None, None, None, None, None, None, None, None, None


class _RecomputeLCE(torch.autograd.Function):
    """Any backend, any reduction: forward keeps only per-token logsumexp, backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, backend, ignore_index, reduction, z_loss,
                label_smoothing, softcap):
        row_max, sumexp, tgt_logit, logit_sum = backend.stats(
            hidden, weight, targets, vocab_start=0, softcap=softcap, need_sum=bool(label_smoothing))
        loss, z, valid, log_se = _finish(row_max, sumexp, tgt_logit, logit_sum, targets,
                                         ignore_index=ignore_index, vocab_total=weight.shape[0],
                                         z_loss=z_loss, label_smoothing=label_smoothing)
        n_valid = valid.sum()
        ctx.save_for_backward(hidden, weight, targets, row_max, log_se, valid, n_valid)
        ctx.backend = backend
        ctx.opts = dict(softcap=softcap, z_loss=z_loss, label_smoothing=label_smoothing)
        ctx.reduction = reduction
        z_out = _reduce(z, reduction, n_valid)
        ctx.mark_non_differentiable(z_out)
        return _reduce(loss, reduction, n_valid), z_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, targets, row_max, log_se, valid, n_valid = ctx.saved_tensors
        row_scale = _row_scale(grad_loss, ctx.reduction, valid, n_valid)
        dx, dw = ctx.backend.grads(hidden, weight, targets, row_max, log_se, row_scale, vocab_start=0,
                                   vocab_total=weight.shape[0], need_dx=ctx.needs_input_grad[0],
                                   need_dw=ctx.needs_input_grad[1], **ctx.opts)
        dx = dx.to(hidden.dtype) if dx is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        return dx, dw, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", z_loss: float = 0.0, label_smoothing: float = 0.0,
                         softcap: Optional[float] = None, return_z_loss: bool = False,
                         impl: str = "auto", compiled: bool = False, _chunk_elems: Optional[int] = None):
    """Cross-entropy of `hidden @ weight.T` against `targets`, never materialising the logits.

    hidden (..., H) fp32/bf16/fp16, weight (V, H) same dtype, targets (...) int64 (int32 accepted).
    Returns an fp32 loss: a scalar for reduction "mean" (over non-ignored tokens; 0 when all are
    ignored) or "sum", targets' shape for "none" (0 at ignored tokens). With return_z_loss, returns
    (loss, z) where z is z_loss * logsumexp^2 reduced the same way -- already included in loss and
    detached (for logging). For gradient accumulation across micro-batches, use reduction="sum" and
    divide by the global token count yourself: nothing here syncs with the host (on CUDA; see
    TARGET_CHECK for the one-off target range check).
    impl: "auto" (the chunked torch path, through cuBLAS on CUDA: faster there than our Triton
    kernels, see get_backend) | "triton" | "torch". "triton" on CPU tensors needs TRITON_INTERPRET=1 set before megacpt.kernels.triton_lce
    is first imported (it is imported lazily, on first use).
    Targets outside [0, V) other than ignore_index raise ValueError (CPU: every call; CUDA: the
    first call, later ones give a NaN loss instead -- see _maybe_check_targets).
    Limitation: the torch path with reduction "mean"/"sum" scales its precomputed gradients in
    place, so a second backward through the same graph (retain_graph=True) raises RuntimeError.
    compiled: on CPU with bf16 operands in one chunk (the bf16-products path), the torch path's
    pass from the logits to their gradient (max, sum of exp, softmax minus one-hot) is one
    torch.compile'd loop instead of ~7 eager passes over the fp32 logits (not with softcap,
    z-loss or label smoothing; elsewhere a no-op; the first call compiles it).
    _chunk_elems (private, tests/benchmarks): overrides CHUNK_ELEMS for the torch path.
    """
    _validate(hidden, weight, targets, reduction, impl, z_loss, label_smoothing, softcap)
    softcap = float(softcap) if softcap is not None else None
    z_loss, label_smoothing = float(z_loss), float(label_smoothing)
    lead_shape = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1)
    _maybe_check_targets(targets1, weight.shape[0], ignore_index)
    backend = get_backend(impl, hidden.device, _chunk_elems)
    need_dx = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad

    if not (need_dx or need_dw):
        with torch.no_grad():
            row_max, sumexp, tgt_logit, logit_sum = backend.stats(
                hidden2, weight, targets1, softcap=softcap, need_sum=bool(label_smoothing))
            loss, z, valid, _ = _finish(row_max, sumexp, tgt_logit, logit_sum, targets1,
                                        ignore_index=ignore_index, vocab_total=weight.shape[0],
                                        z_loss=z_loss, label_smoothing=label_smoothing)
            n_valid = valid.sum()
            loss, z = _reduce(loss, reduction, n_valid), _reduce(z, reduction, n_valid)
    elif backend.name == "torch" and reduction != "none":
        loss, z = _PrecomputedLCE.apply(hidden2, weight, targets1, ignore_index, reduction, z_loss,
                                        label_smoothing, softcap, need_dx, need_dw, _chunk_elems, compiled)
    else:
        loss, z = _RecomputeLCE.apply(hidden2, weight, targets1, backend, ignore_index, reduction,
                                      z_loss, label_smoothing, softcap)
    if reduction == "none":
        loss, z = loss.reshape(lead_shape), z.reshape(lead_shape)
    return (loss, z) if return_z_loss else loss


class LinearCrossEntropy(nn.Module):
    """Loss head: `LinearCrossEntropy(...)(hidden, lm_head.weight, labels)`.

    Holds only the loss options; the weight is passed per call so that a tied embedding or a
    sharded head can be used as is.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                 label_smoothing: float = 0.0, softcap: Optional[float] = None,
                 return_z_loss: bool = False, impl: str = "auto"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.ignore_index, self.reduction, self.z_loss = ignore_index, reduction, z_loss
        self.label_smoothing, self.softcap = label_smoothing, softcap
        self.return_z_loss, self.impl = return_z_loss, impl

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor):
        return linear_cross_entropy(hidden, weight, targets, ignore_index=self.ignore_index,
                                    reduction=self.reduction, z_loss=self.z_loss,
                                    label_smoothing=self.label_smoothing, softcap=self.softcap,
                                    return_z_loss=self.return_z_loss, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, z_loss={self.z_loss}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, impl={self.impl!r}")
