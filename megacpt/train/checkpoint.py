"""Atomic, self-describing checkpoints around DeepSpeed's own per-rank files.

Layout of RUN/checkpoints:
    step_00000030/            DeepSpeed files (model/optimizer shards of every rank)
        megacpt_state.json    step, phase, consumed samples, tokens per source, the run's config
        hf_config.json        the model's HF config (what `export` writes)
        rng/rank_00000.pt     per-rank RNG states (tensors only: loads with weights_only=True)
        manifest.json         every file above: size and BLAKE2b checksum (manifest.py)
        universal/            DeepSpeed's universal checkpoint, when a resume needed one (own manifest)
    latest                    name of the newest complete checkpoint
Every rank writes into `.tmp-step_…`; after a barrier rank 0 writes the metadata and the manifest,
renames the directory and only then replaces `latest` (write-to-temp + os.replace). A crash at any point
leaves the previous checkpoint complete and still named by `latest`; stray temp dirs are
removed at the next start. `checkpoint.async` (async_save.py) takes the same steps, through the
same functions, from a snapshot in host memory while training goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint import ds_to_universal

from megacpt.safe_load import check_torch_file
from megacpt.train import manifest
from megacpt.train.manifest import STATE_FILE, UNIVERSAL

HF_CONFIG_FILE = "hf_config.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def latest_checkpoint(ckpt_root) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = Path(ckpt_root)
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    path = root / tag
    if not (path / STATE_FILE).is_file():
        raise RuntimeError(f"{latest} names {tag}, which is incomplete or missing; the checkpoint dir was edited by hand")
    return path


def newest_intact(ckpt_root) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume (or roll back) from: the one `latest` names when its files match its
    manifest, else the newest older one that does, and the lines that say why. A checkpoint without
    a manifest (older runs) is used with a warning; when none is intact, CheckpointDamaged names the file."""
    latest = latest_checkpoint(ckpt_root)
    if latest is None:
        return None, []
    older = sorted((p for p in Path(ckpt_root).glob("step_*") if is_checkpoint(p) and p.name < latest.name),
                   reverse=True)
    damaged = []
    for cand in [latest, *older]:
        v = manifest.check(cand)
        if v.problem is None:
            break
        damaged.append(v)
    else:
        raise manifest.CheckpointDamaged(
            f"checkpoint {latest} is damaged: {damaged[0].problem}, and no older checkpoint in {ckpt_root} is "
            f"intact ({', '.join(d.path.name for d in damaged)} checked); restore the files or start a new run_dir")
    notes = []
    if damaged:
        also = f" (as are {', '.join(d.path.name for d in damaged[1:])})" if len(damaged) > 1 else ""
        notes.append(f"warning: checkpoint {latest.name} is damaged: {damaged[0].problem}{also}; resuming from "
                     f"{cand.name}, the newest intact checkpoint")
    if v.unverified:
        notes.append(f"warning: {manifest.unverified_note(cand)}")
    return cand, notes


def read_state(ckpt_dir) -> dict:
    with open(Path(ckpt_dir) / STATE_FILE) as f:
        return json.load(f)


def is_checkpoint(path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def resolve_checkpoint(path) -> Path | None:
    """A checkpoint dir, a run's checkpoints dir or a run dir → the checkpoint to read."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    for root in (p / "checkpoints", p):
        if (root / LATEST).is_file():
            return latest_checkpoint(root)
    return None


def clean_partial(ckpt_root) -> None:
    root = Path(ckpt_root)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save(engine, ckpt_root, step: int, state: dict, hf_config: dict, keep: int, rank: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path.

    Ranks agree (all-reduce) on whether their part was written before anything is renamed, so
    a write error on one rank (disk full, quota) fails every rank the same way and leaves the
    previous checkpoint named by `latest`. (checkpoint.async: async_save.py, the same steps.)
    """
    root, tag = Path(ckpt_root), tag_for(step)
    tmp = begin(root, tag, rank)
    error = None
    # DeepSpeed's save ends in a barrier: a rank whose file write raised would skip it and meet
    # the others' barrier with the all-reduce below (a hang until the collective timeout). Its
    # writes therefore go through a wrapper that records the first error and lets it carry on.
    writes = _RecordingWrites(engine.checkpoint_engine)
    engine.checkpoint_engine = writes
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng_dir / f"rank_{rank:05d}.pt")
    except _WRITE_ERRORS as e:
        error = e
    finally:
        engine.checkpoint_engine = writes.inner
    error = writes.error or error
    _fault_point("save", step, rank)
    dist.barrier()  # every rank's files (DeepSpeed's and its RNG state) are written: the manifest sees them all
    if rank == 0 and error is None:
        error = finish_files(tmp, hf_config, state)
    if not all_succeeded(error):
        raise failed(error, root, step, rank)
    if rank == 0:
        publish(root, tag, keep)
    dist.barrier()
    return root / tag


