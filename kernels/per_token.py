"""Per-token loss maths and the options of one call, shared by every backend and autograd function.

Per-token loss, with s = softcap * tanh(z / softcap) (or s = z), eps = label_smoothing:
  loss_i = lse_i - (1 - eps) * s_{i,t} - eps / V * sum_j s_{i,j} + z_loss * lse_i^2
which is torch.nn.functional.cross_entropy's label-smoothing definition plus the z-loss term.
dloss_i/ds_ij = p_ij * (1 + 2 z_loss lse_i) - (1 - eps) [j = t_i] - eps / V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LossSpec", "invalid_targets", "finish", "reduce_loss", "row_scale"]


@dataclass(frozen=True)
class LossSpec:
    """What one loss call computes, its options normalised (floats) by the public op."""

    vocab_total: int  # V of the whole vocabulary: label smoothing's 1/V and the target range
    ignore_index: int = -100
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    vocab_start: int = 0  # the vocabulary row of the weight's first row (a vocab-parallel shard)
    need_dx: bool = True
    need_dw: bool = True

    @property
    def need_sum(self) -> bool:
        """Whether the backends must also return the per-token sum of logits (label smoothing)."""
        return bool(self.label_smoothing)


def invalid_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    """Mask of targets that are neither ignore_index nor in [0, vocab_size) (device op, no sync)."""
    return (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))


def finish(stats, targets: Tensor, spec: LossSpec):
    """Per-token (loss, z term, valid mask, log(sumexp)) from a backend's softmax statistics
    (max, sumexp, target logit, logit sum | None), all N-sized ops."""
    row_max, sumexp, tgt_logit, logit_sum = stats
    eps = spec.label_smoothing
    valid = targets != spec.ignore_index
    log_se = sumexp.log()
    lse = row_max + log_se
    # (max - target) + log(sumexp) rather than lse - target: for a confident target max == target
    # and the loss ~1e-4 would otherwise lose digits to the rounding of lse (~1e-6 * |max|).
    loss = (1.0 - eps) * (row_max - tgt_logit) + log_se
    if eps:
        loss = loss + eps * (row_max - logit_sum / spec.vocab_total)
    z = spec.z_loss * lse.square() if spec.z_loss else torch.zeros_like(lse)
    loss = torch.where(valid, loss + z, 0.0)
    z = torch.where(valid, z, 0.0)
    # Out-of-range targets (unchecked on CUDA after the first call) poison the loss instead of
    # silently training on a wrong logit.
    loss = torch.where(invalid_targets(targets, spec.vocab_total, spec.ignore_index), float("nan"), loss)
    return loss, z, valid, log_se


def reduce_loss(per_token: Tensor, reduction: str, n_valid: Tensor) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "mean":
        # clamp keeps an all-ignored batch at 0 instead of 0/0; stays on device.
        total = total / n_valid.clamp(min=1)
    return total


def row_scale(grad_out: Tensor, reduction: str, valid: Tensor, n_valid: Tensor) -> Tensor:
    """Per-token weight of d(loss)/d(per-token loss) for the backward pass (0 for ignored rows)."""
    g = grad_out.float()
    if reduction == "mean":
        g = g / n_valid.clamp(min=1)
    return (g * valid).expand(valid.shape).contiguous()
