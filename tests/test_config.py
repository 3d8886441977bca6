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
    ({"precision": "fp16"}, [], "precision: must be one of"),
    ({"train": {"global_batch_size": 6, "micro_batch_size": 4}}, [], "not a multiple"),
    ({"optim": {"lr": -1}}, [], "optim.lr must be > 0"),
    ({"data": {"train": [{"name": "a", "path": "x", "weight": 0}]}}, [], "weight must be > 0"),
    ({"data": {"train": [{"name": "a", "weight": 1}]}}, [], "data.train.0.path: required key missing"),
    ({"parallel": {"zero_stage": 4}}, [], "zero_stage must be 0, 1, 2 or 3"),
    ({}, ["optim.lr"], "expected key=value"),
    ({}, ["data.train.3.weight=1"], "not an index"),
    ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, [], "min_lr"),
    ({"eval": {"tasks": {"names": []}}}, [], "eval.tasks.names is empty"),
    ({"eval": {"tasks": {"names": ["a"], "interval": 0}}}, [], "eval.tasks.interval must be > 0"),
    ({"eval": {"tasks": {"names": ["a"]}}, "parallel": {"pp": 2}}, [], "eval.tasks is not available with pipeline"),
    ({"eval": {"tasks": {"name": ["a"]}}}, [], "unknown config key 'eval.tasks.name'"),
    ({"eval": {"tasks": {"names": ["a"]}}, "train": {"early_stopping": {"metric": "task/b/acc"}}}, [],
     "is not a task metric of this run"),
])
def test_bad_configs_name_the_problem(data, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(data, overrides)


def test_task_metrics_for_early_stopping_and_resume():
    from megacpt.config import early_stopping_mode

    cfg = config_from_dict({"eval": {"tasks": {"names": ["probe"]}},
                            "train": {"early_stopping": {"metric": "task/probe/acc_vs_base"}}})
    assert early_stopping_mode(cfg.train.early_stopping) == "max"
    cfg = config_from_dict({"eval": {"tasks": {"names": ["probe"]}},
                            "train": {"early_stopping": {"metric": "task/probe/perplexity"}}})
    assert early_stopping_mode(cfg.train.early_stopping) == "min"
    # tasks can be added to (or changed in) a running job
    a = config_from_dict({}).to_dict()
    b = config_from_dict({"eval": {"tasks": {"names": ["probe"], "interval": 5}}}).to_dict()
    assert run_changing_diff(a, b) == []


def test_by_position_bucket_metrics_for_early_stopping_and_resume():
    from megacpt.config import early_stopping_mode

    valid = [{"name": "long", "path": "p", "seq_len": 2500, "by_position": 1024}]
    for metric in ("valid/long/pos_0_1024/loss", "valid/long/pos_2048_2500/ppl", "valid/long/loss"):
        cfg = config_from_dict({"data": {"valid": valid}, "train": {"early_stopping": {"metric": metric}}})
        assert early_stopping_mode(cfg.train.early_stopping) == "min"
    for metric in ("valid/long/pos_2048_3072/loss", "valid/long/pos_0_1024/tokens", "valid/long/pos_0_1024"):
        with pytest.raises(ConfigError, match="is not a (by-position|validation) metric of this run"):
            config_from_dict({"data": {"valid": valid}, "train": {"early_stopping": {"metric": metric}}})
    # a validation set's length and buckets may change in a running job (its base is then dropped)
    a = config_from_dict({"data": {"valid": [{"name": "long", "path": "p"}]}}).to_dict()
    b = config_from_dict({"data": {"valid": valid}}).to_dict()
    assert run_changing_diff(a, b) == []


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


def _config_dataclasses():
    import dataclasses
    import inspect

    import megacpt.config as mc

    return [c for _, c in inspect.getmembers(mc, inspect.isclass)
            if dataclasses.is_dataclass(c) and c.__module__ == mc.__name__]


def test_every_config_field_has_a_description():
    import dataclasses

    classes = _config_dataclasses()
    assert len(classes) >= 14
    for cls in classes:
        for f in dataclasses.fields(cls):
            help_ = f.metadata.get("help", "")
            assert help_.strip() and "\n" not in help_, f"{cls.__name__}.{f.name} has no one-line description"


def _walk(cls, prefix, seen):
    """(dotted path, field, type) of every key under `cls`, `[]` standing for the items of a list."""
    import dataclasses
    import types
    import typing

    seen.add(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.metadata.get('key', f.name)}"  # the YAML key (checkpoint.async: field async_)
        tp = hints[f.name]
        yield path, f, tp
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(inner) == 1:
            tp = inner[0]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, path + ".", seen)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from _walk(typing.get_args(tp)[0], path + "[].", seen)


