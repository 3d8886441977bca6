"""How much of the model trains: `train.freeze` (patterns and layer ranges) and
`optim.layer_lr_decay`. Frozen parameters keep their weights bit for bit and have no optimizer
state; each optimizer group's LR is the formula's; 2 ZeRO-3 ranks equal one process."""

import json

import pytest
import torch

from helpers import assert_refused, assert_runs_match, run_ok, tiny_hf_model, tiny_run_config, write_config

FREEZE = ["layers.0-0", "model.layers.1.mlp.*"]
DECAY = 0.5


def _tiny_model(path, tied):
    from megacpt.models.hf import args_from_hf_config
    from megacpt.models.llama import Transformer

    d = tiny_hf_model(path, tied=tied, layers=3)
    args = args_from_hf_config(json.loads((d / "config.json").read_text()))
    torch.manual_seed(0)
    return Transformer(args)


@pytest.mark.parametrize("tied", [False, True])
def test_layer_lrs_follow_the_formula(tmp_path, tied):
    from megacpt.train.stages import Stages, freeze, param_groups

    model = _tiny_model(tmp_path / "m", tied)
    L = model.args.num_layers
    n = freeze(model, ["layers.1-1"])
    assert n == sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.1."))
    groups, kinds = param_groups(model, 0.1, split_embeddings=False, layer_lr_decay=DECAY)
    opt = torch.optim.AdamW(groups, lr=1.0)
    Stages(model, kinds, 1.0, None).apply(opt, 2e-3, "all")
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    seen = 0
    for name, p in model.named_parameters():
        if name.startswith("layers.1."):
            assert id(p) not in lr_of and not p.requires_grad, name  # frozen: not in the optimizer
            continue
        if name.startswith("embed_tokens.") and not tied:
            depth = L + 1
        elif name.startswith("layers."):
            depth = L - int(name.split(".")[1])
        else:  # final norm, head, and a tied embedding (which is the head)
            depth = 0
        assert lr_of[id(p)] == pytest.approx(2e-3 * DECAY ** depth, rel=1e-12), name
        assert wd_of[id(p)] == (0.1 if p.dim() >= 2 else 0.0), name
        seen += 1
    assert seen == sum(len(g["params"]) for g in opt.param_groups)


def test_embedding_lr_and_decay_together(tmp_path):
    from megacpt.train.stages import Stages, param_groups

    model = _tiny_model(tmp_path / "m", tied=False)
    groups, kinds = param_groups(model, 0.1, split_embeddings=True, layer_lr_decay=DECAY)
    opt = torch.optim.AdamW(groups, lr=1.0)
    Stages(model, kinds, 1e-3, 5e-3).apply(opt, 1e-3, "all")
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    # An explicit embedding LR wins over the decay, for the embedding and the untied head alike.
    assert lr_of[id(model.embed_tokens.weight)] == lr_of[id(model.lm_head.weight)] == pytest.approx(5e-3)
    assert lr_of[id(model.layers[0].mlp.up_proj.weight)] == pytest.approx(1e-3 * DECAY ** 3)


@pytest.mark.parametrize("patterns, message", [
    (["layers.0-9"], "layer range 'layers.0-9' is outside the model's layers 0-2"),
    (["model.layers.*.attn.*"], "'model.layers.*.attn.*' matches no parameter"),
])
def test_bad_patterns(tmp_path, patterns, message):
    from megacpt.errors import ConfigError
    from megacpt.train.stages import freeze

    model = _tiny_model(tmp_path / "m", tied=False)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        freeze(model, patterns)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("freeze")
    model = tiny_hf_model(tmp / "model", tied=False, layers=3)
    out = {"tmp": tmp, "model": model}
    for name, zero, nproc in (("single", 0, 1), ("zero3", 3, 2)):
        c = tiny_run_config(tmp, model, tmp / name, steps=3, zero=zero, gb=4, mb=1,
                            **{"train.freeze": FREEZE, "optim.layer_lr_decay": DECAY})
        if zero == 3:
            c["deepspeed"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        out[f"{name}_cfg"] = write_config(tmp / f"{name}.yaml", c)
        out[name] = tmp / name
        run_ok(nproc, out[f"{name}_cfg"])
    return out


def _frozen(name: str) -> bool:
    """By megacpt name (HFWeights' keys)."""
    return name.startswith("layers.0.") or name.startswith("layers.1.mlp.")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["single", "zero3"])
def test_frozen_weights_are_bit_identical_and_others_train(runs, run, tmp_path):
    from megacpt.cli import main
    from megacpt.models.hf import HFWeights

    assert main(["export", str(runs[run]), "--output", str(tmp_path / "hf")]) == 0
    before, after = HFWeights(runs["model"]), HFWeights(tmp_path / "hf")
    frozen = [k for k in before.keys() if _frozen(k)]
    assert len(frozen) == 9 + 3  # all of block 0 (q k v o, 3 MLP, 2 norms), block 1's MLP
    for k in before.keys():
        same = torch.equal(before.get(k), after.get(k))
        assert same == _frozen(k), k


@pytest.mark.slow
def test_frozen_parameters_have_no_optimizer_state(runs):
    from megacpt.safe_load import _allowlist

    total = sum(1 for _ in HFNames(runs["model"]))
    frozen = sum(1 for k in HFNames(runs["model"]) if _frozen(k))
    ckpt = sorted((runs["single"] / "checkpoints").glob("step_*"))[-1]
    with torch.serialization.safe_globals(_allowlist()):
        states = torch.load(next(ckpt.glob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=True)
    opt = states["optimizer"]
    assert sum(len(g["params"]) for g in opt["param_groups"]) == total - frozen
    assert len(opt["state"]) == total - frozen
    # ZeRO-3: the fp32 master partitions over both ranks hold the trainable elements only (plus padding).
    from megacpt.models.hf import HFWeights

    w = HFWeights(runs["model"])
    trainable = sum(w.get(k).numel() for k in w.keys() if not _frozen(k))
    ckpt = sorted((runs["zero3"] / "checkpoints").glob("step_*"))[-1]
    held = 0
    for f in ckpt.glob("*optim_states.pt"):
        with torch.serialization.safe_globals(_allowlist()):
            sd = torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        held += sum(t.numel() for t in sd["fp32_flat_groups"])
    assert trainable <= held < trainable + 64 * len(opt["param_groups"])


def HFNames(model_dir):
    from megacpt.models.hf import HFWeights

    return iter(HFWeights(model_dir).keys())


@pytest.mark.slow
def test_two_zero3_ranks_equal_one_process(runs):
    assert_runs_match(runs["single"], runs["zero3"], (1, 2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("sets, message", [
    (["train.freeze=[layers.0-1]"], "config differs from the checkpoint's in keys that change the run: train.freeze"),
    (["optim.layer_lr_decay=0.9"], "optim.layer_lr_decay"),
    (["model.dropout=0.1"], "keys that change the run: model.dropout"),
    (["run_dir=NEW", "train.freeze=[nothing.here]"], "'nothing.here' matches no parameter"),
    (["run_dir=NEW", "optim.layer_lr_decay=1.5"], "optim.layer_lr_decay must be in (0, 1]"),
])
def test_changes_on_resume_and_bad_values_are_refused(runs, sets, message, capsys):
    argv = ["train", str(runs["single_cfg"])]
    for s in sets:
        argv += ["--set", s.replace("NEW", str(runs["tmp"] / "refused"))]
    assert_refused(capsys, argv, message, runs["tmp"] / "refused")
