"""fp32 ZeRO-3 keeps one copy of the weights (megacpt/train/zero3_masters.py, issue 23).

One launch of 2 gloo ranks (tests/harness.py), a tiny Llama cut into several optimizer sub-groups
(so the shared masters are views at non-zero offsets of DeepSpeed's flat parameter buffer):
  - DeepSpeed as released (deepspeed.initialize called directly) still keeps a separate fp32
    master copy: when an upstream release stops doing so, this test says to drop the fix;
  - through megacpt's initialize the masters share the parameter partitions' memory, and three
    steps (two, a checkpoint, one more) give bit-identical weights, masters and Adam moments to
    DeepSpeed as released, with 4 bytes per parameter less per rank;
  - the checkpoint loads into a fresh engine with the sharing intact, and its next step matches;
  - bf16 (separate fp32 masters by design) is left alone.

The scenarios live in this file (the harness imports it on every rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness import Scenario, need_gloo, run_scenarios
from helpers import tiny_hf_model

WD, SEQ, STEPS = 0.1, 16, 3
# Elements per optimizer sub-group: the tiny model's ~13k elements per rank fall into 4 sub-groups.
SUB_GROUP = 4000
UPSTREAM_FIXED = ("DeepSpeed {version} no longer keeps a separate fp32 master copy under fp32 ZeRO-3 (sub-group {i}: "
                  "{why}); the device/string comparison in deepspeed/runtime/zero/stage3.py _create_fp32_partitions "
                  "is fixed upstream, so megacpt/train/zero3_masters.py has nothing left to do: delete it, its call "
                  "in megacpt/train/parallelize.py:initialize and this test")


def _ds_config(dtype: torch.dtype, world: int) -> dict:
    return {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": False},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": SUB_GROUP},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "weight_decay": WD, "torch_adam": True, "fused": True}},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}


def _engine(model_dir: str, world: int, dtype: torch.dtype = torch.float32, released: bool = False, say=print):
    """A ZeRO-3 engine built as the trainer builds it; `released`: deepspeed.initialize called
    directly, without megacpt's fix."""
    import deepspeed

    from dist_tp_worker import model_args
    from megacpt.train.engine import param_groups
    from megacpt.train.parallelize import BuildSpec, build_model, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ds = _ds_config(dtype, world)
    model = build_model(BuildSpec(model_args(model_dir), dtype=dtype, zero_stage=3), weights=model_dir, ds_config=ds)
    groups = param_groups(model, WD)
    if released:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
        return engine
    return initialize(model, groups, ds, None, say=say)


def _steps(engine, steps) -> None:
    vocab = engine.module.embed_tokens.weight.ds_shape[0]
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        x = torch.randint(0, vocab, (2, SEQ + 1), generator=g)
        loss = engine(x[:, :-1], labels=x[:, 1:])
        engine.backward(loss)
        engine.step()


def _save_state(engine, path: Path) -> str:
    """The whole weights, this rank's masters and its Adam moments (by sub-group)."""
    import deepspeed

    opt = engine.optimizer
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    masters = [m.detach().clone() for m in opt.fp32_partitioned_groups_flat]
    moments = [{k: v.clone() for k, v in opt.optimizer.state[m].items()} for m in opt.fp32_partitioned_groups_flat]
    torch.save({"weights": weights, "masters": masters, "moments": moments}, path)
    return str(path)


def _copies(opt) -> list[tuple[int, str]]:
    """(sub-group, why) for each fp32 master that is not a separate copy of its parameter partition."""
    out = []
    for i, (m, lp) in enumerate(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)):
        if m.untyped_storage().data_ptr() == lp.untyped_storage().data_ptr():
            out.append((i, "it shares the parameter partition's storage"))
        elif m.dtype != lp.dtype or m.numel() != lp.numel():
            out.append((i, f"master {m.dtype} × {m.numel()}, partition {lp.dtype} × {lp.numel()}"))
    return out


def _check_shared(opt) -> None:
    """Every master is its parameter partition's memory (same address, length and dtype), and
    the inner optimizer's state, if any, is keyed by exactly these master tensors."""
    masters = opt.fp32_partitioned_groups_flat
    assert len(masters) > 2, "the test wants several sub-groups"
    for i, (m, lp) in enumerate(zip(masters, opt.fp16_partitioned_groups_flat)):
        assert (m.data_ptr(), m.numel(), m.dtype) == (lp.data_ptr(), lp.numel(), lp.dtype), i
    state = opt.optimizer.state
    assert not state or {id(k) for k in state} == {id(m) for m in masters}
    for group in opt.optimizer.param_groups:
        assert group["params"] == []  # DeepSpeed hands a group its master only around each step


def released_keeps_a_copy(rank: int, world: int, out: Path, model_dir: str) -> dict:
    """DeepSpeed as released: separate fp32 masters (equal to the parameters); after three steps
    its weights, masters and moments are the reference for the fixed engine."""
    import deepspeed

    from megacpt.train.metrics import measure_engine

    engine = _engine(model_dir, world, released=True)
    opt = engine.optimizer
    for i, why in _copies(opt):
        raise AssertionError(UPSTREAM_FIXED.format(version=deepspeed.__version__, i=i, why=why))
    for m, lp in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
        assert torch.equal(m, lp)
    _steps(engine, range(STEPS))
    return {"memory": measure_engine(engine), "state": _save_state(engine, out / f"rank{rank}.pt")}