def begin(root: Path, tag: str, rank: int) -> Path:
    """Collective: the empty temporary directory the checkpoint `tag` is written into."""
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    return tmp


def finish_files(tmp: Path, hf_config: dict, state: dict) -> BaseException | None:
    """Rank 0, once every rank's files are in tmp: the metadata, then the manifest over all of it.
    Returns the write error, if any."""
    try:
        write_json_atomic(tmp / HF_CONFIG_FILE, hf_config)
        write_json_atomic(tmp / STATE_FILE, state)
        manifest.write(tmp)  # last: it covers every file above
        _fsync_dir(tmp)
    except _WRITE_ERRORS as e:
        return e
    return None


def all_succeeded(error: BaseException | None) -> bool:
    """Collective: True when no rank had an error."""
    ok = torch.tensor([0 if error else 1])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(int(ok))


def failed(error: BaseException | None, root: Path, step: int, rank: int) -> CheckpointError:
    """Collective, after all_succeeded said no: the temporary directory removed, and the error
    every rank raises (naming this rank's own problem, or another rank's)."""
    if rank == 0:
        shutil.rmtree(root / f".tmp-{tag_for(step)}", ignore_errors=True)
    dist.barrier()
    prev = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else "none"
    return CheckpointError(f"checkpoint at step {step} could not be written "
                           f"({_describe(error, root) if error else 'another rank failed to write its part'}); "
                           f"the previous checkpoint ({prev}) is intact — free disk space and rerun to resume")


def publish(root: Path, tag: str, keep: int) -> None:
    """Rank 0, once the temporary directory is complete: rename it into place, then point
    `latest` at it, then prune."""
    final = root / tag
    if final.exists():  # re-saving a step (e.g. a resumed run that stops at once)
        shutil.rmtree(final)
    os.replace(root / f".tmp-{tag}", final)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, tag + "\n")
    _prune(root, keep)


class CheckpointError(RuntimeError):
    pass


# torch.save reports a full disk as RuntimeError ("file write failed", "unexpected pos ...").
_WRITE_ERRORS = (OSError, RuntimeError)


class _RecordingWrites:
    """DeepSpeed checkpoint engine proxy: the first failed file write is recorded, later ones skipped."""

    def __init__(self, inner):
        self.inner, self.error = inner, None

    def save(self, state_dict, path):
        if self.error is None:
            try:
                self._write(state_dict, path)
            except _WRITE_ERRORS as e:
                self.error = e

    def _write(self, state_dict, path):
        self.inner.save(state_dict, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _describe(error: BaseException, root: Path) -> str:
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else type(error).__name__
    try:
        free = shutil.disk_usage(root).free
        return f"{first}; {free / 2**20:.1f} MiB free on {root}"
    except OSError:
        return first


def _fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for the reliability tests: MEGACPT_FAULT=kill:save:STEP:RANK kills this
    process with SIGKILL after its checkpoint files are written but before anything is renamed."""
    spec = os.environ.get("MEGACPT_FAULT")
    if spec and spec == f"kill:{where}:{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _prune(root: Path, keep: int) -> None:
    # Checkpoints newer than `latest` are left from before a resume that fell back past a damaged
    # one (newest_intact): they neither count towards `keep` nor push out the checkpoint just written.
    latest = (root / LATEST).read_text().strip()
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file() and p.name <= latest)
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    # Python/numpy states as tensors so the file stays loadable with weights_only=True.
    py = random.getstate()
    state["python"] = torch.tensor(list(py[1]), dtype=torch.int64)
    state["python_gauss"] = torch.tensor(float("nan") if py[2] is None else py[2], dtype=torch.float64)
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = torch.tensor(np_state[2])
    return state


def restore_rng(ckpt_dir, rank: int) -> None:
    path = Path(ckpt_dir) / "rng" / f"rank_{rank:05d}.pt"
    if not path.is_file():  # resuming on more ranks than saved: keep the fresh seeds
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    gauss = float(state["python_gauss"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None if gauss != gauss else gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))


def make_universal(ckpt_dir) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (world-size independent), once."""
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / UNIVERSAL
    if (out / "zero").is_dir():
        if manifest.check(out).problem is None:
            return out
        shutil.rmtree(out)  # damaged since: convert again from the checkpoint (verified by the resume)
    for f in ckpt_dir.glob("*.pt"):
        check_torch_file(f)
    tmp = ckpt_dir / f".{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)
    manifest.write(tmp)
    os.replace(tmp, out)
    return out
