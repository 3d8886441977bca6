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
        hidden[:, :] = weight[targets] / weight[targets].norm(dim=1, keepdim=True) ** 2 * 16.0
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
        g = upstream if upstream is not None else torch.tensor(1.0, device=hidden.device)
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
    # Loss and p - 1 ~1e-4 per token: fp32 rounding of the logits (~1e-6) and of p (~6e-8) bound
    # the relative accuracy to ~2e-4 (in bf16, p - 1 would be 0: rel err 1).
    "confident": dict(shape=(9, 32, 40), case=dict(confident=True), kw=dict(reduction="sum"),
                      tol=1e-3),
    "large_logits": dict(shape=(7, 24, 37), case=dict(scale=300.0), kw=dict()),
    "z_loss": dict(shape=(9, 24, 37), case=dict(ignore_every=5), kw=dict(z_loss=1e-2)),
    "label_smoothing": dict(shape=(9, 24, 37), case=dict(ignore_every=5), kw=dict(label_smoothing=0.1)),
    "softcap": dict(shape=(9, 24, 37), case=dict(scale=20.0), kw=dict(softcap=5.0)),
    "everything_none": dict(shape=(9, 24, 37), case=dict(ignore_every=4, scale=10.0),
                            kw=dict(reduction="none", z_loss=1e-3, label_smoothing=0.2, softcap=8.0),
                            upstream=True),
    "bf16": dict(shape=(9, 32, 37), case=dict(dtype=torch.bfloat16, ignore_every=4), kw=dict()),
    # bf16 inputs, p(target) >= 0.999: p - 1 and the loss must survive (bf16 logits or a bf16
    # p - 1 would give relative errors of ~1); the floor is bf16 rounding of the gradients.
    "confident_bf16": dict(shape=(9, 32, 40), case=dict(confident=True, dtype=torch.bfloat16),
                           kw=dict(reduction="sum"), tol=1e-2),
    "tiny_vocab": dict(shape=(5, 16, 11), case=dict(ignore_every=3), kw=dict(label_smoothing=0.1)),
    "fp16_none": dict(shape=(9, 32, 37), case=dict(dtype=torch.float16), kw=dict(reduction="none"),
                      upstream=True),
}


# The Triton pass (impl="chunked-triton") runs every case in CASES, where the kept dlogits fit in
# the fp32 dW buffer's bytes (N <= H in fp32, N <= 2H in bf16/fp16): dW is one GEMM over them.
# These cases have more rows than that: dW is summed chunk by chunk (fp32 and bf16, each reduction,
# ignored rows, confident targets -- p(target) >= 0.999 at this shape too -- softcap).
PASS_FALLBACK_CASES = {
    "fallback_fp32_sum": dict(shape=(40, 8, 37), case=dict(ignore_every=3), kw=dict(reduction="sum")),
    "fallback_bf16_mean": dict(shape=(40, 8, 37), case=dict(dtype=torch.bfloat16, ignore_every=4), kw=dict()),
    "fallback_bf16_none": dict(shape=(40, 8, 37), case=dict(dtype=torch.bfloat16, ignore_every=4, scale=10.0),
                               kw=dict(reduction="none", z_loss=1e-3, label_smoothing=0.2, softcap=8.0),
                               upstream=True),
    # 5 chunks of 15 rows: each chunk's bf16 dW product is rounded before the fp32 sum (as the eager
    # CUDA path does), so dW's error grows with the chunk count.
    "fallback_confident": dict(shape=(72, 32, 40), case=dict(confident=True), kw=dict(reduction="sum"),
                               tol=1e-3, chunk_elems=16 * 40),
    "fallback_confident_bf16": dict(shape=(72, 32, 40), case=dict(confident=True, dtype=torch.bfloat16),
                                    kw=dict(reduction="mean"), tol=1e-2, chunk_elems=16 * 40),
}
PASS_CASES = dict(CASES, **PASS_FALLBACK_CASES)
PASS_CHUNK_ELEMS = 4 * 37  # several chunks, a ragged last one (unless a case says otherwise)


