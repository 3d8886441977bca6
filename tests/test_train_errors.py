"""Bad input to `megacpt train`: one line on stderr, exit 2, nothing written. In-process."""

import json

import numpy as np
import pytest

from helpers import tiny_hf_model, tiny_run_config, write_config, write_shard
from megacpt.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errs")
    model = tiny_hf_model(tmp / "model", max_pos=64)
    cfg = tiny_run_config(tmp, model, tmp / "run")
    return tmp, model, cfg


def run_bad(tmp_path, cfg, capsys, *extra, monkeypatch=None):
    path = write_config(tmp_path / "bad.yaml", cfg)
    rc = main(["train", str(path), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def check(rc, err, fragment, run_dir):
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and fragment in err, err
    assert "Traceback" not in err
    assert not run_dir.exists(), "bad input must leave nothing behind"


def test_missing_model_dir(tmp_path, base, capsys):
    _, _, cfg = base
    cfg = json.loads(json.dumps(cfg))
    cfg["model"]["init_from"] = str(tmp_path / "nope")
    cfg["run_dir"] = str(tmp_path / "run")
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "does not exist", tmp_path / "run")


def test_unreadable_model_dir(tmp_path, base, capsys):
    _, _, cfg = base
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    cfg = dict(cfg, model={"init_from": str(bad)}, run_dir=str(tmp_path / "run"))
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "cannot read", tmp_path / "run")


def test_unsupported_architecture(tmp_path, base, capsys):
    _, model, cfg = base
    bad = tmp_path / "gpt2"
    bad.mkdir()
    c = json.loads((model / "config.json").read_text())
    c["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(c))
    cfg = dict(cfg, model={"init_from": str(bad)}, run_dir=str(tmp_path / "run"))
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "unsupported architecture 'GPT2LMHeadModel'", tmp_path / "run")


def test_misspelled_key(tmp_path, base, capsys):
    _, _, cfg = base
    cfg = dict(cfg, run_dir=str(tmp_path / "run"), trainer={"steps": 3})
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "unknown config key 'trainer'", tmp_path / "run")


def test_wrong_type_via_set(tmp_path, base, capsys):
    _, _, cfg = base
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    rc, err = run_bad(tmp_path, cfg, capsys, "--set", "train.micro_batch_size=two")
    check(rc, err, "train.micro_batch_size: expected an integer", tmp_path / "run")


def test_seq_len_above_model_maximum(tmp_path, base, capsys):
    _, _, cfg = base
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    rc, err = run_bad(tmp_path, cfg, capsys, "--set", "data.seq_len=65")
    check(rc, err, "exceeds the model's max_position_embeddings 64", tmp_path / "run")


