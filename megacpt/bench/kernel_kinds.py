"""Bins for a profiled training step's kernels (bench/step_anatomy.py; the session JSON of
bench/gpu_session.sh): gemm, attention, loss, optimizer, elementwise, communication, other.

Communication and attention go by the kernel's name. Then loss, for every kernel launched
inside the LM head's loss (megacpt's LCE autograd function, forward or backward, or a
cross-entropy: the head's matmuls included), and optimizer, for every kernel inside DeepSpeed's
step (the range bench/step_anatomy.py opens around it). The rest by name again: gemm,
elementwise, other. Compiled code (Inductor's triton_* kernels) is binned like any kernel and
also summed apart.
"""

from __future__ import annotations

import re

KINDS = ("gemm", "attention", "loss", "optimizer", "elementwise", "communication", "other")
# By kernel name, first match wins (names lowercased). Communication and attention before gemm
# (NCCL and flash kernels are not matmuls to us); loss before elementwise (cross-entropy kernels
# are elementwise-shaped but named for what they do).
_PATTERNS = [
    ("other", r"^megacpt::|^profilerstep|memcpy|memset|record_param_comms"),
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all|c10d|gloo"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|cudnn.*mha"),
    ("loss", r"cross_?entropy|nll_loss|log_?softmax|lce|liger"),
    ("optimizer", r"adam|multi_tensor_apply|_foreach_|lamb|fused_sgd|clip_grad|optimizer"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|triton_tem|matmul|scaled_mm|aten::(mm|addmm|bmm|baddbmm|linear)$"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_(poi|red|per)|reduce|aten::|copy|fill|norm|softmax|"
                    r"silu|mul|add|cat|index|embedding|rope|where|exp"),
]
# By where a kernel was launched (its CPU op and their parents): the LM head's loss (megacpt's
# LCE autograd function, forward and backward, or torch's cross-entropy) and DeepSpeed's step.
_LOSS_SCOPE = re.compile(r"lce|cross_?entropy|nll_loss", re.I)
_OPTIMIZER_SCOPE = re.compile(r"^megacpt::optimizer$")


def kernel_kind(name: str, scopes: tuple[str, ...] = ()) -> str:
    """The bin of a kernel named `name` launched inside the CPU ranges `scopes` (innermost first)."""
    low = name.lower()
    kind = next((k for k, pattern in _PATTERNS if re.search(pattern, low)), "other")
    if kind in ("communication", "attention"):
        return kind
    if any(_LOSS_SCOPE.search(s) for s in scopes):
        return "loss"
    if any(_OPTIMIZER_SCOPE.search(s) for s in scopes):
        return "optimizer"
    return kind


def bin_kernels(recs: list[tuple[str, float, tuple]], device_us: float | None = None) -> dict:
    by_kind = {k: {"ms": 0.0, "count": 0} for k in KINDS}
    per_name: dict[str, list] = {}
    compiled = 0.0
    for name, us, scopes in recs:
        kind = kernel_kind(name, scopes)
        by_kind[kind]["ms"] += us / 1e3
        by_kind[kind]["count"] += 1
        entry = per_name.setdefault(name, [kind, 0.0, 0])
        entry[1] += us / 1e3
        entry[2] += 1
        if name.startswith("triton_"):  # Inductor's generated kernels
            compiled += us / 1e3
    total = sum(v["ms"] for v in by_kind.values())
    for v in by_kind.values():
        v["share"] = v["ms"] / total if total else None
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {"total_ms": total, "device_events_ms": None if device_us is None else device_us / 1e3,
            "by_kind": by_kind, "compiled_ms": compiled,
            "top": [{"name": n[:160], "kind": k, "ms": ms, "calls": c} for n, (k, ms, c) in top]}