def tolerance(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


def evaluate_case(name, impl, ours_kw=None, device="cpu", cases=CASES):
    spec = cases[name]
    n, h, v = spec["shape"]
    hidden, weight, targets = (t.to(device) for t in make_case(n, h, v, **spec.get("case", {})))
    upstream = None
    if spec.get("upstream"):
        upstream = torch.linspace(-2.0, 3.0, n, device=device)  # non-uniform, negative and ~0 too
    ours, ref = run_both(hidden, weight, targets, upstream=upstream, impl=impl, ours_kw=ours_kw, **spec["kw"])
    # The reference is evaluated on the same (rounded) low-precision inputs in fp64.
    return dict(case=name, loss_dtype=str(ours["dtype"]), loss=rel_err(ours["loss"], ref["loss"]),
                z=rel_err(ours["z"], ref["z"]), dx=rel_err(ours["dx"], ref["dx"]),
                dw=rel_err(ours["dw"], ref["dw"]), finite=bool(torch.isfinite(ours["loss"]).all()),
                tol=spec.get("tol", tolerance(hidden.dtype)))


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


@pytest.mark.parametrize("n", [9, 72])
def test_confident_case_is_confident(n):
    hidden, weight, targets = make_case(n, 32, 40, confident=True)
    p = torch.softmax(hidden.double() @ weight.double().t(), -1).gather(1, targets[:, None])
    assert p.min() >= 0.999


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


@pytest.mark.parametrize("chunks,reduction,ignore_every", [(4, "sum", 5), (1, "sum", 0), (1, "sum", 5),
                                                           (1, "none", 5), (3, "none", 0)])
def test_cpu_bf16_inputs_keep_fp32_logits(chunks, reduction, ignore_every):
    """bf16 inputs on CPU: the logits are accumulated in fp32 from exact bf16 operands (an fp32
    copy of the weight), so the loss is as accurate as with fp32 inputs (rounded bf16 logits
    would be ~1e-3 off); gradients carry bf16 rounding. One chunk and several, the precomputed
    ("sum") and recomputed ("none") gradients, all-valid and ignored rows."""
    n, v = 64, 3001
    hidden, weight, targets = make_case(n, 96, v, dtype=torch.bfloat16, scale=4.0, ignore_every=ignore_every)
    upstream = torch.rand(n) if reduction == "none" else None
    ours, ref = run_both(hidden, weight, targets, reduction=reduction, upstream=upstream,
                         ours_kw=dict(_chunk_elems=(n // chunks) * v))
    assert rel_err(ours["loss"], ref["loss"]) < 1e-5
    for k in ("dx", "dw"):
        assert rel_err(ours[k], ref[k]) < 1e-2, k


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

    def __init__(self, ignore=()):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0
        self.ops = set()
        self.ignore = ignore  # op name prefixes whose outputs are not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(self.ignore):
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
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


def test_live_storage_tracker_counts_and_frees():
    from megacpt.bench.loss import LiveStorageTracker

    base = torch.zeros(1000)
    with LiveStorageTracker(preexisting=(base,)) as tracker:
        a = base + 1  # 4,000 bytes
        b = a.view(10, 100)  # a view: no new storage
        del a, b
        c = torch.ones(500) * 2  # 2,000 + 2,000 bytes (ones, then the product)
        del c
        d = base[:10].clone()  # 40 bytes; base itself (preexisting) is never counted
    assert tracker.peak == 4000
    assert tracker.current == 40
    del d


def test_loss_bench_smoke(tmp_path, capsys):
    import argparse

    from megacpt.bench.loss import run_loss_bench
    from megacpt.cli.bench import add_loss_args

    parser = argparse.ArgumentParser()
    add_loss_args(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--shape", "64,16,512", "--repeats", "2", "--warmup", "0",
                              "--ignore-fraction", "0.25", "--json", str(out)])
    assert run_loss_bench(args) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["versions"]["torch"] == torch.__version__
    rows = {r["impl"]: r for r in report["results"]}
    assert {"ours", "eager"} <= set(rows)
    for r in rows.values():
        assert "error" not in r, r
        assert len(r["times_s"]) == 2 and r["time_s"] > 0  # interleaved rounds, one time each
    # all implementations compute the same loss; ours never holds the 64 x 512 fp32 logits twice
    assert abs(rows["ours"]["loss"] - rows["eager"]["loss"]) < 1e-4
    assert rows["ours"]["peak_extra_bytes"] < rows["eager"]["peak_extra_bytes"]
    assert "peak extra MB" in capsys.readouterr().out


def test_import_does_not_import_triton():
    # Nor does a CPU call with impl="auto": the Triton pass is CUDA's (the CPU path is unchanged).
    code = ("import sys, torch, megacpt.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
            "h = torch.randn(6, 8, requires_grad=True); w = torch.randn(20, 8, requires_grad=True); "
            "megacpt.kernels.linear_cross_entropy(h, w, torch.arange(6)).backward(); "
            "assert 'triton' not in sys.modules, 'triton imported by a CPU call'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------------------
# Triton path under the interpreter (runs in a subprocess, see the module docstring)
# ------------------------------------------------------------------------------------------------
def _expect_value_error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- reported to the parent as a failure
        return f"WRONG EXCEPTION {type(e).__name__}: {e}"
    return "NO EXCEPTION"


def _interp_extra_checks():
    """Triton-only checks; each returns (name, dict) for the parent to assert on."""
    from megacpt.kernels import triton_lce
    from megacpt.kernels.per_token import LossSpec
    from megacpt.kernels.torch_lce import torch_grads, torch_stats

    out = {"interpreting": dict(value=triton_lce.interpreting())}

    # Shard offsets (what the vocab-parallel variant uses): a 20-row shard starting at row 10 of
    # a 40-word vocabulary, targets on and off the shard, against the torch backend.
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(13, 24, generator=g), torch.randn(20, 24, generator=g)
    targets = torch.randint(0, 40, (13,), generator=g)
    errs = {}
    for cap in (None, 4.0):
        spec = LossSpec(vocab_total=40, vocab_start=10, softcap=cap, z_loss=1e-2, label_smoothing=0.1)
        a = triton_lce.lce_stats(hidden, weight, targets, spec)
        b = torch_stats(hidden, weight, targets, spec)
        errs[f"stats_{cap}"] = max(rel_err(x.double(), y.double()) for x, y in zip(a, b))
        row_max, log_se = b[0], b[1].log() + 0.5  # any consistent statistics will do
        scale = torch.linspace(-1, 1, 13)
        a = triton_lce.lce_grads(hidden, weight, targets, row_max, log_se, scale, spec)
        b = torch_grads(hidden, weight, targets, row_max, log_se, scale, spec)
        errs[f"grads_{cap}"] = max(rel_err(x.double(), y.double()) for x, y in zip(a, b))
    out["vocab_start"] = errs

    # Bad input -> ValueError before any launch.
    h, w, t = make_case(5, 16, 30)
    spec = LossSpec(vocab_total=30)
    out["bad_input"] = {
        "non_contiguous_hidden": _expect_value_error(
            lambda: linear_cross_entropy(torch.randn(16, 5).t(), w, t, impl="triton")),
        "non_contiguous_weight": _expect_value_error(
            lambda: linear_cross_entropy(h, torch.randn(16, 30).t(), t, impl="triton")),
        "mismatched_h": _expect_value_error(lambda: triton_lce.lce_stats(h, torch.randn(30, 8), t, spec)),
        "wrong_dtype": _expect_value_error(
            lambda: triton_lce.lce_stats(h.double(), w.double(), t, spec)),
        "mixed_dtype": _expect_value_error(lambda: triton_lce.lce_stats(h, w.half(), t, spec)),
        "target_range": _expect_value_error(
            lambda: linear_cross_entropy(h, w, torch.tensor([0, 1, 30, 2, 3]), impl="triton")),
    }

    # Determinism, int32 targets, leading dims, module head.
    h, w, t = make_case(21, 24, 45, ignore_every=4)
    runs = []
    for tt in (t, t, t.int()):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh.view(3, 7, 24), ww, tt.view(3, 7), impl="triton", reduction="none")
        loss.backward(torch.linspace(0, 1, 21).view(3, 7))
        runs.append((loss.detach(), hh.grad, ww.grad))
    out["deterministic"] = dict(value=all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])))
    out["int32_targets"] = dict(value=all(torch.equal(a, b) for a, b in zip(runs[0], runs[2])))
    out["leading_dims"] = dict(value=list(runs[0][0].shape))
    head = LinearCrossEntropy(impl="triton", label_smoothing=0.1)
    want, _ = reference(h, w, t, label_smoothing=0.1)
    out["module"] = dict(err=rel_err(head(h, w, t).double(), want))
    with torch.no_grad():  # evaluation: the forward kernel only
        got = linear_cross_entropy(h, w, t, impl="triton")
    out["no_grad"] = dict(err=rel_err(got.double(), reference(h, w, t)[0]))
    return out