def fixed_shares_the_partitions(rank: int, world: int, out: Path, model_dir: str, ckpt: str) -> dict:
    """Through megacpt's initialize: masters shared from the start, through the steps and a
    checkpoint save; one message, on rank 0."""
    from megacpt.train.metrics import measure_engine

    said: list[str] = []
    engine = _engine(model_dir, world, say=said.append)
    assert len(said) == (1 if rank == 0 else 0) and all("share the parameter partitions" in s for s in said), said
    _check_shared(engine.optimizer)
    _steps(engine, range(STEPS - 1))
    engine.save_checkpoint(ckpt, tag="two")
    _steps(engine, [STEPS - 1])
    _check_shared(engine.optimizer)
    return {"memory": measure_engine(engine), "state": _save_state(engine, out / f"rank{rank}.pt")}


def fixed_resumes(rank: int, world: int, out: Path, model_dir: str, ckpt: str) -> dict:
    """A fresh engine loads the checkpoint saved after two steps: the sharing holds, and the third step
    gives the state of the uninterrupted run."""
    engine = _engine(model_dir, world)
    engine.load_checkpoint(ckpt, tag="two", load_optimizer_states=True, load_lr_scheduler_states=False)
    _check_shared(engine.optimizer)
    _steps(engine, [STEPS - 1])
    _check_shared(engine.optimizer)
    return {"state": _save_state(engine, out / f"rank{rank}.pt")}


def bf16_left_alone(rank: int, world: int, out: Path, model_dir: str) -> None:
    said: list[str] = []
    engine = _engine(model_dir, world, dtype=torch.bfloat16, say=said.append)
    assert said == []
    opt = engine.optimizer
    for m, lp in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
        assert m.dtype == torch.float32 and lp.dtype == torch.bfloat16
        assert m.untyped_storage().data_ptr() != lp.untyped_storage().data_ptr()


def _assert_same_state(a: str, b: str, what: str) -> None:
    sa, sb = torch.load(a), torch.load(b)
    assert sa["weights"].keys() == sb["weights"].keys()
    for n in sa["weights"]:
        assert torch.equal(sa["weights"][n], sb["weights"][n]), f"{what}: weight {n}"
    assert len(sa["masters"]) == len(sb["masters"]) > 2
    for i, (ma, mb) in enumerate(zip(sa["masters"], sb["masters"])):
        assert torch.equal(ma, mb), f"{what}: master {i}"
    for i, (ma, mb) in enumerate(zip(sa["moments"], sb["moments"])):
        assert ma.keys() == mb.keys() >= {"exp_avg", "exp_avg_sq", "step"}, f"{what}: moments {i}"
        for k in ma:
            assert torch.equal(ma[k], mb[k]), f"{what}: {k} of sub-group {i}"
    # not vacuous: STEPS optimizer steps ran, with non-zero updates
    assert all(int(m["step"]) == STEPS and m["exp_avg"].abs().sum() > 0 for m in sa["moments"])


@pytest.mark.slow
def test_fp32_zero3_masters_share_the_parameter_partitions(tmp_path):
    need_gloo()
    model = str(tiny_hf_model(tmp_path / "model", perturb=True))
    ckpt = str(tmp_path / "ckpt")
    res = run_scenarios(2, [
        Scenario("test_zero3_masters:released_keeps_a_copy", dict(model_dir=model)),
        Scenario("test_zero3_masters:fixed_shares_the_partitions", dict(model_dir=model, ckpt=ckpt)),
        Scenario("test_zero3_masters:fixed_resumes", dict(model_dir=model, ckpt=ckpt)),
        Scenario("test_zero3_masters:bf16_left_alone", dict(model_dir=model)),
    ], tmp_path)
    released = res["test_zero3_masters:released_keeps_a_copy"]
    fixed = res["test_zero3_masters:fixed_shares_the_partitions"]
    resumed = res["test_zero3_masters:fixed_resumes"]
    for rank in range(2):
        _assert_same_state(released[rank]["state"], fixed[rank]["state"], f"rank {rank}, fixed vs released")
        _assert_same_state(fixed[rank]["state"], resumed[rank]["state"], f"rank {rank}, resumed vs uninterrupted")
        before, after = released[rank]["memory"], fixed[rank]["memory"]
        assert before["fp32_master"] == before["params"] > 0 and not before["fp32_master_shared"]
        assert after["fp32_master"] == 0 and after["fp32_master_shared"]
        assert after["model_state"] == before["model_state"] - before["params"]
        # 4 bytes of parameters (= masters), 4 of gradients, 8 of Adam moments (+ one step scalar
        # per sub-group) per element of this rank's partition
        assert after["model_state"] <= 16 * after["params"] // 4 + 64
