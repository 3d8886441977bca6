"""Operations without a launch: the logging config and its tensorboard alias, trackers that cannot
start or fail later, checkpoint manifests on hand-made checkpoint dirs (a flipped byte, a
truncated or missing file, no manifest), the resume choice past a damaged checkpoint, keep-rotation
and `megacpt verify`. Real runs: tests/test_train_zero.py (trackers across a resume, a damaged
checkpoint resumed, exported and evaluated) and tests/test_train_data.py (universal/)."""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest

from megacpt.cli import main
from megacpt.config import ConfigError, config_from_dict, describe_config, run_changing_diff, tracker_backends
from megacpt.train import manifest
from megacpt.train.trackers import Trackers, open_trackers


@pytest.mark.parametrize("data, want", [
    ({}, ["tensorboard"]),
    ({"tensorboard": False}, []),
    ({"tensorboard": True}, ["tensorboard"]),
    ({"logging": {"backends": ["wandb", "mlflow"]}}, ["wandb", "mlflow"]),
    ({"tensorboard": True, "logging": {"backends": ["tensorboard", "mlflow"]}}, ["tensorboard", "mlflow"]),
    ({"tensorboard": False, "logging": {"backends": []}}, []),
])
def test_logging_backends_and_the_tensorboard_alias(data, want):
    assert tracker_backends(config_from_dict(data)) == want


@pytest.mark.parametrize("data, sets, message", [
    ({"tensorboard": False, "logging": {"backends": ["tensorboard"]}}, [], "contradicts logging.backends"),
    ({"tensorboard": True, "logging": {"backends": ["wandb"]}}, [], "contradicts logging.backends"),
    ({"tensorboard": False}, ["logging.backends=[tensorboard]"], "contradicts logging.backends"),
    ({"logging": {"backends": ["wandb", "wandb"]}}, [], "lists wandb twice"),
    ({"logging": {"backends": ["neptune"]}}, [], "logging.backends.0: must be one of"),
    ({"logging": {"backend": ["wandb"]}}, [], "unknown config key 'logging.backend'"),
])
def test_logging_config_errors_are_one_line(data, sets, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict(data, sets)
    assert "\n" not in str(e.value)


def test_trackers_are_resume_safe():
    old = config_from_dict({}).to_dict()
    new = config_from_dict({"logging": {"backends": ["wandb"], "project": "p", "tags": ["x"]}, "tensorboard": False})
    assert run_changing_diff(old, new.to_dict()) == []


def test_checkpoint_async_is_a_resume_safe_key():
    """`async` is a Python keyword: the field is async_, the YAML key, --set, to_dict and the
    config help say `async`."""
    on = config_from_dict({"checkpoint": {"async": True}})
    assert on.checkpoint.async_ is True and on.to_dict()["checkpoint"]["async"] is True
    assert config_from_dict({}).checkpoint.async_ is False
    assert config_from_dict({}, ["checkpoint.async=true"]).checkpoint.async_ is True
    assert run_changing_diff(config_from_dict({}).to_dict(), on.to_dict()) == []
    assert "  checkpoint.async: bool = false  # " in describe_config()
    with pytest.raises(ConfigError, match="unknown config key 'checkpoint.async_'; did you mean 'async'"):
        config_from_dict({"checkpoint": {"async_": True}})
    with pytest.raises(ConfigError, match="checkpoint.async: expected"):
        config_from_dict({"checkpoint": {"async": "soon"}})


def test_a_tracker_that_is_missing_or_fails_costs_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert open_trackers(["wandb"], tmp_path, {}, "megacpt", []) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: wandb is not installed") and "pip install wandb" in err[0]

    class Recorder:
        name = "recorder"

        def __init__(self):
            self.seen = []

        def log(self, step, values):
            self.seen.append((step, values))

        def close(self):
            self.seen.append("closed")

    class Broken(Recorder):
        name = "broken"

        def log(self, step, values):
            raise OSError("database is locked")

    good, bad = Recorder(), Broken()
    t = Trackers([good, bad])
    t.log({"step": 1, "loss": 2.5, "phase": "main", "mfu": None, "flag": True, "event_free": 1})
    t.log({"step": 1, "event": "loss_spike", "loss": 9.0})  # events are not series
    t.log({"step": 3, "loss": 2.0})
    t.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken failed while logging (OSError: database is locked)" in err[0], err
    assert bad.seen == []  # dropped after its first failure: not closed either
    assert good.seen == [(1, {"loss": 2.5, "event_free": 1}), (3, {"loss": 2.0}), "closed"]


def fake_checkpoint(root, step: int, payload: bytes = b"weights" * 1000):
    d = root / f"step_{step:08d}"
    (d / "rng").mkdir(parents=True)
    (d / manifest.STATE_FILE).write_text(json.dumps({"step": step}))
    (d / "mp_rank_00_model_states.pt").write_bytes(payload)
    (d / "rng" / "rank_00000.pt").write_bytes(b"rng")
    return d


def test_manifest_names_a_flipped_truncated_or_missing_file(tmp_path):
    d = fake_checkpoint(tmp_path, 5)
    m = manifest.write(d)
    big = d / "mp_rank_00_model_states.pt"
    # the checksum is BLAKE2b-256 of the bytes, computed independently here
    assert m["files"]["mp_rank_00_model_states.pt"] == {"bytes": 7000,
                                                        "blake2b": hashlib.blake2b(big.read_bytes(),
                                                                                   digest_size=32).hexdigest()}
    assert sorted(m["files"]) == ["megacpt_state.json", "mp_rank_00_model_states.pt", "rng/rank_00000.pt"]
    assert manifest.check(d).intact
    data = bytearray(big.read_bytes())
    data[3500] ^= 1
    big.write_bytes(bytes(data))
    v = manifest.check(d)
    assert v.problem.startswith("mp_rank_00_model_states.pt does not match its BLAKE2b checksum")
    big.write_bytes(bytes(data[:100]))
    assert manifest.check(d).problem == "mp_rank_00_model_states.pt has 100 bytes, the manifest says 7000 (truncated)"
    (d / "rng" / "rank_00000.pt").unlink()
    assert manifest.check(d).problem == "mp_rank_00_model_states.pt has 100 bytes, the manifest says 7000 (truncated)"
    big.write_bytes(b"weights" * 1000)
    assert manifest.check(d).problem == "rng/rank_00000.pt is missing"
    (d / manifest.MANIFEST).write_text("{not json")
    assert manifest.check(d).problem.startswith("manifest.json is unreadable")
    (d / manifest.MANIFEST).unlink()
    assert manifest.check(d).unverified and manifest.check(d).problem is None


def _damage(d):
    f = d / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))