def _pass_allocations(n, h, v, reduction, softcap):
    """The Triton pass (bf16) under _AllocTracker: largest tensor (elements, bytes) and the eager
    pointwise ops of the torch chunk loop that it still saw (there should be none)."""
    hidden, weight, targets = make_case(n, h, v, dtype=torch.bfloat16, ignore_every=7)
    hidden.requires_grad_()
    weight.requires_grad_()
    # The interpreter hands each pointer's whole storage to the kernel as a uint8 tensor (set_) and
    # copies it back (copy_): neither op allocates, and a GPU launch does neither.
    tracker = _AllocTracker(ignore=("aten.set_.", "aten.copy_."))
    with tracker:
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, softcap=softcap,
                                    z_loss=1e-3, label_smoothing=0.1, impl="chunked-triton",
                                    _chunk_elems=8 * v)
        loss.backward(torch.ones_like(loss))
    eager = sorted(op for op in tracker.ops
                   if op.split(".")[1].rstrip("_") in ("amax", "exp", "scatter_add", "tanh"))
    return dict(n=n, h=h, v=v, largest=tracker.largest, largest_bytes=tracker.largest_bytes,
                saw_mm=any("mm" in op for op in tracker.ops), eager_ops=eager,
                grads=hidden.grad is not None and weight.grad is not None)


