"""Fault injection on real launches (CPU, gloo, a tiny model): killed ranks, a crash at every
point of a checkpoint save, write errors and a full disk, non-finite losses, hung ranks.

Every scenario ends the same way: the launch fails (non-zero exit, a message naming the fault),
`latest` still names the last complete checkpoint and that checkpoint loads, and a plain relaunch
resumes from it and finishes with exactly the samples (per-step `samples_fingerprint`), losses
and weights of an uninterrupted run.

Crash points inside a save that MEGACPT_FAULT does not offer are reached through a
`sitecustomize.py` written into a temporary dir on PYTHONPATH (see HOOK): it wraps a few
functions of megacpt.train.checkpoint / megacpt.train.step when the MEGACPT_TEST_* variables ask
for it and does nothing otherwise. Resume on another data-parallel size (2 → 1 ranks, ZeRO-3
through a universal checkpoint) is covered by tests/test_train_data.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, cpu_env, free_port, tiny_hf_model, tiny_run_config, write_config

pytestmark = pytest.mark.slow

STEPS = 16  # checkpoints every 2 steps
HANG_TIMEOUT_S = 15

# Test-only crash points, active only when the MEGACPT_TEST_* variables are set.
HOOK = r'''
import os
import sys

_DELAY = os.environ.get("MEGACPT_TEST_STEP_DELAY")  # seconds of sleep before every train step
_CRASH = os.environ.get("MEGACPT_TEST_CRASH")  # POINT:STEP[:RANK] -> SIGKILL there
_ENOSPC = os.environ.get("MEGACPT_TEST_ENOSPC")  # STEP:RANK[:FILE-SUBSTRING] -> OSError(ENOSPC)
_RANK_FAULT = os.environ.get("MEGACPT_TEST_RANK_FAULT")  # RANK=SPEC -> MEGACPT_FAULT=SPEC on that rank only
_COLLECTIVES = os.environ.get("MEGACPT_TEST_COLLECTIVES")  # DIR -> DIR/rankN.jsonl: megacpt.train's own collectives


def _rank():
    return int(os.environ.get("RANK", "0"))


if _RANK_FAULT:
    _r, _spec = _RANK_FAULT.split("=", 1)
    if os.environ.get("RANK", "0") == _r:
        os.environ["MEGACPT_FAULT"] = _spec


def _die():
    import signal

    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_checkpoint(mod):
    import errno
    import io

    import torch

    point = step = None
    rank = 0
    if _CRASH:
        parts = _CRASH.split(":")
        point, step = parts[0], int(parts[1])
        rank = int(parts[2]) if len(parts) > 2 else 0
    real_save = torch.save

    def save(obj, f, *a, **kw):
        path = str(f)
        if point == "ds_partial" and f".tmp-{mod.tag_for(step)}" in path and _rank() == rank:
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            data = buf.getvalue()
            with open(path, "wb") as fh:  # the process dies half-way through a DeepSpeed file
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _die()
        if _ENOSPC:
            s, r, *which = _ENOSPC.split(":")
            if f".tmp-{mod.tag_for(int(s))}" in path and _rank() == int(r) and (not which or which[0] in path):
                raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(obj, f, *a, **kw)

    torch.save = save
    if point is None:
        return
    tag = mod.tag_for(step)
    real_json, real_text, real_prune = mod.write_json_atomic, mod.write_text_atomic, mod._prune

    def write_json_atomic(path, obj):
        if point == "meta" and path.name == mod.STATE_FILE and f".tmp-{tag}" in str(path):
            _die()  # hf_config.json written, megacpt_state.json not yet
        return real_json(path, obj)

    def write_text_atomic(path, text):
        if path.name == mod.LATEST and text.strip() == tag:
            if point == "renamed":
                _die()  # the step dir renamed into place, `latest` not yet updated
            if point == "latest_tmp":
                path.with_name(f".{path.name}.tmp-{os.getpid()}").write_text(text)
                _die()  # the new `latest` written under its temporary name only
        return real_text(path, text)

    def _prune(root, keep):
        if point == "prune" and (root / mod.LATEST).read_text().strip() == tag:
            _die()  # `latest` updated, older checkpoints not yet pruned
        return real_prune(root, keep)

    mod.write_json_atomic, mod.write_text_atomic, mod._prune = write_json_atomic, write_text_atomic, _prune

    class _Os:
        """megacpt.train.checkpoint's view of `os`: dies just before the step dir is renamed."""

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst, *a, **kw):
            if point == "rename" and str(src).endswith(f".tmp-{tag}"):
                _die()  # both metadata files written, the directory not yet renamed
            return os.replace(src, dst, *a, **kw)

    mod.os = _Os()


