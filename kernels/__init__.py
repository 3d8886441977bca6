"""Fused kernels (Triton on CUDA, chunked torch elsewhere).

Importing this package never imports triton: the Triton kernels (triton_lce.py) load on first use,
so `import megacpt.kernels` stays fast and works where triton is absent.
"""
from .linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
from .vocab_parallel import vocab_parallel_linear_cross_entropy

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "vocab_parallel_linear_cross_entropy"]
