"""Context parallelism (parallel.cp, DeepSpeed-Ulysses): the rank arithmetic and the config-time
refusals without processes, then one 2-rank launch (tests/harness.py) in which CP=2 runs through
the trainer's own construction (megacpt.train.parallelize) and step (megacpt.train.step) for 5
steps and equals the plain model in one process on the token-mean loss and the clipped global
grad norm (rtol 1e-5, atol 1e-6, fp32): under ZeRO-3 with and without document masking, and for
the families whose attention differs (Gemma 3: one KV head replicated over the cp ranks, sliding
windows, two RoPE bases, activation checkpointing; Gemma 2: soft-capped attention; Phi-3:
longrope, whose factors depend on the longest position of the whole sequence).

The scenarios live in this file (the harness imports it on every rank).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from harness import Scenario, need_gloo, run_scenarios
from helpers import tiny_hf_model, tiny_run_config
from megacpt.config import config_from_dict, derive
from megacpt.errors import ConfigError
from megacpt.models.llama import ModelArgs
from megacpt.parallel import RankLayout, validate_layout

LR, WD, CLIP, STEPS, SEQ = 1e-3, 0.1, 0.05, 5, 12


# ---- rank arithmetic (no processes) ---------------------------------------------------------------

def test_cp2_dp2_groups_of_four_ranks():
    L = RankLayout(4, cp=2)
    assert L.dp == 2
    # rank = ((pp * dp + dp_rank) * cp + cp_rank) * tp + tp_rank
    assert [L.named_coords(r) for r in range(4)] == [
        {"pp": 0, "dp": 0, "cp": 0, "tp": 0}, {"pp": 0, "dp": 0, "cp": 1, "tp": 0},
        {"pp": 0, "dp": 1, "cp": 0, "tp": 0}, {"pp": 0, "dp": 1, "cp": 1, "tp": 0}]
    assert L.cp_groups() == [[0, 1], [2, 3]]  # same samples, different positions
    assert L.dp_groups() == [[0, 2], [1, 3]]  # different samples
    assert L.grad_groups() == [[0, 1, 2, 3]]  # same parameters: ZeRO and the gradient average
    assert L.tp_groups() == [[0], [1], [2], [3]] and L.model_parallel_groups() == [[0], [1], [2], [3]]
    # Existing callers: coords stays (pp, dp, tp).
    assert [L.coords(r) for r in range(4)] == [(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 1, 0)]
    assert all(L.rank_of(p, d, t, c) == r for r in range(4) for p, d, c, t in [L.all_coords(r)])


def test_cp2_dp2_tp2_groups_of_eight_ranks():
    L = RankLayout(8, tp=2, cp=2)
    assert L.dp == 2
    assert L.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.cp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert L.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert L.grad_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert L.model_parallel_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.all_coords(5) == (0, 1, 0, 1) and L.cp_rank_of(6) == 1
    for groups in (L.tp_groups(), L.cp_groups(), L.dp_groups(), L.grad_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))
    # cp = 1 leaves every group as it was (the grad groups are the dp groups).
    plain = RankLayout(8, tp=2, pp=2)
    assert plain.grad_groups() == plain.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ValueError, match="tp × pp × cp"):
        RankLayout(8, tp=2, cp=3)


# ---- refusals at config time (no processes) -------------------------------------------------------

def _args(**kw) -> ModelArgs:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)
    return ModelArgs(**{**base, **kw})


def _refused(fn, *fragments):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_layouts_with_cp():
    validate_layout(_args(), 4, 1, 1, 3, cp=2)
    validate_layout(_args(), 8, 2, 1, 3, cp=2)  # 2 query heads and 1 KV head per tp rank
    validate_layout(_args(num_kv_heads=1), 4, 1, 1, 3, cp=4)  # one KV head, replicated up to 4
    _refused(lambda: validate_layout(_args(num_heads=6, num_kv_heads=6), 4, 1, 1, 3, cp=4),
             "parallel.cp=4 is not possible with tp=1 pp=1 on 4 ranks",
             "6 query heads per rank (num_heads 6 / tp=1) are not divisible by cp=4", "cp values that work there: 1, 2")
    validate_layout(_args(num_heads=8, num_kv_heads=4), 8, 2, 1, 3, cp=4)  # 2 KV heads per tp rank, replicated
    _refused(lambda: validate_layout(_args(num_heads=12, num_kv_heads=4), 6, 2, 1, 3, cp=3),
             "2 KV heads per rank are neither divisible by cp=3 nor a divisor of it", "cp values that work there: 1")
    _refused(lambda: validate_layout(_args(num_heads=12, num_kv_heads=3), 6, 1, 1, 3, cp=2),
             "3 KV heads per rank are neither divisible by cp=2 nor a divisor of it")
    _refused(lambda: validate_layout(_args(), 6, 1, 1, 3, cp=4), "tp × pp × cp = 1×1×4 = 4 does not divide the "
             "world size 6", "cp values that work there: 1, 2")
    _refused(lambda: validate_layout(_args(), 4, 1, 2, 1, cp=2), "does not run with pipeline parallelism (pp=2)")


def _cfg(tmp_path, **over):
    return config_from_dict(tiny_run_config(tmp_path, "model", tmp_path / "run", **over))


def test_config_refuses_what_cp_does_not_combine_with(tmp_path):
    works = "context parallelism works with tp, ZeRO 0-3, document masking"
    _refused(lambda: _cfg(tmp_path, **{"parallel.cp": 2, "parallel.pp": 2}),
             "parallel.cp=2 is not available with pipeline parallelism (parallel.pp > 1)", works)
    _refused(lambda: _cfg(tmp_path, **{"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True}),
             "parallel.cp=2 is not available with parallel.sequence_parallel", works)
    _refused(lambda: _cfg(tmp_path, task="sft", **{"parallel.cp": 2}),
             "parallel.cp=2 is not available with task: sft", works)
    _refused(lambda: _cfg(tmp_path, seq=18, **{"parallel.cp": 4}),
             "parallel.cp=4 splits each sequence into 4 equal blocks: data.seq_len (18) is not divisible by it")
    _refused(lambda: _cfg(tmp_path, **{"parallel.cp": 0}), "parallel.cp must be > 0")
    cfg = _cfg(tmp_path, gb=4, **{"parallel.cp": 2})
    assert derive(cfg, 4).dp_size == 2 and derive(cfg, 4).grad_accum == 2
    _refused(lambda: derive(cfg, 3), "world size 3 is not divisible by parallel.tp × parallel.pp × parallel.cp = 2")


def test_config_checks_each_phase_sequence_length(tmp_path):
    """A phase's own seq_len (PhaseConfig.seq_len, where the schema has it) must split too."""
    from megacpt.config import validate

    cfg = _cfg(tmp_path, **{"parallel.cp": 2})
    phases = [SimpleNamespace(name="short", steps=1, data=None, trainable=None, seq_len=16),
              SimpleNamespace(name="long", steps=1, data=None, trainable=None, seq_len=33)]
    _refused(lambda: validate(dataclasses.replace(cfg, phases=phases)), "phases.1.seq_len (33) is not divisible")


