"""megacpt.kernels.cpu_attention (flash forward, blocked matmul backward) against an fp64
reference: torch's own math attention in float64 with repeated key/value heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacpt.kernels.cpu_attention import attention_backward, causal_attention


def _inputs(dtype, b=2, h=4, kv=2, s=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scaled up so the softmax is peaked (as in trained models), not near uniform.
    q = (torch.randn(b, h, s, d, generator=g) * 2).to(dtype)
    k = (torch.randn(b, kv, s, d, generator=g) * 2).to(dtype)
    v = torch.randn(b, kv, s, d, generator=g).to(dtype)
    grad = torch.randn(b, h, s, d, generator=g).to(dtype)
    return q, k, v, grad


def _masks(b, s):
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    window = causal & (torch.arange(s)[:, None] - torch.arange(s)[None, :] < 7)
    seg = torch.tensor([[0] * 13 + [1] * 20 + [2] * (s - 33), [0] * (s - 5) + [1] * 5])[:b]
    docs = causal[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    return {"causal": None, "window": window[None, None], "documents": docs}


def _reference(q, k, v, grad, mask):
    g = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    m = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril() if mask is None else mask
    out = F.scaled_dot_product_attention(q64, k64.repeat_interleave(g, 1), v64.repeat_interleave(g, 1), attn_mask=m)
    out.backward(grad.double())
    return out.detach(), [q64.grad, k64.grad, v64.grad]


def _ours(q, k, v, grad, mask, compiled):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = causal_attention(qq, kk, vv, mask, compiled=compiled)
    out.backward(grad)
    return out.detach(), [qq.grad, kk.grad, vv.grad]


def _sdpa(q, k, v, grad, mask):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    out.backward(grad)
    return out.detach(), [qq.grad, kk.grad, vv.grad]


def _rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("mask_kind", ["causal", "window", "documents"])
def test_fp32_matches_fp64_reference(mask_kind, monkeypatch):
    import megacpt.kernels.cpu_attention as ca

    # Blocks of 16 rows over 40 positions: three blocks, the last one partial.
    monkeypatch.setattr(ca, "BLOCK_ROWS", 16)
    q, k, v, grad = _inputs(torch.float32)
    mask = _masks(2, 40)[mask_kind]
    ref_out, ref_grads = _reference(q, k, v, grad, mask)
    out, grads = _ours(q, k, v, grad, mask, compiled=False)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("block_rows", [8, 16, 40, 64])
def test_block_size_does_not_change_the_gradients(block_rows):
    q, k, v, grad = _inputs(torch.float32, b=1, s=40)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    one = attention_backward(q, k, v, out, lse, grad, None, q.shape[-1] ** -0.5, block_rows=40)
    many = attention_backward(q, k, v, out, lse, grad, None, q.shape[-1] ** -0.5, block_rows=block_rows)
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["causal", "documents"])
def test_bf16_gradients_as_accurate_as_torch_flash(mask_kind, monkeypatch):
    """bf16, over several blocks: within 1.5x of the fp64-reference error of torch's own bf16
    attention backward."""
    import megacpt.kernels.cpu_attention as ca

    monkeypatch.setattr(ca, "BLOCK_ROWS", 32)  # 96 positions: three blocks
    q, k, v, grad = _inputs(torch.bfloat16, s=96)
    mask = _masks(2, 96)[mask_kind]
    _, ref_grads = _reference(q, k, v, grad, mask)
    _, ours = _ours(q, k, v, grad, mask, compiled=False)
    _, torchs = _sdpa(q, k, v, grad, mask)
    for name, a, t, r in zip("qkv", ours, torchs, ref_grads):
        assert a.dtype == torch.bfloat16
        assert _rel(a, r) <= 1.5 * _rel(t, r) + 1e-3, (name, _rel(a, r), _rel(t, r))


@pytest.mark.slow
def test_compiled_pointwise_pass_matches_eager():
    """The compiled pass (dynamic shapes: each block has its own key count) gives eager's gradients."""
    mask = _masks(2, 300)["documents"]
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, grad = _inputs(dtype, s=300)  # two blocks of 256 rows: 256 and 300 keys
        for m in (None, mask):
            _, eager = _ours(q, k, v, grad, m, compiled=False)
            _, comp = _ours(q, k, v, grad, m, compiled=True)
            for a, b in zip(comp, eager):
                assert a.dtype == dtype
                # bf16: inductor keeps fp32 between the fused ops, eager rounds after each one.
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(a.float(), b.float(), **tol)


def test_rejects_bad_shapes_and_devices():
    q, k, v, _ = _inputs(torch.float32, h=3, kv=2)
    with pytest.raises(ValueError, match="3 query heads do not split into groups over 2"):
        causal_attention(q, k, v)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16, not torch.float64"):
        causal_attention(*(t.double() for t in _inputs(torch.float32)[:3]))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU path"):
            causal_attention(*(t.cuda() for t in _inputs(torch.float32)[:3]))