def _interp_pass_checks():
    """The Triton pass (impl="chunked-triton"): allocations, and a bad device refused up front."""
    from megacpt.kernels import triton_pass
    from megacpt.kernels.torch_lce import TorchBackend

    out = {"pass_interpreting": dict(value=type(triton_pass.KERNELS["softmax_pass"]).__name__)}
    # N V 2 bytes == V H 4: the dlogits are kept (one N x V bf16 tensor) and dW is one GEMM.
    out["pass_alloc_kept_mean"] = _pass_allocations(32, 16, 128, "mean", None)
    out["pass_alloc_kept_none"] = _pass_allocations(32, 16, 128, "none", 4.0)
    # Twice the rows: they would not fit, dW is summed per chunk and nothing is N x V.
    out["pass_alloc_fallback_sum"] = _pass_allocations(64, 16, 128, "sum", None)
    out["pass_auto_on_cpu"] = dict(value=TorchBackend().uses_fused_pass(torch.zeros(1)))
    out["pass_vocab_shard"] = _pass_on_a_shard()
    out["pass_partial_grads"] = _pass_partial_grads()
    return out


def _pass_partial_grads():
    """Only dX (a frozen head) or only dW asked for, bf16, dW kept (N=9) or summed (N=40); and no
    rows at all."""
    errs = {}
    for n in (9, 40):
        hidden, weight, targets = make_case(n, 16, 30, dtype=torch.bfloat16, ignore_every=4)
        for which in ("dx", "dw"):
            h, w = hidden.clone().requires_grad_(which == "dx"), weight.clone().requires_grad_(which == "dw")
            linear_cross_entropy(h, w, targets, impl="chunked-triton", _chunk_elems=4 * 30).backward()
            hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
            reference(hr, wr, targets)[0].backward()
            got, want = (h.grad, hr.grad) if which == "dx" else (w.grad, wr.grad)
            errs[f"{which}_n{n}"] = rel_err(got.double(), want)
    h = torch.zeros(0, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 16).to(torch.bfloat16).requires_grad_()
    linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), impl="chunked-triton").backward()
    errs["no_rows_nonzero_dw"] = float(torch.count_nonzero(w.grad))
    return errs


