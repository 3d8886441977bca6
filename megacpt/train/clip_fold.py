"""Gradient clipping folded into the fused AdamW step under ZeRO-1/2 (issue 23).

DeepSpeed 0.19.8's ZeRO-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py) clips by
multiplying each flat fp32 gradient partition by 1/clip_coef (`unscale_and_clip_grads`) and then
runs the inner optimizer over it: a separate pass reading and writing 4 bytes per parameter per
rank every step. torch's fused AdamW divides the gradients by a device scalar inside its own pass
(the `grad_scale` GradScaler hands it; it then writes the unscaled gradient back), which saves
that pass's read and its kernel:

- DeepSpeed still computes the global norm (`_global_grad_norm`, a device tensor, set before the
  inner optimizer runs) and megacpt still reads it after the step;
- its `clip_grad` is set to 0 (with loss scale 1 its clip then returns before touching anything);
- a step pre-hook on the inner optimizer sets `grad_scale = max(1, (norm + 1e-6) / clip)`,
  DeepSpeed's own formula, computed on the device (no host sync); a non-finite norm or DeepSpeed's
  -1 sentinel gives an infinite scale, as DeepSpeed's clip does (the gradient becomes 0, NaN stays
  NaN, and megacpt's non-finite check rolls the step back).

The result differs from DeepSpeed's by rounding only (g / c against g * (1/c)).

Where DeepSpeed leaves no such pass to save, nothing changes: ZeRO-3 multiplies every sub-group's
gradient by 1/combined_scale even when that is 1, ZeRO-0 clips in its own paths (and the pipeline
engine's fp32 ZeRO-0 in megacpt's pre-step hook), fp16 loss scaling, optimizer offload and any
inner optimizer other than torch's fused Adam/AdamW keep DeepSpeed's clip.
"""

from __future__ import annotations

import torch


def _foldable(opt) -> bool:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    inner = getattr(opt, "optimizer", None)
    return (type(opt) is DeepSpeedZeroOptimizer and float(getattr(opt, "clip_grad", 0.0)) > 0
            and getattr(opt, "compute_grad_norm", False) and not getattr(opt, "cpu_offload", True)
            and not getattr(opt, "zenflow", False) and getattr(opt, "torch_autocast_gradscaler", None) is None
            and getattr(opt, "dynamic_loss_scale", True) is False and float(getattr(opt, "loss_scale", 0)) == 1.0
            and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and inner.defaults.get("fused") is True
            and hasattr(opt, "_global_grad_norm"))


def clip_scale(norm, clip: float, device) -> torch.Tensor:
    """DeepSpeed's clip coefficient as a divisor: max(1, (norm + 1e-6) / clip); inf when the norm
    is non-finite or DeepSpeed's -1 sentinel."""
    n = torch.as_tensor(norm, dtype=torch.float32).to(device, non_blocking=True)
    scale = torch.clamp((n + 1e-6) / clip, min=1.0)
    return torch.where(torch.isfinite(n) & (n >= 0), scale, torch.full_like(n, float("inf")))


def fold_clipping(engine) -> float | None:
    """Move ZeRO-1/2's clipping into the fused AdamW step; returns the clip value when folded."""
    opt = getattr(engine, "optimizer", None)
    if opt is None or not _foldable(opt):
        return None
    clip = float(opt.clip_grad)
    inner = opt.optimizer

    def set_scale(optimizer, args, kwargs):
        device = optimizer.param_groups[0]["params"][0].device
        optimizer.grad_scale = clip_scale(opt._global_grad_norm, clip, device)

    opt.clip_grad = 0.0
    inner.register_step_pre_hook(set_scale)
    return clip
