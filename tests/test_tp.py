"""Tensor parallelism: topology arithmetic, layout validation, apply_tp on meta models, and
multi-process (gloo) checks against the plain single-process model (tests/dist_tp_worker.py).

One launch per world size runs every configuration (tests/harness.py: process start-up
dominates the cost).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import dist_tp_worker
from harness import Scenario, run_scenarios
from helpers import tiny_hf_model
from megacpt.errors import ConfigError
from megacpt.models.llama import ModelArgs, Transformer
from megacpt.parallel import (DeepSpeedMPU, RankLayout, Topology, apply_tp, init_tp_weights, tp_shards, valid_layouts,
                              validate_layout)


# ---- topology (pure arithmetic, no processes) ------------------------------------------------

def test_rank_layout_world8_tp2_pp2():
    L = RankLayout(8, tp=2, pp=2)
    assert L.dp == 2
    # rank = (pp_rank * dp + dp_rank) * tp + tp_rank
    assert [L.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert all(L.rank_of(*L.coords(r)) == r for r in range(8))
    assert L.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert L.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert L.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert L.tp_subgroups(1) == [[r] for r in range(8)]
    assert L.tp_subgroups(2) == L.tp_groups()
    # Every rank is in exactly one group of each kind.
    for groups in (L.tp_groups(), L.dp_groups(), L.pp_groups(), L.model_parallel_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))
    assert RankLayout.group_of(L.dp_groups(), 5) == [5, 7]


def test_rank_layout_other_shapes_and_errors():
    L = RankLayout(8, tp=4, pp=1)
    assert L.tp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]] and L.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert L.tp_subgroups(2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert RankLayout(4, tp=1, pp=1).dp_groups() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="not divisible"):
        RankLayout(6, tp=4)
    with pytest.raises(ValueError, match="does not divide"):
        L.tp_subgroups(3)
    with pytest.raises(ValueError):
        L.coords(8)


def test_topology_world_of_one_and_mpu():
    t = Topology(1, 0)
    assert (t.tp_size, t.dp_size, t.pp_size, t.tp_rank, t.dp_rank, t.pp_rank) == (1, 1, 1, 0, 0, 0)
    assert t.tp_group is None and t.dp_group is None and t.tp_subgroup(1) is None
    mpu = DeepSpeedMPU(t)
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_data_parallel_group_ranks() == [0]
    assert mpu.get_pipeline_model_parallel_world_size() == 1 and mpu.get_tensor_model_parallel_src_rank() == 0
    with pytest.raises(RuntimeError, match="torch.distributed"):
        Topology(2, 0, tp=2)


def test_mpu_answers_what_deepspeed_asks():
    """Every `mpu.get_*` DeepSpeed's engine, ZeRO and clipping call, except the sequence-parallel
    ones, whose presence would switch DeepSpeed to sequence-parallel data groups."""
    needed = ["get_model_parallel_rank", "get_model_parallel_world_size", "get_model_parallel_group",
              "get_data_parallel_rank", "get_data_parallel_world_size", "get_data_parallel_group",
              "get_data_parallel_group_ranks", "get_tensor_model_parallel_rank",
              "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_group",
              "get_tensor_model_parallel_src_rank", "get_pipeline_model_parallel_rank",
              "get_pipeline_model_parallel_world_size", "get_pipeline_model_parallel_group",
              "get_pipe_parallel_group", "get_pipe_parallel_world_size", "get_slice_parallel_rank",
              "get_slice_parallel_world_size", "get_slice_parallel_group"]
    mpu = DeepSpeedMPU(Topology(1, 0))
    assert [n for n in needed if not callable(getattr(mpu, n, None))] == []
    assert not hasattr(mpu, "initialize_sequence_parallel")
    assert not hasattr(mpu, "get_sequence_parallel_world_size")


# ---- layouts ---------------------------------------------------------------------------------

def _args(**kw):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)
    base.update(kw)
    return ModelArgs(**base)


def test_valid_layouts_listed():
    got = valid_layouts(_args(), 8, zero_stage=1)
    # tp ∈ {1, 2, 4} (4 heads; 2 KV heads split or replicated), pp ≤ 2 layers, 8 = tp × pp × dp.
    assert got == [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)]
    assert valid_layouts(_args(), 8, zero_stage=3) == [(1, 1), (2, 1), (4, 1)]
    for tp, pp in got:
        validate_layout(_args(), 8, tp, pp, 1)  # accepted


def test_kv_heads_fewer_than_tp_are_accepted_when_they_divide_it():
    validate_layout(_args(num_kv_heads=1), 2, 2, 1, 3)
    validate_layout(_args(num_kv_heads=2), 4, 4, 1, 3)
    validate_layout(_args(num_heads=8, num_kv_heads=2, head_dim=4), 8, 8, 1, 1)


REJECTED = [
    # (case, args, world, tp, pp, zero, message fragments)
    ("heads", _args(num_heads=6, num_kv_heads=6, head_dim=4), 4, 4, 1, 1,
     ["num_heads 6 is not divisible by tp=4", "tp=1 pp=1 (dp=4)", "tp=2 pp=1 (dp=2)"]),
    ("kv heads", _args(num_heads=6, num_kv_heads=3, head_dim=4), 2, 2, 1, 1,
     ["num_kv_heads 3 neither divisible by tp=2", "tp=1 pp=1 (dp=2), tp=1 pp=2 (dp=1)"]),
    ("kv heads replicated but not dividing tp", _args(num_heads=12, num_kv_heads=3, head_dim=4), 4, 4, 1, 1,
     ["num_kv_heads 3 neither divisible by tp=4", "tp=1 pp=1"]),
    ("vocab", _args(vocab_size=129), 2, 2, 1, 3, ["vocab_size 129 is not divisible by tp=2", "tp=1 pp=1 (dp=2)"]),
    ("intermediate", _args(intermediate_size=66), 4, 4, 1, 0,
     ["intermediate_size 66 is not divisible by tp=4", "tp=2 pp=1 (dp=2)"]),
    ("layers", _args(num_layers=2), 4, 1, 4, 1, ["pp=4 pipeline stages but only 2 layers", "tp=1 pp=2 (dp=2)"]),
    ("pp with zero 2", _args(), 4, 1, 2, 2,
     ["ZeRO stage 0 or 1 only, not zero_stage=2", "zero_stage=2: tp=1 pp=1 (dp=4), tp=2 pp=1 (dp=2), tp=4 pp=1",
      "with zero_stage 0 or 1 also: tp=1 pp=2 (dp=2)"]),
    ("pp with zero 3", _args(), 2, 1, 2, 3, ["not zero_stage=3", "with zero_stage 0 or 1 also: tp=1 pp=2 (dp=1)"]),
    ("world", _args(), 6, 4, 1, 1, ["tp × pp = 4×1 = 4 does not divide the world size 6", "tp=2 pp=1 (dp=3)"]),
    ("world with pp", _args(), 4, 2, 3, 1, ["2×3 = 6 does not divide the world size 4"]),
]


@pytest.mark.parametrize("case,args,world,tp,pp,zero,fragments", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_layout_messages(case, args, world, tp, pp, zero, fragments):
    with pytest.raises(ConfigError) as e:
        validate_layout(args, world, tp, pp, zero)
    msg = str(e.value)
    assert msg.startswith(f"parallel layout tp={tp} pp={pp} zero_stage={zero} is not possible: ")
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


@pytest.mark.parametrize("bad", [dict(tp=0), dict(pp=-1), dict(world=0), dict(zero=4)])
def test_rejected_non_positive_sizes(bad):
    kw = dict(world=2, tp=1, pp=1, zero=1) | bad
    with pytest.raises(ConfigError, match="must be"):
        validate_layout(_args(), kw["world"], kw["tp"], kw["pp"], kw["zero"])


# ---- apply_tp without processes (meta model, group-free fake topology) -----------------------

def _fake_topology(tp, rank):
    return SimpleNamespace(tp_size=tp, tp_rank=rank, tp_group=None, tp_subgroup=lambda size: None)


@pytest.mark.parametrize("kv,tied,bias", [(2, False, False), (1, True, True), (4, False, True)])
def test_apply_tp_on_meta_model_allocates_nothing_and_splits(kv, tied, bias):
    args = _args(num_kv_heads=kv, tie_word_embeddings=tied, qkv_bias=bias)
    tp = 2
    seen_k = []
    for r in range(tp):
        with torch.device("meta"):
            m = Transformer(args)
        apply_tp(m, _fake_topology(tp, r))
        assert all(p.is_meta for p in m.parameters())
        if tied:
            assert m.lm_head.weight is m.embed_tokens.weight
        shards = tp_shards(m)
        exp = dist_tp_worker.expected_local_numel(args, tp)
        assert sum(p.numel() for n, p in m.named_parameters() if n in shards) == exp["split"]
        assert sum(p.numel() for n, p in m.named_parameters() if n not in shards) == exp["replicated"]
        a = m.layers[0].self_attn
        assert shards["layers.0.self_attn.q_proj.weight"].index() == (slice(16 * r, 16 * (r + 1)),)
        assert shards["layers.0.self_attn.o_proj.weight"].index() == (slice(None), slice(16 * r, 16 * (r + 1)))
        assert shards["embed_tokens.weight"].index() == (slice(64 * r, 64 * (r + 1)),)
        assert shards["layers.1.mlp.down_proj.weight"].shape == (32, 32)
        k = shards["layers.0.self_attn.k_proj.weight"]
        seen_k.append((k.start, k.stop))
        if kv < tp:  # each rank keeps the KV head its query heads use; only one replica counts in norms
            assert a.k_proj.weight.tensor_model_parallel == (r == 0)
            assert a.q_proj.weight.tensor_model_parallel
        if bias:
            assert shards["layers.0.self_attn.v_proj.bias"].index() == (slice(k.start, k.stop),)
        assert not hasattr(m.norm.weight, "tensor_model_parallel")
    if kv == 1:
        assert seen_k == [(0, 8), (0, 8)]
    else:
        assert seen_k == [(0, kv * 4), (kv * 4, kv * 8)]


def test_init_tp_weights_does_not_depend_on_the_layout():
    args = _args(num_kv_heads=1, tie_word_embeddings=True, qkv_bias=True)
    with torch.device("meta"):
        plain = Transformer(args)
    init_tp_weights(plain, seed=3)
    full = dict(plain.named_parameters())
    assert plain.lm_head.weight is plain.embed_tokens.weight
    assert torch.equal(full["norm.weight"], torch.ones(32)) and torch.equal(full["layers.0.self_attn.q_proj.bias"],
                                                                            torch.zeros(32))
    assert 0.015 < float(full["layers.0.mlp.up_proj.weight"].detach().std()) < 0.025
    for r in range(2):
        with torch.device("meta"):
            m = Transformer(args)
        apply_tp(m, _fake_topology(2, r))
        init_tp_weights(m, seed=3)
        assert m.lm_head.weight is m.embed_tokens.weight
        shards = tp_shards(m)
        for n, p in m.named_parameters():
            want = full[n][shards[n].index()] if n in shards else full[n]
            assert torch.equal(p, want), n
            assert p.tensor_model_parallel == (n in shards and (r == 0 or not (".k_proj." in n or ".v_proj." in n))) \
                if n in shards else not hasattr(p, "tensor_model_parallel")


def test_apply_tp_refuses_unsplittable_model():
    with torch.device("meta"):
        m = Transformer(_args(vocab_size=129))
    with pytest.raises(ConfigError, match="vocab_size 129"):
        apply_tp(m, _fake_topology(2, 0))


# ---- multi-process checks ---------------------------------------------------------------------

def _need_gloo():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


@pytest.mark.slow
def test_tp2_matches_single_process(tmp_path):
    """TP=2 on 2 ranks vs the plain model: HF→TP→HF exact, per-rank sizes, logits, loss, every
    gradient (local slices and gathered), grad norm, 3 clipped AdamW steps (one config with
    activation checkpointing), replicas unchanged across ranks."""
    _need_gloo()
    dirs = {
        "llama untied kv2": tiny_hf_model(tmp_path / "a", "llama", tied=False, kv_heads=2, seed=1),
        "llama tied kv2": tiny_hf_model(tmp_path / "b", "llama", tied=True, kv_heads=2, seed=2),
        "llama untied kv1": tiny_hf_model(tmp_path / "c", "llama", tied=False, kv_heads=1, seed=3),
        "qwen2 tied kv2": tiny_hf_model(tmp_path / "d", "qwen2", tied=True, kv_heads=2, seed=4),
        "qwen2 untied kv1": tiny_hf_model(tmp_path / "e", "qwen2", tied=False, kv_heads=1, seed=5),
    }
    scenarios = [Scenario("dist_tp_worker:tp2", dict(model_dir=str(path), label=label,
                                                     checkpointing=label.endswith("kv1")), name=label)
                 for label, path in dirs.items()]
    # Sequence parallelism: the same checks (12 positions, 6 per rank), one with replicated KV
    # heads and activation checkpointing, one with tied embeddings and q/k/v bias.
    scenarios += [Scenario("dist_tp_worker:tp2", dict(model_dir=str(dirs[label]), label=f"{label} sequence parallel",
                                                      checkpointing=label.endswith("kv1"), sequence_parallel=True),
                           name=f"{label} sequence parallel")
                  for label in ("llama untied kv1", "qwen2 tied kv2")]
    run_scenarios(2, scenarios, tmp_path)


@pytest.mark.slow
def test_world4_tp4_and_tp2_dp2_under_deepspeed(tmp_path):
    """4 ranks: TP=4 (2 KV heads, so replica groups of 2) numerics; then TP=2 × DP=2 through
    deepspeed.initialize(mpu=DeepSpeedMPU) with ZeRO-0/1/2/3 against one process on the global
    batch (losses, grad norms with clipping, final parameters); ZeRO shards over dp only; the
    checkpoint of each consolidates (export path) to exactly the HF weights."""
    _need_gloo()
    pytest.importorskip("deepspeed")
    dirs = {
        "tp4": tiny_hf_model(tmp_path / "a", "llama", tied=False, kv_heads=2, seed=11),
        "dp llama tied kv1": tiny_hf_model(tmp_path / "b", "llama", tied=True, kv_heads=1, seed=12),
        "dp qwen2 kv2": tiny_hf_model(tmp_path / "c", "qwen2", tied=False, kv_heads=2, seed=13),
    }
    scenarios = [Scenario("dist_tp_worker:tp4", dict(model_dir=str(dirs["tp4"])), name="tp4")]
    scenarios += [Scenario("dist_tp_worker:tp2_dp2_deepspeed", dict(model_dir=str(dirs[label]), stage=stage, label=label),
                           name=f"{label} zero{stage}")
                  for stage in (0, 1, 2, 3) for label in ("dp llama tied kv1", "dp qwen2 kv2")]
    run_scenarios(4, scenarios, tmp_path)
