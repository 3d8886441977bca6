"""Qwen3, Gemma 2, Gemma 3, OLMo 2 and Phi-3 under tensor (and sequence) and pipeline parallelism.

One launch per layout (TP=2, PP=2, ZeRO-3 over 2 ranks; tests/harness.py), each running every
family through the trainer's own construction (megacpt.train.parallelize) and step
(megacpt.train.step / pipeline.PipelineRun): 5 steps of token-mean loss and clipped global grad
norm equal the plain model in one process (rtol 1e-5, atol 1e-6, fp32), and under TP and PP the
DeepSpeed checkpoint consolidates (export's path) to exactly the HF weights. OLMo 2's full-width
q/k norm is refused for tp > 1 at config time (its RMS statistic spans all heads); its TP
scenario checks that the trainer's build refuses it. The export of each family's ZeRO-3
checkpoint reloads in transformers with the trainer's own validation loss (rel 1e-5).

The scenarios live in this file (the harness imports it on every rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness import Scenario, need_gloo, run_scenarios
from helpers import tiny_hf_model
from megacpt.errors import ConfigError
from megacpt.models.llama import ModelArgs

LR, WD, CLIP, STEPS, SEQ = 1e-3, 0.1, 0.05, 5, 12


def _longrope(n: int) -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=(1 + torch.rand(n, generator=g)).tolist(),
                long_factor=(1 + 4 * torch.rand(n, generator=g)).tolist(), partial_rotary_factor=0.5)


# Tiny fp32 configs as tests/test_families.py builds them; windows shorter than SEQ, both Gemma 3
# layer types with their own RoPE bases, soft-caps low enough to bind, a replicated KV head with
# a k norm (Gemma 3, kv_heads 1 under tp 2), partial rotary with longrope's long factors (Phi-3).
FAMILIES = {
    "qwen3": dict(arch="qwen3", head_dim=16, seed=31),
    "gemma2 tied": dict(arch="gemma2", tied=True, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                        attn_logit_softcapping=1.0, final_logit_softcapping=0.5, initializer_range=0.2, seed=32),
    "gemma3": dict(arch="gemma3", layers=3, kv_heads=1, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   final_logit_softcapping=0.5, rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}, seed=33),
    "olmo2 tied": dict(arch="olmo2", tied=True, seed=34),
    "phi3": dict(arch="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=_longrope(2),
                 original_max_position_embeddings=8, max_pos=64, seed=35),
}
# TP scenarios: ZeRO stage and sequence parallelism per family (both clipping paths, both TP modes).
TP_RUNS = {"qwen3": (1, True), "gemma2 tied": (0, False), "gemma3": (1, True), "olmo2 tied": (0, False),
           "phi3": (0, True)}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families_parallel")
    return {name: str(tiny_hf_model(root / name.replace(" ", "_"), perturb=True, **kw))
            for name, kw in FAMILIES.items()}


# ---- config-time refusal (no processes) ---------------------------------------------------------

def _tiny(**kw) -> ModelArgs:
    return ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, **kw)


def test_layouts_of_the_families():
    """Every family switch is split by TP and PP except OLMo 2's full-width q/k norm under TP,
    refused with a message that says why and what works instead."""
    from megacpt.parallel import validate_layout

    gemma = _tiny(norm_placement="sandwich", norm_form="one_plus_weight", qk_norm="head", embed_scale=5.0,
                  final_logit_softcap=30.0, local_rope_theta=10.0, layer_windows=[4, None])
    for args in (gemma, _tiny(qk_norm="head")):
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            validate_layout(args, 2, tp, pp, 1)
    olmo2 = _tiny(norm_placement="post", norm_form="weight_fp32", qk_norm="full")
    validate_layout(olmo2, 2, 1, 1, 3)
    validate_layout(olmo2, 2, 1, 2, 1)
    with pytest.raises(ConfigError) as e:
        validate_layout(olmo2, 2, 2, 1, 1)
    msg = str(e.value)
    for fragment in ("full-width q/k norm (qk_norm='full', OLMo 2)", "RMS statistic spans all heads",
                     "tp=1 pp=1 (dp=2), tp=1 pp=2 (dp=1)"):
        assert fragment in msg, msg


def test_init_and_split_of_gemma_like_model():
    """The layout-independent init starts (1 + w) norms at 0 (the identity), as RMSNorm does;
    under TP the per-head q/k norms stay whole, uncounted on rank 1 of a norm, and sum their
    gradients (HeadParallelRMSNorm); the final soft-cap moves to the vocab-parallel head."""
    from types import SimpleNamespace

    from megacpt.models.llama import Transformer
    from megacpt.parallel import apply_tp, init_tp_weights, tp_shards
    from megacpt.parallel.tp import HeadParallelRMSNorm, SequenceParallelRMSNorm

    args = _tiny(norm_placement="sandwich", norm_form="one_plus_weight", qk_norm="head", final_logit_softcap=3.0,
                 tie_word_embeddings=True)
    with torch.device("meta"):
        plain = Transformer(args)
    init_tp_weights(plain, seed=1)
    full = dict(plain.named_parameters())
    norms = [n for n in full if n.endswith("norm.weight")]
    assert len(norms) == 2 * (4 + 2) + 1 and all(torch.equal(full[n], torch.zeros_like(full[n])) for n in norms)
    for r in range(2):
        with torch.device("meta"):
            m = Transformer(args)
        apply_tp(m, SimpleNamespace(tp_size=2, tp_rank=r, tp_group=None, tp_subgroup=lambda size: None),
                 sequence_parallel=True)
        layer = m.layers[1]
        assert isinstance(layer.self_attn.q_norm, HeadParallelRMSNorm) and layer.self_attn.k_norm.weight.shape == (8,)
        assert all(isinstance(getattr(layer, n), SequenceParallelRMSNorm) for n in layer.norm_names)
        assert m.lm_head.softcap == 3.0
        init_tp_weights(m, seed=1)
        shards = tp_shards(m)
        for n, p in m.named_parameters():
            assert torch.equal(p, full[n][shards[n].index()] if n in shards else full[n]), n
            assert (n in shards) == hasattr(p, "tensor_model_parallel"), n


# ---- multi-process scenarios ----------------------------------------------------------------------

def _batches(args, step: int, n: int):
    """n sequences with ignored labels and several documents per row (document masking on)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, args.vocab_size, (n, SEQ), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    seg = torch.cumsum((torch.rand(n, SEQ, generator=g) < 0.2).long(), dim=1)
    return ids, labels, seg