def test_cp_change_on_resume_is_a_layout_change_not_a_config_change():
    """ZeRO partitions over dp × cp, the same ranks for every cp at one world size: resuming with
    another cp is allowed (a world-size change reshards as for dp)."""
    from megacpt.config import run_changing_diff

    old = {"parallel": {"cp": 1, "tp": 1}, "data": {"seq_len": 16}}
    assert run_changing_diff(old, {"parallel": {"cp": 2, "tp": 1}, "data": {"seq_len": 16}}) == []
    assert run_changing_diff(old, {"parallel": {"cp": 2, "tp": 1}, "data": {"seq_len": 32}}) == ["data.seq_len"]


# ---- 2-rank scenarios -----------------------------------------------------------------------------

# Tiny fp32 models as tests/test_families_parallel.py builds them (windows shorter than SEQ, Gemma 3
# with one KV head and both layer types, soft-caps that bind, Phi-3 past longrope's original length).
FAMILIES = {
    "llama": dict(arch="llama", kv_heads=2, seed=41),
    "gemma3": dict(arch="gemma3", layers=3, kv_heads=1, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   final_logit_softcapping=0.5, rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}, seed=42),
    "gemma2": dict(arch="gemma2", tied=True, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                   attn_logit_softcapping=1.0, final_logit_softcapping=0.5, initializer_range=0.2, seed=43),
    "phi3": dict(arch="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2, max_pos=64, seed=44,
                 original_max_position_embeddings=8, rope_parameters=dict(
                     rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                     short_factor=[1.1, 1.7], long_factor=[2.5, 4.2])),
}
# name: (family, ZeRO stage, document masking, activation checkpointing)
RUNS = {
    "zero3": ("llama", 3, False, False),
    "zero3 document mask": ("llama", 3, True, False),
    "gemma3 zero1 checkpointing": ("gemma3", 1, True, True),
    "gemma2 zero2": ("gemma2", 2, True, False),
    "phi3 zero0": ("phi3", 0, False, False),
}


def _ds_config(mb: int, gas: int, ranks: int, zero: int) -> dict:
    return {"train_batch_size": mb * gas * ranks, "train_micro_batch_size_per_gpu": mb,
            "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
            # Persistence threshold 0: ZeRO-3 partitions even these tiny parameters.
            "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WD,
                                                       "torch_adam": True}},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def _batches(vocab: int, step: int, n: int):
    """n sequences with ignored labels and several documents per row."""
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, vocab, (n, SEQ), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    seg = torch.cumsum((torch.rand(n, SEQ, generator=g) < 0.2).long(), dim=1)
    return ids, labels, seg


