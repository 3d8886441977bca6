"""Learning-rate schedules for continued pre-training, as pure functions of the step.

Being pure functions (no scheduler state), they resume exactly and need no checkpointing.
- cosine / linear: linear warm-up (re-warming from ~0) to `lr`, then decay to `min_lr` at the end.
- wsd: warm-up, constant (stable) at `lr`, then decay over the last `decay_fraction` of steps,
  shaped linear or 1-sqrt (MiniCPM; Hägele et al. 2024 find 1-sqrt best).
- constant: warm-up then `lr`.
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, *, kind: str, lr: float, min_lr: float, warmup_steps: int,
          decay_fraction: float = 0.1, decay_shape: str = "1-sqrt") -> float:
    """LR for optimizer step `step` (0-based) of a schedule `total_steps` long."""
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1): the first step already trains with a non-zero LR.
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    if kind in ("cosine", "linear"):
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return min_lr + (lr - min_lr) * factor
    if kind == "wsd":
        decay_steps = max(int(round(decay_fraction * total_steps)), 1)
        decay_start = max(total_steps - decay_steps, warmup_steps)
        if step < decay_start:
            return lr
        progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
        factor = 1.0 - progress if decay_shape == "linear" else 1.0 - math.sqrt(progress)
        return min_lr + (lr - min_lr) * factor
    raise ValueError(f"unknown schedule kind {kind!r}")
