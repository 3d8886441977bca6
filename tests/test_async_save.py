"""checkpoint.async without a launch: one gloo rank in this process and a stand-in for DeepSpeed's
engine that saves live tensors through DeepSpeed's own TorchCheckpointEngine, as its
save_checkpoint does. The files hold the state of the save call even when training changes it
while they are written; nothing is published before they are on disk; a second save waits for the
first; a failed write fails the next wait on every rank and keeps the previous checkpoint; after an
error, a checkpoint is published only when every rank finished writing; a rank's marker that never
shows is an error, not a hang. A synchronous save of the
same state is the reference. Real runs: tests/test_train_zero.py (ZeRO-3 on 2 ranks, stopped and
resumed with async saves, bit-identical to a run with synchronous ones) and tests/test_faults.py (a
crash at every stage of an async save, one and two ranks)."""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from megacpt.errors import ConfigError
from megacpt.train import async_save
from megacpt.train import checkpoint as ckpt
from megacpt.train import manifest
from megacpt.train.async_save import AsyncSaver

HF = {"model_type": "llama"}


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Engine:
    """What a checkpoint save uses of a DeepSpeed engine: save_checkpoint makes the tag's directory
    and saves state dicts of live tensors (a view sharing its parameter's storage among them)
    through self.checkpoint_engine."""

    def __init__(self, checkpoint_engine=None):
        self.checkpoint_engine = checkpoint_engine or TorchCheckpointEngine()
        self.w = torch.zeros(64, 64)
        self.moment = torch.zeros(64, 64)

    def train(self, value: float):
        self.w.fill_(value)
        self.moment.fill_(-value)

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert not save_latest
        d = Path(save_dir) / tag
        self.checkpoint_engine.makedirs(d, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.w, "row": self.w[3]}}, str(d / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"exp_avg": self.moment}, str(d / "optim_states.pt"))


def state(step: int) -> dict:
    return {"step": step}


@pytest.fixture
def gate(monkeypatch):
    """Holds the writer thread before each file until set."""
    ev = threading.Event()
    real = async_save.write_file

    def write_file(path, parts):
        assert ev.wait(30), "the test never opened the gate"
        return real(path, parts)

    monkeypatch.setattr(async_save, "write_file", write_file)
    return ev


def loaded(ckpt_dir: Path) -> dict:
    out = {}
    for f in sorted(ckpt_dir.rglob("*.pt")):
        out[f.relative_to(ckpt_dir).as_posix()] = torch.load(f, weights_only=True)
    return out


def assert_same(a, b):
    if isinstance(a, torch.Tensor):  # bit for bit (the RNG file holds a NaN: no Gaussian cached)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def test_files_hold_the_state_of_the_save_call_and_are_published_once_written(tmp_path, gate):
    eng = Engine()
    saver = AsyncSaver(eng, 0, 1)
    root = tmp_path / "async" / "checkpoints"
    eng.train(1.0)
    torch.manual_seed(11)
    path = saver.save(eng, root, 2, state(2), HF, keep=2)
    assert path == root / ckpt.tag_for(2)
    eng.train(2.0)  # the next step changes the tensors while the files are still to be written
    torch.rand(3)
    assert ckpt.latest_checkpoint(root) is None and not path.exists()
    assert (root / f".tmp-{ckpt.tag_for(2)}").is_dir()
    gate.set()
    assert saver.wait() == path
    assert ckpt.latest_checkpoint(root) == path and manifest.check(path).intact
    assert not list(path.glob(f"{async_save.WRITTEN}*")) and not list(root.glob(".tmp-*"))
    # The reference: a synchronous save of the state at the save call.
    eng.train(1.0)
    torch.manual_seed(11)
    ref = ckpt.save(eng, tmp_path / "sync" / "checkpoints", 2, state(2), HF, 2, 0)
    a, b = loaded(path), loaded(ref)
    assert sorted(a) == ["mp_rank_00_model_states.pt", "optim_states.pt", "rng/rank_00000.pt"]
    assert_same(a, b)
    assert (a["mp_rank_00_model_states.pt"]["module"]["w"] == 1).all()
    listed = [json.loads((d / manifest.MANIFEST).read_text())["files"].keys() for d in (path, ref)]
    assert sorted(listed[0]) == sorted(listed[1])
    assert ckpt.read_state(path) == ckpt.read_state(ref) == state(2)