def _pass_on_a_shard():
    """The pass's statistics and given-statistics gradients on a vocabulary shard (rows 10..29 of
    40; targets on and off it) against the eager chunk loop: dW as one GEMM (H=24 >= N=13) and
    summed per chunk (H=8)."""
    from megacpt.kernels.per_token import LossSpec
    from megacpt.kernels.torch_lce import TorchBackend, torch_grads, torch_stats

    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 40, (13,), generator=g)
    scale = torch.linspace(-1, 1, 13)
    errs = {}
    for h in (24, 8):
        hidden, weight = torch.randn(13, h, generator=g), torch.randn(20, h, generator=g)
        for cap in (None, 4.0):
            spec = LossSpec(vocab_total=40, vocab_start=10, softcap=cap, z_loss=1e-2, label_smoothing=0.1)
            ours, eager = TorchBackend(4 * 20, fused_pass=True), TorchBackend(fused_pass=False)
            a = torch_stats(hidden, weight, targets, spec, ours)
            b = torch_stats(hidden, weight, targets, spec, eager)
            errs[f"stats_h{h}_{cap}"] = max(rel_err(x.double(), y.double()) for x, y in zip(a, b))
            row_max, log_se = b[0], b[1].log() + 0.5  # any consistent statistics will do
            a = torch_grads(hidden, weight, targets, row_max, log_se, scale, spec, ours)
            b = torch_grads(hidden, weight, targets, row_max, log_se, scale, spec, eager)
            errs[f"grads_h{h}_{cap}"] = max(rel_err(x.double(), y.double()) for x, y in zip(a, b))
    return errs


def _interp_worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    for prefix, impl, cases in (("", "triton", CASES), ("pass:", "chunked-triton", PASS_CASES)):
        for name in sorted(cases):
            t0 = time.time()
            ours_kw = None
            if impl == "chunked-triton":
                ours_kw = dict(_chunk_elems=cases[name].get("chunk_elems", PASS_CHUNK_ELEMS))
            try:
                r = evaluate_case(name, impl, ours_kw=ours_kw, cases=cases)
            except Exception as e:  # noqa: BLE001
                r = dict(case=name, error=f"{type(e).__name__}: {e}")
            r["case"] = prefix + name
            r["seconds"] = round(time.time() - t0, 2)
            print("RESULT " + json.dumps(r), flush=True)
    try:
        extra = _interp_extra_checks()
        extra.update(_interp_pass_checks())
    except Exception as e:  # noqa: BLE001
        import traceback

        extra = {"error": dict(error=traceback.format_exc())}
    for k, v in extra.items():
        print("EXTRA " + json.dumps(dict(check=k, **v)), flush=True)