def _patch_async(mod):
    import errno

    from megacpt.train.checkpoint import tag_for

    point = step = None
    rank = 0
    if _CRASH:
        parts = _CRASH.split(":")
        point, step = parts[0], int(parts[1])
        rank = int(parts[2]) if len(parts) > 2 else 0
    real_write, real_snapshot = mod.write_file, mod._Snapshot._write

    def write_file(path, parts):
        if point == "write_partial" and f".tmp-{tag_for(step)}" in str(path) and _rank() == rank and parts:
            data = b"".join(parts)
            with open(path, "wb") as fh:  # the writer thread dies half-way through a file
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _die()
        if _ENOSPC:
            s, r, *which = _ENOSPC.split(":")
            if f".tmp-{tag_for(int(s))}" in str(path) and _rank() == int(r) and (not which or which[0] in str(path)):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, parts)

    def _write(self, state_dict, path):
        if point == "snapshot" and f".tmp-{tag_for(step)}" in str(path) and _rank() == rank:
            _die()  # while the save call serialises the files into memory
        return real_snapshot(self, state_dict, path)

    mod.write_file, mod._Snapshot._write = write_file, _write


def _patch_step(mod):
    import time

    real, delay = mod.train_step, float(_DELAY)

    def train_step(*a, **kw):
        time.sleep(delay)
        return real(*a, **kw)

    mod.train_step = train_step


def _patch_loop(mod):
    """Log every torch.distributed collective called directly from a megacpt/train/ file (not
    DeepSpeed's, not the model's tensor-parallel layers'), with the loop's step (one_step calls so
    far) and the megacpt/train functions on the stack (to tell a step's from a save's)."""
    import json

    import torch.distributed as dist

    step = [0]
    log = open(os.path.join(_COLLECTIVES, f"rank{_rank()}.jsonl"), "a")

    def wrap(name, real):
        def collective(*a, **kw):
            frame = sys._getframe(1)
            if "/megacpt/train/" in frame.f_code.co_filename:
                stack = []
                while frame is not None:
                    if "/megacpt/train/" in frame.f_code.co_filename:
                        stack.append(frame.f_code.co_name)
                    frame = frame.f_back
                log.write(json.dumps({"step": step[0], "op": name, "stack": stack}) + "\n")
                log.flush()
            return real(*a, **kw)
        return collective

    for name in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
                 "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "gather", "reduce",
                 "reduce_scatter_tensor", "scatter"):
        setattr(dist, name, wrap(name, getattr(dist, name)))
    real_step = mod.one_step

    def one_step(*a, **kw):
        step[0] += 1
        return real_step(*a, **kw)

    mod.one_step = one_step


_TARGETS = {}
if _COLLECTIVES:
    _TARGETS["megacpt.train.loop"] = _patch_loop
if _CRASH or _ENOSPC:
    _TARGETS["megacpt.train.checkpoint"] = _patch_checkpoint
    _TARGETS["megacpt.train.async_save"] = _patch_async
if _DELAY:
    _TARGETS["megacpt.train.step"] = _patch_step

if _TARGETS:
    import importlib.abc
    import importlib.util

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in _TARGETS:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            real_exec, patch = spec.loader.exec_module, _TARGETS[name]

            def exec_module(module):
                real_exec(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())

if os.environ.get("MEGACPT_TEST_STACKS"):  # kill -USR2 <rank pid> prints every thread's stack
    import faulthandler
    import signal as _signal

    faulthandler.register(_signal.SIGUSR2, all_threads=True)