def _ds_config(mb: int, gas: int, dp: int, zero: int) -> dict:
    return {"train_batch_size": mb * gas * dp, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
            "gradient_clipping": CLIP, "zero_optimization": {"stage": zero},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WD,
                                                       "torch_adam": True}},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def _ref_step(ref, opt, ids, labels, seg, mb: int):
    """One clipped AdamW step of the plain model over the global batch, run in micro-batches of
    mb rows as the ranks run it (longrope picks its factors per batch, from its longest position)."""
    opt.zero_grad()
    tokens = float((labels != -100).sum())
    loss = sum(ref(ids[i:i + mb], labels[i:i + mb], segment_ids=seg[i:i + mb]) for i in range(0, len(ids), mb))
    (loss / tokens).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()]))
    coef = min(1.0, CLIP / (float(norm) + 1e-6))
    for p in ref.parameters():
        p.grad.mul_(coef)
    opt.step()
    return loss.detach().double() / tokens, norm


def _compare_steps(model_dir: str, label: str, step_fn, topo, mb: int, gas: int) -> None:
    """STEPS steps of `step_fn(StepInputs)` against the plain model on the same global batch."""
    from dist_tp_worker import _close, model_args, reference
    from megacpt.train.engine import param_groups
    from megacpt.train.step import StepInputs, global_batch

    args = model_args(model_dir)
    ref = reference(model_dir)
    ref_opt = torch.optim.AdamW(param_groups(ref, WD), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    dp = topo.dp_size
    for step in range(STEPS):
        ids, labels, seg = _batches(args, step, mb * gas * dp)
        def rank_batches(d, ids=ids, labels=labels, seg=seg):
            return [{"input_ids": ids[lo:lo + mb], "labels": labels[lo:lo + mb], "segments": seg[lo:lo + mb],
                     "fingerprint": lo} for lo in (m * mb * dp + d * mb for m in range(gas))]

        out = step_fn(StepInputs(*global_batch(rank_batches, topo.dp_rank, dp), gas, False, use_segments=True))
        ref_loss, ref_norm = _ref_step(ref, ref_opt, ids, labels, seg, mb)
        _close(torch.tensor(out.loss, dtype=torch.float64), ref_loss, f"{label} step {step} loss")
        _close(torch.tensor(out.grad_norm, dtype=torch.float64), ref_norm, f"{label} step {step} grad norm")


def tp2_family(rank: int, world: int, out: Path, label: str, model_dir: str, zero: int,
               sequence_parallel: bool) -> None:
    """TP=2 through build_model / initialize / train_step, or the build's refusal (OLMo 2)."""
    import deepspeed

    from dist_tp_worker import check_checkpoint_round_trip, model_args
    from megacpt.parallel import Topology
    from megacpt.train import step as train_step
    from megacpt.train.engine import param_groups
    from megacpt.train.parallelize import BuildSpec, build_model, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    topo = Topology(world, rank, tp=2, pp=1)
    args = model_args(model_dir)
    mb, gas = 1, 2
    ds_config = _ds_config(mb, gas, topo.dp_size, zero)
    spec = BuildSpec(args, dtype=torch.float32, zero_stage=zero, sequence_parallel=sequence_parallel, seed=0)
    if args.qk_norm == "full":
        with pytest.raises(ConfigError, match="full-width q/k norm"):
            build_model(spec, topo, weights=model_dir, ds_config=ds_config)
        return
    model = build_model(spec, topo, weights=model_dir, ds_config=ds_config)
    engine = initialize(model, param_groups(model, WD), ds_config, topo)
    # HF → TP → DeepSpeed checkpoint → consolidated weights (export's path) is exact.
    check_checkpoint_round_trip(engine, model_dir, out / "ckpt")
    _compare_steps(model_dir, label, lambda inputs: train_step.train_step(engine, topo, zero, inputs, {}), topo,
                   mb, gas)
    dist.barrier()


def zero3_family(rank: int, world: int, out: Path, label: str, model_dir: str) -> dict:
    """ZeRO-3 over 2 data-parallel ranks through build_model (partitioned while built, each rank
    loading its flat partition) / initialize / train_step."""
    import deepspeed

    from dist_tp_worker import model_args
    from megacpt.parallel import Topology
    from megacpt.train import step as train_step
    from megacpt.train.engine import param_groups
    from megacpt.train.parallelize import BuildSpec, build_model, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    topo = Topology(world, rank)
    mb, gas, zero = 1, 1, 3
    ds_config = _ds_config(mb, gas, topo.dp_size, zero)
    model = build_model(BuildSpec(model_args(model_dir), dtype=torch.float32, zero_stage=zero), topo,
                        weights=model_dir, ds_config=ds_config)
    engine = initialize(model, param_groups(model, WD), ds_config, topo)
    _compare_steps(model_dir, label, lambda inputs: train_step.train_step(engine, topo, zero, inputs, {}), topo,
                   mb, gas)
    return _validate_and_save(engine, topo, model_dir, out)


def _validation_windows(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, SEQ + 1), generator=torch.Generator().manual_seed(77))


