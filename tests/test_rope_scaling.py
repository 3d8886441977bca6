"""RoPE scaling types (linear, dynamic, yarn, llama3, longrope) against transformers' own rotary
initialisation (modeling_rope_utils.ROPE_INIT_FUNCTIONS), the independent reference: HF configs
read (transformers 5 `rope_parameters` and the older `rope_scaling` dicts), `model.rope_scaling`
overrides, exports reloaded by transformers, and the one-line errors of bad parameters.

Every comparison runs past the original context (max_position_embeddings 16), where the scalings
differ from plain RoPE; the base is small (100) so that yarn's ramp and llama3's band cover
several of the 8 frequencies of head_dim 16.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from helpers import tiny_hf_model, tiny_run_config, write_config
from megacpt.errors import UserError
from megacpt.labels import IGNORE
from megacpt.models.hf import (apply_overrides, args_from_hf_config, hf_config_for, load_full_state, read_hf_config,
                               save_hf)
from megacpt.models.llama import Transformer, rope_cos_sin
from test_model import hf_logits, ours_from

ORIGINAL = 16
LONG = 40
THETA = 100.0
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},  # beta 32/1, truncated, original = max_position_embeddings
    "yarn-params": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 2, "beta_slow": 0.25, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "truncate": False, "original_max_position_embeddings": 12},
    "yarn-attention": {"rope_type": "yarn", "factor": 2, "attention_factor": 1.3},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "short_factor": [1 + 0.1 * i for i in range(8)],
                 "long_factor": [1 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 8},
}
CASES = [(arch, name) for arch in ("llama", "qwen2") for name in SCALINGS]


def lengths(name):
    # dynamic: below, at, just past and well past the length its rescaling starts at.
    return (12, ORIGINAL, ORIGINAL + 1, LONG) if name == "dynamic" else (LONG,)


def tiny(path, arch, scaling=None):
    return tiny_hf_model(path, arch=arch, heads=2, kv_heads=1, head_dim=16, max_pos=ORIGINAL, perturb=True,
                         rope_parameters={"rope_theta": THETA, **(scaling or {})})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    out = {(arch, name): tiny(root / f"{arch}-{name}", arch, SCALINGS[name]) for arch, name in CASES}
    out.update({(arch, None): tiny(root / f"{arch}-plain", arch) for arch in ("llama", "qwen2")})
    return out


def tokens(s, seed=0):
    return torch.randint(0, 128, (2, s), generator=torch.Generator().manual_seed(seed))


def assert_matches_hf(hf_dir, model, x):
    """megacpt's logits equal transformers' fp32 ones within twice transformers' own fp32-vs-fp64 error."""
    ref32, ref64 = hf_logits(hf_dir, x, torch.float32), hf_logits(hf_dir, x, torch.float64)
    with torch.no_grad():
        ours = model(x)
    own_error = (ref32.double() - ref64).abs().max().item()
    diff = (ours.double() - ref32.double()).abs().max().item()
    assert diff <= 2 * own_error + 1e-7, (diff, own_error)


def model_for(args, weights_dir) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    load_full_state(model, weights_dir)
    return model.eval()


