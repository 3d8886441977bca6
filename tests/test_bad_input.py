"""Malformed configs, data and arguments: each gives one line on stderr naming the problem, exit
code 2, no traceback (unless --debug), and leaves nothing behind (no run dir, no output files).

In-process through `megacpt.cli.main(argv)` (the cases stop before any process group starts, so
they cost milliseconds), plus a few through real subprocesses. tests/test_train_errors.py has
more train cases (missing model dir, unsupported architecture, seq_len above the model's maximum,
token ids beyond the vocabulary in a train shard, global batch vs. a data-parallel size of 3).
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest_data import hf_tokenizer_dir  # noqa: F401 (fixture)
from helpers import REPO, cpu_env, random_docs, tiny_hf_model, tiny_run_config, write_config, write_shard
from megacpt.cli import main


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    model = tiny_hf_model(tmp / "model", max_pos=64)
    cfg = tiny_run_config(tmp, model, tmp / "unused", steps=3)
    return {"tmp": tmp, "model": model, "cfg": cfg, "new": cfg["data"]["train"][0]["path"]}


def shard(tmp_path, name="s", vocab=128, n=20, dtype=np.uint16) -> str:
    return write_shard(tmp_path / name, random_docs(n, vocab, 5), dtype=dtype)


def patch_idx(prefix, offset, data: bytes):
    with open(f"{prefix}.idx", "r+b") as f:
        f.seek(offset)
        f.write(data)


# Every case: (tmp_path, ctx) -> (argv, fragment of the message, paths that must not exist, env).
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def train(tmp_path, ctx, mutate=None, sets=(), env=None, raw_yaml=None):
    cfg = copy.deepcopy(ctx["cfg"])
    run = tmp_path / "run"
    cfg["run_dir"] = str(run)
    if mutate:
        mutate(cfg)
    path = tmp_path / "cfg.yaml"
    if raw_yaml is not None:
        path.write_text(raw_yaml.replace("RUN_DIR", str(run)))
    else:
        write_config(path, cfg)
    argv = ["train", str(path)]
    for s in sets:
        argv += ["--set", s]
    return argv, [run], env or {}


def with_train_path(path):
    def mutate(cfg):
        cfg["data"]["train"][0]["path"] = str(path)
    return mutate


# ---- config: keys, types, ranges ---------------------------------------------------------------

@case
def unknown_nested_key(tmp_path, ctx):
    return (*train(tmp_path, ctx, lambda c: c["optim"].update(learning_rate=1e-3))[:1],
            "unknown config key 'optim.learning_rate'", [tmp_path / "run"], {})


def simple(fragment, mutate=None, sets=(), env=None, raw_yaml=None):
    def build(tmp_path, ctx):
        argv, paths, e = train(tmp_path, ctx, mutate, sets, env, raw_yaml)
        return argv, fragment, paths, e
    return build


def setkey(dotted, value):
    def mutate(cfg):
        node = cfg
        *path, last = dotted.split(".")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    return mutate


CASES.update({
    "steps_not_an_integer": simple("train.steps: expected an integer", setkey("train.steps", "ten")),
    "steps_fractional": simple("train.steps: expected an integer", setkey("train.steps", 2.5)),
    "lr_a_list": simple("optim.lr: expected a number", setkey("optim.lr", [1e-3])),
    "lr_not_finite": simple("optim.lr: must be finite", setkey("optim.lr", float("inf"))),
    "tensorboard_not_bool": simple("tensorboard: expected true or false", setkey("tensorboard", "yes")),
    "precision_unknown": simple("precision: must be one of", setkey("precision", "fp16")),
    "schedule_kind_unknown": simple("schedule.kind: must be one of", setkey("schedule.kind", "exponential")),
    "nonfinite_mode_unknown": simple("train.nonfinite: must be one of", setkey("train.nonfinite", "ignore")),
    "data_not_a_mapping": simple("data: expected a mapping", setkey("data", ["x"])),
    "source_missing_path": simple("data.train.0.path: required key missing",
                                  lambda c: c["data"]["train"][0].pop("path")),
    "steps_zero": simple("train.steps must be > 0", setkey("train.steps", 0)),
    "negative_lr": simple("optim.lr must be > 0", setkey("optim.lr", -1e-4)),
    "negative_weight_decay": simple("optim.weight_decay must be ≥ 0", setkey("optim.weight_decay", -0.1)),
    "min_lr_above_lr": simple("optim.min_lr (0.01) is above optim.lr (0.001)", setkey("optim.min_lr", 0.01)),
    "zero_stage_4": simple("parallel.zero_stage must be 0, 1, 2 or 3", setkey("parallel.zero_stage", 4)),
    "decay_fraction_zero": simple("schedule.decay_fraction must be in (0, 1]", setkey("schedule.decay_fraction", 0)),
    "global_batch_vs_micro": simple("train.global_batch_size (5) is not a multiple of train.micro_batch_size (2)",
                                    lambda c: c["train"].update(global_batch_size=5, micro_batch_size=2)),
    "global_batch_vs_dp": simple("not a multiple of micro_batch_size × data-parallel size (1 × 2 = 2)",
                                 setkey("train.global_batch_size", 3), env={"RANK": "0", "WORLD_SIZE": "2"}),
    "weight_zero": simple("data.train.0 (new): weight must be > 0", setkey("data.train.0.weight", 0)),
    "weight_negative": simple("data.train.1 (replay): weight must be > 0", setkey("data.train.1.weight", -0.5)),
    "duplicate_source_names": simple("data.train: source names must be unique",
                                     lambda c: c["data"]["train"][1].update(name="new")),
    "phase_zero_steps": simple("phases.0.steps must be > 0", setkey("phases", [{"name": "anneal", "steps": 0}])),
    "no_train_sources": simple("data.train is empty", setkey("data.train", [])),
    "init_from_unset": simple("model.init_from is not set", setkey("model.init_from", None)),
    # --set
    "set_without_equals": simple("expected key=value", sets=["optim.lr"]),
    "set_index_out_of_range": simple("data.train.5 is not an index of a list of 2 items", sets=["data.train.5.weight=1"]),
    "set_python_tag_is_text": simple("seed: expected an integer", sets=["seed=!!python/object/apply:os.getpid []"]),
    # YAML
    "yaml_invalid": simple("invalid YAML at line 3", raw_yaml="run_dir: RUN_DIR\ntrain:\n\tsteps: 3\n"),
    "yaml_top_level_list": simple("top level must be a mapping", raw_yaml="- run_dir: RUN_DIR\n"),
    # impossible layouts (one process: a world of 1)
    "tensor_parallel_on_one_rank": simple("world size 1 is not divisible by parallel.tp × parallel.pp = 2",
                                          setkey("parallel.tp", 2)),
    "tp_not_dividing_heads": simple("num_heads 4 is not divisible by tp=3", setkey("parallel.tp", 3),
                                    env={"RANK": "0", "WORLD_SIZE": "3"}),
    "pipeline_with_zero3": simple("DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only, not zero_stage=3",
                                  lambda c: c["parallel"].update(pp=2, zero_stage=3),
                                  env={"RANK": "0", "WORLD_SIZE": "2"}),
    "pipeline_more_stages_than_layers": simple("pp=3 pipeline stages but only 2 layers", setkey("parallel.pp", 3),
                                               env={"RANK": "0", "WORLD_SIZE": "3"}),
    "sequence_parallel_without_tp": simple("parallel.sequence_parallel splits positions over the tensor-parallel "
                                           "group: set parallel.tp ≥ 2", setkey("parallel.sequence_parallel", True)),
    "sequence_parallel_seq_len": simple("parallel.sequence_parallel needs data.seq_len (15) divisible by parallel.tp (2)",
                                        lambda c: (c["parallel"].update(tp=2, sequence_parallel=True),
                                                   c["data"].update(seq_len=15)), env={"RANK": "0", "WORLD_SIZE": "2"}),
    "sequence_parallel_with_pp": simple("parallel.sequence_parallel is not available with pipeline parallelism",
                                        lambda c: c["parallel"].update(tp=2, pp=2, zero_stage=1,
                                                                       sequence_parallel=True),
                                        env={"RANK": "0", "WORLD_SIZE": "4"}),
    "pipeline_with_compile": simple("model.compile is not available with pipeline parallelism (parallel.pp > 1)",
                                    lambda c: (c["parallel"].update(pp=2, zero_stage=1),
                                               c["model"].update(compile=True)),
                                    env={"RANK": "0", "WORLD_SIZE": "2"}),
    "pipeline_with_embedding_lr": simple("optim.embedding_lr is not available with pipeline parallelism",
                                         lambda c: (c["parallel"].update(pp=2, zero_stage=1),
                                                    c["optim"].update(embedding_lr=1e-3)),
                                         env={"RANK": "0", "WORLD_SIZE": "2"}),
    "pipeline_with_embeddings_only_stage": simple("trainable: embeddings is not available with pipeline parallelism",
                                                  lambda c: (c["parallel"].update(pp=2, zero_stage=1),
                                                             c["train"].update(trainable="embeddings")),
                                                  env={"RANK": "0", "WORLD_SIZE": "2"}),
    "pipeline_with_sft": simple("task: sft is not available with pipeline parallelism",
                                lambda c: (c["parallel"].update(pp=2, zero_stage=1), c.update(task="sft")),
                                env={"RANK": "0", "WORLD_SIZE": "2"}),
    "sequence_parallel_with_sft_generations": simple(
        "task: sft generations (sft.eval_examples > 0) do not run with parallel.sequence_parallel",
        lambda c: (c["parallel"].update(tp=2, sequence_parallel=True), c.update(task="sft")),
        env={"RANK": "0", "WORLD_SIZE": "2"}),
    "early_stopping_vs_base_without_base": simple(
        "is relative to the step-0 evaluation, which train.eval_at_start: false turns off",
        lambda c: c["train"].update(eval_at_start=False, early_stopping={"metric": "valid/new/ppl_vs_base"})),
    "pp_balance_unknown": simple("parallel.pp_balance must be parameters or layers",
                                 setkey("parallel.pp_balance", "flops")),
    "tp_zero": simple("parallel.tp must be > 0", setkey("parallel.tp", 0)),
})


@case
def config_not_utf8(tmp_path, ctx):
    argv, paths, env = train(tmp_path, ctx)
    Path(argv[1]).write_bytes(b"run_dir: \xff\xfe\n")
    return argv, "cannot read config", paths, env


def plant_checkpoint_state(run, config_path, model_dir, world_size: int, step: int = 2) -> None:
    """Just the metadata of a checkpoint (what the start-up checks read), no DeepSpeed files."""
    import shutil

    from megacpt.config import load_config

    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(d.name + "\n")
    (d / "megacpt_state.json").write_text(json.dumps({"step": step, "world_size": world_size,
                                                      "config": load_config(config_path).to_dict()}))
    shutil.copy(model_dir / "config.json", d / "hf_config.json")


@case
def resume_zero3_tp_run_on_another_world_size(tmp_path, ctx):
    """A TP=2 ZeRO-3 run saved on 2 ranks, restarted on 4: its state cannot be re-sliced (other
    layouts can); refused before anything starts."""
    argv, paths, _ = train(tmp_path, ctx, lambda c: c["parallel"].update(tp=2, zero_stage=3))
    plant_checkpoint_state(paths[0], argv[1], ctx["model"], world_size=2)
    return argv, "resuming a ZeRO-3 run in another layout (tp/pp, or world size with tp/pp > 1) is not supported", \
        [], {"RANK": "0", "WORLD_SIZE": "4"}


@case
def relayout_of_a_run_with_an_embedding_group(tmp_path, ctx):
    """A ZeRO-1 run with optim.embedding_lr saved on 1 rank, restarted with tp=2: its optimizer
    groups are not in the order the re-slicing reads; refused before anything starts."""
    argv, paths, _ = train(tmp_path, ctx, lambda c: (c["parallel"].update(zero_stage=1),
                                                   c["optim"].update(embedding_lr=1e-3)))
    plant_checkpoint_state(paths[0], argv[1], ctx["model"], world_size=1)
    argv += ["--set", "parallel.tp=2"]
    return argv, "resuming in another layout is not supported for runs with optim.embedding_lr", \
        [], {"RANK": "0", "WORLD_SIZE": "2"}


@case
def relayout_of_a_bf16_run(tmp_path, ctx):
    """bf16 optimizer state lives in DeepSpeed's flat wrappers, which the re-slicing does not read."""
    argv, paths, _ = train(tmp_path, ctx, lambda c: (c["parallel"].update(zero_stage=1), c.update(precision="bf16")))
    plant_checkpoint_state(paths[0], argv[1], ctx["model"], world_size=1)
    argv += ["--set", "parallel.tp=2"]
    return argv, "resuming in another layout is supported for fp32 runs only", [], {"RANK": "0", "WORLD_SIZE": "2"}


