"""What this process can run, decided once when megacpt.kernels is imported.

One frozen object rather than flags probed and cached by the code that uses them: every path
reads the same answers, and they never change during the run.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

__all__ = ["Capabilities", "CAPS", "detect"]


@dataclass(frozen=True)
class Capabilities:
    # The triton package can be imported (looked up, not imported: that costs seconds and most
    # runs never use impl="triton").
    triton: bool
    # TRITON_INTERPRET=1: triton.jit decorates the kernels for its CPU interpreter, so impl="triton"
    # takes CPU tensors. triton_lce.py refuses to load if the variable changed since.
    triton_interpret: bool
    # torch.mm(a, b, out_dtype=torch.float32) exists: fp32 logits straight from bf16/fp16
    # operands. Its only kernel is CUDA's, so it is used for CUDA tensors only.
    mm_out_dtype: bool


def detect() -> Capabilities:
    return Capabilities(
        triton=importlib.util.find_spec("triton") is not None,
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        mm_out_dtype="dtype" in torch.ops.aten.mm.overloads(),
    )


CAPS = detect()