def _validate_and_save(engine, topo, model_dir: str, out: Path) -> dict:
    """The trainer's validation loss on fixed windows, and a megacpt checkpoint (what export reads)."""
    from megacpt.models.hf import read_hf_config
    from megacpt.train import checkpoint as ckpt
    from megacpt.train.evaluate import window_loss

    windows = _validation_windows(engine.module.args.vocab_size).numpy()
    loss_sum, count = window_loss(engine, windows, 1, topo, engine.device)
    path = ckpt.save(engine, out / "ckpt", STEPS, {"step": STEPS, "source_dir": model_dir},
                     read_hf_config(model_dir), keep=1, rank=dist.get_rank())
    dist.barrier()
    return {"valid_loss": loss_sum / count, "checkpoint": str(path)}


def pp2_family(rank: int, world: int, out: Path, label: str, model_dir: str) -> None:
    """PP=2 (ZeRO-1) through build_pipeline / PipelineRun."""
    import deepspeed

    from dist_tp_worker import check_checkpoint_round_trip, model_args
    from megacpt.parallel import Topology
    from megacpt.train import pipeline
    from megacpt.train.engine import param_groups
    from megacpt.train.parallelize import BuildSpec, build_pipeline

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    topo = Topology(world, rank, tp=1, pp=2)
    args = model_args(model_dir)
    mb, gas, zero = 1, 2, 1
    ds_config, own_clip = pipeline.ds_config_for(_ds_config(mb, gas, topo.dp_size, zero), zero, torch.float32)
    module, state = build_pipeline(BuildSpec(args, dtype=torch.float32, pp_balance="layers", seed=0), topo,
                                   weights=model_dir)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, WD), config=ds_config)
    run = pipeline.PipelineRun(engine, state, topo, own_clip)
    check_checkpoint_round_trip(engine, model_dir, out / "ckpt")  # per-layer files → HF names, exact
    _compare_steps(model_dir, label, lambda inputs: run.train_step(inputs, {}), topo, mb, gas)
    dist.barrier()


