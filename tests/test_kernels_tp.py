"""vocab_parallel_linear_cross_entropy over 2 gloo ranks against the single-rank op.

One launch (tests/harness.py) runs every configuration (process start-up dominates the cost).
Each rank checks its loss and dX against the full-vocabulary result and its dW against the
matching rows of the full dW; the harness reports a failure with the failing rank's traceback.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from harness import need_gloo, run_scenarios

IGNORE = -100

# (name, N, H, shard sizes per rank, options)
CONFIGS = [
    ("mean", 9, 16, (20, 20), dict()),
    ("sum_smooth_z", 11, 16, (20, 20), dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3)),
    ("none_softcap_uneven", 10, 24, (23, 14), dict(reduction="none", softcap=6.0, label_smoothing=0.2)),
]


def vocab_parallel_scenario(rank: int, world: int, out) -> None:
    from megacpt.kernels import linear_cross_entropy, vocab_parallel_linear_cross_entropy

    for name, n, h, shards, opts in CONFIGS:
        g = torch.Generator().manual_seed(123)  # identical data on both ranks
        v = sum(shards)
        hidden = torch.randn(n, h, generator=g) * 2.0
        weight = torch.randn(v, h, generator=g)
        targets = torch.randint(0, v, (n,), generator=g)
        targets[::4] = IGNORE
        targets[1] = v - 1  # a target in the last shard
        upstream = torch.linspace(-1.0, 2.0, n) if opts.get("reduction") == "none" else None
        start = sum(shards[:rank])
        stop = start + shards[rank]

        h_ref = hidden.clone().requires_grad_()
        w_ref = weight.clone().requires_grad_()
        ref, ref_z = linear_cross_entropy(h_ref, w_ref, targets, impl="torch", return_z_loss=True, **opts)
        ref.backward(upstream if upstream is not None else torch.tensor(1.0))

        h_tp = hidden.clone().requires_grad_()
        w_tp = weight[start:stop].clone().requires_grad_()
        got, got_z = vocab_parallel_linear_cross_entropy(
            h_tp, w_tp, targets, dist.group.WORLD, vocab_start=start, vocab_size=v,
            impl="torch", return_z_loss=True, **opts)
        got.backward(upstream if upstream is not None else torch.tensor(1.0))

        msg = f"rank {rank} config {name}"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{msg} loss: {m}")
        torch.testing.assert_close(got_z, ref_z, rtol=1e-5, atol=1e-7, msg=lambda m: f"{msg} z: {m}")
        torch.testing.assert_close(h_tp.grad, h_ref.grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{msg} dX: {m}")
        torch.testing.assert_close(w_tp.grad, w_ref.grad[start:stop], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{msg} dW: {m}")

        with torch.no_grad():  # forward-only path (evaluation) takes the same collectives
            got_eval = vocab_parallel_linear_cross_entropy(
                hidden, weight[start:stop], targets, dist.group.WORLD, vocab_start=start,
                vocab_size=v, impl="torch", **opts)
        torch.testing.assert_close(got_eval, ref.detach(), rtol=1e-5, atol=1e-6)

    # A target outside the global vocabulary is refused on every rank before any collective.
    bad = torch.tensor([0, 40, IGNORE])
    try:
        vocab_parallel_linear_cross_entropy(torch.randn(3, 16), torch.randn(20, 16), bad,
                                            dist.group.WORLD, vocab_start=20 * rank, vocab_size=40)
    except ValueError:
        pass
    else:
        raise AssertionError("out-of-range target not refused")


def test_vocab_parallel_matches_single_rank(tmp_path):
    need_gloo(deepspeed=False)
    run_scenarios(2, ["test_kernels_tp:vocab_parallel_scenario"], tmp_path)
