"""LoRA adapters (`adapter:`): PEFT is the independent reference.

In-process: the config and its refusals, the adapted linear against PEFT's own LoRA layer, bad
input to export/train (exit 2, nothing written). Launched once per module (launches are the
expensive part) on a Qwen2-shaped model whose vocabulary megacpt extend-vocab grew, training the
adapter plus embed_tokens and lm_head (modules_to_save): one process (ZeRO-3 on one rank), the
same stopped after 2 steps and resumed, ZeRO-3 over 2 data-parallel ranks, TP=2 (ZeRO-1). Then:
equal losses and gradient norms across layouts, a bit-identical resume, a base left bit for bit,
optimizer state for the trained parameters only, and the exported adapter loaded by peft.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest_data import hf_tokenizer_dir  # noqa: F401 (fixture)
from helpers import (REPO, assert_runs_match, checkpoint_tensors, cpu_env, free_port, tiny_hf_model, tiny_run_config,
                     train_losses, write_config)
from megacpt.cli import main

ADAPTER = {"r": 4, "alpha": 8, "modules_to_save": ["embed_tokens", "lm_head"]}
ZERO3_SHARDED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
NEW_TOKENS = [" Straßenbahnhaltestelle", " Donaudampfschiff", " Quatschkopf"]
# Parameters after Adam steps in another layout (see tests/dist_tp_worker.py ADAM_ATOL).
ADAM_ATOL = 1e-5


# ---- config ---------------------------------------------------------------------------------------

def _cfg(**over):
    from megacpt.config import config_from_dict

    return config_from_dict({"model": {"init_from": "x"}, **over})


def test_adapter_config_defaults_and_help():
    from megacpt.config import describe_config

    a = _cfg(adapter={}).adapter
    assert (a.kind, a.r, a.alpha, a.dropout, a.modules_to_save) == ("lora", 8, 16.0, 0.0, [])
    assert a.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert _cfg().adapter is None
    text = describe_config()
    for key in ("adapter.kind", "adapter.r", "adapter.alpha", "adapter.dropout", "adapter.targets",
                "adapter.modules_to_save"):
        assert f"  {key}: " in text, key


@pytest.mark.parametrize("over,fragment", [
    ({"adapter": {"rank": 4}}, "unknown config key 'adapter.rank'"),
    ({"adapter": {"kind": "ia3"}}, "adapter.kind: must be one of 'lora'"),
    ({"adapter": {"r": 0}}, "adapter.r must be > 0"),
    ({"adapter": {"dropout": 1.0}}, "adapter.dropout must be in [0, 1)"),
    ({"adapter": {"targets": []}}, "adapter.targets is empty"),
    ({"adapter": {"modules_to_save": ["norm"]}}, "adapter.modules_to_save.0: must be one of"),
    ({"adapter": {}, "parallel": {"pp": 2, "zero_stage": 1}}, "pipeline parallelism"),
    ({"adapter": {"dropout": 0.1}, "parallel": {"tp": 2}}, "own dropout mask"),
    ({"adapter": {}, "train": {"trainable": "embeddings"}}, "add embed_tokens to adapter.modules_to_save"),
])
def test_adapter_config_refusals(over, fragment):
    from megacpt.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(**over)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_targets_resolve_against_the_model(tmp_path):
    from megacpt.config import AdapterConfig
    from megacpt.errors import ConfigError
    from megacpt.models import lora
    from megacpt.models.hf import args_from_hf_config, read_hf_config

    d = tiny_hf_model(tmp_path / "m", layers=3)
    cfg = read_hf_config(d)
    args = args_from_hf_config(cfg)
    spec = lora.resolve(AdapterConfig(targets=["q_proj", "layers.2.mlp.*", "layers.[01].*.o_proj"]), args, cfg)
    assert spec.targets == ("layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.1.self_attn.q_proj",
                            "layers.1.self_attn.o_proj", "layers.2.self_attn.q_proj", "layers.2.mlp.gate_proj",
                            "layers.2.mlp.up_proj", "layers.2.mlp.down_proj")
    with pytest.raises(ConfigError) as e:
        lora.resolve(AdapterConfig(targets=["q_proj", "qproj"]), args, cfg)
    msg = str(e.value)
    assert "'qproj' matches no projection" in msg and "layers.0.self_attn.q_proj" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="lm_head"):
        lora.resolve(AdapterConfig(targets=["lm_head"]), args, cfg)  # not a projection: no LoRA there
    with pytest.raises(ConfigError, match="qkv_proj"):
        lora.resolve(AdapterConfig(), args, {**cfg, "architectures": ["Phi3ForCausalLM"]})


def test_adapter_is_not_resume_safe():
    """`adapter` is missing from RESUME_SAFE_KEYS on purpose: adding, removing or changing it on
    resume would change the parameters the optimizer state belongs to."""
    from megacpt.config import RESUME_SAFE_KEYS
    from megacpt.errors import ConfigError
    from megacpt.train.resume import check_resume_compatible

    assert not any(k.startswith("adapter") for k in RESUME_SAFE_KEYS)
    old = _cfg(adapter={"r": 4}).to_dict()
    check_resume_compatible(old, _cfg(adapter={"r": 4}))
    for new in (_cfg(adapter={"r": 8}), _cfg(), _cfg(adapter={"r": 4, "targets": ["q_proj"]})):
        with pytest.raises(ConfigError, match="adapter"):
            check_resume_compatible(old, new)
    with pytest.raises(ConfigError, match="adapter"):
        check_resume_compatible(_cfg().to_dict(), _cfg(adapter={}))


@pytest.mark.parametrize("old_par,new_tp,new_world", [({"zero_stage": 1}, 1, 4),  # universal checkpoint
                                                      ({"zero_stage": 0, "tp": 2}, 1, 2)])  # relayout
def test_adapter_resume_in_another_layout_is_refused(old_par, new_tp, new_world):
    """Re-slicing (relayout.py) and DeepSpeed's universal checkpoint expect the whole model in the
    optimizer: an adapter run resumes in its own layout and world size only."""
    from megacpt.errors import ConfigError
    from megacpt.train.resume import check_layout_change
    from megacpt.train.state import Start

    old = _cfg(adapter={}, parallel=old_par).to_dict()
    start = Start(base_cfg={}, resume_dir=Path("ckpt"), state={"config": old, "world_size": 2})
    new = _cfg(adapter={}, parallel={**old_par, "tp": new_tp})
    with pytest.raises(ConfigError, match="adapter run in another layout or world size"):
        check_layout_change(start, new, new_world)


# ---- the adapted linear against PEFT's LoRA layer ---------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_adapted_linear_matches_peft_layer(dropout):
    import peft
    from peft.tuners.lora.layer import Linear as PeftLinear

    from megacpt.models import lora

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    ours = torch.nn.Linear(24, 40, bias=True)
    ours.load_state_dict(base.state_dict())
    spec = lora.LoRASpec(r=4, alpha=12.0, dropout=dropout, targets=("x",))
    a, b = lora.init_factors("x", (4, 24), (40, 4), seed=1)
    assert torch.equal(b, torch.zeros(40, 4))  # the update starts at zero, as PEFT's
    bound = 1 / math.sqrt(24)  # kaiming-uniform with a=√5
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    b = torch.randn(40, 4)  # a trained B, so the update is not zero
    lora.freeze_base(ours)
    lora.attach(ours, a.clone(), b.clone(), spec)
    ref = PeftLinear(base, "default", peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout), r=4, lora_alpha=12,
                     lora_dropout=dropout)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(a)
        ref.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(5)  # the same dropout mask for both (one draw on x each)
    y = ours(x)
    torch.manual_seed(5)
    y_ref = ref(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(ours.lora_A.weight.grad, ref.lora_A["default"].weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.weight.grad, ref.lora_B["default"].weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert ours.weight.grad is None and ours.bias.grad is None  # frozen: no gradient kept


# ---- runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, hf_tokenizer_dir):  # noqa: F811 (fixture)
    """A Qwen2-shaped model (q/k/v biases) whose vocabulary megacpt extend-vocab grew."""
    from transformers import AutoTokenizer

    from megacpt.vocab import extend_vocab

    tmp = tmp_path_factory.mktemp("lora")
    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    orig = tiny_hf_model(tmp / "orig", arch="qwen2", vocab=len(tok), perturb=True)
    tok.save_pretrained(orig)
    report = extend_vocab(orig, tmp / "base", NEW_TOKENS, pad_to_multiple_of=4)
    vocab = json.loads((tmp / "base" / "config.json").read_text())["vocab_size"]
    new_ids = [e["id"] for e in report["added"]]
    assert new_ids and min(new_ids) >= len(tok)
    return {"tmp": tmp, "model": tmp / "base", "vocab": vocab, "new_ids": new_ids}


@pytest.fixture(scope="module")
def runs(base):
    tmp = base["tmp"]

    def cfg(name, zero, **over):
        c = tiny_run_config(tmp, base["model"], tmp / name, steps=5, zero=zero, vocab=base["vocab"], adapter=ADAPTER,
                            deepspeed=ZERO3_SHARDED if zero == 3 else {}, **over)
        c["optim"]["lr"] = 1e-2  # the adapter moves visibly in 5 steps
        return write_config(tmp / f"{name}.yaml", c)

    resumed = cfg("resumed", 3)
    # Two or three ranks at a time (independent runs side by side); the resume after its first half.
    launch_together([(1, cfg("single", 3), []), (1, resumed, ["train.stop_after=2"])])
    launch_together([(1, resumed, []), (2, cfg("zero3", 3), [])])
    launch_together([(2, cfg("tp2", 1, **{"parallel.tp": 2}), [])])
    return {name: tmp / name for name in ("single", "resumed", "zero3", "tp2")}


def launch_together(jobs, timeout: float = 600) -> None:
    """Start every job's ranks (`python -m megacpt.train CONFIG --set ...` with the variables a
    launcher sets, as tests/harness.py starts its ranks: the deepspeed launcher's own start-up
    is seconds per launch), wait for all, fail with the logs of a job that failed."""
    procs = []
    for nproc, cfg_path, sets in jobs:
        port = str(free_port())
        for rank in range(nproc):
            env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            cmd = [sys.executable, "-m", "megacpt.train", str(cfg_path)] + [a for s in sets for a in ("--set", s)]
            # A log file, not a pipe: a rank blocked on a full pipe would stall its peers' collectives.
            fd, log = tempfile.mkstemp(dir=Path(cfg_path).parent, prefix=f"{Path(cfg_path).stem}.rank{rank}.",
                                       suffix=".log")
            with os.fdopen(fd, "w") as out:
                procs.append((Path(log), subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)))
    failed = []
    for log, proc in procs:
        proc.wait(timeout=timeout)
        if proc.returncode != 0:
            failed.append(f"--- {log.name}: exit {proc.returncode}\n{log.read_text(errors='replace')[-3000:]}")
    assert not failed, "\n".join(failed)


def _raw(run_dir):
    from megacpt.train.checkpoint import resolve_checkpoint
    from megacpt.train.consolidate import checkpoint_weights

    return checkpoint_weights(resolve_checkpoint(run_dir), merge_adapter=False)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero3", "tp2"])
def test_layouts_match_one_process(runs, layout):
    a, b = train_losses(runs["single"]), train_losses(runs[layout])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert_runs_match(runs["single"], runs[layout], range(1, 6))
    # The trained tensors themselves (a missing gradient all-reduce of a replicated factor shows
    # here first): 5 Adam steps on the same gradients.
    wa, wb = _raw(runs["single"]), _raw(runs[layout])
    assert sorted(wa.keys()) == sorted(wb.keys())
    trained = [n for n in wa.keys() if "lora_" in n or n in ("embed_tokens.weight", "lm_head.weight")]
    assert len(trained) == 2 * 2 * 7 + 2
    for n in trained:
        torch.testing.assert_close(wb.get(n), wa.get(n), rtol=0, atol=ADAM_ATOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_tp_splits_the_factors(runs):
    """Column-parallel q_proj: B's rows split, A whole; row-parallel down_proj: A's columns split, B whole."""
    layout = json.loads((runs["tp2"] / "layout.json").read_text())["params"]
    r, h, inter = ADAPTER["r"], 32, 64
    expect = {"layers.0.self_attn.q_proj.lora_A.weight": [r * h] * 2,
              "layers.0.self_attn.q_proj.lora_B.weight": [h * r // 2] * 2,
              "layers.0.mlp.down_proj.lora_A.weight": [r * inter // 2] * 2,
              "layers.0.mlp.down_proj.lora_B.weight": [h * r] * 2}
    assert {n: layout[n]["per_rank"] for n in expect} == expect


@pytest.mark.slow
def test_resume_is_bit_identical(runs):
    a, b = train_losses(runs["single"]), train_losses(runs["resumed"])
    for key in ("loss", "grad_norm", "samples_fingerprint"):
        assert [a[s][key] for s in range(1, 6)] == [b[s][key] for s in range(1, 6)], key
    ta = checkpoint_tensors(runs["single"] / "checkpoints" / "step_00000005")
    tb = checkpoint_tensors(runs["resumed"] / "checkpoints" / "step_00000005")
    assert ta.keys() == tb.keys() and any("frozen" in k for k in ta)  # ZeRO-3 keeps the frozen base there
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("run", ["single", "zero3", "tp2"])
def test_base_stays_bit_identical_and_new_rows_learn(runs, base, run):
    from megacpt.models.hf import HFWeights

    hf, raw = HFWeights(base["model"]), _raw(runs[run])
    saved = {"embed_tokens.weight", "lm_head.weight"}
    assert set(hf.keys()) <= set(raw.keys())
    for n in hf.keys():
        if n not in saved:
            assert torch.equal(raw.get(n), hf.get(n)), n
    for n in saved:  # modules_to_save learn, the new tokens' rows included
        new = base["new_ids"]
        assert not torch.equal(raw.get(n)[new], hf.get(n)[new]), n
    for n in (k for k in raw.keys() if k.endswith("lora_B.weight")):
        assert raw.get(n).abs().max() > 0, n  # B starts at zero: it learned


@pytest.mark.slow
def test_optimizer_state_only_for_trained_parameters(runs, base):
    """ZeRO-3 over 2 ranks: each rank's optimizer file holds fp32 masters and two Adam moments of
    its partition of the trained parameters (factors + modules_to_save), nothing of the base."""
    layout = json.loads((runs["zero3"] / "layout.json").read_text())["params"]
    trained = sum(p["numel"] for n, p in layout.items() if "lora_" in n or n in ("embed_tokens.weight",
                                                                                 "lm_head.weight"))
    base_only = sum(p["numel"] for p in layout.values()) - trained
    assert base_only > 0.3 * trained  # enough frozen elements that state for them would show
    tensors = checkpoint_tensors(runs["zero3"] / "checkpoints" / "step_00000005")
    for rank in range(2):
        mine = [t for k, t in tensors.items() if k.startswith(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
                and t.is_floating_point()]
        numel = sum(t.numel() for t in mine)
        # master + exp_avg + exp_avg_sq of its half of the trained elements (up to one element
        # of padding per parameter), and Adam's step count
        assert 3 * trained / 2 <= numel <= 3 * (trained / 2 + len(layout)) + 1, (numel, trained)


@pytest.mark.slow
def test_peft_loads_the_exported_adapter(runs, base, tmp_path):
    import peft
    import transformers
    from safetensors import safe_open

    from megacpt.config import AdapterConfig
    from megacpt.models import lora
    from megacpt.models.hf import args_from_hf_config, read_hf_config
    from megacpt.train.parallelize import BuildSpec, build_model

    out = tmp_path / "adapter"
    assert main(["export", str(runs["zero3"]), "--adapter", "--output", str(out)]) == 0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == ("LORA", 4, 8, 0.0)
    assert conf["base_model_name_or_path"] == str(base["model"].resolve())
    assert conf["modules_to_save"] == ["embed_tokens", "lm_head"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"])
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    hf_cfg = read_hf_config(base["model"])
    args = args_from_hf_config(hf_cfg)
    spec = lora.resolve(AdapterConfig(**ADAPTER), args, hf_cfg)
    ours = build_model(BuildSpec(args, adapter=spec), None, _raw(runs["zero3"])).eval()
    ids = torch.randint(0, base["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = torch.tensor(base["new_ids"][:3] * 3)[:3]  # the new tokens' rows in use
    with torch.no_grad():
        want, got = peft_model(ids).logits, ours(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(ids).logits - want).abs().max() > 1e-3  # the adapter changes the model

    merged_dir = tmp_path / "merged"
    assert main(["export", str(runs["zero3"]), "--output", str(merged_dir)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    reference = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], reference[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ---- bad input -----------------------------------------------------------------------------------

def _one_line_exit_2(rc, err, fragment):
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


def test_export_adapter_refusals(tmp_path, capsys):
    model = tiny_hf_model(tmp_path / "m")
    capsys.readouterr()  # transformers' progress bars
    out = tmp_path / "out"
    rc = main(["export", str(model), "--adapter", "--output", str(out)])
    _one_line_exit_2(rc, capsys.readouterr().err, "not an adapter run")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    rc = main(["export", str(tmp_path / "nope"), "--adapter", "--output", str(out)])
    _one_line_exit_2(rc, capsys.readouterr().err, "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("adapter,fragment", [
    ({"targets": ["q_proj", "attn.qproj"]}, "'attn.qproj' matches no projection"),
    ({"r": -1}, "adapter.r must be > 0"),
])
def test_train_refuses_bad_adapter(tmp_path, capsys, adapter, fragment):
    model = tiny_hf_model(tmp_path / "m")
    cfg = tiny_run_config(tmp_path, model, tmp_path / "run", adapter=adapter)
    capsys.readouterr()  # transformers' progress bars
    rc = main(["train", str(write_config(tmp_path / "c.yaml", cfg))])
    _one_line_exit_2(rc, capsys.readouterr().err, fragment)
    assert not (tmp_path / "run").exists()