def with_config(src, dst, **changes):
    """A copy of an HF dir whose config.json has `changes` (None removes a key)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


@pytest.mark.parametrize("arch,name", CASES)
def test_logits_match_transformers(dirs, arch, name):
    path = dirs[arch, name]
    model = ours_from(path)
    assert model.args.rope_scaling["rope_type"] == SCALINGS[name]["rope_type"]
    for s in lengths(name):
        assert_matches_hf(path, model, tokens(s, seed=s))


def test_scalings_bind(dirs):
    """The comparisons above can fail: past the original length every scaling (and yarn's
    truncate) changes the logits; dynamic leaves them exactly as plain RoPE up to that length."""
    plain = ours_from(dirs["llama", None])
    x = tokens(LONG)
    with torch.no_grad():
        base = plain(x)
        for name in SCALINGS:
            scaled = ours_from(dirs["llama", name])
            assert (scaled(x) - base).abs().max() > 1e-3, name
        dynamic = ours_from(dirs["llama", "dynamic"])
        assert torch.equal(dynamic(x[:, :ORIGINAL]), plain(x[:, :ORIGINAL]))
        yarn = ours_from(dirs["llama", "yarn-params"])
        untruncated = {**yarn.args.rope_scaling, "truncate": True}
        assert (model_for(replace(yarn.args, rope_scaling=untruncated), dirs["llama", "yarn-params"])(x)
                - yarn(x)).abs().max() > 1e-3


def test_dynamic_follows_the_batch_length(dirs):
    """dynamic rescales by the batch's longest position count: a prefix's cos/sin change once the
    sequence passes the original length (as longrope's switch; tensor ops, no host sync)."""
    args = ours_from(dirs["llama", "dynamic"]).args
    pos = torch.arange(LONG)[None]
    at_original, _ = rope_cos_sin(args, pos[:, :ORIGINAL], torch.float32)
    long, _ = rope_cos_sin(args, pos, torch.float32)
    longer, _ = rope_cos_sin(args, torch.arange(2 * LONG)[None], torch.float32)
    assert not torch.allclose(at_original, long[:, :ORIGINAL])
    assert not torch.allclose(long, longer[:, :LONG])
    assert torch.equal(at_original, rope_cos_sin(replace(args, rope_scaling=None), pos[:, :ORIGINAL],
                                                 torch.float32)[0])


@pytest.mark.parametrize("name", list(SCALINGS))
def test_older_rope_scaling_dicts(dirs, tmp_path, name):
    """A config.json with the older `rope_scaling` dict ("type" key, top-level rope_theta) reads
    to the same ModelArgs and logits as transformers."""
    src = dirs["llama", name]
    old = {("type" if k == "rope_type" else k): v for k, v in SCALINGS[name].items()}
    path = with_config(src, tmp_path / "old", rope_parameters=None, rope_scaling=old, rope_theta=THETA)
    model = ours_from(path)
    assert model.args == ours_from(src).args
    assert_matches_hf(path, model, tokens(LONG))


@pytest.mark.parametrize("arch,name", CASES)
def test_override_equals_config(dirs, tmp_path, arch, name):
    """model.rope_scaling on a model that had none gives transformers' logits for a config.json
    that carries that scaling."""
    plain = dirs[arch, None]
    args = apply_overrides(ours_from(plain).args, rope_scaling=SCALINGS[name])
    model = model_for(args, plain)
    ref = with_config(plain, tmp_path / "ref", rope_parameters={"rope_theta": THETA, **SCALINGS[name]})
    for s in lengths(name):
        assert_matches_hf(ref, model, tokens(s, seed=s))


@pytest.mark.parametrize("arch,name", CASES)
def test_export_reloads_with_the_same_perplexity(dirs, tmp_path, arch, name):
    """model.rope_scaling (and a longer model.max_seq_len) written by the exporter: transformers
    reloads it and computes the same loss past the original length; megacpt reads it back to
    the same logits, and a resume (which re-applies the overrides) to the same ModelArgs."""
    import transformers

    plain = dirs[arch, None]
    base = ours_from(plain)
    args = apply_overrides(base.args, max_seq_len=64, rope_scaling=SCALINGS[name])
    model = model_for(args, plain)
    save_hf(model.state_dict(), args, read_hf_config(plain), tmp_path / "out")
    x = tokens(LONG)
    losses = {}
    for dtype in (torch.float32, torch.float64):
        m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).to(dtype).eval()
        with torch.no_grad():
            losses[dtype] = m(x, labels=x).loss.item()
    targets = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    with torch.no_grad():
        ours = model(x, labels=targets).item() / (2 * (LONG - 1))
    own_error = abs(losses[torch.float32] - losses[torch.float64])
    assert abs(ours - losses[torch.float32]) <= 2 * own_error + 1e-6, (ours, losses)
    assert abs(torch.tensor(ours).exp() - torch.tensor(losses[torch.float32]).exp()) <= 1e-4  # perplexity
    back = args_from_hf_config(read_hf_config(tmp_path / "out"))
    assert apply_overrides(back, max_seq_len=64, rope_scaling=SCALINGS[name]) == args  # what a resume builds
    with torch.no_grad():
        assert torch.equal(model_for(back, tmp_path / "out")(x), model(x))  # megacpt reads its export back
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    # dynamic: transformers rescales past max_position_embeddings, so that is where megacpt's starts.
    assert exported["max_position_embeddings"] == (ORIGINAL if name == "dynamic" else 64)


