"""Scenarios for tests/test_tp.py, run on every rank by tests/harness.py (one gloo launch per
world size, a fresh process group per scenario).

Every rank builds the plain single-process reference itself from the same HF directory (tiny
models, so this is cheaper than a separate process) and compares its tensor-parallel shards with
the matching slices of the reference. A failed check raises on its rank; the harness reports it
with that rank's traceback.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

RTOL, ATOL = 1e-5, 1e-6
# Parameters after AdamW steps: Adam divides each gradient by its own magnitude, so an element
# whose gradient is near zero turns a round-off-level difference (TP sums partial products in a
# different order) into an update difference of a fraction of lr. Losses, gradients and grad
# norms are compared at ATOL; parameters after steps at 1 % of lr (1e-3).
ADAM_ATOL = 1e-5
IGNORE = -100
# Gradients are sums over positions and layers whose order TP changes; where terms cancel, an
# element's error is relative to the size of the terms, not of the result. So gradients get a
# tolerance relative to the tensor's largest element too (~800 fp32 ulps of it). Seen on AVX-512
# MKL: one embedding-gradient element of 0.037 off by 1.8e-6 in a tensor of max ~0.05.
GRAD_SCALE_TOL = 1e-4


def _close(got, want, what: str, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"rank {dist.get_rank()} {what}: {m}")


def _close_grad(got, want, what: str):
    _close(got, want, what, atol=max(ATOL, GRAD_SCALE_TOL * float(want.abs().max())))


def model_args(model_dir):
    from megacpt.models.hf import args_from_hf_config, read_hf_config

    return args_from_hf_config(read_hf_config(model_dir))


def reference(model_dir):
    from megacpt.models.hf import load_full_state
    from megacpt.models.llama import Transformer

    with torch.device("meta"):
        m = Transformer(model_args(model_dir))
    load_full_state(m, model_dir)
    return m


def tp_model(model_dir, topo, sequence_parallel: bool = False):
    """meta build → apply_tp → each rank reads its own slices."""
    from megacpt.models.hf import HFWeights
    from megacpt.models.llama import Transformer
    from megacpt.parallel import apply_tp, load_tp_weights

    with torch.device("meta"):
        m = Transformer(model_args(model_dir))
    apply_tp(m, topo, sequence_parallel=sequence_parallel)
    assert all(p.is_meta for p in m.parameters()), "apply_tp allocated parameters of a meta model"
    load_tp_weights(m, HFWeights(model_dir))
    assert not any(p.is_meta for p in m.parameters())
    if m.args.tie_word_embeddings:
        assert m.lm_head.weight is m.embed_tokens.weight, "tied embedding is no longer one parameter"
    return m


def batch(args, seed: int, b: int = 2, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (b, s), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[0, :3] = IGNORE
    labels[-1, 4] = args.vocab_size - 1  # a target in the last vocabulary shard
    return ids, labels


def expected_local_numel(args, tp: int) -> dict:
    """Per-rank element counts: split weights (with replicated KV heads) and replicated ones."""
    h, d, i, v = args.hidden_size, args.head_dim, args.intermediate_size, args.vocab_size
    nh, nkv = args.num_heads, args.num_kv_heads
    kv_local = nkv // tp if nkv % tp == 0 else 1
    b = 1 if args.qkv_bias else 0
    per_layer = (nh // tp) * d * (h + b) + 2 * kv_local * d * (h + b) + (nh // tp) * d * h + 3 * (i // tp) * h
    split = args.num_layers * per_layer + (v // tp) * h * (1 if args.tie_word_embeddings else 2)
    replicated = args.num_layers * 2 * h + h
    return {"split": split, "replicated": replicated}


def check_tp_model(model_dir, topo, label: str, steps: int = 3, checkpointing: bool = False,
                   sequence_parallel: bool = False) -> None:
    """Round trip, per-rank sizes, logits, loss, every gradient, grad norm and AdamW steps."""
    from megacpt.models.hf import HFWeights
    from megacpt.parallel import gather_tp_state, tp_grad_norm, tp_shards

    tp = topo.tp_size
    ref, m = reference(model_dir), tp_model(model_dir, topo, sequence_parallel)
    args = m.args
    shards = tp_shards(m)
    lead = topo.tp_rank == 0
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in m.named_parameters()]
    assert names == list(ref_params), f"{label}: parameter names differ from the plain model"

    # HF → TP → gathered is exact.
    full = gather_tp_state(m, topo)
    if lead:
        w = HFWeights(model_dir)
        assert set(full) == set(ref_params), f"{label}: gathered names {sorted(set(full) ^ set(ref_params))}"
        for n, t in full.items():
            assert torch.equal(t, w.get(n)), f"{label}: round trip of {n} not exact"
    else:
        assert full == {}

    # Per-rank sizes: split weights are 1/tp (replicated KV heads excepted), norms whole.
    split = sum(p.numel() for n, p in m.named_parameters() if n in shards)
    repl = sum(p.numel() for n, p in m.named_parameters() if n not in shards)
    exp = expected_local_numel(args, tp)
    assert (split, repl) == (exp["split"], exp["replicated"]), f"{label}: local sizes {split}, {repl} vs {exp}"
    full_split = sum(ref_params[n].numel() for n in shards if n in ref_params)  # a tied head is one
    extra_kv = 0 if args.num_kv_heads % tp == 0 else 2 * args.num_layers * args.head_dim * (
        args.hidden_size + (1 if args.qkv_bias else 0)) * (1 - args.num_kv_heads / tp)
    assert abs(split - full_split / tp - extra_kv) < 1e-6, f"{label}: {split} is not 1/{tp} of {full_split}"

    # Logits (gathered over the vocabulary) and the eval-mode loss.
    ids, labels = batch(args, seed=1)
    with torch.no_grad():
        _close(m(ids), ref(ids), f"{label} logits")
        _close(m(ids, labels), ref(ids, labels), f"{label} eval loss")
        # per-token losses (by-position validation): gathered over the sequence, equal on every rank
        _close(m(ids, labels, reduction="none"), ref(ids, labels, reduction="none"), f"{label} per-token loss")

    m.activation_checkpointing = ref.activation_checkpointing = checkpointing
    m.train(), ref.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    max_norm = 0.5
    for step in range(steps):
        ids, labels = batch(args, seed=10 + step)
        opt.zero_grad(), ref_opt.zero_grad()
        loss, ref_loss = m(ids, labels), ref(ids, labels)
        _close(loss, ref_loss, f"{label} step {step} loss")
        n_tokens = int((labels != IGNORE).sum())  # backward on the token mean, as the trainer does
        (loss / n_tokens).backward(), (ref_loss / n_tokens).backward()
        for n, p in m.named_parameters():
            want = ref_params[n].grad
            if n in shards:
                want = want[shards[n].index()]
            _close_grad(p.grad, want, f"{label} step {step} grad {n}")
        if step == 0:
            grads = gather_tp_state(m, topo, grads=True)
            if lead:
                for n, g in grads.items():
                    _close_grad(g, ref_params[n].grad, f"{label} gathered grad {n}")
        norm = tp_grad_norm(m, topo)
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()]))
        _close(norm, ref_norm, f"{label} step {step} grad norm")
        for model, nrm in ((m, norm), (ref, ref_norm)):
            coef = min(1.0, max_norm / (float(nrm) + 1e-6))
            for p in model.parameters():
                p.grad.mul_(coef)
        opt.step(), ref_opt.step()

    # Replicas stay identical (norms on all tp ranks; KV heads within their replica groups).
    for n, p in m.named_parameters():
        parts = [torch.empty_like(p) for _ in range(tp)]
        dist.all_gather(parts, p.detach().contiguous(), group=topo.tp_group)
        if n not in shards:
            assert all(torch.equal(parts[0], q) for q in parts), f"{label}: replicated {n} diverged across tp"
        elif (".k_proj." in n or ".v_proj." in n) and args.num_kv_heads < tp:
            rep = tp // args.num_kv_heads
            for j, q in enumerate(parts):
                if j // rep == topo.tp_rank // rep:
                    assert torch.equal(q, p.detach()), f"{label}: KV replica {n} diverged"
    after = gather_tp_state(m, topo)
    if lead:
        for n, t in after.items():
            _close(t, ref_params[n].detach(), f"{label} param {n} after {steps} AdamW steps", atol=ADAM_ATOL)
    dist.barrier()


def tp2(rank: int, world: int, out: Path, model_dir: str, label: str, checkpointing: bool,
        sequence_parallel: bool = False) -> None:
    """World 2, tp 2: one model config (test_tp runs them all, one with activation checkpointing,
    and with sequence parallelism: 12 positions, 6 per rank)."""
    from megacpt.parallel import Topology

    topo = Topology(world, rank, tp=2, pp=1)
    assert (topo.tp_ranks, topo.dp_ranks, topo.dp_size) == ([0, 1], [rank], 1)
    check_tp_model(model_dir, topo, label, checkpointing=checkpointing, sequence_parallel=sequence_parallel)


# ---- world 4: tp 4 numerics, then tp 2 × dp 2 under the DeepSpeed engine ----------------------

def tp4(rank: int, world: int, out: Path, model_dir: str) -> None:
    from megacpt.parallel import Topology

    topo4 = Topology(world, rank, tp=4, pp=1)
    check_tp_model(model_dir, topo4, "tp4 llama kv2 (replica groups of 2)", steps=2)


def tp2_dp2_deepspeed(rank: int, world: int, out: Path, model_dir: str, stage: int, label: str) -> None:
    import deepspeed

    from megacpt.parallel import Topology

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    topo = Topology(world, rank, tp=2, pp=1)
    assert topo.tp_ranks == [rank - rank % 2, rank - rank % 2 + 1]
    assert topo.dp_ranks == [rank % 2, rank % 2 + 2], topo.dp_ranks
    check_deepspeed(model_dir, topo, stage, f"{label} zero{stage}", work=out / "ckpt")


def _ref_step(ref, opt, batches, global_tokens, clip):
    opt.zero_grad()
    loss = sum(ref(ids, labels) for ids, labels in batches)
    (loss / global_tokens).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()]))
    coef = min(1.0, clip / (float(norm) + 1e-6))
    for p in ref.parameters():
        p.grad.mul_(coef)
    opt.step()
    return loss.detach() / global_tokens, norm


def check_checkpoint_round_trip(engine, model_dir, root) -> None:
    """HF → layout → DeepSpeed checkpoint → consolidated weights (megacpt export's path), exact."""
    import shutil

    from megacpt.models.hf import HFWeights
    from megacpt.train.consolidate import checkpoint_weights

    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag="t0", save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copy(Path(model_dir) / "config.json", root / "t0" / "hf_config.json")
        got, hf = checkpoint_weights(root / "t0"), HFWeights(model_dir)
        for n in hf.keys():
            assert torch.equal(got.get(n), hf.get(n)), f"{root.name}: round trip of {n} not exact"
    dist.barrier()


def check_deepspeed(model_dir, topo, stage: int, label: str, steps: int = 3, work=None) -> None:
    """TP=2 × DP=2 through deepspeed.initialize(mpu=DeepSpeedMPU) against one process on the
    global batch: per-step token-mean loss, grad norm before clipping, parameters after."""
    import deepspeed

    from megacpt.parallel import DeepSpeedMPU, gather_tp_state, tp_grad_norm
    from megacpt.train.engine import param_groups

    lr, wd, clip, mb = 1e-3, 0.1, 0.05, 2
    ds_config = {
        "train_batch_size": mb * topo.dp_size, "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1, "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                   "weight_decay": wd, "torch_adam": True}},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
    }
    ref = reference(model_dir)
    ref_opt = torch.optim.AdamW(param_groups(ref, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    m = tp_model(model_dir, topo)
    if stage == 3:
        # ZeRO-3 after TP and loading: partition each rank's TP shards over its dp group only.
        # mpu= lets DeepSpeed's config count the batch over dp ranks, not the whole world.
        deepspeed.zero.Init(module=m, data_parallel_group=topo.dp_group, mpu=DeepSpeedMPU(topo),
                            config_dict_or_path=ds_config, mem_efficient_linear=False)
        for n, p in m.named_parameters():
            assert dist.get_process_group_ranks(p.ds_process_group) == topo.dp_ranks, n
            assert p.ds_tensor.ds_numel == math.ceil(p.ds_numel / topo.dp_size), n
    engine, *_ = deepspeed.initialize(model=m, model_parameters=param_groups(m, wd), config=ds_config,
                                      mpu=DeepSpeedMPU(topo))
    if stage in (1, 2):
        assert dist.get_process_group_ranks(engine.optimizer.dp_process_group) == topo.dp_ranks
        assert engine.optimizer.partition_count == [topo.dp_size] * len(engine.optimizer.partition_count)
    elif stage == 3:
        assert engine.optimizer.partition_count == topo.dp_size
    if work is not None:
        check_checkpoint_round_trip(engine, model_dir, Path(work) / f"{label.replace(' ', '_')}")
    args = m.args
    for step in range(steps):
        batches = [batch(args, seed=100 + step * 10 + k, b=mb) for k in range(topo.dp_size)]
        global_tokens = float(sum(int((lab != IGNORE).sum()) for _, lab in batches))
        ids, labels = batches[topo.dp_rank]
        out = engine(ids, labels=labels)
        engine.backward(out * topo.dp_size / global_tokens)
        norm = tp_grad_norm(engine.module, topo) if stage == 0 else None
        engine.step()
        if norm is None:
            norm = torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float64)
        total = out.detach().clone()
        dist.all_reduce(total, group=topo.dp_group)
        ref_loss, ref_norm = _ref_step(ref, ref_opt, batches, global_tokens, clip)
        _close(total / global_tokens, ref_loss, f"{label} step {step} loss")
        _close(norm.double(), ref_norm, f"{label} step {step} grad norm")
    state = gather_tp_state(engine.module, topo)
    if topo.tp_rank == 0:
        for n, p in ref.named_parameters():
            _close(state[n], p.detach(), f"{label} param {n} after {steps} steps", atol=ADAM_ATOL)
    dist.barrier()