@pytest.mark.slow
def test_tp2_families_match_single_process(tmp_path, family_dirs):
    need_gloo()
    scenarios = [Scenario("test_families_parallel:tp2_family",
                          dict(label=f"tp2 {name}", model_dir=path, zero=TP_RUNS[name][0],
                               sequence_parallel=TP_RUNS[name][1]), name=f"tp2 {name}")
                 for name, path in family_dirs.items()]
    run_scenarios(2, scenarios, tmp_path)


@pytest.mark.slow
def test_pp2_families_match_single_process(tmp_path, family_dirs):
    need_gloo()
    scenarios = [Scenario("test_families_parallel:pp2_family", dict(label=f"pp2 {name}", model_dir=path),
                          name=f"pp2 {name}") for name, path in family_dirs.items()]
    run_scenarios(2, scenarios, tmp_path)


@pytest.mark.slow
def test_zero3_families_match_single_process(tmp_path, family_dirs):
    need_gloo()
    scenarios = [Scenario("test_families_parallel:zero3_family", dict(label=f"zero3 {name}", model_dir=path),
                          name=f"zero3 {name}") for name, path in family_dirs.items()]
    results = run_scenarios(2, scenarios, tmp_path)
    _exports_reload_with_the_same_perplexity(results, family_dirs, tmp_path)


def _exports_reload_with_the_same_perplexity(results: dict, family_dirs: dict, tmp_path: Path) -> None:
    """The export of each family's 2-rank ZeRO-3 checkpoint loads in transformers, whose loss on
    the validation windows equals the one the trainer's validation measured (rel 1e-5)."""
    import transformers

    from megacpt.export import export

    for name in family_dirs:
        got = results[f"zero3 {name}"][0]
        out = export(got["checkpoint"], tmp_path / f"export_{name.replace(' ', '_')}")
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        windows = _validation_windows(model.config.vocab_size)
        with torch.no_grad():
            logits = model(windows[:, :-1]).logits
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten())
        assert abs(got["valid_loss"] / float(ref) - 1) < 1e-5, (name, got["valid_loss"], float(ref))
