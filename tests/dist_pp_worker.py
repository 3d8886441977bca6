"""Scenarios for tests/test_pp.py (run on every rank by tests/harness.py): pipeline layouts
through DeepSpeed's real PipelineEngine, built and stepped by the trainer's own code
(megacpt.train.pipeline), against the plain model in one process on the same global batch.

Each scenario checks, on every rank: the stage holds exactly its own layers (names and element
counts; 1/tp of the split ones), ZeRO partitions over the data-parallel group only, HF → layout
→ checkpoint → consolidated HF weights is exact, then 5 steps of token-mean loss and clipped
global grad norm (rtol 1e-5, atol 1e-6) with document masking on, and afterwards the local
weights (both copies of a tied embedding included) against the reference's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dist_tp_worker import ADAM_ATOL, IGNORE, _close, model_args, reference

LR, WD, CLIP = 1e-3, 0.1, 0.05


def _batches(args, step: int, n: int, s: int = 12):
    """n sequences of the global batch, with ignored labels and several documents per row."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, args.vocab_size, (n, s), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[0, :3] = IGNORE
    seg = torch.cumsum((torch.rand(n, s, generator=g) < 0.2).long(), dim=1)
    return ids, labels, seg


def _ref_step(ref, opt, ids, labels, seg, clip):
    opt.zero_grad()
    tokens = float((labels != IGNORE).sum())
    loss = ref(ids, labels, segment_ids=seg)
    (loss / tokens).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()]))
    coef = min(1.0, clip / (float(norm) + 1e-6))
    for p in ref.parameters():
        p.grad.mul_(coef)
    opt.step()
    return loss.detach().double() / tokens, norm