@pytest.mark.parametrize("scaling", [SCALINGS["dynamic"], SCALINGS["yarn-params"]])
def test_gemma3_full_attention_layers(tmp_path, scaling):
    """Gemma 3 (per-layer-type RoPE): an override scales the full-attention layers; the export
    keeps the sliding layers' default RoPE and transformers computes the same logits."""
    scaling = {k: v for k, v in scaling.items() if k != "truncate"}  # transformers ignores it there
    src = tiny_hf_model(tmp_path / "g3", arch="gemma3", layers=3, head_dim=16, query_pre_attn_scalar=12,
                        sliding_window=5, max_pos=ORIGINAL, perturb=True,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    base = ours_from(src)
    args = apply_overrides(base.args, max_seq_len=64, rope_scaling=scaling)
    assert args.local_rope_scaling is None
    model = model_for(args, src)
    save_hf(model.state_dict(), args, read_hf_config(src), tmp_path / "out")
    assert_matches_hf(tmp_path / "out", model, tokens(LONG))
    with pytest.raises(UserError, match="ignores yarn's truncate in per-layer-type RoPE"):
        apply_overrides(base.args, rope_scaling={**scaling, "rope_type": "yarn", "truncate": False})


BAD = [
    ({"rope_type": "ntk"}, "unsupported rope_type 'ntk' (supported: default, linear, dynamic, yarn, llama3, longrope)"),
    ({"rope_type": "linear"}, "rope_type 'linear' needs factor"),
    ({"type": "dynamic"}, "rope_type 'dynamic' needs factor"),
    ({"rope_type": "yarn", "factor": "4"}, "factor must be a number, got '4'"),
    ({"rope_type": "yarn", "factor": 0.5}, "factor must be >= 1"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 1}, "yarn needs beta_fast > beta_slow"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_slow": 40}, "got 32 and 40"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, "truncate must be true or false"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0}, "attention_factor must be > 0"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, "must be a positive integer"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fats": 8}, "unknown key(s) beta_fats for rope_type 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}, "set the base with model.rope_theta"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "llama3 needs 0 < low_freq_factor < high_freq_factor, got 4.0 and 1.0"),
    ({"rope_type": "llama3", "factor": 8.0}, "needs low_freq_factor, high_freq_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "short_factor must be a list of 8"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "factor": 0}, "factor must be > 0"),
    ({"rope_type": "default", "factor": 2.0}, "unknown key(s) factor for rope_type 'default'"),
]


@pytest.mark.parametrize("scaling,message", BAD)
def test_bad_scaling_one_line(dirs, scaling, message):
    args = ours_from(dirs["llama", None]).args
    with pytest.raises(UserError) as e:
        apply_overrides(args, rope_scaling=scaling)
    assert str(e.value).startswith("model.rope_scaling: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_scaling_in_hf_config(dirs):
    cfg = read_hf_config(dirs["llama", "yarn"])
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "beta_fast": 1, "beta_slow": 2}
    with pytest.raises(UserError, match=r"^x/config.json: yarn needs beta_fast > beta_slow"):
        args_from_hf_config(cfg, "x/config.json")


def test_phi3_takes_longrope_only(tmp_path):
    """Phi3Config refuses other rope types, so megacpt refuses them before training or export."""
    src = tiny_hf_model(tmp_path / "phi3", arch="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    args = apply_overrides(ours_from(src).args, rope_scaling=SCALINGS["yarn"])
    with pytest.raises(UserError, match="Phi3ForCausalLM takes rope_type default or longrope in transformers, "
                                        "not 'yarn'"):
        hf_config_for(args, read_hf_config(src))


def test_train_refuses_bad_scaling(tmp_path, dirs, capsys):
    """Through `megacpt train`: exit 2, one line, no run directory."""
    from megacpt.cli import main

    cfg = tiny_run_config(tmp_path, dirs["llama", None], tmp_path / "run", seq=16)
    cfg["model"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 1}
    rc = main(["train", str(write_config(tmp_path / "bad.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "yarn needs beta_fast > beta_slow" in err, err
    assert not (tmp_path / "run").exists()