def _expected_type_words(tp) -> list[str]:
    import dataclasses
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return [f'"{a}"' for a in typing.get_args(tp)]
    if origin in (typing.Union, types.UnionType):
        return [w for a in typing.get_args(tp) for w in _expected_type_words(a)]
    if tp is type(None):
        return ["null"]
    if origin is list:
        return ["list"]
    if tp is dict or dataclasses.is_dataclass(tp):
        return ["mapping"]
    return [{int: "int", float: "float", str: "str", bool: "bool"}[tp]]


def _expected_default(f) -> str:
    """The default as YAML writes it; a mapping section's default is `{}` (all of its own defaults)."""
    import dataclasses

    if f.default is not dataclasses.MISSING:
        if f.default is None:
            return "null"
        if isinstance(f.default, bool):
            return "true" if f.default else "false"
        if isinstance(f.default, str):
            return f'"{f.default}"'
        return repr(f.default)
    if f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default_factory()
    if isinstance(value, list):  # e.g. adapter.targets' default projections
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return "{}"


def test_describe_config_lists_every_key_with_type_default_and_description():
    from megacpt.config import BatchShape, Derived, describe_config

    text = describe_config()
    lines = text.splitlines()
    seen = set()
    keys = list(_walk(Config, "", seen))
    assert seen == set(_config_dataclasses()) - {Derived, BatchShape}, "a config dataclass is not reachable from Config"
    for path, f, tp in keys:
        mine = [ln for ln in lines if ln.strip().startswith(f"{path}: ")]
        assert len(mine) == 1, f"{path}: {len(mine)} lines in describe_config()"
        head, _, desc = mine[0].partition("  # ")
        assert desc == f.metadata["help"], path
        type_part, _, default_part = head.strip()[len(path) + 2:].rpartition(" = ")
        for word in _expected_type_words(tp):
            assert word in type_part, f"{path}: type {word} missing from {type_part!r}"
        assert default_part == _expected_default(f), f"{path}: default {default_part!r}"
    # Spot checks of the rendering, written out.
    assert '  optim.lr: float = 0.0001  # ' in text
    assert '  data.train[].weight: float = 1.0  # ' in text
    assert '  phases[].trainable: "all" | "embeddings" or null = null  # ' in text
    assert '  data.train[].name: str = required  # ' in text
    # Sections: each top-level mapping or list heads its own group.
    for section in ("top level", "model", "data", "phases", "train", "optim", "schedule", "parallel", "checkpoint",
                    "sft"):
        assert section in lines


def test_config_module_is_light():
    import subprocess
    import sys

    code = ("import sys, megacpt.config; heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'megacpt.train') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_config_flag_prints_every_section(capsys):
    """`megacpt train --help-config` prints describe_config() and exits 0, without a config file."""
    import pytest

    from megacpt.cli import main
    from megacpt.config import describe_config

    with pytest.raises(SystemExit) as e:
        main(["train", "--help-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == describe_config().strip()
    for key in ("optim.lr", "data.train[].weight", "parallel.zero_stage", "checkpoint.keep"):
        assert key in out, key


def test_every_megacpt_environment_variable_is_documented():
    """docs/ENVIRONMENT.md lists every MEGACPT_* variable the code, scripts and tests read."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "ENVIRONMENT.md").read_text()
    files = [p for d in ("megacpt", "kernels", "slurm", "scripts", "bench", "tests", ".ci")
             for p in (repo / d).rglob("*") if p.is_file() and p.suffix in ("", ".py", ".sh")]
    names = {m for p in files for m in re.findall(r"MEGACPT_[A-Z0-9_]*[A-Z0-9]", p.read_text(errors="ignore"))}
    assert len(names) > 10
    assert sorted(n for n in names if n not in doc) == []
