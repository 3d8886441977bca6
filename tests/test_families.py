"""Qwen3, Gemma 2, Gemma 3, OLMo 2 and Phi-3 against transformers (the independent reference).

Every model is a tiny random fp32 model built with transformers' own config class, every
parameter (norms included) moved away from its initial value, saved with save_pretrained, and
loaded through models/hf.py as the trainer loads it.
"""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_hf_model
from megacpt.errors import UserError
from megacpt.labels import IGNORE
from megacpt.models.hf import (SUPPORTED_ARCHITECTURES, HFWeights, apply_overrides, args_from_hf_config,
                               hf_config_for, read_hf_config, save_hf)
from megacpt.models.llama import ModelArgs, rope_cos_sin
from test_model import hf_logits, ours_from

PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3Config's defaults lie outside a 128 vocab
GEMMA3_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def longrope(n: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=(1 + torch.rand(n, generator=g)).tolist(),
                long_factor=(1 + 4 * torch.rand(n, generator=g)).tolist())


# head_dim 16 with hidden 32 and 4 heads: heads × head_dim ≠ hidden, as in Gemma and Qwen3.
FAMILIES = {
    "qwen3-untied": dict(arch="qwen3", head_dim=16),
    "qwen3-tied": dict(arch="qwen3", tied=True, head_dim=16),
    "qwen3-window": dict(arch="qwen3", head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "gemma2-tied": dict(arch="gemma2", tied=True, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                        attn_logit_softcapping=1.0, final_logit_softcapping=0.5, initializer_range=0.2),
    "gemma2-untied": dict(arch="gemma2", head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                          attn_logit_softcapping=1.0, final_logit_softcapping=0.5, initializer_range=0.2),
    "gemma3-tied": dict(arch="gemma3", tied=True, layers=3, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                        layer_types=GEMMA3_TYPES),
    "gemma3-untied-scaled": dict(
        arch="gemma3", layers=3, head_dim=16, query_pre_attn_scalar=12, sliding_window=5, layer_types=GEMMA3_TYPES,
        final_logit_softcapping=0.5, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
    "olmo2-untied": dict(arch="olmo2"),
    "olmo2-tied": dict(arch="olmo2", tied=True),
    "phi3-untied": dict(arch="phi3", **PHI3),
    "phi3-tied": dict(arch="phi3", tied=True, **PHI3),
    "phi3-partial": dict(arch="phi3", partial_rotary_factor=0.5, sliding_window=7, **PHI3),
    "phi3-longrope": dict(arch="phi3", rope_parameters=longrope(4), original_max_position_embeddings=16, max_pos=64,
                          **PHI3),
    "phi3-longrope-partial": dict(arch="phi3", rope_parameters={**longrope(2), "partial_rotary_factor": 0.5},
                                  original_max_position_embeddings=16, max_pos=64, **PHI3),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: tiny_hf_model(root / name, perturb=True, **kw) for name, kw in FAMILIES.items()}


def check_logits(path, x):
    """megacpt's logits equal transformers' fp32 ones within twice transformers' own fp32-vs-fp64 error."""
    ref32, ref64 = hf_logits(path, x, torch.float32), hf_logits(path, x, torch.float64)
    with torch.no_grad():
        ours = ours_from(path)(x)
    own_error = (ref32.double() - ref64).abs().max().item()
    diff = (ours.double() - ref32.double()).abs().max().item()
    assert diff <= 2 * own_error + 1e-7, (diff, own_error)
    return ours


def lengths(name):
    # longrope: below, at and above original_max_position_embeddings (16); others past the windows.
    return (12, 16, 24) if "longrope" in name else (24,)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(family_dirs, name):
    path = family_dirs[name]
    torch.manual_seed(1)
    for s in lengths(name):
        check_logits(path, torch.randint(0, 128, (2, s)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_matches_transformers(family_dirs, name):
    """The fused loss path (soft-capped for Gemma 2) equals transformers' loss with labels."""
    import transformers

    path = family_dirs[name]
    torch.manual_seed(2)
    x = torch.randint(0, 128, (2, lengths(name)[-1]))
    losses = {}
    for dtype in (torch.float32, torch.float64):
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dtype).eval()
        with torch.no_grad():
            losses[dtype] = m(x, labels=x).loss.item()
    targets = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE)], dim=1)  # HF shifts inside; we shift outside
    with torch.no_grad():
        ours = ours_from(path)(x, labels=targets).item() / (2 * (x.shape[1] - 1))
    own_error = abs(losses[torch.float32] - losses[torch.float64])
    assert abs(ours - losses[torch.float32]) <= 2 * own_error + 1e-6, (ours, losses)