@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interp-worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    cases, extra = {}, {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            cases[r["case"]] = r
        elif line.startswith("EXTRA "):
            r = json.loads(line[6:])
            extra[r.pop("check")] = r
    if proc.returncode != 0 or not cases:
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(cases=cases, extra=extra, seconds=time.time() - t0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_interpreter_matches_reference(interp_results, name):
    r = interp_results["cases"][name]
    assert "error" not in r, r["error"]
    check_result(r)


@pytest.mark.parametrize("name", sorted(PASS_CASES))
def test_chunked_triton_pass_matches_reference(interp_results, name):
    """impl="chunked-triton": cuBLAS-style GEMMs (torch) + one Triton pass per logits chunk."""
    r = interp_results["cases"]["pass:" + name]
    assert "error" not in r, r["error"]
    check_result(r)


def test_chunked_triton_pass_on_a_vocabulary_shard(interp_results):
    extra = interp_results["extra"]
    assert "error" not in extra, extra.get("error")
    assert len(extra["pass_vocab_shard"]) == 8
    for k, err in extra["pass_vocab_shard"].items():
        assert err < 1e-5, (k, err)


def test_chunked_triton_pass_partial_grads(interp_results):
    extra = interp_results["extra"]
    assert "error" not in extra, extra.get("error")
    errs = extra["pass_partial_grads"]
    assert len(errs) == 5 and errs.pop("no_rows_nonzero_dw") == 0
    for k, err in errs.items():
        assert err < tolerance(torch.bfloat16), (k, err)


def test_chunked_triton_pass_allocations(interp_results):
    """The N x V tensor of the Triton pass is deliberate and bounded: with N V 2 <= V H 4 bytes
    (bf16) the dlogits of all rows are kept -- exactly one N x V bf16 tensor (and its transposed
    view), no bigger than the fp32 dW buffer it replaces -- for dW as one GEMM. With more rows it
    falls back to per-chunk sums and, like the eager torch path, allocates nothing N x V. In
    both, the chunk loop's eager pointwise ops (amax, exp, scatter, tanh) are gone."""
    extra = interp_results["extra"]
    assert "error" not in extra, extra.get("error")
    assert extra["pass_interpreting"]["value"] == "InterpretedFunction"
    assert extra["pass_auto_on_cpu"]["value"] is False  # impl="auto" on CPU: the eager path, unchanged
    for key in ("pass_alloc_kept_mean", "pass_alloc_kept_none", "pass_alloc_fallback_sum"):
        r = extra[key]
        n, h, v = r["n"], r["h"], r["v"]
        assert r["saw_mm"] and r["grads"], r
        assert r["eager_ops"] == [], r
        if "kept" in key:
            assert r["largest"] == n * v, r
            assert r["largest_bytes"] == n * v * 2 <= v * h * 4, r
        else:
            assert n * v * 2 > v * h * 4
            assert r["largest"] < n * v, r
            assert r["largest"] <= max(8 * v, v * h), r


def test_triton_interpreter_extra_checks(interp_results):
    extra = interp_results["extra"]
    assert "error" not in extra, extra.get("error")
    assert extra["interpreting"]["value"] is True
    for k, err in extra["vocab_start"].items():
        assert err < 1e-5, (k, err)
    for k, msg in extra["bad_input"].items():
        assert not msg.startswith(("NO EXCEPTION", "WRONG EXCEPTION")), (k, msg)
    assert "contiguous" in extra["bad_input"]["non_contiguous_hidden"]
    assert "contiguous" in extra["bad_input"]["non_contiguous_weight"]
    assert "outside" in extra["bad_input"]["target_range"]
    assert extra["deterministic"]["value"] is True
    assert extra["int32_targets"]["value"] is True
    assert extra["leading_dims"]["value"] == [3, 7]
    assert extra["module"]["err"] < 2e-5
    assert extra["no_grad"]["err"] < 2e-5


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation for Hopper (no GPU needed) -- also in a subprocess, without
# TRITON_INTERPRET, so that the kernels are decorated for compilation whatever this process did.
# ------------------------------------------------------------------------------------------------
_SCALAR_ARGS = {"softcap": "fp32", "z_coef2": "fp32", "tgt_coef": "fp32", "smooth": "fp32"}


def _cubin_stack_bytes(cubin: bytes):
    """Per-thread stack (register spills) of a cubin via the cuobjdump bundled with triton."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else None


def _aot_pass_worker():
    """The Triton pass's kernel for sm_90: bf16 and fp32 dlogits, computed and given statistics."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megacpt.kernels import triton_pass

    fn = triton_pass.KERNELS["softmax_pass"]
    blocks = {k: v for k, v in triton_pass.GPU_BLOCKS.items() if k.startswith("BLOCK")}
    for dz_dtype, given in (("bf16", False), ("fp32", False), ("bf16", True)):
        # Pointers and row strides divisible by 16, as the launch specialises them for V = 128,256.
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg.endswith("_ptr") or arg in ("V", "stride_z", "stride_dz", "stride_stats"):
                attrs[(i,)] = [["tt.divisibility", 16]]
            if fn.params[i].is_constexpr:
                signature[arg] = "constexpr"
            elif arg == "tgt_ptr":
                signature[arg] = "*i64"
            elif arg.endswith("_ptr"):
                signature[arg] = f"*{dz_dtype}" if arg == "dz_ptr" else "*fp32"
            else:
                signature[arg] = _SCALAR_ARGS.get(arg, "i32")
        constexprs = dict(blocks, GIVEN_STATS=given, WRITE_DZ=True, HAS_SCALE=True, HAS_SOFTCAP=True,
                          NEED_SUM=not given)
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=triton_pass.GPU_BLOCKS["num_warps"]))
        muls = [ln for ln in compiled.asm["ttir"].splitlines() if "arith.muli" in ln]
        print("AOTPASS " + json.dumps(dict(
            dz=dz_dtype, given=given, cubin_bytes=len(compiled.asm["cubin"]),
            v4_loads=compiled.asm["ptx"].count("ld.global.v4"),
            stack=_cubin_stack_bytes(compiled.asm["cubin"]),
            muls_i64=sum(("i64" in ln and "i32" not in ln) for ln in muls))), flush=True)