def _ref_step(ref, opt, ids, labels, seg, mb: int):
    """One clipped AdamW step of the plain model over the whole global batch (seg None: no
    document masking), in micro-batches of mb rows."""
    opt.zero_grad()
    tokens = float((labels != -100).sum())
    kw = [{} if seg is None else {"segment_ids": seg[i:i + mb]} for i in range(0, len(ids), mb)]
    loss = sum(ref(ids[i:i + mb], labels[i:i + mb], **kw[i // mb]) for i in range(0, len(ids), mb))
    (loss / tokens).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()]))
    coef = min(1.0, CLIP / (float(norm) + 1e-6))
    for p in ref.parameters():
        p.grad.mul_(coef)
    opt.step()
    return loss.detach().double() / tokens, norm


def cp2_run(rank: int, world: int, out: Path, label: str, model_dir: str, zero: int, document_mask: bool,
            checkpointing: bool) -> dict:
    """CP=2 through build_model / context_parallel / initialize / train_step against the plain
    model; the hidden states between blocks hold this rank's half of the positions; the trainer's
    validation (whole windows, CP off) matches the plain model after the steps."""
    import deepspeed

    from dist_tp_worker import _close, model_args, reference
    from megacpt.parallel import Topology
    from megacpt.train import step as train_step
    from megacpt.train.engine import param_groups
    from megacpt.train.evaluate import window_loss
    from megacpt.train.parallelize import BuildSpec, build_model, context_parallel, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    topo = Topology(world, rank, cp=2)
    args = model_args(model_dir)
    mb, gas = 1, 2
    ds_config = _ds_config(mb, gas, topo.grad_size, zero)
    spec = BuildSpec(args, dtype=torch.float32, zero_stage=zero, activation_checkpointing=checkpointing, seed=0)
    model = build_model(spec, topo, weights=model_dir, ds_config=ds_config)
    cp = context_parallel(args, topo)
    engine = initialize(model, param_groups(model, WD), ds_config, topo)
    if zero == 3:  # partitioned over the cp ranks, which hold the same parameters
        assert all(p.ds_tensor.numel() == -(-p.ds_numel // 2) for p in engine.module.parameters())
    shapes = set()
    engine.module.layers[0].register_forward_hook(lambda m, i, o: shapes.add(tuple(o.shape)))
    ref = reference(model_dir)
    ref_opt = torch.optim.AdamW(param_groups(ref, WD), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    for step in range(STEPS):
        ids, labels, seg = _batches(args.vocab_size, step, mb * gas * topo.dp_size)
        batches = [{"input_ids": ids[m * mb:(m + 1) * mb], "labels": labels[m * mb:(m + 1) * mb],
                    "segments": seg[m * mb:(m + 1) * mb], "fingerprint": m} for m in range(gas)]
        mine, tokens, fingerprint = train_step.global_batch(lambda d: batches, 0, 1)  # dp = 1: cp splits sequences
        got = train_step.train_step(engine, topo, zero, train_step.StepInputs(mine, tokens, fingerprint, gas, False,
                                                                              document_mask, cp=cp), {})
        want_loss, want_norm = _ref_step(ref, ref_opt, ids, labels, seg if document_mask else None, mb)
        _close(torch.tensor(got.loss, dtype=torch.float64), want_loss, f"{label} step {step} loss")
        _close(torch.tensor(got.grad_norm, dtype=torch.float64), want_norm, f"{label} step {step} grad norm")
    assert shapes == {(mb, SEQ // 2, args.hidden_size)}, shapes
    windows = torch.randint(0, args.vocab_size, (3, SEQ + 1), generator=torch.Generator().manual_seed(5))
    loss_sum, count = window_loss(engine, windows.numpy(), 1, topo, engine.device)
    with torch.no_grad():
        want = ref(windows[:, :-1], windows[:, 1:]).double() / windows[:, 1:].numel()
    _close(torch.tensor(loss_sum / count, dtype=torch.float64), want, f"{label} validation loss", rtol=1e-5, atol=1e-5)
    dist.barrier()
    return {"loss": got.loss, "hidden": sorted(shapes)}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_families")
    return {name: str(tiny_hf_model(root / name, perturb=True, **kw)) for name, kw in FAMILIES.items()}


@pytest.mark.slow
def test_cp2_matches_single_process(tmp_path, family_dirs):
    need_gloo()
    scenarios = [Scenario("test_cp:cp2_run", dict(label=name, model_dir=family_dirs[fam], zero=zero,
                                                  document_mask=doc, checkpointing=ckpt), name=name)
                 for name, (fam, zero, doc, ckpt) in RUNS.items()]
    results = run_scenarios(2, scenarios, tmp_path)
    # Both ranks of a run report the same (global) loss.
    for name in RUNS:
        assert results[name][0]["loss"] == results[name][1]["loss"], name