def test_switches_are_read(family_dirs):
    """The tests above can fail: each family switch, set back to Llama's, changes the logits."""
    from dataclasses import replace

    from megacpt.models.hf import load_full_state
    from megacpt.models.llama import Transformer

    flips = {
        "qwen3-untied": dict(qk_norm=None),
        "gemma3-tied": dict(norm_form="weight", norm_placement="pre", hidden_act="silu", embed_scale=None,
                            attn_scale=None, local_rope_theta=None, qk_norm=None),
        "gemma2-tied": dict(attn_logit_softcap=None, final_logit_softcap=None),
        "olmo2-untied": dict(qk_norm=None),
        "phi3-partial": dict(partial_rotary_factor=1.0, layer_windows=[None, None]),
    }
    x = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    for name, changes in flips.items():
        path = family_dirs[name]
        ref = ours_from(path)
        with torch.no_grad():
            base = ref(x)
        for key, value in changes.items():
            with torch.device("meta"):
                model = Transformer(replace(ref.args, **{key: value}))
            load_full_state(model, path)  # a switch that drops norms leaves their weights unread
            with torch.no_grad():
                assert (model.eval()(x) - base).abs().max() > 1e-3, (name, key)


def test_soft_caps_bind(family_dirs):
    """Gemma 2's caps are low enough to change the logits (so the match above tests them)."""
    model = ours_from(family_dirs["gemma2-tied"])
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        capped = model(x)
        model.lm_head.softcap = None
        no_final = model(x)
        model.lm_head.softcap = model.args.final_logit_softcap
        for layer in model.layers:
            layer.self_attn.softcap = None
        no_attn = model(x)
    assert (capped - no_final).abs().max() > 1e-3
    assert (capped - no_attn).abs().max() > 1e-3
    assert capped.abs().max() <= model.args.final_logit_softcap


def test_longrope_switches_at_the_original_length(family_dirs):
    """Past original_max_position_embeddings the long factors apply to every position (as in
    transformers), so a prefix's logits change with the length of the sequence."""
    path = family_dirs["phi3-longrope"]
    args = args_from_hf_config(read_hf_config(path))
    pos = torch.arange(24)[None]
    short_cos, _ = rope_cos_sin(args, pos[:, :16], torch.float32)
    long_cos, _ = rope_cos_sin(args, pos, torch.float32)
    assert not torch.allclose(short_cos, long_cos[:, :16])
    model = ours_from(path)
    x = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(x[:, :16]), model(x)[:, :16], atol=1e-4)


def test_config_fields(family_dirs):
    a = {n: args_from_hf_config(read_hf_config(p)) for n, p in family_dirs.items()}
    assert a["gemma3-tied"].layer_windows == [5, None, 5]
    assert (a["gemma3-tied"].rope_theta, a["gemma3-tied"].local_rope_theta) == (1_000_000.0, 10_000.0)
    assert a["gemma3-tied"].attn_logit_softcap is None  # transformers' Gemma 3 ignores it
    assert a["gemma3-untied-scaled"].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert a["gemma2-tied"].layer_windows == [5, None]
    assert (a["gemma2-tied"].attn_logit_softcap, a["gemma2-tied"].final_logit_softcap) == (1.0, 0.5)
    assert a["qwen3-window"].layer_windows == [None, 5]
    assert a["phi3-partial"].rotary_dim == 4 and a["phi3-partial"].layer_windows == [7, 7]
    assert a["phi3-longrope"].rope_scaling["original_max_position_embeddings"] == 16
    assert a["olmo2-untied"].norm_placement == "post" and a["olmo2-untied"].qk_norm == "full"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_exact(family_dirs, tmp_path, name):
    """HF → megacpt → HF: the same tensors under the same names (Phi-3's fused ones too), a
    config transformers reloads to the same model, and the same ModelArgs read back."""
    import transformers

    src = family_dirs[name]
    model = ours_from(src)
    out = tmp_path / "out"
    save_hf(model.state_dict(), model.args, read_hf_config(src), out, source_dir=src)
    assert stored_tensors(out).keys() == stored_tensors(src).keys()
    for k, t in stored_tensors(src).items():
        assert torch.equal(stored_tensors(out)[k], t), k
    assert args_from_hf_config(read_hf_config(out)) == model.args
    assert json.loads((out / "config.json").read_text()).get("rope_parameters") is not None
    x = torch.randint(0, 128, (1, lengths(name)[-1]))
    m1 = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m2(x).logits)