def test_a_failed_start_gives_the_signal_handlers_back(tmp_path, base, capsys):
    """train() takes SIGUSR1/SIGTERM for its clean stop; a caller in the same process (a test, a
    notebook) must be killable again afterwards."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    _, _, cfg = base
    rc, err = run_bad(tmp_path, dict(cfg, run_dir=str(tmp_path / "run")), capsys, "--set", "data.seq_len=65")
    check(rc, err, "exceeds the model's max_position_embeddings 64", tmp_path / "run")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_seq_len_allowed_with_override(tmp_path, base, monkeypatch):
    """With model.max_seq_len the same length passes the length check and reaches the data stage."""
    from megacpt.train import loop

    class ReachedData(Exception):
        pass

    def stop(*a):
        raise ReachedData

    _, _, cfg = base
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(loop, "build_datasets", stop)
    with pytest.raises(ReachedData):
        main(["train", str(write_config(tmp_path / "c.yaml", cfg)), "--set", "data.seq_len=65",
              "--set", "model.max_seq_len=128"])


def test_token_ids_beyond_vocab(tmp_path, base, capsys):
    _, _, cfg = base
    big = write_shard(tmp_path / "big", [np.array([1, 2, 200, 3] * 20)], dtype=np.uint16)
    cfg = json.loads(json.dumps(cfg))
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"]["train"][0]["path"] = big
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "200", tmp_path / "run")


def test_global_batch_not_multiple_of_dp(tmp_path, base, capsys, monkeypatch):
    _, _, cfg = base
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc, err = run_bad(tmp_path, cfg, capsys)  # global batch 4, micro 1, dp 3
    check(rc, err, "not a multiple of micro_batch_size × data-parallel size", tmp_path / "run")


def test_missing_config_file(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not found" in err and len(err.splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    from megacpt.errors import UserError

    with pytest.raises(UserError):
        main(["train", str(tmp_path / "none.yaml"), "--debug"])


def test_missing_train_data(tmp_path, base, capsys):
    _, _, cfg = base
    cfg = json.loads(json.dumps(cfg))
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"]["train"][1]["path"] = str(tmp_path / "absent")
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "absent", tmp_path / "run")


def test_python_m_entry_point_exit_code(tmp_path):
    import subprocess
    import sys

    from helpers import REPO, cpu_env

    r = subprocess.run([sys.executable, "-m", "megacpt.train", str(tmp_path / "none.yaml"), "--local_rank=0"],
                       capture_output=True, text=True, env=cpu_env(), cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: config file")


def test_bad_eval_tasks_stop_the_start(tmp_path, base, capsys):
    """eval.tasks is checked before any rank starts: a model without tokenizer files, then a task
    whose data would have to be downloaded."""
    from helpers import word_tokenizer

    _, _, cfg = base
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text("task: hub\ndataset_path: some_org/some_data\ntest_split: test\n"
                                    "output_type: loglikelihood\ndoc_to_text: '{{a}}'\ndoc_to_target: '{{b}}'\n")
    cfg = json.loads(json.dumps(cfg))
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["eval"] = {"tasks": {"names": ["hub"], "include_path": str(tasks)}}
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "no tokenizer files found", tmp_path / "run")
    cfg["eval"]["tasks"]["tokenizer"] = str(tmp_path / "tok")
    word_tokenizer(tmp_path / "tok")
    rc, err = run_bad(tmp_path, cfg, capsys)
    check(rc, err, "not available offline", tmp_path / "run")


VALID_ERRORS = {
    "unknown key": (["data.valid.0.bucket_width=8"], "unknown config key 'data.valid.0.bucket_width'"),
    "width 0": (["data.valid.0.by_position=0"], "data.valid.0.by_position (new) must be a positive number"),
    "width < 0": (["data.valid.1.by_position=-8"], "data.valid.1.by_position (original) must be a positive number"),
    "seq_len 0": (["data.valid.0.seq_len=0"], "data.valid.0.seq_len (new) must be a positive number"),
    "seq_len too long": (["data.valid.1.seq_len=65", "data.valid.1.by_position=16"],
                         "data.valid original: seq_len 65 exceeds the model's max_position_embeddings 64"),
    "with pipeline": (["data.valid.0.by_position=8", "parallel.pp=2"], "not available with pipeline parallelism"),
    "with sft": (["data.valid.0.by_position=8", "task=sft"], "data.valid.0.by_position (new) applies to task cpt"),
    "no such bucket": (["data.valid.0.by_position=16", "train.early_stopping.metric=valid/new/pos_0_8/loss"],
                       "e.g. valid/new/pos_0_16/loss (buckets of 16 positions up to 16)"),
    "bucket of a plain set": (["train.early_stopping.metric=valid/new/pos_0_16/loss"],
                              "is not a by-position metric of this run"),
    # 20 tokens: the longest window has 20 input tokens, so positions 32-47 are never reached
    "bucket never reached": (["data.valid.0.seq_len=48", "data.valid.0.by_position=16", "data.valid_tokens=20",
                              "train.early_stopping.metric=valid/new/pos_32_48/ppl"],
                             "no document of data.valid new reaches position 32"),
}


@pytest.mark.parametrize("case", VALID_ERRORS)
def test_bad_by_position_validation_set(tmp_path, base, capsys, case):
    """data.valid[].seq_len / .by_position and early stopping on a bucket: exit 2, one line, before
    any rank starts."""
    _, _, cfg = base
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    sets, fragment = VALID_ERRORS[case]
    rc, err = run_bad(tmp_path, cfg, capsys, *[a for s in sets for a in ("--set", s)])
    check(rc, err, fragment, tmp_path / "run")
