"""Tests of megacpt.kernels.linear_cross_entropy against an fp64 reference written here.

Triton path on CPU: the Triton interpreter is chosen when a kernel is *decorated* (triton.jit
reads TRITON_INTERPRET at import of the kernel module), so setting the variable inside this
pytest process is fragile -- another test module may already have imported the kernels compiled
for a GPU. These checks therefore run in one fresh `python this_file --interp-worker` subprocess
with TRITON_INTERPRET=1 in its environment; it prints one JSON line per case and the parametrised
tests below assert on those results. Costs one interpreter start (~3 s) plus the cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from megacpt.kernels import LinearCrossEntropy, linear_cross_entropy
from megacpt.kernels import linear_cross_entropy as lce_mod_fn  # noqa: F401  (public name)

IGNORE = -100


# ------------------------------------------------------------------------------------------------
# reference and case generation (shared with the interpreter worker)
# ------------------------------------------------------------------------------------------------
def reference(hidden, weight, targets, *, ignore_index=IGNORE, reduction="mean", z_loss=0.0,
              label_smoothing=0.0, softcap=None):
    """fp64 eager reference: returns (loss, z_term)."""
    logits = hidden.double() @ weight.double().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    tgt = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    eps = label_smoothing
    zterm = z_loss * lse ** 2
    loss = lse - (1 - eps) * tgt - eps * logits.mean(-1) + zterm
    loss = torch.where(valid, loss, 0.0)
    zterm = torch.where(valid, zterm, 0.0)
    if reduction == "none":
        return loss, zterm
    n = valid.sum().clamp(min=1)
    if reduction == "sum":
        return loss.sum(), zterm.sum()
    return loss.sum() / n, zterm.sum() / n


def make_case(n, h, v, *, dtype=torch.float32, seed=0, scale=1.0, ignore_every=0, all_ignored=False,
              confident=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale / h ** 0.5).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if confident:
        # Make the target logit dominate: p(target) >= 0.999 where (p - 1) cancels in low precision.
        weight = torch.randn(v, h, generator=g) * 0.01
        targets = torch.arange(n) % v
        hidden = torch.zeros(n, h)
        hidden[:, :] = weight[targets] / weight[targets].norm(dim=1, keepdim=True) ** 2 * 12.0
        weight, hidden = weight.to(dtype), hidden.to(dtype)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    if all_ignored:
        targets[:] = IGNORE
    return hidden, weight, targets


def run_both(hidden, weight, targets, *, upstream=None, impl="torch", ours_kw=None, **kw):
    """(ours, reference) values and gradients as fp64 tensors."""
    out = {}
    for name in ("ours", "ref"):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        if name == "ours":
            loss, z = linear_cross_entropy(h, w, targets, return_z_loss=True, impl=impl, **kw,
                                               **(ours_kw or {}))
        else:
            loss, z = reference(h, w, targets, **kw)
        g = upstream if upstream is not None else torch.tensor(1.0)
        loss.backward(g.to(loss.dtype))
        out[name] = dict(loss=loss.detach().double(), z=z.detach().double(),
                         dx=h.grad.double(), dw=w.grad.double(), dtype=loss.dtype)
    return out["ours"], out["ref"]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) if b.numel() else 0.0


# Cases exercised by both the torch path and the interpreter worker (tiny: the interpreter costs
# ~20-40 ms per program instance). Ragged shapes: N odd, V and H not multiples of 16.
CASES = {
    "basic_mean": dict(shape=(7, 24, 37), kw=dict()),
    "ragged_ignore_sum": dict(shape=(13, 20, 45), case=dict(ignore_every=3), kw=dict(reduction="sum")),
    "none_upstream": dict(shape=(11, 24, 37), case=dict(ignore_every=4), kw=dict(reduction="none"),
                          upstream=True),
    "all_ignored_mean": dict(shape=(5, 16, 33), case=dict(all_ignored=True), kw=dict()),
    "all_ignored_none": dict(shape=(5, 16, 33), case=dict(all_ignored=True), kw=dict(reduction="none"),
                             upstream=True),
    "confident": dict(shape=(9, 32, 40), case=dict(confident=True), kw=dict(reduction="sum")),
    "large_logits": dict(shape=(7, 24, 37), case=dict(scale=300.0), kw=dict()),
    "z_loss": dict(shape=(9, 24, 37), case=dict(ignore_every=5), kw=dict(z_loss=1e-2)),
    "label_smoothing": dict(shape=(9, 24, 37), case=dict(ignore_every=5), kw=dict(label_smoothing=0.1)),
    "softcap": dict(shape=(9, 24, 37), case=dict(scale=20.0), kw=dict(softcap=5.0)),
    "everything_none": dict(shape=(9, 24, 37), case=dict(ignore_every=4, scale=10.0),
                            kw=dict(reduction="none", z_loss=1e-3, label_smoothing=0.2, softcap=8.0),
                            upstream=True),
    "bf16": dict(shape=(9, 32, 37), case=dict(dtype=torch.bfloat16, ignore_every=4), kw=dict()),
    "fp16_none": dict(shape=(9, 32, 37), case=dict(dtype=torch.float16), kw=dict(reduction="none"),
                      upstream=True),
}


def tolerance(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


def evaluate_case(name, impl, ours_kw=None):
    spec = CASES[name]
    n, h, v = spec["shape"]
    hidden, weight, targets = make_case(n, h, v, **spec.get("case", {}))
    upstream = None
    if spec.get("upstream"):
        upstream = torch.linspace(-2.0, 3.0, n)  # non-uniform, includes negative and ~0 weights
    ours, ref = run_both(hidden, weight, targets, upstream=upstream, impl=impl, ours_kw=ours_kw, **spec["kw"])
    # The reference is evaluated on the same (rounded) low-precision inputs in fp64.
    return dict(case=name, loss_dtype=str(ours["dtype"]), loss=rel_err(ours["loss"], ref["loss"]),
                z=rel_err(ours["z"], ref["z"]), dx=rel_err(ours["dx"], ref["dx"]),
                dw=rel_err(ours["dw"], ref["dw"]), finite=bool(torch.isfinite(ours["loss"]).all()),
                tol=tolerance(hidden.dtype))


def check_result(r):
    assert r["loss_dtype"] == "torch.float32", r
    assert r["finite"], r
    for k in ("loss", "z", "dx", "dw"):
        assert r[k] <= r["tol"], f"{r['case']}: {k} rel err {r[k]:.3g} > {r['tol']}"


# ------------------------------------------------------------------------------------------------
# torch path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_path_matches_reference(name):
    # A small chunk budget forces several chunks (and a ragged last one) even at these sizes.
    check_result(evaluate_case(name, "torch", ours_kw=dict(_chunk_elems=4 * 37)))


def test_reference_matches_torch_cross_entropy():
    # Ties our hand-written reference (label smoothing, ignore_index, mean) to torch's definition.
    hidden, weight, targets = make_case(11, 16, 29, ignore_every=3)
    logits = hidden.double() @ weight.double().t()
    for eps in (0.0, 0.25):
        for red in ("mean", "sum", "none"):
            want = F.cross_entropy(logits, targets, ignore_index=IGNORE, label_smoothing=eps, reduction=red)
            got, _ = reference(hidden, weight, targets, label_smoothing=eps, reduction=red)
            torch.testing.assert_close(got, want)


def test_default_chunking_and_leading_dims():
    hidden, weight, targets = make_case(12, 16, 50, ignore_every=5)
    loss = linear_cross_entropy(hidden.view(3, 4, 16), weight, targets.view(3, 4), reduction="none")
    assert loss.shape == (3, 4) and loss.dtype == torch.float32
    want, _ = reference(hidden, weight, targets, reduction="none")
    torch.testing.assert_close(loss.double().view(-1), want, rtol=1e-5, atol=1e-5)


def test_no_grad_inputs_and_partial_grads():
    hidden, weight, targets = make_case(9, 16, 30)
    want, _ = reference(hidden, weight, targets)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not got.requires_grad
    for reduction in ("mean", "none"):
        h = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(h, weight, targets, reduction=reduction)
        loss.sum().backward()
        hr = hidden.double().clone().requires_grad_()
        reference(hr, weight, targets, reduction=reduction)[0].sum().backward()
        torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-5, atol=1e-6)
        w = weight.clone().requires_grad_()
        linear_cross_entropy(hidden, w, targets, reduction=reduction).sum().backward()
        assert w.grad is not None and w.grad.shape == weight.shape


def test_deterministic():
    hidden, weight, targets = make_case(33, 16, 70, ignore_every=4)
    grads = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, _chunk_elems=8 * 70)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_sum_divided_by_global_count_matches_mean():
    # What the trainer does: per-micro-batch sums over a count it computes itself.
    hidden, weight, targets = make_case(16, 16, 40, ignore_every=3)
    w1 = weight.clone().requires_grad_()
    count = (targets != IGNORE).sum()
    for part in (slice(0, 7), slice(7, 16)):
        (linear_cross_entropy(hidden[part], w1, targets[part], reduction="sum") / count).backward()
    w2 = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w2, targets).backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_second_backward_refused():
    hidden, weight, targets = make_case(5, 16, 30)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(hidden, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_module_head():
    hidden, weight, targets = make_case(6, 16, 30, ignore_every=2)
    head = LinearCrossEntropy(z_loss=1e-3, return_z_loss=True)
    loss, z = head(hidden, weight, targets)
    want, wz = reference(hidden, weight, targets, z_loss=1e-3)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.double(), wz, rtol=1e-5, atol=1e-8)
    assert "reduction='mean'" in repr(head)


@pytest.mark.parametrize("bad,match", [
    (dict(targets=torch.tensor([0, 50, 1])), "outside"),
    (dict(targets=torch.tensor([0, -1, 1])), "outside"),
    (dict(weight=torch.randn(30, 8)), "last dim"),
    (dict(weight=torch.randn(30, 16, dtype=torch.float64)), "share one of"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "int64"),
    (dict(targets=torch.tensor([0, 1])), "targets shape"),
    (dict(reduction="avg"), "reduction"),
    (dict(impl="cuda"), "impl"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(softcap=0.0), "softcap"),
])
def test_bad_input_raises_value_error(bad, match):
    args = dict(hidden=torch.randn(3, 16), weight=torch.randn(30, 16), targets=torch.tensor([0, IGNORE, 29]))
    kw = {k: bad.pop(k) for k in list(bad) if k not in args}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["targets"], **kw)


class _AllocTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor any op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        self.ops.add(str(func))
        return out


@pytest.mark.parametrize("reduction,softcap", [("mean", None), ("none", 4.0), ("sum", None)])
def test_torch_path_never_allocates_n_by_v(reduction, softcap):
    # N x V = 65,536 is larger than the weight (8,192), hidden (2,048) and chunk (8 x 512) tensors,
    # so any N x V logits / probabilities / gradient tensor would be seen.
    n, h, v = 128, 16, 512
    hidden, weight, targets = make_case(n, h, v, ignore_every=7)
    hidden.requires_grad_()
    weight.requires_grad_()
    tracker = _AllocTracker()
    with tracker:
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, softcap=softcap,
                                    z_loss=1e-3, label_smoothing=0.1, impl="torch", _chunk_elems=8 * v)
        loss.backward(torch.ones_like(loss))
    assert any("mm" in op for op in tracker.ops)  # the mode really saw the matmuls
    assert hidden.grad is not None and weight.grad is not None
    assert tracker.largest < n * v, tracker.largest
    assert tracker.largest <= max(8 * v, v * h)


def test_import_does_not_import_triton():
    code = ("import sys, megacpt.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
