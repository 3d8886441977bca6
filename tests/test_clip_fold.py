"""Gradient clipping folded into the fused AdamW step under ZeRO-1/2 (megacpt/train/clip_fold.py).

One launch of 2 gloo ranks (tests/harness.py): a tiny Llama trained 3 steps with a clip small
enough to bind at every step, under ZeRO-1 and ZeRO-2, fp32 and bf16, once through megacpt's
initialize (clipping folded: DeepSpeed's own clip off) and once through deepspeed.initialize as
released (DeepSpeed clips). fp32 masters and Adam moments agree to rounding (g / c against
g * (1/c)); the same run without clipping differs far beyond that, so the clip is really applied.
ZeRO-3 keeps DeepSpeed's clip. The scenarios live in this file (the harness imports it on every rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness import Scenario, need_gloo, run_scenarios
from helpers import tiny_hf_model

CLIP, SEQ, STEPS = 0.05, 16, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ds_config(stage: int, dtype: torch.dtype, clip: float) -> dict:
    from megacpt.train.engine import bf16_config

    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "gradient_clipping": clip, "bf16": bf16_config(dtype), "fp16": {"enabled": False},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "weight_decay": 0.1, "torch_adam": True, "fused": True}},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}


def train(rank: int, world: int, out: Path, model_dir: str, stage: int, dtype: str, released: bool,
          clip: float = CLIP) -> dict:
    """Three steps; this rank's fp32 masters and moments saved, the norms and whether clipping was folded."""
    import deepspeed

    from dist_tp_worker import model_args
    from megacpt.train.engine import param_groups
    from megacpt.train.parallelize import BuildSpec, build_model, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ds = _ds_config(stage, DTYPES[dtype], clip)
    model = build_model(BuildSpec(model_args(model_dir), dtype=DTYPES[dtype], zero_stage=stage), weights=model_dir,
                        ds_config=ds)
    groups = param_groups(model, 0.1)
    if released:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    else:
        engine = initialize(model, groups, ds, None)
    opt = engine.optimizer
    norms = []
    w = engine.module.embed_tokens.weight
    vocab = getattr(w, "ds_shape", w.shape)[0]
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        x = torch.randint(0, vocab, (2, SEQ + 1), generator=g)
        engine.backward(engine(x[:, :-1], labels=x[:, 1:]))
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    masters = opt.single_partition_of_fp32_groups if stage < 3 else opt.fp32_partitioned_groups_flat
    state = {"masters": [m.detach().clone() for m in masters],
             "moments": [{k: v.clone() for k, v in opt.optimizer.state[m].items()} for m in masters]}
    path = out / f"{stage}-{dtype}-{released}-{clip}-rank{rank}.pt"
    torch.save(state, path)
    return {"state": str(path), "norms": norms, "ds_clip": float(opt.clip_grad),
            "hooks": len(opt.optimizer._optimizer_step_pre_hooks)}


def _assert_close_states(a: str, b: str) -> None:
    sa, sb = torch.load(a), torch.load(b)
    assert len(sa["masters"]) == len(sb["masters"]) > 0
    for ma, mb in zip(sa["masters"], sb["masters"]):
        torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-6)
    for da, db in zip(sa["moments"], sb["moments"]):
        assert int(da["step"]) == int(db["step"]) == STEPS
        torch.testing.assert_close(da["exp_avg"], db["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(da["exp_avg_sq"], db["exp_avg_sq"], rtol=1e-5, atol=1e-10)


def test_clip_scale_is_deepspeeds_formula():
    from megacpt.train.clip_fold import clip_scale

    got = [clip_scale(torch.tensor(n), 1.0, "cpu").item() for n in (0.5, 1.0, 3.0, -1.0, float("nan"), float("inf"))]
    assert got[:3] == pytest.approx([1.0, 1.000001, 3.000001], rel=1e-7)
    assert got[3:] == [float("inf")] * 3


_CASES = [(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]


def test_folded_clipping_equals_deepspeeds(tmp_path):
    need_gloo()
    model = str(tiny_hf_model(tmp_path / "model", perturb=True))
    scenarios = []
    for stage, dtype in _CASES:
        for released in (True, False):
            scenarios.append(Scenario("test_clip_fold:train", dict(model_dir=model, stage=stage, dtype=dtype,
                                                                  released=released),
                                      name=f"zero{stage}-{dtype}-{'released' if released else 'folded'}"))
    scenarios.append(Scenario("test_clip_fold:train", dict(model_dir=model, stage=1, dtype="fp32", released=True,
                                                          clip=0.0), name="zero1-fp32-unclipped"))
    scenarios.append(Scenario("test_clip_fold:train", dict(model_dir=model, stage=3, dtype="fp32", released=False),
                               name="zero3-fp32"))
    res = run_scenarios(2, scenarios, tmp_path)
    out = [res[s.label] for s in scenarios]
    for i, (stage, dtype) in enumerate(_CASES):
        released, folded = out[2 * i], out[2 * i + 1]
        for rank in range(2):
            assert released[rank]["ds_clip"] == CLIP and released[rank]["hooks"] == 0
            assert folded[rank]["ds_clip"] == 0.0 and folded[rank]["hooks"] == 1, f"ZeRO-{stage} {dtype}: not folded"
            # the clip binds at every step: the norms are far above it
            assert min(released[rank]["norms"]) > 10 * CLIP
            torch.testing.assert_close(folded[rank]["norms"], released[rank]["norms"], rtol=1e-5, atol=0)
            _assert_close_states(released[rank]["state"], folded[rank]["state"])
    unclipped, zero3 = out[-2], out[-1]
    for rank in range(2):
        clipped, free = torch.load(out[0][rank]["state"]), torch.load(unclipped[rank]["state"])
        gap = max((a - b).abs().max().item() for a, b in zip(clipped["masters"], free["masters"]))
        assert gap > 1e-3, f"clipping made no difference ({gap}): the comparison above would not see a missing clip"
        assert zero3[rank]["ds_clip"] == CLIP and zero3[rank]["hooks"] == 0