# ---- data: missing, corrupted, truncated, vocabulary --------------------------------------------

@case
def train_path_missing(tmp_path, ctx):
    argv, paths, env = train(tmp_path, ctx, with_train_path(tmp_path / "absent"))
    return argv, "no such shard", paths, env


@case
def directory_without_shards(tmp_path, ctx):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("no shards here")
    argv, paths, env = train(tmp_path, ctx, with_train_path(tmp_path / "empty_dir"))
    return argv, "directory holds no .idx/.bin shards", paths, env


@case
def bin_truncated(tmp_path, ctx):
    p = shard(tmp_path)
    with open(f"{p}.bin", "r+b") as f:
        f.truncate(os.path.getsize(f"{p}.bin") - 10)
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "the .bin is truncated", paths, env


@case
def bin_missing(tmp_path, ctx):
    p = shard(tmp_path)
    os.remove(f"{p}.bin")
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, f"missing shard file {p}.bin", paths, env


@case
def idx_bad_magic(tmp_path, ctx):
    p = shard(tmp_path)
    patch_idx(p, 0, b"NOTANIDX\x00")
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "bad magic", paths, env


@case
def idx_bad_version(tmp_path, ctx):
    p = shard(tmp_path)
    patch_idx(p, 9, struct.pack("<Q", 7))
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "unsupported index version 7", paths, env


