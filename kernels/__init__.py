"""Fused kernels (Triton on CUDA, chunked torch elsewhere), installed as megacpt.kernels.

Importing this package never imports triton: the Triton kernels (triton_lce.py) load on first use,
so `import megacpt.kernels` stays fast and works where triton is absent.

This folder sits at the repository root, so a process with the root on sys.path (`python -c` or
`python -m megacpt.train` run there) finds it as the top-level `kernels` too -- the import name of
Hugging Face's `kernels` package, which transformers imports. Imported under that name, it hands
the name to that package instead (see _hand_over_top_level_name).
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_top_level_name() -> bool:
    """Replace this module in sys.modules["kernels"] by the `kernels` found on sys.path without the
    folder that holds this one; False (this package stays `kernels`, as before) if there is none."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    return True


if __name__ != "kernels" or not _hand_over_top_level_name():
    from .linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
    from .vocab_parallel import vocab_parallel_linear_cross_entropy

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "vocab_parallel_linear_cross_entropy"]