def _aot_worker():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megacpt.kernels import triton_lce

    assert not triton_lce.interpreting()
    for dtype, precision in (("bf16", "ieee"), ("fp32", "tf32")):
        for name, fn in triton_lce.KERNELS.items():
            signature, constexprs = {}, {}
            for i, arg in enumerate(fn.arg_names):
                if fn.params[i].is_constexpr:
                    signature[arg] = "constexpr"
                elif arg in ("h_ptr", "w_ptr"):
                    signature[arg] = f"*{dtype}"
                elif arg == "tgt_ptr":
                    signature[arg] = "*i64"
                elif arg.endswith("_ptr"):
                    signature[arg] = "*fp32"
                else:
                    signature[arg] = _SCALAR_ARGS.get(arg, "i32")
            blocks = {k: v for k, v in triton_lce.GPU_BLOCKS.items() if k.startswith("BLOCK")}
            constexprs = dict(blocks, HAS_SOFTCAP=True, UPCAST=False, DOT_PRECISION=precision)
            if "NEED_SUM" in fn.arg_names:
                constexprs["NEED_SUM"] = True
            t0 = time.time()
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=triton_lce.GPU_BLOCKS["num_warps"],
                             num_stages=triton_lce.GPU_BLOCKS["num_stages"]))
            muls = [ln for ln in compiled.asm["ttir"].splitlines() if "arith.muli" in ln]
            print("AOT " + json.dumps(dict(
                kernel=name, dtype=dtype, cubin_bytes=len(compiled.asm["cubin"]),
                wgmma="wgmma" in compiled.asm["ptx"], stack=_cubin_stack_bytes(compiled.asm["cubin"]),
                # every row * stride product must be 64-bit (int32 overflows past 2^31 elements)
                muls=len(muls), muls_i64=sum(("i64" in ln and "i32" not in ln) for ln in muls),
                seconds=round(time.time() - t0, 2))), flush=True)


def test_triton_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--aot-worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(ln[4:]) for ln in proc.stdout.splitlines() if ln.startswith("AOT ")]
    assert len(rows) == 6, proc.stdout
    for r in rows:
        assert r["cubin_bytes"] > 1000, r
        assert r["muls"] >= 3 and r["muls"] == r["muls_i64"], r
        if r["dtype"] == "bf16":  # the GPU training dtype; fp32 tiles spill a little (<= 64 B)
            assert r["wgmma"], r  # Hopper tensor-core path
            assert r["stack"] in (0, None), r  # no register spills with the shipped tile sizes
    # The Triton pass of impl="auto" on CUDA: builds, no spills, 64-bit row offsets (row * stride
    # of the logits and of dz; the statistics planes are N apart, N < 2^30 fits int32).
    rows = [json.loads(ln[8:]) for ln in proc.stdout.splitlines() if ln.startswith("AOTPASS ")]
    assert len(rows) == 3, proc.stdout
    for r in rows:
        assert r["cubin_bytes"] > 1000, r
        assert r["stack"] in (0, None), r
        assert r["muls_i64"] >= 2, r
        assert r["v4_loads"] > 0, r  # the logits stream in 16-byte loads


