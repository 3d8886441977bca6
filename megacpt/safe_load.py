"""Checking torch pickles before anyone unpickles them freely.

DeepSpeed's loaders call torch.load(weights_only=False), which would execute code planted in a
checkpoint directory. Every .pt is first opened with weights_only=True and an explicit allowlist
of the plain-data classes DeepSpeed writes; anything else is refused before DeepSpeed runs.
"""

from __future__ import annotations

import argparse
import collections
import pickle
from pathlib import Path

import torch

from megacpt.errors import UserError


def _allowlist() -> list:
    allowed = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set, frozenset]
    # DeepSpeed's classes only where DeepSpeed is installed: HF .bin files load without it.
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_load(path):
    """torch.load with weights_only=True and DeepSpeed's plain-data classes allowed."""
    with torch.serialization.safe_globals(_allowlist()):
        return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)


def refusal_reason(e: BaseException) -> str:
    """One line naming what a weights_only load refused (torch's own message spans many lines and
    leads with advice to retry unsafely)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln[:200]
    return lines[0][:200] if lines else type(e).__name__


def check_torch_file(path) -> None:
    try:
        safe_load(path)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it contains objects outside the safe allowlist "
                        f"({refusal_reason(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint file {path}: {str(e).splitlines()[0][:200]}") from None
