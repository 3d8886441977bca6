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


def test_confident_case_is_confident():
    hidden, weight, targets = make_case(9, 32, 40, confident=True)
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
    code = ("import sys, megacpt.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; print('ok')")
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


def _interp_worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    for name in sorted(CASES):
        t0 = time.time()
        try:
            r = evaluate_case(name, "triton")
        except Exception as e:  # noqa: BLE001
            r = dict(case=name, error=f"{type(e).__name__}: {e}")
        r["seconds"] = round(time.time() - t0, 2)
        print("RESULT " + json.dumps(r), flush=True)
    try:
        extra = _interp_extra_checks()
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


# ------------------------------------------------------------------------------------------------
# real GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_CASES = dict(CASES)
GPU_CASES.update({
    "gpu_big_fp32": dict(shape=(517, 200, 3001), case=dict(ignore_every=7), kw=dict(reduction="sum")),
    "gpu_big_bf16_none": dict(shape=(517, 256, 3001), case=dict(dtype=torch.bfloat16, ignore_every=7),
                              kw=dict(reduction="none", z_loss=1e-4, softcap=30.0), upstream=True),
})


@_GPU
@pytest.mark.parametrize("impl", ["triton", "torch"])
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


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    _interp_worker()
elif __name__ == "__main__" and "--aot-worker" in sys.argv:
    _aot_worker()


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