def test_a_save_waits_for_the_one_in_flight(tmp_path, gate):
    eng = Engine()
    saver = AsyncSaver(eng, 0, 1)
    root = tmp_path / "checkpoints"
    eng.train(1.0)
    saver.save(eng, root, 2, state(2), HF, keep=1)
    opened = threading.Timer(0.5, gate.set)
    opened.start()
    t0 = time.perf_counter()
    eng.train(2.0)
    saver.save(eng, root, 4, state(4), HF, keep=1)
    assert time.perf_counter() - t0 >= 0.45  # it waited for the gate, i.e. for step 2's files
    assert (root / ckpt.tag_for(2) / manifest.MANIFEST).is_file()  # published before step 4 began
    saver.wait()
    assert ckpt.latest_checkpoint(root).name == ckpt.tag_for(4)
    assert not (root / ckpt.tag_for(2)).exists()  # keep: 1
    assert (loaded(root / ckpt.tag_for(4))["optim_states.pt"]["exp_avg"] == -2).all()


def test_a_failed_write_fails_the_next_wait_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    eng = Engine()
    saver = AsyncSaver(eng, 0, 1)
    root = tmp_path / "checkpoints"
    eng.train(1.0)
    saver.save(eng, root, 2, state(2), HF, keep=2)
    saver.wait()
    real = async_save.write_file

    def full(path, parts):
        if "optim_states" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, parts)

    monkeypatch.setattr(async_save, "write_file", full)
    eng.train(2.0)
    saver.save(eng, root, 4, state(4), HF, keep=2)  # its write fails in the background
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint at step 4 could not be written \(.*No space left on "
                                                   r"device.*\); the previous checkpoint \(step_00000002\) is intact"):
        saver.wait()
    assert ckpt.latest_checkpoint(root).name == ckpt.tag_for(2) and manifest.check(root / ckpt.tag_for(2)).intact
    assert not list(root.glob(".tmp-*")) and not (root / ckpt.tag_for(4)).exists()
    assert saver.wait() is None  # nothing in flight any more


@pytest.mark.parametrize("other_rank_done", [False, True])
def test_abandon_publishes_only_what_every_rank_finished(tmp_path, other_rank_done):
    """Rank 0 of two: after an error it finishes its own files and publishes only when rank 1's
    marker is there too; otherwise the temporary dir stays, unpublished (removed at the next start)."""
    eng = Engine()
    saver = AsyncSaver(eng, 0, 2)
    root = tmp_path / "checkpoints"
    eng.train(1.0)
    saver.save(eng, root, 2, state(2), HF, keep=2)
    tmp = root / f".tmp-{ckpt.tag_for(2)}"
    if other_rank_done:
        (tmp / f"{async_save.WRITTEN}00001").touch()
    saver.abandon()
    if other_rank_done:
        assert ckpt.latest_checkpoint(root).name == ckpt.tag_for(2) and manifest.check(root / ckpt.tag_for(2)).intact
    else:
        assert ckpt.latest_checkpoint(root) is None
        assert (tmp / "optim_states.pt").is_file() and (tmp / f"{async_save.WRITTEN}00000").is_file()
        ckpt.clean_partial(root)
        assert not tmp.exists()
    assert saver.wait() is None


def test_a_rank_whose_marker_never_shows_fails_the_wait_instead_of_hanging(tmp_path, monkeypatch):
    """Every rank said its files are written, but rank 0 never sees rank 1's marker (a checkpoint
    dir on node-local disks): an error naming the marker after MARK_GRACE_S, nothing published."""
    monkeypatch.setattr(async_save, "MARK_GRACE_S", 0.3)
    eng = Engine()
    saver = AsyncSaver(eng, 0, 2)
    root = tmp_path / "checkpoints"
    saver.save(eng, root, 2, state(2), HF, keep=2)
    with pytest.raises(ckpt.CheckpointError, match=r"rank 0 does not see \.tmp-written-rank_00001 in .* 0 s after "
                                                   r"that rank wrote its files; checkpoint.async needs a checkpoint "
                                                   r"dir that every rank shares"):
        saver.wait()
    assert ckpt.latest_checkpoint(root) is None and not list(root.glob(".tmp-*"))


def test_async_needs_deepspeeds_torch_checkpoint_engine():
    class Other(CheckpointEngine):
        def create(self, info): ...
        def save(self, state_dict, path): ...
        def load(self, path, map_location=None): ...
        def commit(self, info): ...

    with pytest.raises(ConfigError, match="checkpoint.async needs DeepSpeed's torch checkpoint engine, not Other"):
        AsyncSaver(Engine(Other()), 0, 1)