def test_resume_choice_skips_damaged_checkpoints(tmp_path):
    from megacpt.train import checkpoint as ckpt

    for s in (3, 4, 5):
        manifest.write(fake_checkpoint(tmp_path, s))
    (tmp_path / ckpt.LATEST).write_text("step_00000005\n")
    assert ckpt.newest_intact(tmp_path) == (tmp_path / "step_00000005", [])
    _damage(tmp_path / "step_00000005")
    _damage(tmp_path / "step_00000004")
    got, notes = ckpt.newest_intact(tmp_path)
    assert got == tmp_path / "step_00000003"
    assert notes == ["warning: checkpoint step_00000005 is damaged: mp_rank_00_model_states.pt does not match its "
                     "BLAKE2b checksum: changed since it was written (as are step_00000004); resuming from "
                     "step_00000003, the newest intact checkpoint"]
    (tmp_path / "step_00000003" / manifest.MANIFEST).unlink()  # an older run's checkpoint
    got, notes = ckpt.newest_intact(tmp_path)
    assert got == tmp_path / "step_00000003" and len(notes) == 2 and "loading it unverified" in notes[1]
    _damage(tmp_path / "step_00000003")
    manifest.write(tmp_path / "step_00000003")
    _damage(tmp_path / "step_00000003")
    with pytest.raises(manifest.CheckpointDamaged, match="step_00000005 is damaged: mp_rank_00_model_states.pt "
                                                         ".*no older checkpoint .* is intact"):
        ckpt.newest_intact(tmp_path)


def test_keep_rotation_never_drops_the_newest_intact_checkpoint(tmp_path):
    """After a resume fell back from a damaged step 5 to step 3 and saved step 4, keep: 1 keeps
    step 4 (`latest`), not the stale, damaged step 5 that sorts after it."""
    from megacpt.train import checkpoint as ckpt

    for s in (3, 4, 5):
        manifest.write(fake_checkpoint(tmp_path, s))
    _damage(tmp_path / "step_00000005")
    (tmp_path / ckpt.LATEST).write_text("step_00000004\n")
    ckpt._prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000005"]
    assert ckpt.newest_intact(tmp_path)[0] == tmp_path / "step_00000004"


def test_verify_command(tmp_path, capsys):
    run = tmp_path / "run"
    root = run / "checkpoints"
    for s in (3, 5):
        manifest.write(fake_checkpoint(root, s))
    (root / "latest").write_text("step_00000005\n")
    universal = root / "step_00000005" / manifest.UNIVERSAL
    (universal / "zero").mkdir(parents=True)
    (universal / "zero" / "x.pt").write_bytes(b"u" * 100)
    manifest.write(universal)
    assert manifest.check(root / "step_00000005").files == 3  # the universal folder is not in it
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in out] == [["intact", "step_00000003:"], ["intact", "step_00000005:"],
                                              ["intact", "step_00000005/universal:"]]
    (universal / "zero" / "x.pt").write_bytes(b"u" * 99)
    (root / "step_00000003" / "rng" / "rank_00000.pt").write_bytes(b"RNG")
    assert main(["verify", str(root)]) == 2
    cap = capsys.readouterr()
    untimed = [re.sub(r" checked in [0-9.]+ s$", "", ln) for ln in cap.out.splitlines()]  # the time varies
    assert untimed == [
        "DAMAGED     step_00000003: rng/rank_00000.pt does not match its BLAKE2b checksum: changed since it was "
        "written", re.sub(r" checked in [0-9.]+ s$", "", out[1]),
        "DAMAGED     step_00000005/universal: zero/x.pt has 99 bytes, the manifest says 100 (truncated)"]
    assert cap.err.strip().splitlines() == ["error: 2 damaged: step_00000003, step_00000005/universal (files named "
                                            "above); a resume falls back to the newest intact checkpoint"]
    assert main(["verify", str(root / "step_00000005")]) == 2  # one checkpoint, with its universal folder
    (root / "step_00000005" / manifest.MANIFEST).unlink()
    assert main(["verify", str(root / "step_00000005")]) == 2
    assert capsys.readouterr().out.splitlines()[-2].startswith("unverified  step_00000005: no manifest.json")
    for bad in (tmp_path / "nothing", tmp_path):
        assert main(["verify", str(bad)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
