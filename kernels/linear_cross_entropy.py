"""Fused linear + cross-entropy: loss = CE(hidden @ weight.T, targets) without the N x V logits.

Public entry points: `linear_cross_entropy` (function) and `LinearCrossEntropy` (nn.Module). This
module checks the arguments and picks an implementation; the work is done by a backend:
  * torch (torch_lce.py; any device, what impl="auto" runs everywhere): the logits in chunks of a
    fixed budget, gradients precomputed in forward for reduction mean/sum. Each chunk's logits
    come from a torch GEMM (cuBLAS on CUDA); its pointwise work (softmax statistics, dlogits) is
    either eager torch ops (CPU; impl="torch" everywhere) or one Triton pass (triton_pass.py:
    impl="auto" on CUDA with triton installed, or impl="chunked-triton", also on CPU tensors under
    TRITON_INTERPRET=1), which also makes dW one GEMM over kept bf16 dlogits where they fit in
    the bytes of the fp32 dW buffer.
  * triton (triton_lce.py; CUDA, or CPU tensors under TRITON_INTERPRET=1; only when asked for by
    impl="triton"): always the recompute scheme (forward 2NHV FLOPs, backward 8NHV); its only
    workspace is up to 4 partial fp32 dX buffers (N x H) when the vocabulary is split across
    programs.

Both backends expose the same two primitives, so that `RecomputeLCE` below and the vocab-parallel
variant (vocab_parallel.py) are backend-agnostic:
  stats(hidden, weight, targets, spec) -> (max, sumexp, tgt_logit, logit_sum | None)
      per-token, over this weight's rows only; tgt_logit is 0 where the target is not a row of it.
  grads(hidden, weight, targets, row_max, log_sumexp, row_scale, spec) -> (dX | None, dW | None)
      gradients of sum_i row_scale[i] * loss_i given the (global) softmax statistics: fp32 (the
      Triton pass's one-GEMM dW: the weight's dtype; callers cast to the input dtypes).
The per-token maths and the call's options (`LossSpec`) are in per_token.py.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from .capabilities import CAPS
from .per_token import LossSpec, finish, invalid_targets, reduce_loss, row_scale
from .torch_lce import PrecomputedLCE, TorchBackend

__all__ = ["linear_cross_entropy", "LinearCrossEntropy"]

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("auto", "chunked-triton", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Target range checking (see check_targets): "always" | "first" | "never".
TARGET_CHECK = os.environ.get("MEGACPT_LCE_CHECK_TARGETS", "first")
_checked_once = False


def _check_choices(reduction: str, impl: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def validate(hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str, impl: str,
             z_loss: float, label_smoothing: float, softcap: Optional[float]) -> None:
    """ValueError for arguments the backends cannot take (shapes, dtypes, devices, options)."""
    _check_choices(reduction, impl)
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


def check_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ValueError for out-of-range targets.

    The check needs the answer on the host. On CPU that is free, so it always runs. On CUDA it is
    a device->host sync that stalls the launch queue every step, so by default ("first") only the
    first call in the process pays it -- which catches the usual mistake (a tokenizer/model vocab
    mismatch) at step 1. Afterwards bad targets are still visible without a sync: their per-token
    loss is NaN (see per_token.finish). MEGACPT_LCE_CHECK_TARGETS=always|never changes the policy.
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


def get_backend(impl: str, chunk_elems: Optional[int] = None):
    """Resolve impl ("auto" | "chunked-triton" | "triton" | "torch") to a backend object; imports
    triton lazily."""
    if impl in ("torch", "auto"):
        # "auto" is the chunked path on CUDA too: chunks through cuBLAS measured 7.8x faster than
        # our all-in-one Triton kernels on an H100 (85.7 vs 670.6 ms, bench/README.md), whose
        # backward re-reads and re-writes fp32 dX/dW tiles for every vocabulary tile. On CUDA with
        # triton installed its pointwise work per chunk is one Triton pass (torch_lce.TorchBackend).
        return TorchBackend(chunk_elems, fused_pass=False if impl == "torch" else None)
    if not CAPS.triton:
        raise ImportError(f"impl={impl!r} needs the triton package (pip install triton)")
    if impl == "chunked-triton":
        return TorchBackend(chunk_elems, fused_pass=True)
    # Lazy: importing triton costs seconds, and only impl="triton" needs it.
    from . import triton_lce

    return triton_lce.TritonBackend()


def forward_no_grad(backend, hidden: Tensor, weight: Tensor, targets: Tensor, spec: LossSpec,
                    reduction: str):
    """(loss, z) of an evaluation call: the statistics only, no gradient work."""
    with torch.no_grad():
        loss, z, valid, _ = finish(backend.stats(hidden, weight, targets, spec), targets, spec)
        n_valid = valid.sum()
        return reduce_loss(loss, reduction, n_valid), reduce_loss(z, reduction, n_valid)


class RecomputeLCE(torch.autograd.Function):
    """Any backend, any reduction: forward keeps only per-token logsumexp, backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, backend, spec: LossSpec, reduction: str):
        stats = backend.stats(hidden, weight, targets, spec)
        loss, z, valid, log_se = finish(stats, targets, spec)
        n_valid = valid.sum()
        ctx.save_for_backward(hidden, weight, targets, stats[0], log_se, valid, n_valid)
        ctx.backend, ctx.spec, ctx.reduction = backend, spec, reduction
        z_out = reduce_loss(z, reduction, n_valid)
        ctx.mark_non_differentiable(z_out)
        return reduce_loss(loss, reduction, n_valid), z_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, targets, row_max, log_se, valid, n_valid = ctx.saved_tensors
        scale = row_scale(grad_loss, ctx.reduction, valid, n_valid)
        dx, dw = ctx.backend.grads(hidden, weight, targets, row_max, log_se, scale, ctx.spec)
        dx = dx.to(hidden.dtype) if dx is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        return dx, dw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", z_loss: float = 0.0, label_smoothing: float = 0.0,
                         softcap: Optional[float] = None, return_z_loss: bool = False,
                         impl: str = "auto", _chunk_elems: Optional[int] = None):
    """Cross-entropy of `hidden @ weight.T` against `targets`, never materialising the logits.

    hidden (..., H) fp32/bf16/fp16, weight (V, H) same dtype, targets (...) int64 (int32 accepted).
    Returns an fp32 loss: a scalar for reduction "mean" (over non-ignored tokens; 0 when all are
    ignored) or "sum", targets' shape for "none" (0 at ignored tokens). With return_z_loss, returns
    (loss, z) where z is z_loss * logsumexp^2 reduced the same way -- already included in loss and
    detached (for logging). For gradient accumulation across micro-batches, use reduction="sum" and
    divide by the global token count yourself: nothing here syncs with the host (on CUDA; see
    TARGET_CHECK for the one-off target range check).
    impl: "auto" (the chunked torch path, through cuBLAS on CUDA: faster there than our Triton
    kernels, see get_backend; on CUDA with triton installed each chunk's pointwise work is one
    Triton pass) | "chunked-triton" (that path with the Triton pass wherever asked) | "triton" |
    "torch" (the chunked path with eager pointwise ops only). "triton" and "chunked-triton" on CPU
    tensors need TRITON_INTERPRET=1 set before megacpt.kernels is imported (the Triton modules
    themselves are imported on first use).
    Targets outside [0, V) other than ignore_index raise ValueError (CPU: every call; CUDA: the
    first call, later ones give a NaN loss instead -- see check_targets).
    Limitation: the torch path with reduction "mean"/"sum" scales its precomputed gradients in
    place, so a second backward through the same graph (retain_graph=True) raises RuntimeError.
    _chunk_elems (private, tests/benchmarks): overrides torch_lce.CHUNK_ELEMS for the torch path.
    """
    validate(hidden, weight, targets, reduction, impl, z_loss, label_smoothing, softcap)
    lead_shape = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1)
    check_targets(targets1, weight.shape[0], ignore_index)
    backend = get_backend(impl, _chunk_elems)
    spec = LossSpec(vocab_total=weight.shape[0], ignore_index=ignore_index, z_loss=float(z_loss),
                    label_smoothing=float(label_smoothing),
                    softcap=float(softcap) if softcap is not None else None,
                    need_dx=torch.is_grad_enabled() and hidden.requires_grad,
                    need_dw=torch.is_grad_enabled() and weight.requires_grad)
    if not (spec.need_dx or spec.need_dw):
        loss, z = forward_no_grad(backend, hidden2, weight, targets1, spec, reduction)
    elif backend.name == "torch" and reduction != "none":
        loss, z = PrecomputedLCE.apply(hidden2, weight, targets1, spec, reduction, backend)
    else:
        loss, z = RecomputeLCE.apply(hidden2, weight, targets1, backend, spec, reduction)
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
        _check_choices(reduction, impl)
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