@case
def idx_bad_dtype(tmp_path, ctx):
    p = shard(tmp_path)
    patch_idx(p, 17, struct.pack("<B", 6))  # float32: not a token dtype
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "dtype code 6 is not a token dtype", paths, env


@case
def idx_truncated_header(tmp_path, ctx):
    p = shard(tmp_path)
    with open(f"{p}.idx", "r+b") as f:
        f.truncate(20)
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "truncated index header", paths, env


@case
def idx_size_mismatch(tmp_path, ctx):
    p = shard(tmp_path)
    with open(f"{p}.idx", "r+b") as f:
        f.truncate(os.path.getsize(f"{p}.idx") - 8)
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "does not match its header", paths, env


@case
def sidecar_vocab_larger_than_model(tmp_path, ctx):
    from megacpt.data.sidecar import SIDECAR_FORMAT

    p = shard(tmp_path)
    Path(f"{p}.json").write_text(json.dumps({"format": SIDECAR_FORMAT, "version": 1, "vocab_size": 50000}))
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "tokenized with a vocabulary of 50000 tokens but the model has 128", paths, env


@case
def sidecar_unreadable(tmp_path, ctx):
    p = shard(tmp_path)
    Path(f"{p}.json").write_text("{truncated")
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "sidecar", paths, env