'''


# ---------------------------------------------------------------------------------------------
# Launch helpers


class Launch:
    """`python -m megacpt.train` (1 rank) or the deepspeed launcher (n ranks), in its own session."""

    def __init__(self, nproc: int, cfg: Path, log: Path, env: dict, sets=()):
        args = [str(cfg)] + [x for s in sets for x in ("--set", s)]
        if nproc == 1:
            cmd = [sys.executable, "-m", "megacpt.train", *args]
        else:
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                   str(free_port()), "--module", "megacpt.train", *args]
        self.nproc, self.log = nproc, log
        self._fh = open(log, "w")
        self.p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def wait(self, timeout=240) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launch did not finish in {timeout}s:\n{self.output()[-4000:]}") from None
        finally:
            self._fh.close()

    def kill(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)  # the session this launch started
        except ProcessLookupError:
            pass
        self.p.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rank_process(self, rank: int):
        import psutil

        if self.nproc == 1:
            return psutil.Process(self.p.pid)
        deadline = time.time() + 120
        while time.time() < deadline:
            for c in psutil.Process(self.p.pid).children(recursive=True):
                try:
                    if f"--local_rank={rank}" in c.cmdline() and "megacpt.train" in c.cmdline():
                        return c
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"rank {rank} process not found")


def train_records(run_dir, start: int = 0) -> list[dict]:
    """Training lines of metrics.jsonl from line `start` on (a line being written is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines()[start:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "samples_fingerprint" in rec:
            out.append(rec)
    return out


def events(run_dir, kind: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == kind]


def n_lines(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_step(launch: Launch, run_dir, step: int, start_line: int, timeout=180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = train_records(run_dir, start_line)
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if launch.p.poll() is not None:
            raise AssertionError(f"run exited ({launch.p.returncode}) before step {step}:\n{launch.output()[-3000:]}")
        time.sleep(0.05)
    launch.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s:\n{launch.output()[-3000:]}")


def killed_between_saves(run_dir, start_line: int, seen: int) -> int:
    """After a kill between saves: the step `latest` must name. The kill came while the run slept
    before the step after `seen`, but a slow poll may let one more step (and its save) through,
    so the newest even step logged by the killed launch, if that save completed, is accepted too."""
    last = max([r["step"] for r in train_records(run_dir, start_line)] + [seen])
    tag_now = latest_tag(run_dir)
    step = int(tag_now.split("_")[1]) if tag_now else 0
    # (a step logged is saved right after, so the save of an even `seen` may have been cut short)
    assert (seen - 1) - (seen - 1) % 2 <= step <= last - last % 2, (seen, last, tag_now)
    return step


def ckpt_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir) -> str | None:
    p = ckpt_root(run_dir) / "latest"
    return p.read_text().strip() if p.exists() else None


def tag(step: int) -> str:
    return f"step_{step:08d}"


def check_loadable(ckpt_dir: Path) -> dict:
    """What a resume or an export reads: metadata, every .pt through the safe loader, the weights."""
    from megacpt.train import checkpoint as ckpt
    from megacpt.train.consolidate import checkpoint_weights
    from megacpt.safe_load import check_torch_file

    assert ckpt.is_checkpoint(ckpt_dir), ckpt_dir
    state = ckpt.read_state(ckpt_dir)
    assert state["step"] == int(ckpt_dir.name.split("_")[1])
    json.loads((ckpt_dir / ckpt.HF_CONFIG_FILE).read_text())
    for f in ckpt_dir.rglob("*.pt"):
        check_torch_file(f)
    w = checkpoint_weights(ckpt_dir)
    return {k: w.get(k).clone() for k in w.keys()}


def assert_weights(a: dict, b: dict, exact: bool):
    assert set(a) == set(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def assert_same_history(run_dir, ref: dict, exact: bool):
    """Every training step logged by every launch of the run (re-done steps included) consumed the
    uninterrupted run's samples and, in the same layout, computed its loss bit for bit."""
    recs = train_records(run_dir)
    assert sorted({r["step"] for r in recs}) == list(range(1, STEPS + 1))
    for r in recs:
        s = r["step"]
        assert r["samples_fingerprint"] == ref[s]["samples_fingerprint"], f"step {s}: other samples"
        if exact:
            assert r["loss"] == ref[s]["loss"], f"step {s}: loss {r['loss']} != {ref[s]['loss']}"
        else:
            assert r["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5, abs=1e-6), s


# ---------------------------------------------------------------------------------------------
# Shared set-up: a tiny model, data, the hook and one uninterrupted reference run


class World:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.model = tiny_hf_model(tmp / "model")
        self.hook = tmp / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(HOOK)
        self.ref_dir = tmp / "ref"
        r = self.launch(1, self.config("ref", **{"checkpoint.keep": 100}), "ref")
        assert r.wait() == 0, r.output()[-3000:]
        self.ref = {rec["step"]: rec for rec in train_records(self.ref_dir)}
        assert sorted(self.ref) == list(range(1, STEPS + 1))
        assert len({r["samples_fingerprint"] for r in self.ref.values()}) == STEPS
        self._ref_weights = {}

    def config(self, name, zero=0, run_dir=None, **over) -> Path:
        over = {"checkpoint.interval": 2, "checkpoint.keep": 2, **over}
        cfg = tiny_run_config(self.tmp, self.model, run_dir or self.tmp / name, steps=STEPS, zero=zero, **over)
        return write_config(self.tmp / f"{name}.yaml", cfg)

    def env(self, **extra) -> dict:
        env = cpu_env()
        for k in [k for k in env if k.startswith(("MEGACPT_FAULT", "MEGACPT_TEST_"))]:
            del env[k]
        env.update({k: str(v) for k, v in extra.items()})
        env["PYTHONPATH"] = os.pathsep.join([str(self.hook), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def launch(self, nproc, cfg, label, sets=(), **env) -> Launch:
        log = self.tmp / f"{label}.{int(time.time() * 1000)}.log"
        return Launch(nproc, cfg, log, self.env(**env), sets)

    def ref_weights(self, step: int) -> dict:
        if step not in self._ref_weights:
            self._ref_weights[step] = check_loadable(ckpt_root(self.ref_dir) / tag(step))
        return self._ref_weights[step]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("faults"))


def crashed(launch: Launch, expect_kill=True) -> str:
    rc = launch.wait()
    out = launch.output()
    if expect_kill:
        assert rc == -signal.SIGKILL, f"rc={rc}\n{out[-3000:]}"
    else:
        assert rc != 0, out[-3000:]
    return out


# ---------------------------------------------------------------------------------------------
# (a), (b) one process, ZeRO-0: a crash at each point of a save, a kill between saves


def crash_while_publishing(relaunch, run, expect, prefix: str, last_file: str) -> None:
    """A save killed at each publishing stage, sync or async alike (launches PREFIX4..PREFIX7, each
    resuming from what the previous crash left): with its last file (`last_file`) written but the
    directory not yet renamed (step 8); renamed into place, `latest` still naming the one before
    (10); the new `latest` written under its temporary name (12); `latest` updated, older
    checkpoints not yet pruned (14). `expect(step, exists_too)` checks what is published."""
    root = ckpt_root(run)
    out = crashed(relaunch(f"{prefix}4", MEGACPT_TEST_CRASH="rename:8"))
    assert f"resuming from {root / tag(4)} at step 4" in out
    expect(6, exists_too=[f".tmp-{tag(8)}/{last_file}"])
    assert not (root / tag(8)).exists()

    out = crashed(relaunch(f"{prefix}5", MEGACPT_TEST_CRASH="renamed:10"))
    assert f"resuming from {root / tag(6)} at step 6" in out
    expect(8, exists_too=[tag(10) + "/megacpt_state.json"])

    out = crashed(relaunch(f"{prefix}6", MEGACPT_TEST_CRASH="latest_tmp:12"))
    assert f"resuming from {root / tag(8)} at step 8" in out  # not from the newer step_10
    expect(10, exists_too=[tag(12)])
    assert list(root.glob(".latest.tmp-*"))

    out = crashed(relaunch(f"{prefix}7", MEGACPT_TEST_CRASH="prune:14"))
    assert f"resuming from {root / tag(10)} at step 10" in out
    expect(14, exists_too=[tag(10), tag(12)])


def test_single_process_crash_at_every_point_of_a_save(world):
    """One run killed eight times, each relaunch resuming from what the previous crash left:
    inside DeepSpeed's file write, after the rank files (MEGACPT_FAULT), between the two metadata
    files, before the rename, after the rename but before `latest`, with `latest` half-replaced,
    before pruning, and between saves from outside (kill -9). Plus a planted temp dir and an
    incomplete step dir. Every step of every launch has the reference's samples and loss, every
    checkpoint left behind the reference's weights, bit for bit."""
    run = world.tmp / "chainA"
    cfg = world.config("chainA")
    root = ckpt_root(run)

    def relaunch(label, **env):
        return world.launch(1, cfg, label, **env)

    def expect_latest(step, exists_too=()):
        assert latest_tag(run) == (tag(step) if step else None), sorted(os.listdir(root))
        if step:
            assert_weights(check_loadable(root / tag(step)), world.ref_weights(step), exact=True)
        from megacpt.train import checkpoint as ckpt

        found = ckpt.resolve_checkpoint(run)
        assert (found.name if found else None) == (tag(step) if step else None)
        for name in exists_too:
            assert (root / name).exists(), (name, sorted(os.listdir(root)))

    # 1. dies half-way through DeepSpeed's model file of the first checkpoint: nothing to resume.
    crashed(relaunch("a1", MEGACPT_TEST_CRASH="ds_partial:2"))
    expect_latest(None, exists_too=[f".tmp-{tag(2)}"])
    from megacpt.errors import UserError
    from megacpt.safe_load import check_torch_file

    with pytest.raises(UserError, match="cannot read checkpoint file"):
        check_torch_file(root / f".tmp-{tag(2)}" / "mp_rank_00_model_states.pt")

    # 2. after its files are written, before anything is renamed (MEGACPT_FAULT=kill:save:...).
    out = crashed(relaunch("a2", MEGACPT_FAULT="kill:save:4:0"))
    assert "resuming" not in out  # the partial step 2 was not taken for a checkpoint
    expect_latest(2, exists_too=[f".tmp-{tag(4)}"])
    assert not (root / f".tmp-{tag(2)}").exists()  # cleaned at start
    assert not (root / f".tmp-{tag(4)}" / "megacpt_state.json").exists()

    # 3. hf_config.json written, megacpt_state.json not.
    out = crashed(relaunch("a3", MEGACPT_TEST_CRASH="meta:6"))
    assert f"resuming from {root / tag(2)} at step 2" in out
    expect_latest(4, exists_too=[f".tmp-{tag(6)}/hf_config.json"])

    # 4.-7. the publishing stages (steps 8 to 14), as for asynchronous saves.
    crash_while_publishing(relaunch, run, expect_latest, "a", last_file="megacpt_state.json")

    # 8. kill -9 from outside between two saves.
    start = n_lines(run)
    a8 = relaunch("a8", MEGACPT_TEST_STEP_DELAY=1.5)
    seen = wait_for_step(a8, run, 15, start)
    a8.rank_process(0).kill()
    out = crashed(a8)
    assert f"resuming from {root / tag(14)} at step 14" in out
    resume = killed_between_saves(run, start, seen)
    expect_latest(resume)

    # Planted: a temp dir of the step still to be saved and an incomplete later step.
    (root / f".tmp-{tag(STEPS)}").mkdir()
    (root / f".tmp-{tag(STEPS)}" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    (root / tag(99)).mkdir()
    (root / tag(99) / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    (root / tag(99) / "hf_config.json").write_text("{}")

    last = relaunch("a9")
    assert last.wait() == 0, last.output()[-3000:]
    assert f"resuming from {root / tag(resume)} at step {resume}" in last.output()
    expect_latest(STEPS, exists_too=[tag(99)])  # the incomplete dir is ignored, never pruned as one
    assert_same_history(run, world.ref, exact=True)
    assert_weights(check_loadable(root / tag(STEPS)), world.ref_weights(STEPS), exact=True)


# ---------------------------------------------------------------------------------------------
# checkpoint.async: a crash at every stage of an asynchronous save (one process, then two ranks)


def expect_published(world, run, step, exact, exists_too=()):
    """`latest` names step (None: nothing published), whose weights are the reference's."""
    root = ckpt_root(run)
    assert latest_tag(run) == (tag(step) if step else None), sorted(os.listdir(root))
    if step:
        assert_weights(check_loadable(root / tag(step)), world.ref_weights(step), exact=exact)
    for name in exists_too:
        assert (root / name).exists(), (name, sorted(os.listdir(root)))


def test_async_save_crash_at_every_stage(world):
    """checkpoint.async, one process killed at each stage of an async save, each relaunch resuming
    from what the previous crash left: while the save call snapshots the files, half-way through a
    file in the writer thread (training has gone on meanwhile), after the files but before the
    writer's marker (MEGACPT_FAULT), and in rank 0's publisher thread before the rename, after it
    but before `latest`, with `latest` half-replaced and before pruning. After each the last
    published checkpoint is `latest` and equals the reference's (saved synchronously) bit for bit;
    the finished run has the reference's samples, losses and final weights, bit for bit."""
    run = world.tmp / "chainAsync"
    cfg = world.config("chainAsync", **{"checkpoint.async": True})
    root = ckpt_root(run)

    def relaunch(label, **env):
        return world.launch(1, cfg, label, **env)

    def expect(step, exists_too=()):
        expect_published(world, run, step, True, exists_too)

    out = crashed(relaunch("s1", MEGACPT_TEST_CRASH="snapshot:2"))
    expect(None, exists_too=[f".tmp-{tag(2)}"])

    out = crashed(relaunch("s2", MEGACPT_TEST_CRASH="write_partial:4"))
    assert "resuming" not in out
    expect(2, exists_too=[f".tmp-{tag(4)}"])
    from megacpt.errors import UserError
    from megacpt.safe_load import check_torch_file

    with pytest.raises(UserError, match="cannot read checkpoint file"):
        check_torch_file(root / f".tmp-{tag(4)}" / "mp_rank_00_model_states.pt")

    out = crashed(relaunch("s3", MEGACPT_FAULT="kill:save:6:0"))
    assert f"resuming from {root / tag(2)} at step 2" in out
    expect(4, exists_too=[f".tmp-{tag(6)}/mp_rank_00_model_states.pt", f".tmp-{tag(6)}/rng/rank_00000.pt"])
    assert not list((root / f".tmp-{tag(6)}").glob(".tmp-written-*"))  # no marker: never published
    assert not (root / f".tmp-{tag(6)}" / "megacpt_state.json").exists()

    crash_while_publishing(relaunch, run, expect, "s", last_file="manifest.json")

    last = relaunch("s8")
    assert last.wait() == 0, last.output()[-3000:]
    assert f"resuming from {root / tag(14)} at step 14" in last.output()
    expect(STEPS)
    assert not list(root.glob(".tmp-*"))
    assert_same_history(run, world.ref, exact=True)


def test_async_two_ranks_killed_while_writing_and_a_failed_write(world):
    """checkpoint.async on 2 ranks (ZeRO-1: each writes its optimizer shard). Rank 1 killed after
    writing its files but before its marker: rank 0 never publishes that checkpoint and exits when
    its next collective fails. Rank 1's shard write failing (disk full) in the background: every rank
    fails at the next save, naming the step, and the previous checkpoint stays `latest`. A relaunch
    then ends with the uninterrupted run's samples, and up to float reassociation its losses and
    weights."""
    run = world.tmp / "chainAsync2"
    cfg = world.config("chainAsync2", zero=1, **{"checkpoint.async": True,
                                                 "train.collective_timeout_s": HANG_TIMEOUT_S})
    root = ckpt_root(run)

    out = crashed(world.launch(2, cfg, "c1", MEGACPT_FAULT="kill:save:4:1"), expect_kill=False)
    expect_published(world, run, 2, False, exists_too=[f".tmp-{tag(4)}"])
    assert not (root / tag(4)).exists()

    out = crashed(world.launch(2, cfg, "c2", MEGACPT_TEST_ENOSPC="6:1:optim_states"), expect_kill=False)
    assert f"resuming from {root / tag(2)} at step 2" in out
    assert "checkpoint at step 6 could not be written" in out, out[-4000:]
    assert "No space left on device" in out and "another rank failed to write its part" in out
    assert f"the previous checkpoint ({tag(4)}) is intact" in out
    expect_published(world, run, 4, False)
    assert not (root / f".tmp-{tag(6)}").exists() and not (root / tag(6)).exists()

    last = world.launch(2, cfg, "c3")
    assert last.wait() == 0, last.output()[-3000:]
    assert f"resuming from {root / tag(4)} at step 4" in last.output()
    expect_published(world, run, STEPS, False)
    assert_same_history(run, world.ref, exact=False)


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    from megacpt.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    (root / tag(4)).mkdir(parents=True)  # no megacpt_state.json: incomplete
    (root / "latest").write_text(tag(4) + "\n")
    with pytest.raises(RuntimeError, match="incomplete or missing"):
        ckpt.latest_checkpoint(root)
    (root / "latest").unlink()
    assert ckpt.latest_checkpoint(root) is None and ckpt.resolve_checkpoint(tmp_path) is None
    (root / f".tmp-{tag(6)}").mkdir()
    ckpt.clean_partial(root)
    assert not (root / f".tmp-{tag(6)}").exists() and (root / tag(4)).exists()


# ---------------------------------------------------------------------------------------------
# (d) non-finite losses (MEGACPT_FAULT=nan:PHASE:BATCH makes that data batch's loss NaN)

NAN_BATCH = 12  # the data batch of step 13, after the checkpoint at step 12


@pytest.fixture(scope="module")
def nan_run(world):
    """One process, train.nonfinite=rollback: data batch 12 diverges once; also spike_factor 1.0,
    so that ordinary noise above the running median is logged as loss_spike events."""
    run = world.tmp / "nan_rollback"
    r = world.launch(1, world.config("nan_rollback", **{"train.spike_factor": 1.0}), "nan",
                     MEGACPT_FAULT=f"nan:main:{NAN_BATCH}")
    assert r.wait() == 0, r.output()[-3000:]
    return run, r.output()


def test_nonfinite_rollback_skips_the_batch(world, nan_run):
    run, out = nan_run
    ev = events(run, "nonfinite")
    assert [e["step"] for e in ev] == [NAN_BATCH + 1] and ev[0]["loss"] != ev[0]["loss"]  # NaN
    assert f"rolled back to {tag(12)}, skipping that batch (1/3)" in out
    ref_fp = {s: r["samples_fingerprint"] for s, r in world.ref.items()}
    recs = train_records(run)
    final = {r["step"]: r for r in recs}
    assert sorted(final) == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] for r in recs)  # no NaN reached a training line
    # Before the bad batch: the reference, bit for bit. From it on: the reference's next batches;
    # the bad batch (the reference's step 13) is never trained on.
    for s in range(1, NAN_BATCH + 1):
        assert final[s]["samples_fingerprint"] == ref_fp[s] and final[s]["loss"] == world.ref[s]["loss"], s
    for s in range(NAN_BATCH + 1, STEPS):
        assert final[s]["samples_fingerprint"] == ref_fp[s + 1], s
    assert final[STEPS]["samples_fingerprint"] not in ref_fp.values()  # data batch 16, beyond the reference
    assert ref_fp[NAN_BATCH + 1] not in {r["samples_fingerprint"] for r in recs}
    assert final[NAN_BATCH + 1]["loss"] < 10
    from megacpt.train import checkpoint as ckpt

    state = ckpt.read_state(ckpt_root(run) / tag(STEPS))
    assert state["skipped_batches"] == {"main": [NAN_BATCH]}
    # the token counts include the skipped batch (it was read), one global batch more than the reference
    assert sum(v for k, v in final[STEPS].items() if k.startswith("tokens/")) > \
        sum(v for k, v in world.ref[STEPS].items() if k.startswith("tokens/"))


def test_loss_spike_events(world, nan_run):
    run, _ = nan_run
    spikes = events(run, "loss_spike")
    assert spikes, "spike_factor 1.0 logs every loss above the running median"
    for e in spikes:
        assert e["loss"] > 1.0 * e["median"] and e["step"] > 10
    assert not events(world.ref_dir, "loss_spike")  # the default factor 3 stays quiet on a smooth run


def test_async_rollback_rolls_back_to_the_save_in_flight(world, nan_run):
    """checkpoint.async: the checkpoint of step 12 is written in the background while step 13 runs
    and diverges; the rollback finishes that save first and rolls back to it, so the run equals the
    rollback run with synchronous saves bit for bit (every logged step, the final weights)."""
    run = world.tmp / "nan_async"
    r = world.launch(1, world.config("nan_async", **{"train.spike_factor": 1.0, "checkpoint.async": True}),
                     "nan_async", MEGACPT_FAULT=f"nan:main:{NAN_BATCH}")
    assert r.wait() == 0, r.output()[-3000:]
    assert f"rolled back to {tag(12)}, skipping that batch (1/3)" in r.output()
    nan_dir, _ = nan_run
    fields = ("step", "loss", "grad_norm", "samples_fingerprint")
    assert [[x[k] for k in fields] for x in train_records(run)] == \
        [[x[k] for k in fields] for x in train_records(nan_dir)]
    assert_weights(check_loadable(ckpt_root(run) / tag(STEPS)), check_loadable(ckpt_root(nan_dir) / tag(STEPS)),
                   exact=True)


@pytest.mark.parametrize("case", ["stop", "limit", "no_checkpoint"])
def test_nonfinite_failures(world, case):
    """train.nonfinite=stop, the rollback limit reached, and nothing to roll back to: exit 1, the
    message says why, the last checkpoint is intact and still latest."""
    name = f"nan_{case}"
    over = {"stop": {"train.nonfinite": "stop"}, "limit": {"train.max_rollbacks": 0}, "no_checkpoint": {}}[case]
    batch = 0 if case == "no_checkpoint" else 3
    r = world.launch(1, world.config(name, **over), name, MEGACPT_FAULT=f"nan:main:{batch}")
    rc, out = r.wait(), r.output()
    assert rc == 1, out[-3000:]
    why = {"stop": "train.nonfinite is stop", "limit": "0 rollbacks already",
           "no_checkpoint": "no checkpoint to roll back to"}[case]
    assert f"non-finite loss/gradient at step {batch + 1} ({why})" in out, out[-3000:]
    run = world.tmp / name
    assert [e["step"] for e in events(run, "nonfinite")] == [batch + 1]
    if case == "no_checkpoint":
        assert latest_tag(run) is None and "last good checkpoint: none" in out
    else:
        assert latest_tag(run) == tag(2) and f"last good checkpoint: {ckpt_root(run) / tag(2)}" in out
        assert_weights(check_loadable(ckpt_root(run) / tag(2)), world.ref_weights(2), exact=True)


def step_collectives(counts: Path, rank: int) -> dict[int, list[str]]:
    """megacpt.train's own collectives per loop step (MEGACPT_TEST_COLLECTIVES), leaving out the
    start-up, evaluations and checkpoints (after_step), rollbacks and the teardown."""
    per_step: dict[int, list[str]] = {}
    for line in (counts / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] >= 1 and not {"after_step", "roll_back", "finish"} & set(rec["stack"]):
            per_step.setdefault(rec["step"], []).append(f"{rec['op']} in {rec['stack'][0]}")
    return per_step


@pytest.mark.parametrize("zero,nproc", [(1, 2), (2, 1), (3, 1)])
def test_bf16_nan_gradient_under_zero_rolls_back_with_one_collective_per_step(world, zero, nproc):
    """bf16 under ZeRO-1 (2 ranks), ZeRO-2 and ZeRO-3 (one rank each: a 2-rank launch costs ~40 s
    more here, and the optimizers' sentinel paths do not depend on it), with DeepSpeed's separate
    overflow scan off (engine.bf16_config): data batch 2's gradients become NaN while its loss
    stays finite (MEGACPT_FAULT=nangrad), so only the global norm shows it — as inf or DeepSpeed's
    -1 sentinel. The run rolls back to step 2 and skips the batch, as an fp32 run does. With
    log_interval 3, each loop step makes exactly one collective of megacpt's own."""
    from megacpt.train import checkpoint as ckpt

    name = f"bf16_zero{zero}"
    counts = world.tmp / f"{name}_collectives"
    counts.mkdir()
    cfg = world.config(name, zero=zero, precision="bf16",
                       **{"train.steps": 4, "train.log_interval": 3, "data.valid": []})
    r = world.launch(nproc, cfg, name, MEGACPT_FAULT="nangrad:main:2", MEGACPT_TEST_COLLECTIVES=counts)
    assert r.wait() == 0, r.output()[-3000:]
    run = world.tmp / name
    (ev,) = events(run, "nonfinite")
    assert ev["step"] == 3 and ev["loss"] < 10, ev  # the loss finite: the norm caught it
    assert ev["grad_norm"] is None or ev["grad_norm"] < 0, ev  # inf (logged as null) or -1
    assert f"rolled back to {tag(2)}, skipping that batch (1/3)" in r.output()
    state = ckpt.read_state(ckpt_root(run) / tag(4))
    assert state["skipped_batches"] == {"main": [2]}
    recs = train_records(run)
    assert [x["step"] for x in recs] == [3, 4] and all(x["loss"] < 10 for x in recs)
    assert all(torch.isfinite(w).all() for w in check_loadable(ckpt_root(run) / tag(4)).values())
    for rank in range(nproc):
        per_step = step_collectives(counts, rank)
        # steps 1, 2, 3 (NaN, rolled back), 3 and 4 again
        assert sorted(per_step) == [1, 2, 3, 4, 5], per_step
        assert all(len(v) == 1 for v in per_step.values()), per_step


# ---------------------------------------------------------------------------------------------
# (c) a real full disk: the run dir on a small tmpfs (root only)


def test_disk_full_on_tmpfs(world):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    from megacpt.train import checkpoint as ckpt

    ckpt_bytes = sum(f.stat().st_size for f in (ckpt_root(world.ref_dir) / tag(2)).rglob("*") if f.is_file())
    mnt = world.tmp / "small"
    mnt.mkdir()
    size_kb = int(1.5 * ckpt_bytes / 1024) + 96  # one checkpoint and the logs fit, a second does not
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        run = mnt / "run"
        cfg = world.config("disk_full", run_dir=run)
        first = world.launch(1, cfg, "full")
        rc, out = first.wait(), first.output()
        assert rc == 1, out[-3000:]
        assert "checkpoint at step 4 could not be written" in out, out[-3000:]
        assert f"the previous checkpoint ({tag(2)}) is intact" in out
        assert latest_tag(run) == tag(2)
        assert_weights(check_loadable(ckpt.latest_checkpoint(ckpt_root(run))), world.ref_weights(2), exact=True)
        # with space again, a plain rerun resumes and ends where the uninterrupted run did
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        second = world.launch(1, cfg, "full2")
        assert second.wait() == 0, second.output()[-3000:]
        assert f"resuming from {ckpt_root(run) / tag(2)} at step 2" in second.output()
        assert_same_history(run, world.ref, exact=True)
        assert_weights(check_loadable(ckpt_root(run) / tag(STEPS)), world.ref_weights(STEPS), exact=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# (a), (c), (d), (e) two ranks, ZeRO-1 (each rank writes its own optimizer shard)


def test_two_ranks_write_error_kills_hang_and_one_sided_nan(world, nan_run):
    """One 2-rank run taken through: a write error on rank 1 only (inside DeepSpeed's save), rank 1
    killed inside a save, rank 1 killed between saves, rank 1 frozen (SIGSTOP) until rank 0's
    collective times out, and finally a NaN on rank 1 only (both ranks must roll back alike).
    It ends with the samples, and up to float reassociation the losses and weights, of the
    one-process run with the same NaN batch."""
    import psutil

    run = world.tmp / "chainB"
    cfg = world.config("chainB", zero=1, **{"train.collective_timeout_s": HANG_TIMEOUT_S})
    root = ckpt_root(run)

    def expect_latest(step):
        assert latest_tag(run) == tag(step), sorted(os.listdir(root))
        assert_weights(check_loadable(root / tag(step)), world.ref_weights(step), exact=False)

    # 1. rank 1 cannot write its optimizer shard (disk full): every rank fails, step_2 stays latest.
    b1 = world.launch(2, cfg, "b1", MEGACPT_TEST_ENOSPC="4:1:optim_states")
    out = crashed(b1, expect_kill=False)
    assert "checkpoint at step 4 could not be written" in out, out[-4000:]
    assert "No space left on device" in out and "another rank failed to write its part" in out
    assert f"the previous checkpoint ({tag(2)}) is intact" in out
    expect_latest(2)

    # 2. rank 1 SIGKILLed after writing its files, before rank 0 renames anything.
    b2 = world.launch(2, cfg, "b2", MEGACPT_FAULT="kill:save:6:1")
    out = crashed(b2, expect_kill=False)
    assert f"resuming from {root / tag(2)} at step 2" in out
    expect_latest(4)

    # 3. rank 1 SIGKILLed from outside between saves.
    start = n_lines(run)
    b3 = world.launch(2, cfg, "b3", MEGACPT_TEST_STEP_DELAY=1.5)
    seen = wait_for_step(b3, run, 5, start)
    b3.rank_process(1).kill()
    out = crashed(b3, expect_kill=False)
    assert f"resuming from {root / tag(4)} at step 4" in out
    assert "rank 0: collective failed at step" in out and "another rank stopped participating or died" in out
    resume = killed_between_saves(run, start, seen)
    expect_latest(resume)

    # 4. rank 1 stops participating (SIGSTOP): rank 0 gives up after the collective timeout.
    start = n_lines(run)
    b4 = world.launch(2, cfg, "b4", MEGACPT_TEST_STEP_DELAY=1.0, MEGACPT_TEST_STACKS=1)
    seen = wait_for_step(b4, run, resume + 1, start)
    r0, r1 = b4.rank_process(0), b4.rank_process(1)
    r1.suspend()
    t0 = time.time()
    try:
        try:
            r0.wait(HANG_TIMEOUT_S + 45)
        except psutil.TimeoutExpired:
            r0.send_signal(signal.SIGUSR2)  # its stack, for the failure message
            time.sleep(1)
            raise AssertionError(f"rank 0 still waiting {time.time() - t0:.0f}s after rank 1 stopped "
                                 f"(train.collective_timeout_s={HANG_TIMEOUT_S}):\n{b4.output()[-5000:]}")
        waited = time.time() - t0
    finally:
        r1.resume()
    out = crashed(b4, expect_kill=False)
    assert waited < HANG_TIMEOUT_S + 30, waited
    assert f"rank 0: collective failed at step {seen + 1} during " in out, out[-4000:]
    assert "another rank stopped participating or died" in out
    assert f"resuming from {root / tag(resume)} at step {resume}" in out
    resume = killed_between_saves(run, start, seen)
    expect_latest(resume)

    # 5. the rest, with data batch 12 diverging on rank 1 only.
    counts = world.tmp / "b5_collectives"
    counts.mkdir()
    b5 = world.launch(2, cfg, "b5", MEGACPT_TEST_RANK_FAULT=f"1=nan:main:{NAN_BATCH}", MEGACPT_TEST_COLLECTIVES=counts)
    assert b5.wait() == 0, b5.output()[-3000:]
    for rank in (0, 1):  # the rank that saw the NaN alone decides alike with one collective per step
        assert all(len(v) == 1 for v in step_collectives(counts, rank).values())
    assert f"resuming from {root / tag(resume)} at step {resume}" in b5.output()
    assert f"rolled back to {tag(12)}" in b5.output()
    assert [e["step"] for e in events(run, "nonfinite")] == [NAN_BATCH + 1]
    nan_dir, _ = nan_run
    like = {r["step"]: r for r in train_records(nan_dir)}
    assert_same_history(run, like, exact=False)
    assert_weights(check_loadable(root / tag(STEPS)), check_loadable(ckpt_root(nan_dir) / tag(STEPS)), exact=False)
