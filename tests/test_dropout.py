"""model.dropout: active in training only (eval mode is the model without it), exported where
the family's HF config can say it, refused where model-parallel ranks would disagree, and a
stopped and resumed run with dropout on is bit-identical to an uninterrupted one (the RNG state
is checkpointed)."""

import dataclasses
import json

import pytest
import torch

from helpers import assert_refused, run_ok, tiny_hf_model, tiny_run_config, train_losses, write_config


def _model(tmp_path, arch="llama", **drop):
    from megacpt.models.hf import args_from_hf_config
    from megacpt.models.llama import Transformer

    d = tiny_hf_model(tmp_path / arch, arch=arch)
    args = dataclasses.replace(args_from_hf_config(json.loads((d / "config.json").read_text())), **drop)
    torch.manual_seed(0)
    return Transformer(args)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: the soft-capped attention path
def test_dropout_only_in_training(tmp_path, arch):
    plain = _model(tmp_path, arch)
    drop = _model(tmp_path, arch, attention_dropout=0.3, residual_dropout=0.3)
    drop.load_state_dict(plain.state_dict())
    ids = torch.randint(1, 128, (2, 12))
    plain.eval(), drop.eval()
    with torch.no_grad():
        assert torch.equal(drop(ids), plain(ids))
    drop.train()
    torch.manual_seed(1)
    a = drop(ids)
    torch.manual_seed(1)
    b = drop(ids)
    assert torch.equal(a, b)  # the masks come from torch's RNG: reproducible from its state
    assert not torch.allclose(a, plain(ids))
    # attention dropout alone changes the output too (the probabilities, not just the residuals)
    att = _model(tmp_path, arch, attention_dropout=0.5)
    att.load_state_dict(plain.state_dict())
    assert not torch.allclose(att.train()(ids), plain(ids))


def test_export_config_carries_dropout(tmp_path):
    from megacpt.models.hf import args_from_hf_config, hf_config_for

    for arch, extra in (("llama", {}), ("phi3", {"resid_pdrop": 0.2})):
        kw = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} if arch == "phi3" else {}
        base = json.loads((tiny_hf_model(tmp_path / arch, arch=arch, **kw) / "config.json").read_text())
        args = dataclasses.replace(args_from_hf_config(base), attention_dropout=0.2, residual_dropout=0.2)
        cfg = hf_config_for(args, base)
        assert cfg["attention_dropout"] == 0.2
        assert {k: cfg[k] for k in extra} == extra
        again = args_from_hf_config(cfg)
        assert again.attention_dropout == 0.2 and again.residual_dropout == (0.2 if extra else 0.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropout")
    model = tiny_hf_model(tmp / "model")
    out = {"tmp": tmp}
    for name in ("full", "split"):
        c = tiny_run_config(tmp, model, tmp / name, steps=4, zero=2, gb=2, mb=1, **{"model.dropout": 0.3})
        out[name], out[f"{name}_cfg"] = tmp / name, write_config(tmp / f"{name}.yaml", c)
    run_ok(1, out["full_cfg"])
    run_ok(1, out["split_cfg"], "train.stop_after=2")
    run_ok(1, out["split_cfg"])
    return out


@pytest.mark.slow
def test_resume_with_dropout_is_bit_identical(runs):
    a, b = train_losses(runs["full"]), train_losses(runs["split"])
    for s in range(1, 5):
        assert (a[s]["loss"], a[s]["grad_norm"]) == (b[s]["loss"], b[s]["grad_norm"]), s
    model = json.loads((runs["full"] / "config.resolved.json").read_text())["model"]
    assert model["attention_dropout"] == model["residual_dropout"] == 0.3


@pytest.mark.slow
@pytest.mark.parametrize("sets, message", [
    (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    (["parallel.tp=2"], "is not available with tensor, pipeline or context parallelism yet"),
])
def test_bad_dropout_settings_are_refused(runs, sets, message, capsys):
    argv = ["train", str(runs["full_cfg"]), "--set", f"run_dir={runs['tmp'] / 'refused'}"]
    for s in sets:
        argv += ["--set", s]
    assert_refused(capsys, argv, message, runs["tmp"] / "refused")