@case
def token_id_beyond_vocab_int32_shard(tmp_path, ctx):
    p = write_shard(tmp_path / "wide", [np.array([1, 2, 3] * 30 + [70000])], dtype=np.int32)
    argv, paths, env = train(tmp_path, ctx, with_train_path(p))
    return argv, "token id 70000", paths, env


@case
def valid_token_beyond_vocab(tmp_path, ctx):
    p = write_shard(tmp_path / "v", [np.array([1, 2, 300] * 30)])
    argv, paths, env = train(tmp_path, ctx, lambda c: c["data"]["valid"][0].update(path=p))
    return argv, "token id 300", paths, env


@case
def valid_too_short_for_a_window(tmp_path, ctx):
    p = write_shard(tmp_path / "short", [np.array([1, 2, 3])])
    argv, paths, env = train(tmp_path, ctx, lambda c: c["data"]["valid"][1].update(path=p))
    return argv, "fewer than seq_len+1 = 17 tokens", paths, env


@case
def model_unsupported_activation(tmp_path, ctx):
    bad = tmp_path / "gelu"
    bad.mkdir()
    c = json.loads((ctx["model"] / "config.json").read_text())
    c["hidden_act"] = "gelu"
    (bad / "config.json").write_text(json.dumps(c))
    argv, paths, env = train(tmp_path, ctx, setkey("model.init_from", str(bad)))
    return argv, "unsupported hidden_act 'gelu'", paths, env