def expected_stage_names(args, pp_rank: int, pp: int, bounds: list[int]) -> list[str]:
    names = []
    if pp_rank == 0:
        names.append("embed_tokens.weight")
    for i in range(bounds[pp_rank], bounds[pp_rank + 1]):
        names += [f"layers.{i}.{n}" for n in (
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
            "post_attention_layernorm.weight")]
        if args.qkv_bias:
            names += [f"layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
    if pp_rank == pp - 1:
        names += ["norm.weight", "lm_head.weight"]
    return sorted(names)


def check_pipeline(model_dir: str, topo, zero: int, label: str, work: Path, steps: int = 5, mb: int = 1,
                   gas: int = 2) -> None:
    import deepspeed

    from megacpt.models.hf import HFWeights
    from megacpt.models.llama import Transformer
    from megacpt.parallel import apply_tp, tp_shards
    from megacpt.parallel.pp import megacpt_name, stage_bounds
    from megacpt.train import pipeline
    from megacpt.train.consolidate import checkpoint_weights
    from megacpt.train.engine import param_groups
    from megacpt.train.parallelize import BuildSpec, build_pipeline
    from megacpt.train.step import StepInputs, global_batch

    args = model_args(model_dir)
    dp = topo.dp_size
    ds_config = {
        "train_batch_size": mb * gas * dp, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP, "zero_optimization": {"stage": zero},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
    }
    ds_config, own_clip = pipeline.ds_config_for(ds_config, zero, torch.float32)
    spec = BuildSpec(args, dtype=torch.float32, pp_balance="parameters", seed=0,
                     activation_checkpointing=label.endswith("ckpt"))
    module, state = build_pipeline(spec, topo, weights=model_dir)
    bounds = stage_bounds(args, topo.pp_size, "parameters")
    assert module.layer_bounds == bounds

    # This rank holds its stage's parameters only (tp slices of the split ones), under HF names.
    local = {megacpt_name(n): p for n, p in module.named_parameters()}
    want = expected_stage_names(args, topo.pp_rank, topo.pp_size, bounds)
    assert sorted(local) == want, f"{label} rank {topo.rank}: {sorted(local)} != {want}"
    ref = reference(model_dir)
    ref_params = dict(ref.named_parameters())
    ref_params.setdefault("lm_head.weight", ref.lm_head.weight)  # tied: the last stage's copy
    with torch.device("meta"):
        meta = Transformer(args)
    apply_tp(meta, topo)
    shards = tp_shards(meta)  # a tied head's slice is the embedding's
    for n, p in local.items():
        full = ref_params[n]
        exp = full[shards[n].index()] if shards.get(n) is not None else full
        assert tuple(p.shape) == tuple(exp.shape), f"{label}: {n} local shape {tuple(p.shape)} vs {tuple(exp.shape)}"
        assert torch.equal(p.detach(), exp.detach()), f"{label}: {n} not loaded exactly"

    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, WD), config=ds_config)
    if zero == 1:
        assert dist.get_process_group_ranks(engine.optimizer.dp_process_group) == topo.dp_ranks, label
        assert engine.optimizer.partition_count == [dp] * len(engine.optimizer.partition_count)
    run = pipeline.PipelineRun(engine, state, topo, own_clip)

    # HF → layout → checkpoint → consolidated weights, exact.
    root = work / label.replace(" ", "_")
    if topo.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag="t0", save_latest=False)
    dist.barrier()
    if topo.rank == 0:
        shutil.copy(Path(model_dir) / "config.json", root / "t0" / "hf_config.json")
        got = checkpoint_weights(root / "t0")
        hf = HFWeights(model_dir)
        names = [n for n in hf.keys()]
        for n in names:
            assert torch.equal(got.get(n).float(), hf.get(n).float()), f"{label}: round trip of {n} not exact"
    dist.barrier()

    ref_opt = torch.optim.AdamW(param_groups(ref, WD), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    for step in range(steps):
        ids, labels, seg = _batches(args, step, mb * gas * dp)
        def rank_batches(d, ids=ids, labels=labels, seg=seg):
            return [{"input_ids": ids[lo:lo + mb], "labels": labels[lo:lo + mb], "segments": seg[lo:lo + mb],
                     "fingerprint": lo} for lo in (m * mb * dp + d * mb for m in range(gas))]

        batches, tokens, fingerprint = global_batch(rank_batches, topo.dp_rank, dp)
        for g in engine.optimizer.param_groups:
            g["lr"] = LR
        out = run.train_step(StepInputs(batches, tokens, fingerprint, gas, False, use_segments=True), {})
        ref_loss, ref_norm = _ref_step(ref, ref_opt, ids, labels, seg, CLIP)
        _close(torch.tensor(out.loss, dtype=torch.float64), ref_loss, f"{label} step {step} loss")
        _close(torch.tensor(out.grad_norm, dtype=torch.float64), ref_norm, f"{label} step {step} grad norm")
    ref_params = dict(ref.named_parameters())
    ref_params.setdefault("lm_head.weight", ref.lm_head.weight)
    for n, p in engine.module.named_parameters():
        n = megacpt_name(n)
        full = ref_params[n].detach()
        exp = full[shards[n].index()] if shards.get(n) is not None else full
        _close(p.detach(), exp, f"{label} param {n} after {steps} steps", atol=ADAM_ATOL)
    # The checkpoint read back layout-free (what a resume in another layout starts from): full
    # fp32 weights and Adam moments equal the reference's, and the step count.
    engine.save_checkpoint(str(root), tag="t5", save_latest=False)
    dist.barrier()
    if topo.rank == 0:
        from megacpt.train.relayout import read_layout_free

        full, adam_step = read_layout_free(root / "t5", args, {"tp": topo.tp_size, "pp": topo.pp_size,
                                                               "zero_stage": zero})
        assert adam_step == steps, adam_step
        ref_state = {n: ref_opt.state[p] for n, p in ref.named_parameters()}
        assert sorted(full) == sorted(ref_state), sorted(set(full) ^ set(ref_state))
        for n, st in full.items():
            _close(st["fp32"], ref_params[n].detach(), f"{label} layout-free weight {n}", atol=ADAM_ATOL)
            _close(st["exp_avg"], ref_state[n]["exp_avg"], f"{label} exp_avg {n}", rtol=1e-4, atol=1e-8)
            _close(st["exp_avg_sq"], ref_state[n]["exp_avg_sq"], f"{label} exp_avg_sq {n}", rtol=1e-4, atol=1e-10)
    dist.barrier()
    # Validation through the engine's inference schedule equals the plain model's loss sum.
    windows = torch.randint(0, args.vocab_size, (3, 13), generator=torch.Generator().manual_seed(5)).numpy()
    loss_sum, count = run.evaluate(windows, mb)
    with torch.no_grad():
        t = torch.from_numpy(windows)
        want_sum = float(ref(t[:, :-1], t[:, 1:]))
    assert count == 3 * 12, count
    _close(torch.tensor(loss_sum), torch.tensor(want_sum), f"{label} eval loss sum")
    dist.barrier()


def pipeline_layout(rank: int, world: int, out: Path, label: str, model_dir: str, tp: int, pp: int,
                    zero: int) -> None:
    """One (label, model_dir, tp, pp, zero) scenario."""
    import deepspeed

    from megacpt.parallel import Topology

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    topo = Topology(world, rank, tp=tp, pp=pp)
    check_pipeline(model_dir, topo, zero, label, out)