def stored_tensors(path) -> dict:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_gemma3_export_keeps_per_layer_type_rope(family_dirs, tmp_path):
    """model.rope_theta / rope_scaling change the full-attention layers only; the export keeps
    transformers' per-layer-type rope_parameters and reloads with both bases."""
    import transformers

    src = family_dirs["gemma3-tied"]
    model = ours_from(src)
    args = apply_overrides(model.args, max_seq_len=256, rope_theta=2e6, rope_scaling={"rope_type": "linear",
                                                                                         "factor": 2.0})
    assert (args.local_rope_theta, args.local_rope_scaling) == (10_000.0, None)
    save_hf(model.state_dict(), args, read_hf_config(src), tmp_path / "out")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert cfg.rope_parameters["full_attention"] == {"rope_theta": 2e6, "rope_type": "linear", "factor": 2.0}
    assert cfg.rope_parameters["sliding_attention"] == {"rope_theta": 10_000.0, "rope_type": "default"}
    assert args_from_hf_config(hf_config_for(args, read_hf_config(src))) == args
    check_logits(tmp_path / "out", torch.randint(0, 128, (1, 20)))


def test_local_rope_theta_override(family_dirs, tmp_path):
    """model.local_rope_theta sets the sliding layers' base only; the export carries it; a model
    without sliding-layer RoPE refuses it with a message."""
    import transformers

    from megacpt.errors import UserError

    src = family_dirs["gemma3-tied"]
    model = ours_from(src)
    args = apply_overrides(model.args, local_rope_theta=20_000)
    assert (args.local_rope_theta, args.rope_theta) == (20_000.0, model.args.rope_theta)
    save_hf(model.state_dict(), args, read_hf_config(src), tmp_path / "out")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 20_000.0
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == model.args.rope_theta
    with pytest.raises(UserError, match="no separate RoPE for sliding-window layers"):
        apply_overrides(ours_from(family_dirs["qwen3-tied"]).args, local_rope_theta=20_000)


def test_fused_phi3_weights_read_by_slices(family_dirs):
    """Phi-3's qkv_proj / gate_up_proj are served as q/k/v and gate/up, rows read lazily, as
    tensor-parallel (row or column slices) and ZeRO-3 (flat ranges) loading read them."""
    path = family_dirs["phi3-untied"]
    w = HFWeights(path)
    names = list(w.keys())
    assert "layers.0.self_attn.qkv_proj.weight" not in names and "layers.0.self_attn.qkv_proj.weight" not in w
    assert names.index("layers.0.self_attn.k_proj.weight") == names.index("layers.0.self_attn.q_proj.weight") + 1
    fused = stored_tensors(path)
    qkv, gate_up = fused["model.layers.1.self_attn.qkv_proj.weight"], fused["model.layers.1.mlp.gate_up_proj.weight"]
    parts = {"self_attn.q_proj": qkv[:32], "self_attn.k_proj": qkv[32:48], "self_attn.v_proj": qkv[48:],
             "mlp.gate_proj": gate_up[:64], "mlp.up_proj": gate_up[64:]}
    for part, full in parts.items():
        name = f"layers.1.{part}.weight"
        assert w.shape(name) == tuple(full.shape)
        assert torch.equal(w.get(name), full)
        assert torch.equal(w.get(name, slice(3, 9)), full[3:9])
        assert torch.equal(w.get(name, (slice(None), slice(4, 12))), full[:, 4:12])
        assert torch.equal(w.get_flat_range(name, 37, 101), full.reshape(-1)[37:138])