@case
def model_dir_without_weights(tmp_path, ctx):
    """Caught at eval: an HF dir with a config but no weight files."""
    bad = tmp_path / "noweights"
    bad.mkdir()
    (bad / "config.json").write_text((ctx["model"] / "config.json").read_text())
    return (["eval", "--model", str(bad), "--data", ctx["new"] + "_valid", "--json", str(tmp_path / "out.json")],
            "has no model.safetensors", [tmp_path / "out.json"], {})


@case
def resume_with_changed_config(tmp_path, ctx):
    """A run dir whose checkpoint was made with another optim.lr: refused with the diff, nothing
    written into the run."""
    from megacpt.config import config_from_dict
    from megacpt.train import checkpoint as ckpt

    argv, paths, env = train(tmp_path, ctx, setkey("optim.lr", 5e-4))
    old = copy.deepcopy(ctx["cfg"])
    old["run_dir"] = str(tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / ckpt.tag_for(2)
    step.mkdir(parents=True)
    ckpt.write_json_atomic(step / ckpt.STATE_FILE, {"step": 2, "config": config_from_dict(old).to_dict(),
                                                    "world_size": 1})
    (step / ckpt.HF_CONFIG_FILE).write_text((ctx["model"] / "config.json").read_text())
    (step.parent / ckpt.LATEST).write_text(ckpt.tag_for(2) + "\n")
    return argv, "config differs from the checkpoint's in keys that change the run: optim.lr", [], env


# ---- other subcommands ----------------------------------------------------------------------

@case
def eval_missing_model(tmp_path, ctx):
    return (["eval", "--model", str(tmp_path / "nope"), "--data", ctx["new"], "--json", str(tmp_path / "o.json")],
            "does not exist", [tmp_path / "o.json"], {})


@case
def eval_missing_data(tmp_path, ctx):
    return (["eval", "--model", str(ctx["model"]), "--data", f"x={tmp_path / 'absent'}", "--json",
             str(tmp_path / "o.json")], "no such shard", [tmp_path / "o.json"], {})


@case
def export_missing_run(tmp_path, ctx):
    return ["export", str(tmp_path / "norun"), "--output", str(tmp_path / "hf")], "does not exist", [tmp_path / "hf"], {}


@case
def export_not_a_run(tmp_path, ctx):
    (tmp_path / "plain").mkdir()
    return (["export", str(tmp_path / "plain"), "--output", str(tmp_path / "hf")],
            "neither a Hugging Face model dir", [tmp_path / "hf"], {})


@case
def merge_missing_prefix(tmp_path, ctx):
    return (["merge", ctx["new"], str(tmp_path / "absent"), "--output", str(tmp_path / "merged")],
            "merge input", [Path(f"{tmp_path / 'merged'}.bin"), Path(f"{tmp_path / 'merged'}.idx")], {})


@case
def prepare_missing_input(tmp_path, ctx):
    out = tmp_path / "out" / "corpus"
    return (["prepare", "--input", str(tmp_path / "absent.jsonl"), "--tokenizer", str(ctx["model"]), "--output",
             str(out)], "does not exist", [out.parent], {})


def _prepare_empty(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    out = tmp_path / "out" / "corpus"
    return (["prepare", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer", tok, "--output", str(out),
             "--workers", "1"], "no documents", [Path(f"{out}.bin"), Path(f"{out}.idx"), Path(f"{out}.json")], {})


NAMES = sorted(CASES)


def check_one_line_exit_2(rc, err, fragment):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name, ctx, tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    argv, fragment, absent, env = CASES[name](tmp_path, ctx)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    check_one_line_exit_2(rc, err, fragment)
    for p in absent:
        assert not p.exists(), f"{p} left behind"
    # nothing else was written either (no half-made files next to the inputs)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_prepare_empty_input(tmp_path, capsys, hf_tokenizer_dir):
    argv, fragment, absent, _ = _prepare_empty(tmp_path, hf_tokenizer_dir)
    capsys.readouterr()
    rc = main(argv)
    check_one_line_exit_2(rc, capsys.readouterr().err, fragment)
    for p in absent:
        assert not p.exists(), p
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_enough_cases():
    assert len(CASES) + 1 >= 30  # + prepare with an empty input


def test_debug_raises_instead(ctx, tmp_path):
    from megacpt.errors import UserError

    argv, _, _, _ = CASES["idx_bad_magic"](tmp_path, ctx)
    with pytest.raises(UserError, match="bad magic"):
        main(argv + ["--debug"])


def test_layout_validation_names_the_rule():
    """Layouts a model cannot take, checked directly (a world of 8 ranks needs no launch)."""
    from megacpt.errors import ConfigError
    from megacpt.models.llama import ModelArgs
    from megacpt.parallel.layouts import validate_layout

    args = ModelArgs(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
    validate_layout(args, 8, 2, 2, 1)  # fine: tp 2 × pp 2 × dp 2
    for (world, tp, pp, zero), fragment in [
        ((8, 3, 1, 0), "does not divide the world size 8"),
        ((6, 3, 1, 0), "num_heads 4 is not divisible by tp=3"),
        ((8, 1, 4, 0), "pp=4 pipeline stages but only 2 layers"),
        ((8, 1, 2, 3), "supports ZeRO stage 0 or 1 only"),
        ((8, 0, 1, 0), "parallel.tp must be a positive integer"),
        ((8, 1, 1, 5), "parallel.zero_stage must be 0, 1, 2 or 3"),
    ]:
        with pytest.raises(ConfigError) as e:
            validate_layout(args, world, tp, pp, zero)
        assert fragment in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


# ---- real processes ---------------------------------------------------------------------------

def _subprocess(cmd, tmp_path):
    return subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), cwd=REPO, timeout=120)


def test_python_m_train_bad_shard(ctx, tmp_path):
    argv, fragment, absent, _ = CASES["idx_bad_version"](tmp_path, ctx)
    r = _subprocess([sys.executable, "-m", "megacpt.train", *argv[1:], "--local_rank=0"], tmp_path)
    check_one_line_exit_2(r.returncode, r.stderr, fragment)
    assert not any(p.exists() for p in absent)


def test_console_script_unknown_key_and_debug(ctx, tmp_path):
    exe = str(Path(sys.executable).parent / "megacpt")
    argv, fragment, absent, _ = CASES["unknown_nested_key"](tmp_path, ctx)
    r = _subprocess([exe, *argv], tmp_path)
    check_one_line_exit_2(r.returncode, r.stderr, fragment)
    assert not any(p.exists() for p in absent)
    r = _subprocess([exe, *argv, "--debug"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_console_script_export_missing(tmp_path):
    exe = str(Path(sys.executable).parent / "megacpt")
    r = _subprocess([exe, "export", str(tmp_path / "none"), "--output", str(tmp_path / "hf")], tmp_path)
    check_one_line_exit_2(r.returncode, r.stderr, "does not exist")
    assert not (tmp_path / "hf").exists()