# ------------------------------------------------------------------------------------------------
# real GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_CASES = dict(CASES)
GPU_CASES.update({
    "gpu_big_fp32": dict(shape=(517, 200, 3001), case=dict(ignore_every=7), kw=dict(reduction="sum")),
    "gpu_big_bf16_none": dict(shape=(517, 256, 3001), case=dict(dtype=torch.bfloat16, ignore_every=7),
                              kw=dict(reduction="none", z_loss=1e-4, softcap=30.0), upstream=True),
    # N = 2H in bf16: the Triton pass keeps the dlogits and makes dW one GEMM (the two above: N > 2H).
    "gpu_big_bf16_kept": dict(shape=(512, 256, 3001), case=dict(dtype=torch.bfloat16, ignore_every=7),
                              kw=dict(label_smoothing=0.1)),
})


@_GPU
@pytest.mark.parametrize("impl", ["triton", "torch", "chunked-triton"])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_matches_reference(name, impl):
    check_result(evaluate_case(name, impl, device="cuda", cases=GPU_CASES))


@_GPU
def test_triton_gpu_deterministic_and_auto():
    hidden, weight, targets = (t.cuda() for t in make_case(300, 128, 2000, dtype=torch.bfloat16,
                                                            ignore_every=5))
    grads = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        linear_cross_entropy(h, w, targets, impl="triton").backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # impl="auto" on CUDA: the chunked cuBLAS path, same result within bf16 rounding.
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_cross_entropy(h, w, targets).backward()
    torch.testing.assert_close(h.grad.float(), grads[0][0].float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), grads[0][1].float(), rtol=2e-2, atol=2e-3)


@_GPU
@pytest.mark.parametrize("n", [256, 600])  # 256 <= 2H: dlogits kept, dW one GEMM; 600: summed per chunk
@pytest.mark.parametrize("chunk_elems", [None, 64 * 5000])
def test_gpu_pass_is_auto_and_matches_eager_chunk_loop(n, chunk_elems):
    from megacpt.kernels.capabilities import CAPS
    from megacpt.kernels.torch_lce import TorchBackend

    hidden, weight, targets = (t.cuda() for t in make_case(n, 128, 5000, dtype=torch.bfloat16,
                                                            ignore_every=5, scale=4.0))
    assert TorchBackend().uses_fused_pass(hidden) == (CAPS.triton and not CAPS.triton_interpret
                                                      and os.environ.get("MEGACPT_LCE_TRITON_PASS") != "0")
    out = {}
    for impl in ("chunked-triton", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, impl=impl, _chunk_elems=chunk_elems)
        loss.backward()
        out[impl] = (loss.detach(), h.grad.float(), w.grad.float())
    (la, dxa, dwa), (lb, dxb, dwb) = out["chunked-triton"], out["torch"]
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    # Both round the dlogits to bf16; they differ by that rounding and the order of sums.
    assert rel_err(dxa.double(), dxb.double()) < 2e-2
    assert rel_err(dwa.double(), dwb.double()) < 2e-2


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    _interp_worker()
elif __name__ == "__main__" and "--aot-worker" in sys.argv:
    _aot_worker()
    _aot_pass_worker()


def test_cpu_bf16_several_chunks_make_no_weight_sized_temporaries():
    """bf16 on CPU with several chunks: dW is summed in one fp32 buffer, next to one fp32 copy of
    the weight per call: no bf16 product of weight size and no fp32 copy of it per chunk."""
    from megacpt.bench.loss import LiveStorageTracker

    n, hdim, v, c = 64, 256, 8192, 16
    hidden, weight, targets = make_case(n, hdim, v, dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with LiveStorageTracker(preexisting=(h, w, targets)) as tracker:
        linear_cross_entropy(h, w, targets, reduction="sum", _chunk_elems=c * v).backward()
    w_elems = v * hdim
    # fp32 dW + the bf16 gradient returned + fp32 weight copy + 2 chunk workspaces
    bound = 4 * w_elems + 2 * w_elems + 4 * w_elems + 2 * 10 * c * v + 16 * n * hdim
    assert tracker.peak <= bound, (tracker.peak, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_no_rows(dtype, reduction):
    hidden = torch.zeros(0, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16).to(dtype).requires_grad_()
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert hidden.grad.shape == (0, 16) and torch.count_nonzero(weight.grad) == 0