def test_unsupported_architecture_one_line(family_dirs, tmp_path, capsys):
    from megacpt.cli import main

    bad = tmp_path / "gpt2"
    bad.mkdir()
    cfg = read_hf_config(family_dirs["olmo2-untied"])
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="supported: " + ", ".join(SUPPORTED_ARCHITECTURES)):
        args_from_hf_config(cfg)
    capsys.readouterr()
    rc = main(["export", str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM" in err[0]
    assert all(a in err[0] for a in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                     "Olmo2ForCausalLM", "Phi3ForCausalLM"))


def test_export_cli_fuses_phi3(family_dirs, tmp_path):
    """`megacpt export` of an HF dir writes Phi-3's fused tensors back, bit for bit."""
    from megacpt.cli import main

    src = family_dirs["phi3-partial"]
    assert main(["export", str(src), "--output", str(tmp_path / "out")]) in (0, None)
    a, b = stored_tensors(src), stored_tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals():
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cases = [
        ({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, "attention_bias"),
        ({"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True}, "bidirectional"),
        ({"architectures": ["Olmo2ForCausalLM"], "hidden_act": "relu"}, "unsupported hidden_act 'relu'"),
        ({"architectures": ["Phi3ForCausalLM"], "head_dim": 8,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 4}},
         "short_factor must be a list of 4 numbers"),
    ]
    for extra, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            args_from_hf_config({**base, **extra})


def test_flops_and_params_count_what_is_computed(family_dirs):
    """Gemma/Qwen3 widths: attention term 12 · L · nh · d · s; the new norms are counted."""
    for name in ("gemma3-tied", "qwen3-untied", "olmo2-untied", "gemma2-untied"):
        model = ours_from(family_dirs[name])
        args = model.args
        assert args.num_params() == sum(p.numel() for p in model.parameters()), name
        non_emb = args.num_params(embedding=False)
        assert args.flops_per_token(24) == 6 * non_emb + 12 * args.num_layers * args.num_heads * args.head_dim * 24


def test_norm_forms_match_transformers_in_bf16():
    """The three norm forms differ only in where the cast falls, which fp32 cannot show: bf16
    outputs equal transformers' own norm modules bit for bit, and differ from each other."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from megacpt.models.llama import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 64, generator=g).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(64, generator=g)).to(torch.bfloat16)
    outs = {}
    for form, hf_cls, hf_w in (("weight", Qwen3RMSNorm, w), ("weight_fp32", Olmo2RMSNorm, w),
                               ("one_plus_weight", Gemma3RMSNorm, w - 1)):
        ours, ref = RMSNorm(64, 1e-6, form).to(torch.bfloat16), hf_cls(64, eps=1e-6).to(torch.bfloat16)
        with torch.no_grad():
            ours.weight.copy_(hf_w)
            ref.weight.copy_(hf_w)
            outs[form] = ours(x)
            assert torch.equal(outs[form], ref(x)), form
    assert not torch.equal(outs["weight"], outs["weight_fp32"])
    assert not torch.equal(outs["weight"], outs["one_plus_weight"])


def test_longer_window_keeps_longrope_numerics(family_dirs, tmp_path):
    """model.max_seq_len on a longrope model pins the attention factor it implied (factor =
    max_position_embeddings / original), so a longer training window leaves the model as it was;
    the export carries the pinned factor and transformers computes the same logits."""
    src = family_dirs["phi3-longrope"]
    model = ours_from(src)
    args = apply_overrides(model.args, max_seq_len=256)
    assert args.rope_scaling["factor"] == 64 / 16 and args.max_position_embeddings == 256
    assert args_from_hf_config(hf_config_for(args, read_hf_config(src))) == args  # what a resume reads back
    save_hf(model.state_dict(), args, read_hf_config(src), tmp_path / "out")
    x = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(check_logits(tmp_path / "out", x), model(x))


def test_compile_pointwise_new_families(family_dirs):
    """compile_pointwise covers the new pointwise code (Gemma's norm form, GeGLU, partial RoPE)."""
    from megacpt.models.llama import compile_pointwise

    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    for name in ("gemma3-tied", "phi3-partial"):  # (1 + w) norm, GeGLU, q/k norms; partial RoPE
        eager, compiled = ours_from(family_dirs[name]), ours_from(family_dirs[name])
        assert compile_pointwise(compiled) > 0
        for m in (eager, compiled):
            m(x, labels=x).backward()
        # Inductor reorders float ops: equal up to rounding, relative to each gradient's scale.
        for (pname, a), b in zip(eager.named_parameters(), compiled.parameters()):
            err = ((b.grad - a.grad).abs().max() / a.grad.abs().max()).item()
            assert err < 1e-5, (name, pname, err)


def test_gemma3_270m_shape():
    """Gemma 3 270M's published config (no weights): 268M parameters, 5 of every 6 layers sliding."""
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32_768,
        query_pre_attn_scalar=256).to_dict()
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    args = args_from_hf_config(cfg)
    assert args.layer_windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert (args.rope_theta, args.local_rope_theta, args.tie_word_embeddings) == (1e6, 1e4, True)
    assert round(args.num_params() / 1e6) == 268
