from pathlib import Path

import pytest

from megacpt.config import Config, ConfigError, config_from_dict, derive, load_config, run_changing_diff
from megacpt.train.schedule import lr_at

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    derive(cfg, world_size=cfg.parallel.tp * cfg.parallel.pp * 2)


def test_numbers_parse_as_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-4\n  min_lr: 1.0e-6\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)


def test_set_overrides_typed_and_indexed():
    base = {"data": {"train": [{"name": "a", "path": "x", "weight": 0.5}, {"name": "b", "path": "y", "weight": 0.5}]}}
    cfg = config_from_dict(base, ["optim.lr=3e-4", "train.steps=7", "data.train.0.weight=0.9",
                                  "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7
    assert cfg.data.train[0].weight == 0.9
    assert cfg.deepspeed == {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@pytest.mark.parametrize("data, overrides, message", [
    ({"optim": {"lr_max": 1}}, [], "unknown config key 'optim.lr_max'"),
    ({"trian": {}}, [], "did you mean 'train'"),
    ({}, ["train.stesp=3"], "unknown config key 'train.stesp'"),
    ({"train": {"steps": "ten"}}, [], "train.steps: expected an integer"),
    ({}, ["train.steps=1.5"], "train.steps: expected an integer"),
    ({"optim": {"lr": "fast"}}, [], "optim.lr: expected a number"),
    ({"schedule": {"kind": "cosinus"}}, [], "schedule.kind: must be one of"),
    ({"precision": "fp8"}, [], "precision: must be one of"),
    ({"train": {"global_batch_size": 6, "micro_batch_size": 4}}, [], "not a multiple"),
    ({"optim": {"lr": -1}}, [], "optim.lr must be > 0"),
    ({"data": {"train": [{"name": "a", "path": "x", "weight": 0}]}}, [], "weight must be > 0"),
    ({"data": {"train": [{"name": "a", "weight": 1}]}}, [], "data.train.0.path: required key missing"),
    ({"parallel": {"zero_stage": 4}}, [], "zero_stage must be 0, 1, 2 or 3"),
    ({}, ["optim.lr"], "expected key=value"),
    ({}, ["data.train.3.weight=1"], "not an index"),
    ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, [], "min_lr"),
])
def test_bad_configs_name_the_problem(data, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(data, overrides)


def test_global_batch_must_divide_by_data_parallel_size():
    cfg = config_from_dict({"train": {"global_batch_size": 6, "micro_batch_size": 1}})
    assert derive(cfg, 2).grad_accum == 3
    with pytest.raises(ConfigError, match="micro_batch_size × data-parallel size"):
        derive(cfg, 4)


def test_resume_diff_ignores_safe_keys_and_lists_others():
    a = config_from_dict({}).to_dict()
    b = config_from_dict({}, ["train.stop_after=3", "checkpoint.keep=5", "train.log_interval=9"]).to_dict()
    assert run_changing_diff(a, b) == []
    c = config_from_dict({}, ["optim.lr=0.5", "seed=1"]).to_dict()
    assert run_changing_diff(a, c) == ["optim.lr", "seed"]


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 100, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, 100, kind="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(99, 100, kind="cosine", **kw) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, 100, kind="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(55, 100, kind="linear", **kw) == pytest.approx(0.55)
    assert lr_at(50, 100, kind="constant", **kw) == 1.0
    # WSD: stable until the last 20 %, then 1-sqrt to min_lr at the final step.
    wsd = dict(kind="wsd", decay_fraction=0.2, **kw)
    assert lr_at(79, 100, **wsd) == 1.0
    assert lr_at(99, 100, **wsd) == pytest.approx(0.1)
    mid = lr_at(89, 100, decay_shape="1-sqrt", **wsd)
    assert mid == pytest.approx(0.1 + 0.9 * (1 - (10 / 20) ** 0.5))
    assert lr_at(89, 100, decay_shape="linear", **wsd) == pytest.approx(0.1 + 0.9 * 0.5)
